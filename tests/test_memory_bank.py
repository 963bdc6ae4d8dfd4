"""The memory bank: stacked per-client memories by client id, lazy, in RAM or memory-mapped on disk,
checkpointable."""

import numpy as np
import pytest
import torch

from fedmaml.engines.memory_bank import BankStore, MemoryBank
from fedmaml.errors import DataError

LIKE = {"layer1.weight": torch.zeros(4, 3), "layer1.bias": torch.zeros(4)}
TASKS = 2
ROW_BYTES = (12 + 4) * 4 * TASKS


def memories(cids, salt=0.0):
    """Distinct, recognisable memories: every value encodes (client, task, salt)."""
    out = {}
    for k, v in LIKE.items():
        base = torch.tensor([[c * 10 + t + salt for t in range(TASKS)] for c in cids],
                            dtype=torch.float32)
        out[k] = base.reshape(len(cids), TASKS, *[1] * v.dim()).expand(len(cids), TASKS, *v.shape)
    return {k: v + torch.arange(v[0, 0].numel()).reshape(v.shape[2:]) * 1e-3 for k, v in out.items()}


def assert_rows(bank, cids, salt=0.0):
    got, want = bank.read(cids), memories(cids, salt)
    for k in LIKE:
        assert torch.equal(got[k], want[k]), k


def test_lazy_rows_read_write_and_growth():
    bank = MemoryBank(LIKE, num_clients=1_000_000, budget_mb=64)
    assert bank.num_stored == 0 and not bank.contains([0, 999_999]).any()
    first = [999_999, 3, 500_000]
    bank.write(first, memories(first))
    assert bank.num_stored == 3 and bank.nbytes == 3 * ROW_BYTES
    assert bank.contains([3, 4, 999_999]).tolist() == [True, False, True]
    # many more clients: the store grows (several doublings) and keeps the earlier rows
    more = list(range(10, 400))
    bank.write(more, memories(more))
    assert bank.num_stored == 393 and not bank.on_disk
    assert_rows(bank, first)
    assert_rows(bank, [399, 10, 3])
    # rewriting existing clients (mixed with a new one) updates in place, takes one new row
    mixed = [10, 7, 3]
    bank.write(mixed, memories(mixed, salt=0.5))
    assert bank.num_stored == 394
    assert_rows(bank, mixed, salt=0.5)
    assert_rows(bank, [11, 999_999])
    assert bank.client_ids().tolist()[:4] == [999_999, 3, 500_000, 10]
    # reads are copies: changing them does not change the bank
    got = bank.read([3])
    got["layer1.bias"] += 100
    assert_rows(bank, [3], salt=0.5)


def test_over_budget_moves_to_memory_mapped_files(tmp_path):
    budget_mb = 200 * ROW_BYTES / 2 ** 20  # room for 200 clients in RAM
    bank = MemoryBank(LIKE, num_clients=10_000, budget_mb=budget_mb, directory=tmp_path / "bank")
    cids = list(range(0, 100))
    bank.write(cids, memories(cids))
    assert not bank.on_disk and bank.path is None
    more = list(range(5000, 5900))  # 1000 clients > budget: the store moves to disk and grows there
    bank.write(more, memories(more))
    assert bank.on_disk and bank.path == tmp_path / "bank"
    assert sorted(p.name for p in (tmp_path / "bank").iterdir()) == ["layer1.bias.bin",
                                                                     "layer1.weight.bin"]
    assert_rows(bank, [0, 99, 5000, 5899])
    bank.write([50, 6000], memories([50, 6000], salt=0.25))  # update + new row on disk
    assert_rows(bank, [50, 6000], salt=0.25)
    assert_rows(bank, [51, 5001])
    # the files hold the rows (memory-mapped, not a copy in RAM)
    on_file = np.memmap(tmp_path / "bank" / "layer1.bias.bin", dtype=np.float32, mode="r")
    row = int(np.nonzero(bank.client_ids() == 6000)[0][0])
    assert np.array_equal(on_file.reshape(-1, TASKS, 4)[row], memories([6000], 0.25)["layer1.bias"][0])


def test_temporary_directory_is_removed_on_close():
    bank = MemoryBank(LIKE, num_clients=1000, budget_mb=0)
    bank.write([1, 2], memories([1, 2]))
    path = bank.path
    assert bank.on_disk and path.is_dir()
    assert_rows(bank, [2, 1])
    bank.close()
    assert not path.exists() and bank.num_stored == 0


@pytest.mark.parametrize("budget_mb", [64, 0])
def test_checkpoint_round_trip(tmp_path, budget_mb):
    bank = MemoryBank(LIKE, num_clients=500, budget_mb=budget_mb)
    cids = [7, 400, 3, 99]
    bank.write(cids, memories(cids))
    bank.save(tmp_path / "bank.pt")
    bank.write([7, 8], memories([7, 8], salt=0.5))  # changes after the checkpoint are undone
    bank.restore(tmp_path / "bank.pt")
    assert bank.num_stored == 4 and not bank.contains([8])[0]
    assert_rows(bank, cids)
    other = MemoryBank(LIKE, num_clients=500, budget_mb=64 - budget_mb)  # RAM <-> disk
    other.restore(tmp_path / "bank.pt")
    assert_rows(other, cids)
    bank.close(), other.close()


def test_bad_checkpoints_are_reported_with_the_file(tmp_path):
    bank = MemoryBank(LIKE, num_clients=10)
    bank.write([1], memories([1]))
    bad = tmp_path / "truncated.pt"
    bank.save(bad)
    bad.write_bytes(bad.read_bytes()[:40])
    with pytest.raises(DataError, match="truncated.pt.*unreadable"):
        bank.restore(bad)
    other_model = MemoryBank({"w": torch.zeros(2)}, num_clients=10)
    other_model.write([0], {"w": torch.zeros(1, 1, 2)})
    other_model.save(tmp_path / "other.pt")
    with pytest.raises(DataError, match="other.pt has parameters \\['w'\\].*another model"):
        bank.restore(tmp_path / "other.pt")
    with pytest.raises(DataError, match="for 10 clients, this federation has 11"):
        MemoryBank(LIKE, num_clients=11).restore(tmp_path / "other.pt")
    assert_rows(bank, [1])  # failed restores left the bank alone


def test_misuse_is_rejected():
    bank = MemoryBank(LIKE, num_clients=10)
    with pytest.raises(KeyError, match="client\\(s\\) \\[4\\]"):
        bank.read([4])
    with pytest.raises(IndexError, match="\\[10\\] outside 0..9"):
        bank.write([10], memories([10]))
    with pytest.raises(ValueError, match="same client id twice"):
        bank.write([1, 1], memories([1, 1]))
    with pytest.raises(ValueError, match="layer1.bias.*expected \\[1, tasks, 4\\]"):
        bank.write([1], {**memories([1]), "layer1.bias": torch.zeros(1, TASKS, 5)})
    bank.write([1], memories([1]))
    with pytest.raises(ValueError, match="same number of tasks"):
        bank.write([2], {k: torch.cat([v, v], 1) for k, v in memories([2]).items()})


def test_bank_store_is_one_clients_view():
    bank = MemoryBank(LIKE, num_clients=10)
    store = BankStore(bank, 4)
    assert store.load() is None
    mem = {k: v[0] for k, v in memories([4]).items()}
    store.save(mem)
    loaded = store.load()
    assert all(torch.equal(loaded[k], mem[k]) for k in LIKE)
    assert bank.contains([4])[0] and not bank.contains([5])[0]
