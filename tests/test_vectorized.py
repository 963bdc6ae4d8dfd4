"""The vectorized engine against the in-process engine: the same sampled clients, the same memories
and the same metrics (to float tolerance) for every algorithm, several Lambda patterns (including
prefix caching), cross-device and cross-silo mode; cohorts that cannot be batched run client by
client in the same round; the engine is selectable from a config."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from fedmaml.engines.inprocess import run_inprocess
from fedmaml.engines.memory_bank import BankStore
from fedmaml.engines.vectorized import VectorizedGrid, run_vectorized
from fedmaml.cli import main
from fedmaml.config import dump_yaml, load_config
from fedmaml.federated.client_app import make_client_app
from fedmaml.federated.memory_store import ContextStateStore
from fedmaml.federated.server_app import make_server_app
from fedmaml.federated.setup import setup_for
from fedmaml.federated.strategy import MetaStrategy
from fedmaml.results.recorder import MODEL_FILE, read_metrics

TIMING = ("seconds", "train_seconds_max", "adapt-ms")  # wall-clock fields differ between runs
SILO = ("federated.mode=cross_silo", "data.num_clients=3", "data.tasks_per_client=3",
        "algorithm.tasks_per_step=2", "algorithm.local_steps=2")

CASES = {
    # MOML, cross-device: full adaptation (first order), prefix caching with a mixed pattern and a
    # separate memory pattern (second order), head-only with the Hessian-free estimator.
    "moml-full": ("algorithm.name=moml",),
    "moml-mixed-so": ("algorithm.name=moml", "model.hidden=[8,8]",
                      "algorithm.inner_pattern=111|011|001", "algorithm.memory_pattern=011x3",
                      "algorithm.meta_gradient=second_order"),
    "moml-head-hf": ("algorithm.name=moml", "algorithm.inner_pattern=01x2",
                     "algorithm.meta_gradient=hessian_free", "algorithm.hf_delta=0.01"),
    "moml-reinit": ("algorithm.name=moml", "algorithm.memory_policy=reinit",
                    "algorithm.local_steps=2"),
    # the MOML public code's protocol options: first memories from the initial model, which every
    # seed shares; evaluation on shared points
    "moml-public-protocol": ("algorithm.name=moml", "algorithm.memory_init=initial_model",
                             "model.init_seed=1234", "data.eval_points=shared"),
    "per_fedavg-hf-normalized": ("algorithm.name=per_fedavg", "algorithm.meta_gradient=hessian_free",
                                 "algorithm.hf_perturbation=normalized", "algorithm.hf_delta=0.01"),
    "per_fedavg-hf": ("algorithm.name=per_fedavg", "algorithm.meta_gradient=hessian_free",
                      "algorithm.hf_delta=0.01"),
    "fedmeta-so": ("algorithm.name=fedmeta", "algorithm.meta_gradient=second_order",
                   "algorithm.inner_pattern=11|01"),
    "reptile": ("algorithm.name=reptile", "algorithm.inner_pattern=11|01"),
    "fedavg": ("algorithm.name=fedavg",),
    # cross-silo: every silo every round, several tasks per silo, H local steps with B tasks each
    "silo-moml": ("algorithm.name=moml", *SILO),
    "silo-moml-decay": ("algorithm.name=moml", "algorithm.memory_policy=decay_to_w",
                        "algorithm.inner_pattern=01", *SILO),
    "silo-fedmeta": ("algorithm.name=fedmeta", "algorithm.inner_pattern=11|01", *SILO),
    "silo-reptile": ("algorithm.name=reptile", *SILO),
    "silo-fedavg": ("algorithm.name=fedavg", *SILO),
}


def run_engine(cfg, engine: str, run_dir: Path):
    """Run ``cfg`` on one engine; return (metrics rows, final model, memories by client, grid)."""
    setup = setup_for(cfg)
    nodes = setup.federation.num_clients + setup.federation.num_unseen
    server_app = make_server_app(cfg, run_dir, quiet=True)
    client_app = make_client_app(cfg)
    if engine == "inprocess":
        grid = run_inprocess(server_app, client_app, nodes)
        memories = {ctx.node_config["partition-id"]: ContextStateStore(ctx).load()
                    for ctx in grid.contexts.values()}
    else:
        grid = run_vectorized(server_app, client_app, nodes, cfg)
        memories = {int(c): BankStore(grid.bank, int(c)).load()
                    for c in (grid.bank.client_ids() if grid.bank is not None else [])}
    memories = {c: m for c, m in memories.items() if m is not None}
    model = torch.load(run_dir / MODEL_FILE, weights_only=True)
    return read_metrics(run_dir), model, memories, grid


def assert_close_values(a, b, where):
    if isinstance(a, dict):
        assert a.keys() == b.keys(), where
        for k in a:
            if k not in TIMING and not k.endswith(".adapt-ms.mean") and ".adapt-ms." not in k:
                assert_close_values(a[k], b[k], f"{where}.{k}")
    elif isinstance(a, list):
        assert len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b)):
            assert_close_values(x, y, f"{where}[{i}]")
    elif isinstance(a, float) and isinstance(b, float):
        assert math.isclose(a, b, rel_tol=1e-4, abs_tol=1e-5), f"{where}: {a} != {b}"
    else:
        assert a == b, f"{where}: {a!r} != {b!r}"


def assert_params_close(a, b, where):
    assert list(a) == list(b), where
    for k in a:
        assert torch.allclose(a[k], b[k], rtol=1e-4, atol=1e-5), f"{where}: {k}"


def assert_same_run(tiny_config, tmp_path, *overrides):
    cfg = tiny_config(*overrides)
    rows_i, model_i, mem_i, _ = run_engine(cfg, "inprocess", tmp_path / "inprocess")
    rows_v, model_v, mem_v, grid = run_engine(cfg, "vectorized", tmp_path / "vectorized")
    assert len(rows_i) == len(rows_v) == cfg.federated.rounds + 1
    for a, b in zip(rows_i, rows_v):
        assert a.get("clients") == b.get("clients")  # the same sampled clients
        assert_close_values(a, b, f"round {a['round']}")
    assert_params_close(model_i, model_v, "final model")
    assert mem_i.keys() == mem_v.keys()  # the same clients hold memories...
    for c in mem_i:  # ...and the same memories
        assert_params_close(mem_i[c], mem_v[c], f"memory of client {c}")
    grid.close()
    return cfg, grid, mem_v


@pytest.mark.parametrize("case", list(CASES))
def test_vectorized_equals_inprocess(tiny_config, tmp_path, case):
    cfg, grid, memories = assert_same_run(tiny_config, tmp_path, *CASES[case])
    setup = setup_for(cfg)
    rounds, per_round = cfg.federated.rounds, (cfg.federated.clients_per_round
                                               if cfg.federated.mode == "cross_device"
                                               else cfg.data.num_clients)
    # every client trained, in vmapped cohorts; only a cohort of one (say the single returning
    # client among fresh ones) takes the per-client path
    stats = grid.stats
    assert stats.fallbacks == 0 and stats.vmapped_clients + stats.per_client == rounds * per_round
    assert stats.vmapped_clients >= rounds * per_round / 2
    if not setup.algorithm.uses_memory or cfg.federated.mode == "cross_silo":
        assert stats.per_client == 0
    assert bool(memories) == setup.algorithm.uses_memory
    # its eval rows (equal to the in-process engine's per-client evaluations) came from one
    # evaluate message per evaluation round
    assert stats.eval_cohorts == sum(1 for r in range(rounds + 1)
                                     if MetaStrategy(setup).is_eval_round(r))


def test_unbatchable_cohorts_run_client_by_client_in_the_same_round(tiny_config, tmp_path):
    # 5 clients per round, cohorts of at most 2: 2 + 2 vmapped, the odd one out by itself; fresh
    # clients (memory initialisation) and returning ones also form separate cohorts.
    _, grid, _ = assert_same_run(tiny_config, tmp_path, "algorithm.name=moml",
                                 "federated.clients_per_round=5", "engine.max_cohort_size=2")
    assert grid.stats.per_client >= 3 and grid.stats.vmapped_clients >= 6
    assert grid.stats.per_client + grid.stats.vmapped_clients == 15


def test_engine_is_selected_by_the_config_and_the_cli(tiny_config, tmp_path):
    config = tmp_path / "tiny.yaml"
    config.write_text(dump_yaml(tiny_config("engine.name=vectorized")))
    assert main(["run", str(config), "--quiet", f"output_dir={tmp_path / 'out'}",
                 "federated.rounds=2", "engine.memory_budget_mb=0"]) == 0
    run_dir = tmp_path / "out" / "tiny"
    assert load_config(run_dir / "config.yaml").engine.name == "vectorized"
    rows = read_metrics(run_dir)
    assert [r["round"] for r in rows] == [0, 1, 2]
    assert all(r["failures"] == 0 and r["replies"] == 3 for r in rows[1:])
    assert rows[-1]["eval"]["seen.memory-loss.mean"] > 0  # memories were kept (on disk) and read


def test_grid_answers_other_messages_through_the_client_app(tiny_config):
    cfg = tiny_config()
    grid = VectorizedGrid(cfg, make_client_app(cfg), 8)
    from flwr.app import Message, RecordDict

    replies = grid.send_and_receive([Message(RecordDict(), n, "query") for n in (2, 5)])
    assert [int(r.content["metrics"]["partition-id"]) for r in replies] == [0, 3]


def test_a_cohort_that_cannot_be_vmapped_runs_client_by_client(tiny_config, caplog):
    """A model with a data-dependent Python branch cannot run under vmap: the cohort falls back to
    the per-client path in the same call, and every client still gets its (correct) reply."""
    import dataclasses

    from flwr.app import ConfigRecord, Message, RecordDict
    from flwr.supercore.task_identity import TaskIdentity

    from fedmaml.federated import records as R
    from fedmaml.federated.client_app import train_client
    from fedmaml.models.base import Linear, StagedModel

    class BranchingLinear(Linear):
        def __call__(self, p, h):
            if float(h.detach().abs().max()) > 1e30:  # .item()-style: fine per client, not in vmap
                raise ValueError("input out of range")
            return super().__call__(p, h)

    cfg = tiny_config("algorithm.name=moml")
    setup = setup_for(cfg)
    model = StagedModel("branching", [BranchingLinear("layer1", 1, 16, relu=True),
                                      BranchingLinear("layer2", 16, 1, relu=False)])
    assert {k: v.shape for k, v in model.init(0).items()} == \
           {k: v.shape for k, v in setup.initial_params.items()}
    setup = dataclasses.replace(setup, model=model)
    TaskIdentity.task_id, TaskIdentity.run_id, TaskIdentity.node_id = 1, 1, 1
    grid = VectorizedGrid(cfg, make_client_app(cfg), 8)
    grid.setup = setup
    content = RecordDict({R.ARRAYS: R.to_record(setup.initial_params),
                          R.CONFIG: ConfigRecord({R.ROUND: 1, R.ETA: 0.01})})
    messages = [Message(content, cid + 2, "train", group_id="1") for cid in (0, 3, 5)]
    with caplog.at_level("WARNING", logger="fedmaml"):
        replies = list(grid.send_and_receive(messages))
    assert grid.stats.fallbacks == 1 and grid.stats.per_client == 3
    assert "could not run batched" in caplog.text
    assert [int(r.content[R.METRICS][R.PARTITION]) for r in replies] == [0, 3, 5]
    for cid, reply in zip((0, 3, 5), replies):  # what the ClientApp computes for that client
        reference = train_client(messages[0], cfg, setup, cid, _Memories())
        got = R.from_record(reply.content[R.ARRAYS], setup.initial_params, "reply")
        want = R.from_record(reference.content[R.ARRAYS], setup.initial_params, "reference")
        assert_params_close(got, want, f"client {cid}")
    assert sorted(grid.bank.client_ids().tolist()) == [0, 3, 5]


@pytest.mark.parametrize("op", [
    lambda t: t * t.sum().item(),                       # .item() (and float())
    lambda t: t if t.sum() > 0 else -t,                 # a branch on a tensor's value
    lambda t: torch.nonzero(t),                         # an output of data-dependent shape
    lambda t: torch.tensor(t.detach().numpy()),         # numpy() of a batched tensor
])
def test_vmaps_own_refusals_are_told_from_other_errors(op):
    from fedmaml.engines.vectorized import vmap_refused

    with pytest.raises(Exception) as refused:
        torch.func.vmap(op)(torch.randn(3, 4))
    assert vmap_refused(refused.value), refused.value

    def bad_data(t):
        raise ValueError("client 3: x and y differ in length")

    with pytest.raises(ValueError) as other:
        torch.func.vmap(bad_data)(torch.randn(3, 4))
    assert not vmap_refused(other.value)
    assert not vmap_refused(RuntimeError("mat1 and mat2 shapes cannot be multiplied (3x4 and 5x6)"))


class _Memories:
    """A fresh client's memory store (for the reference computation)."""

    def load(self):
        return None

    def save(self, memory):
        pass


@pytest.mark.slow
def test_a_compiled_cohort_update_gives_the_same_run(tiny_config, tmp_path):
    """engine.compile: torch.compile of the cohort update (compiles the fresh and the returning
    cohort's shapes, about a minute on 2 cores) changes nothing but the time."""
    _, grid, _ = assert_same_run(tiny_config, tmp_path, "algorithm.name=moml", "engine.compile=true",
                                 "federated.rounds=2", "federated.clients_per_round=2",
                                 "data.num_clients=2", "federated.eval_every=0")
    assert grid._update._compiled not in (None, False)  # it compiled, and did not fall back


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device here")
def test_vectorized_on_cuda_equals_inprocess(tiny_config, tmp_path):
    """engine.device=cuda: cohorts, the memory bank (on the device) and evaluation (on the host)."""
    _, grid, _ = assert_same_run(tiny_config, tmp_path, "algorithm.name=moml", "engine.device=cuda")
    assert grid.bank.device.type == "cuda"
