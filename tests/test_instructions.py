"""The train instruction's model: read back from the server's own record without decoding, and
decoded whenever the record is not that one, unchanged."""

import torch
from flwr.app import ConfigRecord, Message, RecordDict
from flwr.supercore.task_identity import TaskIdentity

from fedmaml.federated import records as R
from fedmaml.federated.instructions import train_instruction
from fedmaml.federated.setup import setup_for


def instruction(record, server_round: int = 3) -> Message:
    TaskIdentity.task_id, TaskIdentity.run_id, TaskIdentity.node_id = 1, 1, 1  # as an engine does
    content = RecordDict({R.ARRAYS: record,
                          R.CONFIG: ConfigRecord({R.ROUND: server_round, R.ETA: 0.5})})
    return Message(content, 7, "train")


def test_the_servers_record_is_read_back_as_a_copy_and_any_other_record_is_decoded(tiny_config):
    setup = setup_for(tiny_config())
    w = {k: torch.randn(v.shape, generator=torch.Generator().manual_seed(i))
         for i, (k, v) in enumerate(setup.initial_params.items())}
    record = R.kept_record(w)
    got, server_round, hp = train_instruction(instruction(record), setup, torch.device("cpu"))
    assert server_round == 3 and hp.eta == 0.5
    assert list(got) == list(w) and all(torch.equal(got[k], w[k]) for k in w)
    first = next(iter(w))
    before = w[first].clone()
    w[first].add_(1.0)  # the server's tensors change after the record was made: not the record's
    again, _, _ = train_instruction(instruction(record), setup, torch.device("cpu"))
    assert torch.equal(again[first], before)

    # the record changed in place (an array replaced by other values): decoded, the new values
    other = {k: v * 2 + 1 for k, v in w.items()}
    record[first] = R.to_record(other)[first]
    changed, _, _ = train_instruction(instruction(record), setup, torch.device("cpu"))
    assert torch.equal(changed[first], other[first])

    # an equal record that is another object: decoded, equal values
    copy = R.to_record(w)
    decoded, _, _ = train_instruction(instruction(copy), setup, torch.device("cpu"))
    assert all(torch.equal(decoded[k], w[k]) for k in w)

