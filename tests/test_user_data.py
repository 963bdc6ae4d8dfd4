"""A user's own data: arrays, files, a partitioner, a Flower task module (docs/custom.md).

The same clients described each way must give identical federations; each bad input must be
refused before training with a message naming the client and the fix; short runs on the in-process
and vectorized engines train on user data, for classification and regression.
"""

from __future__ import annotations

import os
import textwrap

import numpy as np
import pytest
import torch

from fedmaml.data import (DataSpec, build_federation, clear_cache, files_config,
                          partitioner_clients, save_client_arrays)
from fedmaml.data.user_sources import read_files, read_flower_task
from fedmaml.errors import DataError
from fedmaml.experiment import run_experiment
from fedmaml.federated.setup import setup_for
from fedmaml.results.recorder import read_summary


@pytest.fixture(autouse=True)
def _isolated_caches(tmp_path, monkeypatch):
    monkeypatch.setenv("FEDMAML_CACHE_DIR", str(tmp_path / "cache"))
    clear_cache()
    yield
    clear_cache()


def make_clients(n=5, size=(14, 18, 12, 16, 20), classes=3, features=4, seed=0, regression=False):
    """Client i's examples: inputs around a client-specific mean, labels 0..classes-1."""
    rng = np.random.default_rng(seed)
    out = {}
    for i in range(n):
        x = (rng.normal(size=(size[i % len(size)], features)) + i).astype(np.float32)
        if regression:  # a client-specific linear map of inputs near 0
            x -= i
            y = (x @ (np.arange(1, features + 1, dtype=np.float32) * (1 + 0.1 * i)) / features)[:, None]
        else:
            y = np.arange(size[i % len(size)]) % classes
            rng.shuffle(y)
        out[i] = (x, y.astype(np.float32 if regression else np.int64))
    return out


def task_arrays(fed):
    """Every training and unseen client's tasks, as numpy arrays, for exact comparison."""
    tasks = [fed.client_tasks(c) for c in range(fed.num_clients)]
    tasks += [fed.unseen_tasks(j) for j in range(fed.num_unseen)]
    return [[(t.train_x.numpy(), t.train_y.numpy(), t.heldout_x.numpy(), t.heldout_y.numpy())
             for t in client] for client in tasks]


def assert_same_federation(a, b):
    assert (a.num_clients, a.num_unseen, a.input_shape, a.num_outputs, a.task_type) == \
        (b.num_clients, b.num_unseen, b.input_shape, b.num_outputs, b.task_type)
    for ca, cb in zip(task_arrays(a), task_arrays(b), strict=True):
        for ta, tb in zip(ca, cb, strict=True):
            for u, v in zip(ta, tb, strict=True):
                assert u.dtype == v.dtype and np.array_equal(u, v)


def write_csv(path, clients, float_labels=False):
    with open(path, "w") as fh:
        fh.write("f0,f1,f2,f3,client,label\n")
        for cid, (x, y) in clients.items():
            for row, label in zip(x, y):
                # repr of the float32 value read back as float64 and cast to float32 is exact
                values = [repr(float(v)) for v in row]
                fh.write(",".join(values + [str(cid), repr(float(np.ravel(label)[0])) if float_labels
                                            else str(int(label))]) + "\n")
    return path


NATURAL = {"partition": "natural", "num_clients": 4, "unseen_clients": 1, "heldout_fraction": 0.25}


# ------------------------------------------------------------------------- the ways agree


def test_arrays_npz_dir_pt_dir_csv_npz_table_and_parquet_give_the_same_federation(tmp_path):
    clients = make_clients()
    reference = build_federation({"family": "files", "path": str(save_client_arrays(clients)),
                                  **NATURAL}, seed=3)
    assert (reference.input_shape, reference.num_outputs, reference.task_type) == \
        ((4,), 3, "classification")

    npz_dir = tmp_path / "npz"
    npz_dir.mkdir()
    for cid, (x, y) in clients.items():
        np.savez(npz_dir / f"{cid}.npz", x=x, y=y)
    pt_dir = tmp_path / "pt"
    pt_dir.mkdir()
    for cid, (x, y) in clients.items():  # tensors, as a tuple and as a dict
        content = (torch.from_numpy(x), torch.from_numpy(y))
        torch.save(content if cid % 2 else {"x": content[0], "y": content[1]}, pt_dir / f"{cid}.pt")
    csv = write_csv(tmp_path / "all.csv", clients)
    table = tmp_path / "all.npz"
    np.savez(table, x=np.concatenate([x for x, _ in clients.values()]),
             y=np.concatenate([y for _, y in clients.values()]),
             client=np.concatenate([np.full(len(y), cid) for cid, (_, y) in clients.items()]))
    paths = [npz_dir, pt_dir, csv, table]
    try:
        import pyarrow as pa
        import pyarrow.parquet as pq
    except ImportError:  # Parquet is optional (fedmaml[datasets])
        pass
    else:
        columns = {f"f{j}": np.concatenate([x[:, j] for x, _ in clients.values()]) for j in range(4)}
        columns["label"] = np.concatenate([y for _, y in clients.values()])
        columns["client"] = np.concatenate([[f"{cid}"] * len(y) for cid, (_, y) in clients.items()])
        pq.write_table(pa.table(columns), tmp_path / "all.parquet")
        paths.append(tmp_path / "all.parquet")
    for path in paths:
        clear_cache()
        assert_same_federation(reference, build_federation(
            {"family": "files", "path": str(path), **NATURAL}, seed=3))


def test_client_ids_are_ordered_numerically_and_the_last_ones_are_unseen(tmp_path):
    clients = {10: make_clients()[0], 2: make_clients()[1], 7: make_clients()[2]}
    data = read_files(DataSpec(family="files", path=str(save_client_arrays(clients)),
                               partition="natural"))
    assert data.ids == ("2", "7", "10")
    config = files_config(save_client_arrays(clients), unseen_clients=1)
    assert (config["num_clients"], config["unseen_clients"]) == (2, 1)
    fed = build_federation(config, seed=0)
    unseen = fed.unseen_tasks(0)[0]
    pooled = np.concatenate([unseen.train_x.numpy(), unseen.heldout_x.numpy()])
    assert sorted(map(tuple, pooled.tolist())) == sorted(map(tuple, clients[10][0].tolist()))


def test_a_pooled_file_is_partitioned_like_the_built_in_pools(tmp_path):
    clients = make_clients(n=6)
    table = tmp_path / "pooled.npz"  # no client column: one labelled data set
    x = np.concatenate([x for x, _ in clients.values()])
    y = np.concatenate([y for _, y in clients.values()])
    np.savez(table, x=x, y=y)
    for partition in ("iid", "dirichlet", "classes"):
        spec = {"family": "files", "path": str(table), "partition": partition, "num_clients": 4,
                "unseen_clients": 1, "classes_per_client": 2}
        fed = build_federation(spec, seed=1)
        rows = [np.concatenate([u[0], u[2]]) for c in task_arrays(fed) for u in c]
        joined = np.concatenate(rows)
        assert len(np.unique(joined, axis=0)) == len(joined)  # parts are disjoint
        if partition == "classes":
            labels = [np.unique(np.concatenate([u[1], u[3]])) for c in task_arrays(fed) for u in c]
            assert all(len(lab) == 2 for lab in labels)
        if partition == "iid":
            assert len(joined) == len(x)


def test_a_flwr_datasets_partitioner_gives_the_same_clients(tmp_path):
    datasets = pytest.importorskip("datasets")
    partitioners = pytest.importorskip("flwr_datasets.partitioner")
    clients = make_clients()
    pooled = datasets.Dataset.from_dict({
        "features": np.concatenate([x for x, _ in clients.values()]).tolist(),
        "label": np.concatenate([y for _, y in clients.values()]).tolist(),
        "writer": np.concatenate([np.full(len(y), cid) for cid, (_, y) in clients.items()]).tolist(),
    })
    natural = partitioners.NaturalIdPartitioner(partition_by="writer")
    natural.dataset = pooled
    converted = partitioner_clients(natural, "features", id_column="writer")
    assert sorted(converted) == sorted(clients)
    for cid, (x, y) in clients.items():
        assert np.array_equal(converted[cid][0].astype(np.float32), x)
        assert np.array_equal(converted[cid][1], y)
    reference = build_federation({"family": "files", "path": str(save_client_arrays(clients)),
                                  **NATURAL}, seed=3)
    clear_cache()
    assert_same_federation(reference, build_federation(
        {"family": "files", "path": str(save_client_arrays(converted)), **NATURAL}, seed=3))
    # flwr-datasets' own label-skew partitioner over the pooled set works the same way
    dirichlet = partitioners.DirichletPartitioner(num_partitions=3, partition_by="label",
                                                  alpha=1.0, min_partition_size=4, seed=0)
    dirichlet.dataset = pooled
    parts = partitioner_clients(dirichlet, "features")
    assert sorted(parts) == [0, 1, 2] and sum(len(y) for _, y in parts.values()) == len(pooled)


FLOWER_TASK = '''
"""A Flower-quickstart-style task module: load_data(partition_id, num_partitions)."""
import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset


def arrays(partition_id, split):
    rng = np.random.default_rng(100 * partition_id + (split == "test"))
    n = 18 if split == "train" else 6
    x = rng.normal(size=(n, 1, 6, 6)).astype(np.float32) + partition_id
    y = (np.arange(n) % 3).astype(np.int64)
    return x, y


class Images(Dataset):  # dict items like the quickstart's Hugging Face datasets
    def __init__(self, x, y):
        self.x, self.y = x, y

    def __len__(self):
        return len(self.y)

    def __getitem__(self, i):
        return {"img": torch.from_numpy(self.x[i]), "label": int(self.y[i])}


def load_data(partition_id: int, num_partitions: int):
    train, test = arrays(partition_id, "train"), arrays(partition_id, "test")
    return (DataLoader(Images(*train), batch_size=5, shuffle=False),
            DataLoader(Images(*test), batch_size=4))


def load_pairs(partition_id: int, num_partitions: int):
    train, test = arrays(partition_id, "train"), arrays(partition_id, "test")
    pairs = lambda a: torch.utils.data.TensorDataset(torch.from_numpy(a[0]), torch.from_numpy(a[1]))
    return DataLoader(pairs(train), batch_size=7), DataLoader(pairs(test), batch_size=7)
'''


@pytest.fixture
def flower_task(tmp_path, monkeypatch):
    """A task module ``user_flower_task`` importable from the test's directory."""
    (tmp_path / "user_flower_task.py").write_text(textwrap.dedent(FLOWER_TASK))
    monkeypatch.syspath_prepend(str(tmp_path))
    import importlib
    import sys
    sys.modules.pop("user_flower_task", None)
    return importlib.import_module("user_flower_task")


def test_a_flower_task_module_gives_its_partitions_with_the_testloader_held_out(flower_task):
    spec = {"family": "flower", "flower_task": "user_flower_task", "num_clients": 3,
            "unseen_clients": 1}
    data = read_flower_task(DataSpec.from_config(spec))
    pairs = read_flower_task(DataSpec.from_config(
        {**spec, "flower_task": "user_flower_task:load_pairs"}))
    fed = build_federation(spec, seed=0)
    assert (fed.input_shape, fed.num_outputs, fed.task_type) == ((1, 6, 6), 3, "classification")
    for pid in range(4):
        train, test = flower_task.arrays(pid, "train"), flower_task.arrays(pid, "test")
        for got in (data, pairs):
            assert np.array_equal(got.x[pid], train[0]) and np.array_equal(got.y[pid], train[1])
            assert np.array_equal(got.test[pid][0], test[0])
        task = fed.client_tasks(pid)[0] if pid < 3 else fed.unseen_tasks(0)[0]
        assert np.array_equal(task.heldout_x.numpy(), test[0])
        order = np.lexsort(task.train_x.numpy().reshape(len(task.train_x), -1).T)
        expected = np.lexsort(train[0].reshape(len(train[0]), -1).T)
        assert np.array_equal(task.train_x.numpy()[order], train[0][expected])
    # the same partitions written as per-client files are the same clients
    clients = {pid: flower_task.arrays(pid, "train") for pid in range(4)}
    files = read_files(DataSpec(family="files", path=str(save_client_arrays(clients)),
                                partition="natural"))
    assert all(np.array_equal(a, b) for a, b in zip(files.x, data.x, strict=True))


# ------------------------------------------------------------------------------- bad data


def files_spec(clients, **kw):
    return {"family": "files", "path": str(save_client_arrays(clients)), "partition": "natural",
            "num_clients": len(clients), **kw}


def bad(clients, index, x=None, y=None):
    clients = dict(clients)
    ox, oy = clients[index]
    clients[index] = (ox if x is None else x, oy if y is None else y)
    return clients


@pytest.mark.parametrize("case, message", [
    ("shape", r"client '3'.*inputs have shape \[5\] per example but client '0'.*same input shape"),
    ("dtype", r"client '2'.*targets are float32 \(regression\) but client '0'.*int64"),
    ("negative", r"client '1'.*label -1 is negative.*0\.\.C-1"),
    ("gap", r"labels run up to 4 but label\(s\) \[3\] occur in no client.*relabel"),
    ("nan", r"client '4'.*inputs of example 2 hold NaN or infinite values"),
    ("inf_target", r"client '0'.*targets of example 0 hold NaN or infinite"),
    ("length", r"client '1'.*18 inputs but 13 targets"),
    ("tiny", r"client '2'.*holds 1 examples.*give it more examples or drop it"),
    ("count", r"the data has 5 clients but data.num_clients \+ data.unseen_clients = 4 \+ 0.*"
              r"set data.num_clients to 5"),
    ("strings", r"client '0'.*inputs have dtype <U1; expected numbers"),
])
def test_bad_data_is_refused_naming_the_client_and_the_fix(case, message):
    clients = make_clients()
    kw = {}
    if case == "shape":
        clients = bad(clients, 3, x=np.zeros((16, 5), np.float32))
    elif case == "dtype":
        clients = bad(clients, 2, y=np.zeros(12, np.float32))
    elif case == "negative":
        clients = bad(clients, 1, y=np.full(18, -1))
    elif case == "gap":
        clients = bad(clients, 1, y=np.full(18, 4))
    elif case == "nan":
        x = clients[4][0].copy()
        x[2, 1] = np.nan
        clients = bad(clients, 4, x=x)
    elif case == "inf_target":
        clients = make_clients(regression=True)
        y = clients[0][1].copy()
        y[0] = np.inf
        clients = bad(clients, 0, y=y)
    elif case == "length":
        clients = bad(clients, 1, y=clients[1][1][:13])
    elif case == "tiny":
        clients = bad(clients, 2, x=clients[2][0][:1], y=clients[2][1][:1])
    elif case == "count":
        kw = {"num_clients": 4}
    elif case == "strings":
        clients = bad(clients, 0, x=np.array([["a"]] * 14))
    with pytest.raises(DataError, match=message) as info:
        build_federation(files_spec(clients, **kw), seed=0)
    assert str(save_client_arrays(clients)) in str(info.value) or case == "gap"


def test_file_problems_name_the_file(tmp_path):
    (tmp_path / "d").mkdir()
    np.savez(tmp_path / "d" / "0.npz", inputs=np.zeros((4, 2)), y=np.zeros(4, np.int64))
    with pytest.raises(DataError, match=r"0\.npz: expected arrays 'x' and 'y' \(found \['inputs', 'y'\]\)"):
        build_federation({"family": "files", "path": str(tmp_path / "d"), "partition": "natural",
                          "num_clients": 1}, seed=0)
    (tmp_path / "t.csv").write_text("a,b,label\n1,2,0\n1,x,1\n")
    with pytest.raises(DataError, match=r"t\.csv, line 3: column 'b' holds 'x', not a number"):
        build_federation({"family": "files", "path": str(tmp_path / "t.csv"), "partition": "iid",
                          "num_clients": 1}, seed=0)
    (tmp_path / "u.csv").write_text("a,b,label\n1,2,0\n1,3,1\n")
    with pytest.raises(DataError, match=r"u\.csv: data.partition = 'natural' needs a client-id "
                                        r"column 'client'"):
        build_federation({"family": "files", "path": str(tmp_path / "u.csv"),
                          "partition": "natural", "num_clients": 1}, seed=0)
    (tmp_path / "t.json").write_text("{}")
    with pytest.raises(DataError, match=r"cannot read \.json files"):
        build_federation({"family": "files", "path": str(tmp_path / "t.json"), "num_clients": 1},
                         seed=0)
    with pytest.raises(DataError, match=r"'dirichlet' splits by label.*use 'iid' or 'natural'"):
        build_federation({"family": "files", "num_clients": 2, "partition": "dirichlet",
                          "path": str(save_client_arrays(make_clients(regression=True)))}, seed=0)
    with pytest.raises(DataError, match=r"data.flower_task = 'no_such_module_here': cannot import"):
        build_federation({"family": "flower", "flower_task": "no_such_module_here",
                          "num_clients": 1}, seed=0)
    with pytest.raises(DataError, match=r"data.flower_task is empty"):
        DataSpec(family="flower")
    with pytest.raises(DataError, match=r"client 'a/b': a client id becomes a file name"):
        save_client_arrays({"a/b": make_clients()[0]})
    with pytest.raises(DataError, match=r"pooled\.npz', data.partition = 'iid' over 50 clients: "
                                        r"80 examples cannot give 50 parts at least 2 examples"):
        np.savez(tmp_path / "pooled.npz", x=np.zeros((80, 2)), y=np.arange(80) % 2)
        build_federation({"family": "files", "path": str(tmp_path / "pooled.npz"),
                          "partition": "iid", "num_clients": 50, "tasks_per_client": 1}, seed=0)


@pytest.mark.parametrize("extra", [-5, 50], ids=["y_shorter", "y_longer"])
def test_a_one_file_npz_table_with_y_of_another_length_is_refused(tmp_path, extra):
    """One .npz of every client (x, y, client): y must have one row per row of x, else the rows
    that `client` picks from y belong to other examples (or do not exist)."""
    clients = make_clients()
    x = np.concatenate([x for x, _ in clients.values()])
    y = np.concatenate([y for _, y in clients.values()])
    ids = np.concatenate([np.full(len(y), cid) for cid, (_, y) in clients.items()])
    y = y[:len(y) + extra] if extra < 0 else np.concatenate([y, y[:extra]])
    np.savez(tmp_path / "table.npz", x=x, y=y, client=ids)
    with pytest.raises(DataError, match=rf"table\.npz: {len(x)} inputs but {len(x) + extra} "
                                        r"targets; x and y need one row per example each"):
        build_federation({"family": "files", "path": str(tmp_path / "table.npz"), **NATURAL},
                         seed=0)


def test_a_one_file_npz_table_of_a_single_value_is_refused(tmp_path):
    np.savez(tmp_path / "scalar.npz", x=np.zeros((4, 2)), y=np.float32(1.0), client=np.zeros(4))
    with pytest.raises(DataError, match=r"scalar\.npz: x and y must have one row per example "
                                        r"\(got shapes \[4, 2\] and \[\]\)"):
        build_federation({"family": "files", "path": str(tmp_path / "scalar.npz"), **NATURAL},
                         seed=0)


def test_tensors_from_python_are_the_same_clients_as_arrays():
    clients = make_clients()
    tensors = {cid: (torch.from_numpy(x), torch.from_numpy(y)) for cid, (x, y) in clients.items()}
    assert save_client_arrays(tensors) == save_client_arrays(clients)  # named by the contents


def test_a_client_smaller_than_support_plus_query_is_refused_before_training(tiny_config):
    clients = make_clients()  # client 2 has 12 examples, 9 after holding out a quarter
    cfg = tiny_config(*overrides(files_spec(clients, heldout_fraction=0.25, num_clients=4,
                                            unseen_clients=1)),
                      "algorithm.support_size=5", "algorithm.query_size=5")
    with pytest.raises(DataError, match=r"client 2 in id order \(task 0\): 9 training examples .* "
                                        r"algorithm.support_size \+ query_size = 10"):
        setup_for(cfg)


# -------------------------------------------------------------------------------- training


def overrides(data: dict) -> list[str]:
    return [f"data.{k}={v}" for k, v in data.items()]


@pytest.mark.parametrize("regression", [False, True], ids=["classification", "regression"])
def test_user_data_trains_on_the_inprocess_and_vectorized_engines(tiny_config, tmp_path, regression):
    clients = make_clients(n=8, size=(24, 30, 28), regression=regression)
    data = files_spec(clients, num_clients=6, unseen_clients=2, heldout_fraction=0.25)
    results = {}
    for engine in ("inprocess", "vectorized"):
        cfg = tiny_config(*overrides(data), f"engine.name={engine}", "federated.rounds=8",
                          "algorithm.support_size=5", "algorithm.eta=0.05",
                          "federated.eval_every=0")
        results[engine] = read_summary(run_experiment(cfg, quiet=True, run_dir=tmp_path / engine))
    for summary in results.values():
        assert summary["after"]["seen.loss.mean"] < summary["before"]["seen.loss.mean"]
    a, b = results["inprocess"]["after"], results["vectorized"]["after"]
    assert a["seen.loss.mean"] == pytest.approx(b["seen.loss.mean"], rel=1e-4)


def flower_config(tiny_config, *more):
    return tiny_config("data.family=flower", "data.flower_task=user_flower_task",
                       "data.num_clients=3", "data.unseen_clients=1", "model.name=conv4",
                       "model.conv_width=8", "federated.rounds=3", "federated.clients_per_round=2",
                       "federated.eval_every=0", "engine.num_cpus=1", *more)


def assert_same_run(a, b):
    sa, sb = read_summary(a), read_summary(b)
    compared = [k for k in sa["after"] if "loss" in k or "acc" in k]  # not timings
    assert "seen.loss.mean" in compared and "unseen.loss.mean" in compared
    for key in compared:
        value = sa["after"][key]
        if isinstance(value, float):
            assert value == pytest.approx(sb["after"][key], rel=1e-4, abs=1e-6), key
    ma = torch.load(a / "model.pt", weights_only=True)
    mb = torch.load(b / "model.pt", weights_only=True)
    for k in ma:
        torch.testing.assert_close(ma[k], mb[k], rtol=1e-4, atol=1e-6)


def test_a_flower_task_module_trains_alike_in_process_and_vectorized(tiny_config, tmp_path,
                                                                      flower_task):
    runs = {engine: run_experiment(flower_config(tiny_config, f"engine.name={engine}"),
                                   quiet=True, run_dir=tmp_path / engine)
            for engine in ("inprocess", "vectorized")}
    summary = read_summary(runs["inprocess"])
    assert np.isfinite(summary["after"]["seen.loss.mean"])
    assert_same_run(runs["inprocess"], runs["vectorized"])


@pytest.mark.ray
@pytest.mark.slow
def test_a_flower_task_module_trains_alike_on_ray(tiny_config, tmp_path, flower_task, ray_guard,
                                                  monkeypatch):
    # Ray's actors are separate processes: they import the task module through PYTHONPATH (the
    # docs say so), which the raylet passes on from this process's environment.
    path = os.environ.get("PYTHONPATH", "")
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(filter(None, [str(tmp_path), path])))
    ray_dir = run_experiment(flower_config(tiny_config, "engine.name=ray"), quiet=True,
                             run_dir=tmp_path / "ray")
    local = run_experiment(flower_config(tiny_config), quiet=True, run_dir=tmp_path / "inprocess")
    assert_same_run(local, ray_dir)


def test_fedmaml_run_trains_a_csv_regression_and_refuses_a_bad_csv(tmp_path, capsys):
    from fedmaml.cli import main

    clients = make_clients(n=5, size=(24, 28, 30), regression=True)
    good = write_csv(tmp_path / "table.csv", clients, float_labels=True)
    config = tmp_path / "run.yaml"
    config.write_text(textwrap.dedent(f"""\
        name: tabular
        output_dir: {tmp_path / "runs"}
        data: {{family: files, path: {good}, partition: natural, num_clients: 4,
                unseen_clients: 1, heldout_fraction: 0.25, eval_adapt_size: 5}}
        model: {{hidden: [16]}}
        algorithm: {{support_size: 5, eta: 0.05}}
        federated: {{rounds: 6, clients_per_round: 2, eval_every: 0}}
        """))
    assert main(["run", str(config), "--quiet", "--output-dir", str(tmp_path / "runs")]) == 0
    summary = read_summary(next((tmp_path / "runs").glob("tabular*")))
    assert summary["after"]["seen.loss.mean"] < summary["before"]["seen.loss.mean"]

    lines = good.read_text().splitlines()
    lines[3] = lines[3].replace(lines[3].split(",")[1], "nan", 1)  # client 0, example 2
    good.write_text("\n".join(lines) + "\n")
    clear_cache()
    assert main(["run", str(config), "--quiet", "--output-dir", str(tmp_path / "bad")]) != 0
    err = capsys.readouterr().err
    assert "table.csv, client '0': inputs of example 2 hold NaN or infinite values" in err
    assert not list((tmp_path / "bad").glob("*/metrics.jsonl"))  # refused before training


@pytest.mark.slow
def test_the_tabular_guide_script_runs_end_to_end(tmp_path, monkeypatch):
    # simulations/custom_tabular.py --short: the CSV, the run with its baselines, the figure.
    import importlib.util
    import pathlib

    root = pathlib.Path(__file__).resolve().parents[1]
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(filter(None, [str(root),
                                                                   os.environ.get("PYTHONPATH")])))
    spec = importlib.util.spec_from_file_location("custom_tabular",
                                                  root / "simulations" / "custom_tabular.py")
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    assert script.main(["--short", "--out", str(tmp_path / "out")]) == 0
    assert (tmp_path / "out" / "compare" / "convergence-seen.loss.mean-rounds.png").stat().st_size
    report = (tmp_path / "out" / "compare" / "report.md").read_text()
    assert all(f"| {name} | 1 |" in report for name in ("fedavg", "moml", "per_fedavg"))
