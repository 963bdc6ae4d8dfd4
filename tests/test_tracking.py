"""Experiment tracking against the real libraries (no mocks): TensorBoard event files read back with
TensorBoard's own EventAccumulator, the MLflow file store queried with MLflow's client, W&B offline
run files decoded with W&B's own protobuf records. Every scalar is compared with metrics.jsonl.

Each backend's tests need its extra (``pip install -e ".[test]"`` installs all three); without it
they skip, saying which extra is missing.
"""

from __future__ import annotations

import json
import math
import struct
import sys
from pathlib import Path

import pytest

from fedmaml.cli import TRACKING_BACKENDS, main
from fedmaml.config import TRACKING_BACKENDS as SCHEMA_BACKENDS
from fedmaml.config import config_to_flat, load_config
from fedmaml.errors import ConfigError
from fedmaml.experiment import run_experiment
from fedmaml.tracking import flatten, open_tracker
from fedmaml.tracking.base import summary_scalars


def needs(package: str, extra: str):
    return pytest.importorskip(package, reason=f"needs the {extra} extra: pip install "
                                                f"\"fedmaml[{extra}]\" (or .[test])")


def rows_of(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def expected_series(run_dir: Path) -> tuple[dict[str, dict[int, float]],
                                            dict[str, dict[int, list[float]]]]:
    """name -> {round: value} of every scalar, and of every per-client list, from metrics.jsonl
    read as plain JSON (null = NaN), independently of the code under test."""
    scalars: dict[str, dict[int, float]] = {}
    lists: dict[str, dict[int, list[float]]] = {}

    def walk(prefix: str, d: dict, step: int) -> None:
        for k, v in d.items():
            name = prefix + k
            if isinstance(v, dict):
                walk(name + "/", v, step)
            elif v is None or isinstance(v, (int, float)):
                scalars.setdefault(name, {})[step] = math.nan if v is None else float(v)
            elif isinstance(v, list) and k.endswith(".clients"):
                lists.setdefault(name, {})[step] = [float(x) for x in v if x is not None]

    for row in rows_of(run_dir):
        walk("", {k: v for k, v in row.items() if k != "round"}, row["round"])
    return scalars, lists


def same(a: float, b: float, rel: float) -> bool:
    return (math.isnan(a) and math.isnan(b)) or a == pytest.approx(b, rel=rel, abs=1e-12)


def tracked_run(tiny_config, backends: str, *overrides: str) -> Path:
    cfg = tiny_config(f"tracking.backends=[{backends}]", *overrides)
    return run_experiment(cfg, quiet=True)


# -- the row -> scalars rule --------------------------------------------------------------------

def test_flatten_names_values_and_distributions():
    row = {"round": 3, "replies": 2, "updated": True, "loss_after": float("nan"),
           "clients": [4, 1], "eval": {"seen.loss.mean": 0.5, "seen.ids": [4, 1],
                                       "seen.loss.clients": [0.25, None, 0.75],
                                       "eval-failures": 0}}
    scalars, histograms = flatten(row)
    assert set(scalars) == {"replies", "updated", "loss_after", "eval/seen.loss.mean",
                            "eval/eval-failures"}
    assert scalars["updated"] == 1.0 and math.isnan(scalars["loss_after"])
    assert histograms == {"eval/seen.loss.clients": [0.25, 0.75]}
    assert summary_scalars({"rounds": 3, "after": {"seen.loss.mean": 0.5}, "name": "x"}) == {
        "summary/rounds": 3.0, "summary/after/seen.loss.mean": 0.5}


def test_cli_lists_the_schema_backends():
    assert TRACKING_BACKENDS == SCHEMA_BACKENDS


def test_a_missing_extra_is_named_before_the_run_starts(tiny_config, monkeypatch, capsys):
    """A package that cannot be imported (None in sys.modules: Python's own way to block one)."""
    monkeypatch.setitem(sys.modules, "wandb", None)
    cfg = tiny_config("tracking.backends=[tensorboard, wandb]")
    with pytest.raises(ConfigError, match=r"tracking.backends: 'wandb' needs the wandb package, "
                                          r"which is not installed; pip install \"fedmaml\[wandb\]\""):
        run_experiment(cfg, quiet=True)
    assert not Path(cfg.output_dir).exists()  # nothing was run


def test_no_backend_means_no_files(tiny_config):
    run_dir = run_experiment(tiny_config(), quiet=True)
    assert not list(run_dir.glob("events.out.tfevents.*")) and not (run_dir / "wandb").exists()
    assert not {"mlruns", "mlartifacts", "mlflow.db"} & {p.name for p in run_dir.parent.iterdir()}


# -- TensorBoard --------------------------------------------------------------------------------

def tensorboard_data(run_dir: Path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(run_dir), size_guidance={"scalars": 0, "histograms": 0,
                                                         "images": 0, "tensors": 0})
    acc.Reload()
    return acc


def check_tensorboard(run_dir: Path) -> None:
    """Every scalar and histogram of metrics.jsonl is in the event files with its value (float32
    there), and nothing else but the summary."""
    acc = tensorboard_data(run_dir)
    scalars, lists = expected_series(run_dir)
    tags = acc.Tags()
    summary = json.loads((run_dir / "summary.json").read_text())
    assert set(tags["scalars"]) == set(scalars) | set(summary_scalars(summary))
    for name, series in scalars.items():
        events = acc.Scalars(name)
        assert [e.step for e in events] == list(series), name
        for e in events:
            assert same(e.value, series[e.step], rel=1e-6), (name, e.step, e.value)
    assert set(tags["histograms"]) == set(lists)
    for name, series in lists.items():
        for h in acc.Histograms(name):
            values = series[h.step]
            assert h.histogram_value.num == len(values)
            assert h.histogram_value.sum == pytest.approx(sum(values), rel=1e-9)
            assert h.histogram_value.min == pytest.approx(min(values), rel=1e-9)
    for name, value in summary_scalars(summary).items():
        assert same(acc.Scalars(name)[-1].value, value, rel=1e-6), name


def hparams_of(acc) -> dict:
    from tensorboard.plugins.hparams import plugin_data_pb2

    content = acc.PluginTagToContent("hparams")
    start = plugin_data_pb2.HParamsPluginData.FromString(
        content["_hparams_/session_start_info"]).session_start_info
    values = {}
    for k, v in start.hparams.items():
        kind = v.WhichOneof("kind")
        values[k] = getattr(v, kind)
    return values


def test_tensorboard_live_run_matches_metrics_jsonl(tiny_config):
    needs("tensorboard", "tensorboard")
    run_dir = tracked_run(tiny_config, "tensorboard")
    check_tensorboard(run_dir)
    acc = tensorboard_data(run_dir)
    assert acc.Tags()["images"] == ["figures/convergence"]
    status = acc.Tensors("status/text_summary")[-1].tensor_proto.string_val[0].decode()
    assert status == "completed"
    flat = hyperparameters(run_dir)
    hparams = hparams_of(acc)
    assert set(hparams) == set(flat)  # a single run: every key is a hyperparameter
    assert hparams["algorithm.beta"] == pytest.approx(flat["algorithm.beta"])


def test_tensorboard_export_equals_the_live_log(tiny_config, tmp_path):
    needs("tensorboard", "tensorboard")
    run_dir = run_experiment(tiny_config(), quiet=True)
    assert main(["export", str(run_dir), "--to", "tensorboard"]) == 0
    check_tensorboard(run_dir)
    # a second export would log every round twice: refused, naming the event file
    assert main(["export", str(run_dir), "--to", "tensorboard"]) == 2


# -- MLflow -------------------------------------------------------------------------------------

def mlflow_client(uri: str):
    needs("mlflow", "mlflow")
    from fedmaml.tracking.mlflow_backend import open_client

    return open_client(uri)


def mlflow_runs(store: Path | str, experiment: str) -> list:
    """The runs of an experiment in a store: a URI, or the directory of a file store."""
    client = mlflow_client(store if isinstance(store, str) else store.resolve().as_uri())
    exp = client.get_experiment_by_name(experiment)
    assert exp is not None, f"no MLflow experiment {experiment!r} in {store}"
    return client, client.search_runs([exp.experiment_id])


def default_store(output_dir: Path) -> str:
    """The default store's URI, spelled out independently of the code under test."""
    return f"sqlite:///{(output_dir / 'mlflow.db').resolve()}"


def hyperparameters(run_dir: Path) -> dict:
    """The run's config but where it is stored and tracked."""
    flat = config_to_flat(load_config(run_dir / "config.yaml"))
    return {k: v for k, v in flat.items() if k != "output_dir" and not k.startswith("tracking.")}


def check_mlflow(client, run, run_dir: Path) -> None:
    scalars, _ = expected_series(run_dir)
    summary = json.loads((run_dir / "summary.json").read_text())
    assert set(run.data.metrics) == set(scalars) | set(summary_scalars(summary))
    for name, series in scalars.items():
        history = client.get_metric_history(run.info.run_id, name)
        assert sorted(m.step for m in history) == list(series), name
        for m in history:
            assert same(m.value, series[m.step], rel=1e-12), (name, m.step)
    assert run.data.params == {k: str(v) for k, v in hyperparameters(run_dir).items()}
    assert run.info.status == "FINISHED" and run.data.tags["fedmaml.status"] == "completed"
    artifacts = {a.path for a in client.list_artifacts(run.info.run_id)}
    assert {"config.yaml", "summary.json", "model.pt", "convergence.png"} <= artifacts


def test_mlflow_live_run_matches_metrics_jsonl(tiny_config):
    needs("mlflow", "mlflow")
    run_dir = tracked_run(tiny_config, "mlflow")
    client, runs = mlflow_runs(default_store(run_dir.parent), "fedmaml")
    assert len(runs) == 1 and runs[0].info.run_name == run_dir.name
    check_mlflow(client, runs[0], run_dir)


def test_the_default_mlflow_store_reads_without_extra_settings(tiny_config, tmp_path, monkeypatch):
    """The default store is a SQLite database in the output directory, the runs' files beside it
    (not in ./mlruns of whatever directory the run started from): a plain MlflowClient in a fresh
    process, without MLFLOW_ALLOW_FILE_STORE or any other MLflow variable, reads it."""
    import os
    import subprocess

    needs("mlflow", "mlflow")
    monkeypatch.chdir(tmp_path)
    run_dir = tracked_run(tiny_config, "mlflow")
    output_dir = run_dir.parent
    assert (output_dir / "mlflow.db").is_file() and not (tmp_path / "mlruns").exists()
    script = ("import sys; from mlflow import MlflowClient\n"
              "c = MlflowClient(tracking_uri=sys.argv[1])\n"
              "e = c.get_experiment_by_name('fedmaml')\n"
              "r = c.search_runs([e.experiment_id])[0]\n"
              "print(r.info.run_name, r.info.status, r.info.artifact_uri)\n"
              "print(' '.join(sorted(a.path for a in c.list_artifacts(r.info.run_id))))")
    env = {k: v for k, v in os.environ.items() if not k.startswith("MLFLOW_")}
    env["MLFLOW_DISABLE_TELEMETRY"] = env["DO_NOT_TRACK"] = "true"  # offline, not a store setting
    out = subprocess.run([sys.executable, "-c", script, default_store(output_dir)], env=env,
                         capture_output=True, text=True, check=True).stdout.splitlines()
    name, status, artifact_uri = out[0].split()
    assert (name, status) == (run_dir.name, "FINISHED")
    assert artifact_uri.startswith((output_dir / "mlartifacts").resolve().as_uri())
    assert {"config.yaml", "summary.json", "model.pt"} <= set(out[1].split())


def test_mlflow_export_and_a_failed_run(tiny_config, tmp_path):
    needs("mlflow", "mlflow")
    run_dir = run_experiment(tiny_config(), quiet=True)
    store = tmp_path / "store"
    args = ["export", str(run_dir), "--to", "mlflow", "--mlflow-uri", store.as_uri(),
            "--project", "exported"]
    assert main(args) == 0
    client, runs = mlflow_runs(store, "exported")
    check_mlflow(client, runs[0], run_dir)
    assert main(args) == 2  # already there: refused

    # rounds that raise end the MLflow run as FAILED (KILLED for Ctrl-C), not RUNNING forever
    cfg = tiny_config("tracking.backends=[mlflow]", f"tracking.mlflow_uri={store.as_uri()}",
                      "tracking.project=broken")
    for error, status in ((RuntimeError, "FAILED"), (KeyboardInterrupt, "KILLED")):
        with pytest.raises(error):
            with open_tracker(cfg, tmp_path / "broken") as tracker:
                tracker.log_round({"round": 0, "eval": {"seen.loss.mean": 1.0}})
                raise error()
        client, runs = mlflow_runs(store, "broken")
        assert runs[0].info.status == status  # newest first
        assert client.get_metric_history(runs[0].info.run_id, "eval/seen.loss.mean")[0].value == 1


def test_a_diverged_run_ends_its_mlflow_run_with_its_status(tiny_config, tmp_path):
    """Run health stops a diverged run before its rounds end: the tracker still gets the summary,
    so MLflow records the status the run ended with, not 'completed' and not a crash."""
    needs("mlflow", "mlflow")
    store = tmp_path / "store"
    run_dir = run_experiment(tiny_config("algorithm.eta=1e6", "tracking.backends=[mlflow]",
                                         f"tracking.mlflow_uri={store.as_uri()}",
                                         "tracking.project=health"), quiet=True)
    assert json.loads((run_dir / "summary.json").read_text())["status"] == "diverged"
    _, runs = mlflow_runs(store, "health")
    assert len(runs) == 1 and runs[0].data.tags["fedmaml.status"] == "diverged"
    assert runs[0].info.status == "FAILED"


# -- W&B ----------------------------------------------------------------------------------------

def wandb_records(run_dir: Path) -> list:
    """The records of the W&B offline run in ``run_dir``: W&B's own protobuf ``Record`` messages,
    framed as a LevelDB log (7-byte file header, 32 KiB blocks of chunks with a 7-byte header:
    CRC32C, little-endian length, type full/first/middle/last)."""
    from wandb.proto import wandb_internal_pb2 as pb

    (path,) = (run_dir / "wandb").glob("offline-run-*/run-*.wandb")
    data = path.read_bytes()
    assert data[:4] == b":W&B", "not a W&B run file"
    block, pos, records, pending = 32768, 7, [], b""
    while pos + 7 <= len(data):
        if block - pos % block < 7:  # a block's tail too short for a header is padding
            pos += block - pos % block
            continue
        _, length, kind = struct.unpack("<IHB", data[pos:pos + 7])
        if length == 0 and kind == 0:
            break
        pending += data[pos + 7:pos + 7 + length]
        pos += 7 + length
        if kind in (1, 4):  # full or last chunk: a whole record
            records.append(pb.Record.FromString(pending))
            pending = b""
    return records


def check_wandb(run_dir: Path) -> None:
    scalars, lists = expected_series(run_dir)
    records = wandb_records(run_dir)
    logged: dict[str, dict[int, object]] = {}
    for r in records:
        if r.WhichOneof("record_type") == "history":
            step = r.history.step.num
            for i in r.history.item:  # a histogram comes as items (name, _type), (name, bins)...
                key, *field = [i.key] if i.key else list(i.nested_key)
                if key.startswith("_"):
                    continue
                value = json.loads(i.value_json)
                if field:
                    logged.setdefault(key, {}).setdefault(step, {})[field[0]] = value
                else:
                    logged.setdefault(key, {})[step] = value
    assert set(logged) == set(scalars) | set(lists), str([(r.WhichOneof("record_type"), r.history.step.num) for r in records])
    for name, series in scalars.items():
        assert sorted(logged[name]) == list(series)
        for step, value in series.items():
            got = logged[name][step]
            assert same(math.nan if got in ("NaN", None) else float(got), value, rel=1e-12)
    for name, series in lists.items():
        for step, values in series.items():
            hist = logged[name][step]
            assert hist["_type"] == "histogram" and sum(hist["values"]) == len(values)
    summary = json.loads((run_dir / "summary.json").read_text())
    final: dict[str, object] = {}
    for r in records:
        if r.WhichOneof("record_type") == "summary":
            final.update({(i.key or "/".join(i.nested_key)): json.loads(i.value_json)
                          for i in r.summary.update})
    assert final["status"] == "completed"
    for name, value in summary_scalars(summary).items():
        assert same(float(final[name]), value, rel=1e-12), name
    (run,) = [r.run for r in records if r.WhichOneof("record_type") == "run"]
    config = {i.key: json.loads(i.value_json) for i in run.config.update}
    assert config["algorithm"]["beta"] == hyperparameters(run_dir)["algorithm.beta"]
    assert "tracking" not in config and "output_dir" not in config
    (files,) = (run_dir / "wandb").glob("offline-run-*/files")
    assert {"config.yaml", "summary.json", "model.pt", "convergence.png"} <= {
        p.name for p in files.iterdir()}


def test_wandb_live_run_matches_metrics_jsonl(tiny_config):
    needs("wandb", "wandb")
    check_wandb(tracked_run(tiny_config, "wandb"))


def test_wandb_export(tiny_config):
    needs("wandb", "wandb")
    run_dir = run_experiment(tiny_config(), quiet=True)
    assert main(["export", str(run_dir), "--to", "wandb"]) == 0
    check_wandb(run_dir)


# -- offline ------------------------------------------------------------------------------------

def test_tracking_stays_offline(tiny_config):
    """No socket of this process connects beyond the machine, and no host name is looked up,
    while MLflow and W&B log a run (W&B's own service process is reached over localhost)."""
    needs("mlflow", "mlflow")
    needs("wandb", "wandb")
    remote: list[tuple] = []

    def hook(event: str, args: tuple) -> None:
        if event == "socket.getaddrinfo" and args[0] not in ("localhost", "127.0.0.1", "::1",
                                                            None, b"localhost"):
            remote.append((event, args[:2]))
        elif event == "socket.connect":
            address = args[1]
            if isinstance(address, tuple) and address[0] not in ("127.0.0.1", "::1", "localhost"):
                remote.append((event, address))

    sys.addaudithook(hook)  # audit hooks cannot be removed: it only records, into this list
    tracked_run(tiny_config, "mlflow,wandb")
    seen = list(remote)
    remote.clear()
    assert not seen, f"tracking tried the network: {seen[:5]}"


# -- sweeps -------------------------------------------------------------------------------------

def test_a_swept_entry_of_algorithm_kwargs_is_a_hyperparameter_of_its_own(tiny_config, tmp_path):
    """A sweep over algorithm.kwargs.lam logs lam (not the whole kwargs text) beside the seed; a
    setting whose kwargs lack it (a built-in algorithm) logs no value for it."""
    from fedmaml.sweep import SweepSpec, plan_sweep, write_manifest
    from fedmaml.tracking import run_info

    sweep_dir = tmp_path / "lams"
    base = tiny_config("algorithm.name=my_algos:Mine", "algorithm.kwargs={mu: [1, 2]}")
    spec = SweepSpec(grid={}, seeds=(0,), settings={
        "a": {"algorithm.kwargs.lam": 0.1}, "b": {"algorithm.kwargs.lam": 0.5},
        "fedavg": {"algorithm.name": "fedavg", "algorithm.kwargs": ""}})
    runs, _ = plan_sweep(base, spec, sweep_dir)
    write_manifest(sweep_dir, base, spec)
    hparams = {r.name: run_info(r.config, sweep_dir / r.name).hparams for r in runs}
    assert hparams == {"a,seed=0": {"algorithm.kwargs.lam": 0.1, "algorithm.name": "my_algos:Mine",
                                    "algorithm.kwargs": '{"mu": [1, 2], "lam": 0.1}', "seed": 0},
                       "b,seed=0": {"algorithm.kwargs.lam": 0.5, "algorithm.name": "my_algos:Mine",
                                    "algorithm.kwargs": '{"mu": [1, 2], "lam": 0.5}', "seed": 0},
                       "fedavg,seed=0": {"algorithm.name": "fedavg", "algorithm.kwargs": "",
                                         "seed": 0}}


def test_sweep_runs_carry_their_grid_values_as_hyperparameters(tiny_config, tmp_path):
    """TensorBoard HParams and MLflow compare see a sweep's runs side by side: one experiment named
    after the sweep, each run's grid values (and seed) as its hyperparameters; a finished sweep
    exports the same way."""
    needs("tensorboard", "tensorboard")
    needs("mlflow", "mlflow")
    from fedmaml.sweep import SweepSpec, run_sweep

    sweep_dir = tmp_path / "betas"
    spec = SweepSpec(grid={"algorithm.beta": (0.3, 0.9)}, seeds=(0,))
    result = run_sweep(tiny_config("tracking.backends=[tensorboard, mlflow]"), spec, sweep_dir,
                       quiet=True)
    assert not result.failed
    for name, beta in (("beta=0.3,seed=0", 0.3), ("beta=0.9,seed=0", 0.9)):
        hparams = hparams_of(tensorboard_data(sweep_dir / name))
        assert hparams.keys() == {"algorithm.beta", "seed"}
        assert hparams["algorithm.beta"] == pytest.approx(beta) and hparams["seed"] == 0
    client, runs = mlflow_runs(default_store(sweep_dir), "betas")
    assert sorted(r.info.run_name for r in runs) == ["beta=0.3,seed=0", "beta=0.9,seed=0"]
    for run in runs:
        assert run.data.tags["fedmaml.sweep"] == "betas"
        check_mlflow(client, run, sweep_dir / run.info.run_name)

    store = tmp_path / "exported"
    assert main(["export", str(sweep_dir), "--to", "mlflow", "--mlflow-uri", store.as_uri()]) == 0
    client, runs = mlflow_runs(store, "betas")
    assert len(runs) == 2
    for run in runs:
        check_mlflow(client, run, sweep_dir / run.info.run_name)


def test_mlflow_store_deleted_between_runs_of_one_process(tiny_config, tmp_path):
    """MLflow caches its store per URI for the process; a second run into a cleaned output
    directory still logs."""
    import shutil

    needs("mlflow", "mlflow")
    first = tracked_run(tiny_config, "mlflow")
    shutil.rmtree(first.parent)
    second = tracked_run(tiny_config, "mlflow")
    client, runs = mlflow_runs(default_store(second.parent), "fedmaml")
    assert len(runs) == 1
    check_mlflow(client, runs[0], second)


def test_a_backend_failing_mid_run_is_dropped_and_the_others_go_on(tiny_config, tmp_path,
                                                                   caplog, monkeypatch):
    """The MLflow run is deleted behind the tracker's back (a real MLflow error on the next
    write): one warning, MLflow logs nothing more, TensorBoard still gets every round."""
    needs("tensorboard", "tensorboard")
    needs("mlflow", "mlflow")
    from fedmaml.tracking import mlflow_backend

    monkeypatch.setattr(mlflow_backend, "FLUSH_SECONDS", 0.0)  # every round writes its batch
    cfg = tiny_config("tracking.backends=[mlflow, tensorboard]")
    run_dir = tmp_path / "run"
    tracker = open_tracker(cfg, run_dir)
    mlflow_run = tracker.backends[0]
    tracker.log_round({"round": 0, "eval": {"seen.loss.mean": 1.0}})
    mlflow_run.client.delete_run(mlflow_run.run_id)
    with caplog.at_level("WARNING", logger="fedmaml"):
        for step in (1, 2):
            tracker.log_round({"round": step, "loss_after": 0.5})
        tracker.finish({"rounds": 2}, run_dir)
    warnings = [r.getMessage() for r in caplog.records if "tracking: mlflow failed" in r.getMessage()]
    assert len(warnings) == 1, warnings
    assert [b.name for b in tracker.backends] == ["tensorboard"]
    assert [e.step for e in tensorboard_data(run_dir).Scalars("loss_after")] == [1, 2]


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def bad_mlflow_uris() -> list[str]:
    """An unsupported scheme, and a real HTTP address where nothing listens."""
    return ["bogus://x", f"http://127.0.0.1:{free_port()}"]


@pytest.mark.parametrize("kind", [0, 1], ids=["unsupported-scheme", "unreachable-http"])
def test_an_mlflow_store_that_cannot_start_is_reported_and_the_run_goes_on(tiny_config, caplog,
                                                                           kind):
    """The run completes (no traceback, no run directory left unfinished), within seconds, with
    one warning naming the key, the value and the reason."""
    import time

    needs("mlflow", "mlflow")
    uri = bad_mlflow_uris()[kind]
    start = time.monotonic()
    with caplog.at_level("WARNING", logger="fedmaml"):
        run_dir = tracked_run(tiny_config, "mlflow", f"tracking.mlflow_uri={uri}")
    assert time.monotonic() - start < 60
    assert (run_dir / "summary.json").is_file()
    assert json.loads((run_dir / "summary.json").read_text()).get("status", "completed") \
        == "completed"
    warnings = [r.getMessage() for r in caplog.records if "tracking.mlflow_uri" in r.getMessage()]
    assert len(warnings) == 1, [r.getMessage() for r in caplog.records]
    assert uri in warnings[0] and "could not start" in warnings[0]
    # the same address again in this process (a run's baselines open trackers of their own)
    caplog.clear()
    with caplog.at_level("WARNING", logger="fedmaml"):
        again = open_tracker(tiny_config("tracking.backends=[mlflow]",
                                         f"tracking.mlflow_uri={uri}"), run_dir / "again")
    assert again.backends == []
    assert not [r for r in caplog.records if "tracking.mlflow_uri" in r.getMessage()]


class SilentServer:
    """A real TCP port that accepts connections and closes each at once, counting them: an MLflow
    server that never answers (MLflow's client fails after its bounded retries)."""

    def __init__(self) -> None:
        import socket
        import threading

        self.sock = socket.create_server(("127.0.0.1", 0))
        self.uri = f"http://127.0.0.1:{self.sock.getsockname()[1]}"
        self.connections = 0
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:  # closed
                return
            self.connections += 1
            conn.close()

    def close(self) -> None:
        self.sock.close()


def test_a_store_that_cannot_start_is_tried_once_by_a_run_its_baselines_and_a_sweep(
        tiny_config, tmp_path, caplog):
    """Each try of a store that does not answer costs seconds: the baselines of a run, and the runs
    of a sweep, do not try it again (the connections it receives are those of one try), and it is
    warned about once; each worker process of a sweep tries it once."""
    needs("mlflow", "mlflow")
    from fedmaml.sweep import SweepSpec, run_sweep

    servers = [SilentServer() for _ in range(4)]
    try:
        one, run, sweep, pool = servers
        # one try: a tracker opened on its own
        assert open_tracker(tiny_config("tracking.backends=[mlflow]",
                                        f"tracking.mlflow_uri={one.uri}"),
                            tmp_path / "one").backends == []
        assert one.connections > 0
        with caplog.at_level("WARNING", logger="fedmaml"):
            run_dir = tracked_run(tiny_config, "mlflow", f"tracking.mlflow_uri={run.uri}",
                                  "compare_with=[fedavg,per_fedavg]")
            result = run_sweep(tiny_config("tracking.backends=[mlflow]",
                                           f"tracking.mlflow_uri={sweep.uri}"),
                               SweepSpec(grid={"algorithm.beta": (0.3, 0.9)}, seeds=(0,)),
                               tmp_path / "betas", quiet=True)
            # --jobs 2: each worker process tries it once, whatever number of runs it trains
            pooled = run_sweep(tiny_config("tracking.backends=[mlflow]",
                                           f"tracking.mlflow_uri={pool.uri}"),
                               SweepSpec(grid={"algorithm.beta": (0.1, 0.3, 0.5, 0.9)}, seeds=(0,)),
                               tmp_path / "pooled", jobs=2, quiet=True)
        assert (run.connections, sweep.connections) == (one.connections, one.connections)
        assert one.connections <= pool.connections <= 2 * one.connections
        assert not pooled.failed and len(pooled.ran) == 4
        for server in (run, sweep):
            warned = [r for r in caplog.records if server.uri in r.getMessage()]
            assert len(warned) == 1, [r.getMessage() for r in warned]
        assert all(json.loads((d / "summary.json").read_text()).get("status", "completed")
                   == "completed" for d in [run_dir, *(run_dir / "baselines").iterdir()])
        assert not result.failed and len(result.ran) == 2
    finally:
        for server in servers:
            server.close()


def test_export_to_an_mlflow_store_that_cannot_start_is_refused_with_the_address(tiny_config,
                                                                                  capsys):
    import time

    needs("mlflow", "mlflow")
    run_dir = run_experiment(tiny_config(), quiet=True)
    for uri in bad_mlflow_uris():
        start = time.monotonic()
        assert main(["export", str(run_dir), "--to", "mlflow", "--mlflow-uri", uri]) == 2
        assert time.monotonic() - start < 60
        err = capsys.readouterr().err
        assert uri in err and "Traceback" not in err, err
