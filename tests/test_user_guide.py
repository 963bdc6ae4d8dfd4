"""Everything works with a user's own module and files (issue 25, points 4 and 5).

The user's module is docs/custom.md's ``my_models.py`` (a CNN with residual blocks, not built in),
written to the test's directory and imported by its path, as a user runs it; the data are per-client
``.npz`` files written from scikit-learn's digits by simulations/custom_images.py's
``write_client_files``. On them: ``fedmaml run`` with TensorBoard tracking, ``fedmaml sweep
--vectorize`` and ``fedmaml compare``, ``fedmaml select-pattern``, a run stopped and resumed (equal
to an uninterrupted one, bit for bit), the guide's script end to end (short), and ``fedmaml deploy``
on a local SuperLink with two SuperNodes (real processes).
"""

from __future__ import annotations

import importlib.util
import json
import os
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from fedmaml.cli import main
from fedmaml.config import load_config
from fedmaml.experiment import run_experiment
from fedmaml.results.recorder import read_metrics
from tests.test_checkpoint import stop_after, without_timing  # noqa: F401 (a fixture)
from tests.test_user_model import doc_files

REPO = Path(__file__).resolve().parents[1]
CLIENTS = 8  # 6 trained + 2 unseen


def _script():
    spec = importlib.util.spec_from_file_location("custom_images",
                                                  REPO / "simulations" / "custom_images.py")
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    return script


CONFIG = """\
name: user
seed: 1
data: {{family: files, path: {clients}, partition: natural, num_clients: 6, unseen_clients: 2,
        heldout_fraction: 0.3, eval_adapt_size: 5}}
model: {{name: "my_models:small_resnet", kwargs: {{width: 4}}}}
algorithm: {{name: moml, support_size: 5, alpha: 0.1, eta: 0.05, inner_pattern: "0001"}}
federated: {{rounds: 4, clients_per_round: 3, eval_every: 2}}
evaluation: {{steps: 1, alpha: 0.1, pattern: "0001"}}
output_dir: {out}
"""


@pytest.fixture
def user(tmp_path, monkeypatch):
    """The user's directory: my_models.py, clients/<id>.npz and user.yaml; my_models importable
    here and in every process started from here (PYTHONPATH)."""
    from sklearn.datasets import load_digits

    (tmp_path / "my_models.py").write_text(doc_files()["my_models.py"], encoding="utf-8")
    digits = load_digits()
    _script().write_client_files(digits.images, digits.target, tmp_path / "clients",
                                 clients=CLIENTS)
    (tmp_path / "user.yaml").write_text(CONFIG.format(clients=tmp_path / "clients",
                                                      out=tmp_path / "runs"))
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.delitem(sys.modules, "my_models", raising=False)
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(
        filter(None, [str(tmp_path), str(REPO), os.environ.get("PYTHONPATH")])))
    monkeypatch.chdir(tmp_path)
    return tmp_path


def test_the_guide_script_trains_the_documented_module():
    assert _script().MY_MODELS == doc_files()["my_models.py"]


def test_the_guide_and_its_script_evaluate_as_the_guide_says():
    """docs/custom.md's images.yaml and the script that made its table evaluate alike, and their
    evaluation.steps is what runs (a written-out pattern has its own step count)."""
    import re

    import yaml

    from fedmaml.core.patterns import pattern_steps

    doc = (REPO / "docs" / "custom.md").read_text(encoding="utf-8")
    block = doc[doc.index("name: custom_images"):]
    documented = yaml.safe_load(re.search(r"evaluation: (\{.*?\})", block).group(1))
    script = yaml.safe_load(re.search(r"evaluation: (\{\{.*?\}\})", _script().CONFIG).group(1)
                            .replace("{{", "{").replace("}}", "}"))
    assert documented == script
    assert pattern_steps(script["pattern"], script["steps"]) == script["steps"]
    steps = {1: "one step", 5: "5 steps"}[script["steps"]]
    assert f"evaluated the same way: {steps} of head-only adaptation" in doc


def test_the_client_files_hold_every_image_once_three_digits_each(tmp_path):
    from sklearn.datasets import load_digits

    digits = load_digits()
    _script().write_client_files(digits.images, digits.target, tmp_path, clients=CLIENTS)
    files = sorted(tmp_path.glob("*.npz"), key=lambda p: int(p.stem))
    assert [p.stem for p in files] == [str(c) for c in range(CLIENTS)]
    pixels = digits.images.astype(np.float32)[:, None] / np.float32(digits.images.max())
    digit_of = {bytes(p): d for p, d in zip(pixels, digits.target)}  # no image appears twice
    assert len(digit_of) == len(pixels)
    seen = []
    for c, path in enumerate(files):
        with np.load(path) as f:
            x, y = f["x"], f["y"]
        assert x.dtype == np.float32 and x.shape[1:] == (1, 8, 8) and y.dtype == np.int64
        held = [digit_of[bytes(image)] for image in x]
        assert set(held) == {(c + k) % 10 for k in range(3)}
        # The client's own names: one label per digit, 0, 1, 2 each used once.
        names = dict(zip(held, y.tolist()))
        assert sorted(names.values()) == [0, 1, 2]
        assert all(names[d] == label for d, label in zip(held, y.tolist()))
        seen += [bytes(image) for image in x]
    assert sorted(seen) == sorted(digit_of)  # every image exactly once


def test_the_guides_image_snippet_runs_as_written_and_writes_the_scripts_files(tmp_path,
                                                                              monkeypatch):
    # docs/custom.md, "Your CNN on your image files", step 2: the snippet on its own (nothing
    # defined beforehand) writes the files the script writes.
    import re
    import textwrap

    from sklearn.datasets import load_digits

    doc = (REPO / "docs" / "custom.md").read_text(encoding="utf-8")
    section = doc.split("### Your CNN on your image files", 1)[1]
    snippet = textwrap.dedent(re.search(r"```python\n(.*?)\n *```", section, flags=re.S).group(1))
    monkeypatch.chdir(tmp_path)
    exec(compile(snippet, "docs/custom.md", "exec"), {"__name__": "__main__"})
    digits = load_digits()
    _script().write_client_files(digits.images, digits.target, tmp_path / "script")
    written = sorted(p.name for p in (tmp_path / "clients").iterdir())
    assert written == sorted(p.name for p in (tmp_path / "script").iterdir())
    assert len(written) == 24
    for name in written:
        with np.load(tmp_path / "clients" / name) as a, np.load(tmp_path / "script" / name) as b:
            assert sorted(a.files) == ["x", "y"]
            for key in ("x", "y"):
                assert a[key].dtype == b[key].dtype and np.array_equal(a[key], b[key]), name


def test_run_with_tensorboard_then_select_pattern(user, capsys):
    from tests.test_tracking import check_tensorboard, needs

    needs("tensorboard", "tensorboard")
    assert main(["run", "user.yaml", "--quiet", "tracking.backends=tensorboard"]) == 0
    run_dir = Path(capsys.readouterr().out.strip().splitlines()[-1])
    rows = read_metrics(run_dir)
    assert [r["round"] for r in rows if "eval" in r] == [0, 2, 4]
    assert rows[-1]["round"] == 4 and rows[-1].get("failures", 0) == 0
    assert set(torch.load(run_dir / "model.pt", weights_only=True)) >= {"2.conv.weight", "7.bias"}
    check_tensorboard(run_dir)  # every scalar of metrics.jsonl, with its value

    # Lambda-pattern selection among head-only, the last two groups, and full adaptation.
    assert main(["select-pattern", str(run_dir), "--quiet", "--epsilon", "100",
                 "--only-candidates", "--candidates", "0001", "0011",
                 "pattern_selection.repeats=1", "pattern_selection.warmup=0",
                 "pattern_selection.validation_clients=3"]) == 0
    [record_file] = run_dir.glob("pattern_selection_*.json")
    record = json.loads(record_file.read_text())
    patterns = [r["pattern"] for r in record["rows"]]
    assert {"0001", "0011"} <= set(patterns) and record["chosen"] in patterns
    assert all("error" not in r for r in record["rows"]), record["rows"]


SWEEP = """
sweep:
  settings:
    slow: {algorithm.eta: 0.02}
    fast: {algorithm.eta: 0.05}
    FedAvg: {algorithm.name: fedavg}
  seeds: [0]
"""


def test_sweep_vectorized_and_compare(user, capsys):
    config = user / "user.yaml"
    config.write_text(config.read_text() + SWEEP)
    assert main(["sweep", str(config), "--vectorize", "--quiet", "--sweep-dir",
                 str(user / "sweep")]) == 0
    summaries = {d.name: json.loads((d / "summary.json").read_text())
                 for d in (user / "sweep").iterdir() if (d / "summary.json").exists()}
    assert set(summaries) == {"slow,seed=0", "fast,seed=0", "FedAvg,seed=0"}
    assert all(s["status"] == "completed" for s in summaries.values())
    # The two MOML settings differ only in eta: one batch on the user's module; FedAvg has
    # another shape and trains in a batch of its own.
    assert [summaries[f"{name},seed=0"]["batch"]["runs"] for name in ("slow", "fast")] == [2, 2]
    capsys.readouterr()
    assert main(["compare", str(user / "sweep"), "--out", str(user / "compare")]) == 0
    report = (user / "compare" / "report.md").read_text()
    assert all(f"| {name} | 1 |" in report for name in ("slow", "fast", "FedAvg"))
    assert (user / "compare" / "convergence-seen.accuracy.mean-rounds.png").stat().st_size


def test_a_stopped_run_resumes_bitwise(user, stop_after):  # noqa: F811
    cfg = load_config(user / "user.yaml")
    stop_after(2)
    cut = run_experiment(cfg, quiet=True, run_dir=user / "cut")
    stop_after(10 ** 6)
    assert json.loads((cut / "summary.json").read_text())["status"] == "interrupted"
    assert main(["run", "--resume", str(cut), "--quiet"]) == 0
    full = run_experiment(cfg, quiet=True, run_dir=user / "full")
    assert [without_timing(r) for r in read_metrics(cut)] == [
        without_timing(r) for r in read_metrics(full)]
    a, b = (torch.load(d / "model.pt", weights_only=True) for d in (cut, full))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.slow
def test_the_guide_script_runs_both_parts_end_to_end(tmp_path, monkeypatch):
    # simulations/custom_guide.py --short: the image files and the sweep of three settings on the
    # user's CNN, the CSV and its run with baselines; a figure and a table for each.
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(filter(None, [str(REPO),
                                                                   os.environ.get("PYTHONPATH")])))
    spec = importlib.util.spec_from_file_location("custom_guide",
                                                  REPO / "simulations" / "custom_guide.py")
    guide = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(guide)
    assert guide.main(["--short", "--out", str(tmp_path / "out")]) == 0
    images, tabular = (tmp_path / "out" / part / "compare" for part in ("images", "tabular"))
    assert (images / "convergence-seen.accuracy.mean-rounds.png").stat().st_size
    report = (images / "report.md").read_text()
    assert all(f"| {name} | 1 |" in report for name in ("MOML-head", "MOML-full", "FedAvg"))
    assert (tabular / "convergence-seen.loss.mean-rounds.png").stat().st_size
    assert "| moml | 1 |" in (tabular / "report.md").read_text()


# -- fedmaml deploy: the user's module travels with the app ----------------------------------------

def test_the_deployed_app_bundles_the_users_module(user):
    import importlib
    import io
    import tomllib
    import zipfile

    from flwr.cli.build import build_fab_from_disk

    from fedmaml.deploy.app_bundle import staged_app, user_code

    (user / "my_pkg").mkdir()
    (user / "my_pkg" / "__init__.py").write_text("")
    (user / "my_pkg" / "nets.py").write_text("from my_models import small_resnet as net\n")
    cfg = load_config(user / "user.yaml")
    assert user_code(cfg) == [(user / "my_models.py").resolve()]
    both = load_config(user / "user.yaml", ["data.family=flower", "data.flower_task=my_pkg.nets"])
    assert user_code(both) == [(user / "my_models.py").resolve(), (user / "my_pkg").resolve()]
    # the user's own loss and algorithm travel with the model
    (user / "my_losses.py").write_text("def huber(pred, y):\n    return ((pred - y) ** 2).mean()\n")
    (user / "my_algos.py").write_text("from fedmaml.algorithms.moml import MOML as Mine\n")
    importlib.invalidate_caches()
    every = load_config(user / "user.yaml", ["model.loss=my_losses:huber",
                                             "algorithm.name=my_algos:Mine"])
    assert user_code(every) == [(user / name).resolve()
                                for name in ("my_models.py", "my_losses.py", "my_algos.py")]
    # Built in, installed (torch), fedmaml's own, or not found: nothing to bundle.
    for name in ("torch.nn:Linear", "fedmaml.models:nothing", "nowhere:f"):
        assert user_code(load_config(user / "user.yaml", [f"model.name={name}"])) == [], name
    assert user_code(load_config(None, ["model.name=mlp"])) == []
    with staged_app(user_code(both)) as app:
        names = zipfile.ZipFile(io.BytesIO(build_fab_from_disk(app))).namelist()
        include = tomllib.loads((app / "pyproject.toml").read_text())["tool"]["flwr"]["app"][
            "fab-include"]
    assert include == ["fedmaml/**/*.py", "my_models.py", "my_pkg/**/*.py"]
    assert {"my_models.py", "my_pkg/__init__.py", "my_pkg/nets.py",
            "fedmaml/federated/client_app.py"} <= set(names)


@pytest.mark.skipif(os.environ.get("FEDMAML_SKIP_DEPLOYMENT") == "1",
                    reason="FEDMAML_SKIP_DEPLOYMENT=1")
@pytest.mark.deployment
@pytest.mark.slow
def test_deploy_runs_the_users_module_and_files_on_a_local_superlink(user):
    """A SuperLink and two SuperNodes (real processes) that cannot import my_models themselves
    (their PYTHONPATH has fedmaml only): ``fedmaml deploy submit`` bundles it, and the run
    trains the user's CNN on the user's files."""
    import subprocess

    from fedmaml.deploy import processes
    from fedmaml.deploy.commands import program_env, superlink_argv
    from fedmaml.deploy.flwr_config import write_connection

    env = {**program_env(), "PYTHONPATH": str(REPO), "FLWR_LOG_LEVEL": "INFO",
           "PYTHONUNBUFFERED": "1"}
    (user / "user.yaml").write_text(CONFIG.format(clients=user / "clients", out=user / "runs")
                                    .replace("num_clients: 6, unseen_clients: 2",
                                             "num_clients: 2, unseen_clients: 0")
                                    .replace("rounds: 4, clients_per_round: 3, eval_every: 2",
                                             "rounds: 2, clients_per_round: 2, eval_every: 2, "
                                             "round_timeout: 300, mode: cross_silo"))
    for c in range(2, CLIENTS):  # a federation of two devices: clients 0 and 1
        (user / "clients" / f"{c}.npz").unlink()
    fleet, control = processes.free_port(), processes.free_port()
    procs: dict[str, subprocess.Popen] = {}
    try:
        procs["superlink"] = processes.start(
            superlink_argv(None, host="127.0.0.1", port=fleet, control_port=control,
                           insecure=True, operator_token=user / "operator.token"),
            user / "superlink.log", cwd=REPO, env={**env, "FLWR_HOME": str(user / "home-link")})
        processes.wait_until(lambda: processes.port_open("127.0.0.1", control), 180, "SuperLink",
                             process=procs["superlink"], name="the SuperLink",
                             log=user / "superlink.log")
        for i in range(2):
            procs[f"node-{i}"] = processes.start(
                [sys.executable, "-m", "fedmaml", "deploy", "supernode", "--superlink",
                 f"127.0.0.1:{fleet}", "--insecure", "--partition-id", str(i), "--num-partitions",
                 "2", "--port", str(processes.free_port()), "--home", str(user / f"home-{i}"),
                 "--retry-for", "0"], user / f"node-{i}.log", env=env, cwd=REPO)
        for i in range(2):
            processes.wait_until(lambda i=i: "SuperNode ID: " in (user / f"node-{i}.log").read_text(
                errors="replace"), 240, f"node {i} to connect", process=procs[f"node-{i}"],
                name=f"node {i}", log=user / f"node-{i}.log")
        home = user / "home-op"
        write_connection("op", f"127.0.0.1:{control}", None, insecure=True, default=True,
                         home=home, token_file=user / "operator.token")
        # The submitter's environment has the user's directory on PYTHONPATH (the fixture's).
        done = subprocess.run([sys.executable, "-m", "fedmaml", "deploy", "submit", "user.yaml",
                               "--connection", "op", "--timeout", "900"],
                              capture_output=True, text=True, cwd=user,
                              env={**os.environ, **program_env(), "FLWR_HOME": str(home)},
                              timeout=1000)
        assert done.returncode == 0, done.stdout + done.stderr
        assert f"bundling {(user / 'my_models.py').resolve()} with the app" in done.stdout
        [run_dir] = [d for d in (user / "runs").iterdir() if d.is_dir()]
        rows = read_metrics(run_dir)
        assert [r["round"] for r in rows] == [0, 1, 2] and rows[2]["replies"] == 2, rows
        assert set(torch.load(run_dir / "model.pt", weights_only=True)) >= {"2.conv.weight"}
    finally:
        for proc in reversed(list(procs.values())):
            processes.stop(proc)
    for name, proc in procs.items():
        assert proc.poll() is not None, f"{name} still runs"
