"""`fedmaml sweep`: grid parsing and key suffixes, planning, real sweeps into run directories,
skipping finished runs, resuming after a crash and after a real kill, parallel workers, failures."""

import contextlib
import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from fedmaml.cli import main
from fedmaml.config import load_config, load_config_and_sweep, resolve_key, short_key
from fedmaml.errors import ConfigError, FedmamlError
from fedmaml.run_dir import HOLDER_SUFFIX
from fedmaml.sweep import (LOCK_FILE, Reference, SweepSpec, _Lock, load_sweep, parse_grid_arg, parse_seeds, plan_sweep,
                           run_name, run_sweep, write_manifest)

ROOT = Path(__file__).resolve().parents[1]

# Each run is a fraction of a second in-process: 6 sinusoid clients, 4 rounds, a 16-unit MLP.
TINY = {
    "name": "tiny", "seed": 0,
    "data": {"family": "sinusoid", "num_clients": 6, "unseen_clients": 2},
    "model": {"hidden": [16]},
    "federated": {"rounds": 4, "clients_per_round": 3, "eval_every": 2, "eval_clients": 0},
    "evaluation": {"steps": 3},
}


def write_config(tmp_path: Path, extra: dict | None = None, name: str = "tiny.yaml") -> Path:
    data = {**TINY, "output_dir": str(tmp_path / "results"), **(extra or {})}
    path = tmp_path / name
    path.write_text(yaml.safe_dump(data), encoding="utf-8")
    return path


def summaries(sweep_dir: Path) -> dict[str, int]:
    """Run name -> mtime (ns) of its summary.json: a rerun rewrites it."""
    return {p.parent.name: p.stat().st_mtime_ns for p in sweep_dir.glob("*/summary.json")}


# -- keys, values, seeds ---------------------------------------------------------------------------

def test_key_suffixes_resolve_or_explain():
    assert resolve_key("beta") == "algorithm.beta"
    assert resolve_key("algorithm.beta") == "algorithm.beta"
    assert resolve_key("eval_every") == "federated.eval_every"
    with pytest.raises(ConfigError, match=r"alpha: ambiguous key.*algorithm\.alpha.*evaluation\.alpha"):
        resolve_key("alpha")
    with pytest.raises(ConfigError, match="betta: unknown key; did you mean 'beta'"):
        resolve_key("betta")
    # A suffix shared by several keys is settled by the values when only one key accepts them.
    assert parse_grid_arg("mode=cross_device,cross_silo")[0] == "federated.mode"
    assert short_key("algorithm.beta") == "beta"
    assert short_key("algorithm.alpha") == "algorithm.alpha"


def test_grid_values_are_typed_like_overrides():
    assert parse_grid_arg("beta=0.3,0.5,0.9") == ("algorithm.beta", (0.3, 0.5, 0.9))
    assert parse_grid_arg("hidden=[40,40],[20]") == ("model.hidden", ([40, 40], [20]))
    assert parse_grid_arg("rounds=5,10") == ("federated.rounds", (5, 10))
    # A string key keeps the text: "0001" is a pattern, not the number 1.
    assert parse_grid_arg("evaluation.pattern=0001,full") == ("evaluation.pattern", ("0001", "full"))


@pytest.mark.parametrize("text, message", [
    ("beta", "must look like key=value1,value2"),
    ("beta=0.3,,0.5", "an empty value"),
    ("alpha=0.1,0.2", "ambiguous key"),
    ("seed=0,1", "use --seeds"),
    ("output_dir=a,b", "cannot be a grid key"),
    ("nope=1,2", "nope: unknown key"),
])
def test_bad_grid_arguments(text, message):
    with pytest.raises(ConfigError, match=message):
        parse_grid_arg(text)


def test_seed_lists():
    assert parse_seeds("0-4") == (0, 1, 2, 3, 4)
    assert parse_seeds("0,2,5") == (0, 2, 5)
    assert parse_seeds("0-1,7") == (0, 1, 7)
    assert parse_seeds(3) == (3,)
    assert parse_seeds([1, 2]) == (1, 2)
    for bad in ("4-1", "a", "", [-1], [1, 1], True):
        with pytest.raises(ConfigError, match="--seeds"):
            parse_seeds(bad)


# -- planning --------------------------------------------------------------------------------------

def test_plan_names_every_combination_once_per_seed(tmp_path):
    base, spec = load_sweep(write_config(tmp_path), grid_args=["beta=0.3,0.9", "mode=cross_device,cross_silo"],
                            seeds="0-2")
    runs, invalid = plan_sweep(base, spec, tmp_path / "sw")
    assert len(runs) == 2 * 2 * 3 and not invalid
    names = {r.name for r in runs}
    assert "beta=0.3,federated.mode=cross_silo,seed=2" in names
    run = next(r for r in runs if r.name == "beta=0.9,federated.mode=cross_device,seed=1")
    cfg = run.config
    assert (cfg.algorithm.beta, cfg.federated.mode, cfg.seed) == (0.9, "cross_device", 1)
    assert cfg.name == run.name and Path(cfg.output_dir) == tmp_path / "sw"
    # The name does not depend on the order in which the grid was given.
    assert run_name({"federated.mode": "x", "algorithm.beta": 1}, 0) == run_name(
        {"algorithm.beta": 1, "federated.mode": "x"}, 0)


def test_invalid_values_and_combinations(tmp_path):
    base = load_config(write_config(tmp_path))
    with pytest.raises(ConfigError, match=r"grid algorithm\.beta: 1\.5 is out of range"):
        plan_sweep(base, SweepSpec({"algorithm.beta": (0.5, 1.5)}, (0,)), tmp_path)
    # decay_to_w needs cross_silo: one of four combinations breaks a rule linking two keys.
    spec = SweepSpec({"algorithm.memory_policy": ("keep", "decay_to_w"),
                      "federated.mode": ("cross_device", "cross_silo")}, (0,))
    with pytest.raises(ConfigError, match=r"memory_policy=decay_to_w, federated\.mode=cross_device "
                                          r"is invalid.*--skip-invalid"):
        plan_sweep(base, spec, tmp_path)
    runs, invalid = plan_sweep(base, spec, tmp_path, skip_invalid=True)
    assert len(runs) == 3 and len(invalid) == 1 and "decay_to_w" in invalid[0]
    # Linked keys change together (replace_paths): fedmeta + second_order is fine as a pair.
    spec = SweepSpec({"algorithm.name": ("fedmeta",), "meta_gradient": ("second_order",)}, (0,))
    assert len(plan_sweep(base, spec, tmp_path)[0]) == 1


def test_sweep_section_in_yaml(tmp_path):
    path = write_config(tmp_path, {"sweep": {"grid": {"beta": [0.3, 0.9]}, "seeds": "0-1"}})
    base, spec = load_sweep(path)
    assert spec.grid == {"algorithm.beta": (0.3, 0.9)} and spec.seeds == (0, 1)
    # The command line adds keys, replaces the file's seeds and overrides the base.
    base, spec = load_sweep(path, ["algorithm.eta=0.01"], ["eval_every=1,2"], "3")
    assert set(spec.grid) == {"algorithm.beta", "federated.eval_every"} and spec.seeds == (3,)
    assert base.algorithm.eta == 0.01
    # `fedmaml run` refuses a sweep file rather than silently running one point of it.
    with pytest.raises(ConfigError, match=r"has a 'sweep:' section.*fedmaml sweep"):
        load_config(path)
    bad = write_config(tmp_path, {"sweep": {"grid": {"beta": 0.3}}}, "bad.yaml")
    with pytest.raises(ConfigError, match=r"sweep\.grid\.beta: expected a non-empty list"):
        load_sweep(bad)
    bad = write_config(tmp_path, {"sweep": {"grids": {}}}, "bad2.yaml")
    with pytest.raises(ConfigError, match=r"sweep\.grids: unknown key; allowed keys: settings, "
                                          r"references, grid, seeds"):
        load_sweep(bad)


@pytest.mark.parametrize("path", sorted((ROOT / "configs" / "sweeps").glob("*.yaml")), ids=lambda p: p.name)
def test_every_shipped_sweep_file_plans(path, tmp_path):
    base, spec = load_sweep(path)
    assert (spec.grid or spec.settings) and path.read_text().startswith("# ")
    runs, invalid = plan_sweep(base, spec, tmp_path)
    assert len(runs) == spec.num_settings * len(spec.seeds) and not invalid


# -- running ---------------------------------------------------------------------------------------

def test_sweep_runs_every_combination_and_skips_finished_runs(tmp_path, capsys):
    cfg = write_config(tmp_path)
    sweep_dir = tmp_path / "sw"
    argv = ["sweep", str(cfg), "--grid", "beta=0.3,0.9", "--seeds", "0-1", "--sweep-dir", str(sweep_dir)]
    assert main(argv) == 0
    first = summaries(sweep_dir)
    assert sorted(first) == ["beta=0.3,seed=0", "beta=0.3,seed=1", "beta=0.9,seed=0", "beta=0.9,seed=1"]
    err = capsys.readouterr().err
    assert "4 runs (2 settings x 2 seeds); 0 finished already, 4 to run" in err
    assert "run 4/4" in err  # the overall progress line
    run = sweep_dir / "beta=0.9,seed=1"
    saved = load_config(run / "config.yaml")
    assert (saved.algorithm.beta, saved.seed) == (0.9, 1)
    rows = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    assert rows[-1]["round"] == 4

    # The manifest is itself a sweep file that leads back here.
    base, section = load_config_and_sweep(sweep_dir / "sweep.yaml")
    assert Path(base.output_dir) / base.name == sweep_dir
    assert section == {"grid": {"algorithm.beta": [0.3, 0.9]}, "seeds": [0, 1]}

    # Re-invoked: nothing runs again.
    assert main(argv) == 0
    assert "4 finished already, 0 to run" in capsys.readouterr().err
    assert summaries(sweep_dir) == first
    # Through the manifest, and extended by a seed: only the new seed runs.
    assert main(["sweep", str(sweep_dir / "sweep.yaml"), "--seeds", "0-2"]) == 0
    after = summaries(sweep_dir)
    assert set(after) - set(first) == {"beta=0.3,seed=2", "beta=0.9,seed=2"}
    assert all(after[k] == first[k] for k in first)


def test_a_sweep_into_a_run_directory_is_refused_with_a_directory_to_use(tmp_path):
    base, spec = load_sweep(write_config(tmp_path), grid_args=["beta=0.3,0.9"], seeds="0")
    run_dir = tmp_path / "tiny"
    (run_dir).mkdir()
    (run_dir / "config.yaml").write_text("name: tiny\n")  # what `fedmaml run` leaves there
    with pytest.raises(FedmamlError, match=r"is a run directory.*--sweep-dir \S*tiny-sweep"):
        run_sweep(base, spec, run_dir, quiet=True)
    assert sorted(p.name for p in run_dir.iterdir()) == ["config.yaml"]  # nothing written


def test_resume_reruns_only_the_unfinished_run_cleanly(tmp_path):
    base, spec = load_sweep(write_config(tmp_path), grid_args=["beta=0.3,0.9"], seeds="0")
    sweep_dir = tmp_path / "sw"
    run_sweep(base, spec, sweep_dir, quiet=True)
    before = summaries(sweep_dir)
    # A crash mid-run leaves a directory without summary.json (and maybe stale files).
    crashed = sweep_dir / "beta=0.9,seed=0"
    (crashed / "summary.json").unlink()
    (crashed / "stale.txt").write_text("from the interrupted attempt")
    result = run_sweep(base, spec, sweep_dir, quiet=True)
    assert result.ran == ["beta=0.9,seed=0"] and result.skipped == ["beta=0.3,seed=0"]
    assert summaries(sweep_dir)["beta=0.3,seed=0"] == before["beta=0.3,seed=0"]
    assert (crashed / "summary.json").exists() and not (crashed / "stale.txt").exists()


def test_finished_run_of_another_config_is_not_reused(tmp_path):
    base, spec = load_sweep(write_config(tmp_path), grid_args=["beta=0.3"], seeds="0")
    run_sweep(base, spec, tmp_path / "sw", quiet=True)
    other, spec = load_sweep(write_config(tmp_path), ["algorithm.eta=0.01"], ["beta=0.3"], "0")
    with pytest.raises(FedmamlError, match=r"a finished run of a different config \(algorithm\.eta: "
                                           r"0\.005 there, 0\.01 now\)"):
        run_sweep(other, spec, tmp_path / "sw", quiet=True)


def test_failed_run_is_reported_and_retried(tmp_path, capsys):
    # a missing data file is found when the run sets up (the sweep plans without reading data)
    cfg = write_config(tmp_path, {"data": {**TINY["data"], "path": str(tmp_path / "missing"),
                                           "partition": "iid"}})
    sweep_dir = tmp_path / "sw"
    argv = ["sweep", str(cfg), "--grid", "data.family=sinusoid,files", "--sweep-dir",
            str(sweep_dir)]
    assert main(argv) == 1
    out = capsys.readouterr()
    assert "1 failed" in out.out and "DataError" in out.err and "missing' does not exist" in out.err
    failed = sweep_dir / "data.family=files,seed=0"
    assert (failed / "error.txt").exists() and not (failed / "summary.json").exists()
    assert (sweep_dir / "data.family=sinusoid,seed=0" / "summary.json").exists()
    assert main(argv) == 1  # retried (still failing), the finished one skipped
    assert "1 finished already, 1 to run" in capsys.readouterr().err


def test_a_user_module_that_cannot_be_built_while_planning_is_left_to_its_runs(tmp_path):
    # its layer groups need the data, which is missing: planning cannot check its patterns, and
    # leaves the error to the run that uses that data (as for the built-in models above)
    cfg = write_config(tmp_path, {"model": {"name": "user_models:mlp_like"},
                                  "data": {**TINY["data"], "path": str(tmp_path / "missing"),
                                           "partition": "iid"}})
    base, spec = load_sweep(cfg, grid_args=["data.family=sinusoid,files"], seeds="0")
    runs, invalid = plan_sweep(base, spec, tmp_path / "sw", False)
    assert [r.name for r in runs] == ["data.family=sinusoid,seed=0", "data.family=files,seed=0"]
    assert invalid == []


def test_dry_run_lists_states_and_runs_nothing(tmp_path, capsys):
    cfg = write_config(tmp_path)
    sweep_dir = tmp_path / "sw"
    assert main(["sweep", str(cfg), "--grid", "beta=0.3,0.9", "--sweep-dir", str(sweep_dir),
                 "--dry-run", "--quiet"]) == 0
    out, err = capsys.readouterr()  # the listing is the output: stdout, even with --quiet
    assert "new        beta=0.3,seed=0" in out and "new        beta=0.9,seed=0" in out
    assert out.startswith(f"sweep {sweep_dir}: 2 runs (2 settings x 1 seed)") and err == ""
    assert not sweep_dir.exists()


def test_one_run_is_counted_in_the_singular(tmp_path, capsys):
    cfg = write_config(tmp_path)
    assert main(["sweep", str(cfg), "--sweep-dir", str(tmp_path / "sw"), "--dry-run"]) == 0
    assert ": 1 run (1 setting x 1 seed); 0 finished already, 1 to run" in capsys.readouterr().out


def test_no_holder_file_stays_behind(tmp_path):
    """The holder file names a running sweep: it goes when the sweep ends, however it ends."""
    holder_file = LOCK_FILE + HOLDER_SUFFIX
    base, spec = load_sweep(write_config(tmp_path), grid_args=["beta=0.3"], seeds="0")
    sweep_dir = tmp_path / "sw"
    assert not run_sweep(base, spec, sweep_dir, quiet=True).failed
    assert (sweep_dir / "beta=0.3,seed=0" / "summary.json").is_file()
    assert not (sweep_dir / holder_file).exists()
    for error in (RuntimeError, KeyboardInterrupt):
        with pytest.raises(error):
            with _Lock(sweep_dir):
                assert json.loads((sweep_dir / holder_file).read_text())["pid"] == os.getpid()
                raise error()
        assert not (sweep_dir / holder_file).exists()


def test_concurrent_sweep_in_one_directory_is_refused(tmp_path):
    base, spec = load_sweep(write_config(tmp_path), grid_args=["beta=0.3"], seeds="0")
    sweep_dir = tmp_path / "sw"
    sweep_dir.mkdir()
    with _Lock(sweep_dir):
        with pytest.raises(FedmamlError, match="another fedmaml sweep is running"):
            run_sweep(base, spec, sweep_dir, quiet=True)


def test_jobs_are_checked(tmp_path):
    base, spec = load_sweep(write_config(tmp_path, {"engine": {"name": "ray"}}), grid_args=["beta=0.3"])
    with pytest.raises(ConfigError, match="--jobs 2 with engine.name 'ray'"):
        run_sweep(base, spec, tmp_path / "sw", jobs=2, quiet=True)
    with pytest.raises(ConfigError, match="--jobs: -1"):
        run_sweep(base, spec, tmp_path / "sw", jobs=-1, quiet=True)
    from fedmaml.sweep import resolve_jobs

    local, _ = load_sweep(write_config(tmp_path), grid_args=["beta=0.3"])
    assert resolve_jobs(0, local) == os.cpu_count()  # --jobs 0: one per CPU core


def _final_eval(run_dir: Path) -> dict:
    rows = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return {k: v for k, v in rows[-1]["eval"].items() if "adapt-ms" not in k}


@pytest.mark.slow
def test_parallel_workers_give_the_same_runs(tmp_path):
    base, spec = load_sweep(write_config(tmp_path), grid_args=["beta=0.3,0.9"], seeds="1")
    serial = run_sweep(base, spec, tmp_path / "serial", quiet=True)
    parallel = run_sweep(base, spec, tmp_path / "parallel", jobs=2, quiet=True)
    assert not parallel.failed and sorted(parallel.ran) == sorted(serial.ran)
    for name in serial.ran:
        assert _final_eval(tmp_path / "parallel" / name) == _final_eval(tmp_path / "serial" / name)


@pytest.mark.slow
def test_resume_after_killing_the_sweep_process(tmp_path):
    """A real interruption: the sweep process is killed (SIGKILL, no clean-up) mid-way."""
    cfg = write_config(tmp_path, {"federated": {**TINY["federated"], "rounds": 30}})
    sweep_dir = tmp_path / "sw"
    argv = [str(cfg), "--grid", "beta=0.2,0.4,0.6,0.8", "--sweep-dir", str(sweep_dir), "--quiet"]
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.Popen([sys.executable, "-m", "fedmaml", "sweep", *argv], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.time() + 120
        while not summaries(sweep_dir) and time.time() < deadline and proc.poll() is None:
            time.sleep(0.05)
        assert proc.poll() is None, "the sweep finished before it could be interrupted"
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    done_before = summaries(sweep_dir)
    assert 1 <= len(done_before) < 4
    base, spec = load_sweep(cfg, grid_args=["beta=0.2,0.4,0.6,0.8"])
    result = run_sweep(base, spec, sweep_dir, quiet=True)
    assert sorted(result.skipped) == sorted(done_before)
    assert len(result.ran) == 4 - len(done_before) and not result.failed
    after = summaries(sweep_dir)
    assert len(after) == 4 and all(after[k] == v for k, v in done_before.items())


def test_sweep_lock_is_held_across_processes_and_names_the_holder(tmp_path):
    """The lock is an OS lock: another process cannot take it while this one holds it, and can
    once it is released."""

    sweep_dir = tmp_path / "sw"
    sweep_dir.mkdir()
    code = ("import sys; from pathlib import Path; from fedmaml.sweep import _Lock\n"
            "from fedmaml.errors import FedmamlError\n"
            "try:\n    _Lock(Path(sys.argv[1])).__enter__()\n    print('acquired')\n"
            "except FedmamlError as e:\n    print(e)\n")
    root = str(Path(__file__).resolve().parents[1])
    env = {**os.environ, "PYTHONPATH": root}

    def other() -> str:
        return subprocess.run([sys.executable, "-c", code, str(sweep_dir)], capture_output=True,
                              text=True, env=env, check=True).stdout.strip()

    with _Lock(sweep_dir):
        message = other()
        assert message.startswith(f"{sweep_dir}: another fedmaml sweep is running in this "
                                  f"directory (pid {os.getpid()} on host {socket.gethostname()} "
                                  "since ")
        assert message.endswith("); wait for it or use another --sweep-dir")
    assert other() == "acquired"


def test_tracking_keys_do_not_make_a_finished_run_different():
    """Where a run is logged does not change its results: a sweep re-invoked with tracking on
    reuses its finished runs (``fedmaml export`` logs those)."""
    from fedmaml.config import Config, replace_paths
    from fedmaml.sweep import config_differences

    tracked = replace_paths(Config(), {"tracking.backends": ["tensorboard", "mlflow"],
                                       "tracking.project": "p"})
    assert config_differences(Config(), tracked) == []
    assert config_differences(Config(), replace_paths(tracked, {"algorithm.beta": 0.5})) == [
        ("algorithm.beta", 0.3, 0.5)]


# -- named settings (sweep.settings) -----------------------------------------------------------------

NAMED = {"MOML": {"algorithm.name": "moml", "beta": 0.3},
         "FO-MAML": {"algorithm.name": "fedmeta", "algorithm.eta": 0.001}}


def test_an_override_that_a_named_setting_replaces_is_refused(tmp_path):
    """A key=value override changes the base config; a setting's own value of that key would
    replace it in the setting's runs, silently."""
    path = write_config(tmp_path, {"sweep": {"settings": NAMED}})
    with pytest.raises(ConfigError, match=r"algorithm\.eta=0\.01: setting 'FO-MAML' of .* sets "
                       r"algorithm\.eta itself \(0\.001\)"):
        load_sweep(path, ["algorithm.eta=0.01"])
    with pytest.raises(ConfigError, match=r"setting 'MOML' .* sets algorithm\.beta itself"):
        load_sweep(path, ["algorithm.beta=0.5"])
    base, spec = load_sweep(path, ["federated.rounds=3"])  # no setting sets it: every run has it
    runs, _ = plan_sweep(base, spec, tmp_path / "sw")
    assert {r.config.federated.rounds for r in runs} == {3}


def test_named_settings_cross_the_grid_and_seeds_and_name_the_run_directories(tmp_path):
    path = write_config(tmp_path, {"sweep": {"settings": NAMED, "grid": {"rounds": [2, 4]},
                                             "seeds": [0, 1]}})
    base, spec = load_sweep(path)
    assert spec.settings == {"MOML": {"algorithm.name": "moml", "algorithm.beta": 0.3},
                             "FO-MAML": {"algorithm.name": "fedmeta", "algorithm.eta": 0.001}}
    assert spec.num_settings == 4
    runs, _ = plan_sweep(base, spec, tmp_path / "sw")
    assert list(spec.settings) == ["FO-MAML", "MOML"]  # the file's order (safe_dump sorts keys)
    assert [r.name for r in runs] == [f"{s},rounds={n},seed={seed}" for s in ("FO-MAML", "MOML")
                                      for n in (2, 4) for seed in (0, 1)]
    for r in runs:
        assert r.setting == r.name.split(",")[0]
        alg = base.algorithm  # what a setting does not set comes from the base config
        expected = ({"algorithm.name": "moml", "algorithm.beta": 0.3, "algorithm.eta": alg.eta}
                    if r.setting == "MOML" else
                    {"algorithm.name": "fedmeta", "algorithm.beta": alg.beta, "algorithm.eta": 0.001})
        assert {k: getattr(r.config.algorithm, k.split(".")[1]) for k in expected} == expected
        assert r.config.federated.rounds == r.values["federated.rounds"]
    # A list of one-entry mappings is the same spec, in its order.
    listed = write_config(tmp_path, {"sweep": {"settings": [{"FO-MAML": NAMED["FO-MAML"]},
                                                            {"MOML": NAMED["MOML"]}]}}, "l.yaml")
    assert list(load_sweep(listed)[1].settings) == ["FO-MAML", "MOML"]
    # The manifest keeps the settings (and references): `fedmaml sweep DIR/sweep.yaml` resumes it.
    spec = SweepSpec(grid=spec.grid, seeds=(0,), settings=spec.settings,
                     references={"MOML": Reference("0.3 at 40,000 steps", "unseen.loss.mean",
                                                   (40000,))})
    run_sweep(base, spec, tmp_path / "sw", quiet=True)
    again_base, again = load_sweep(tmp_path / "sw" / "sweep.yaml")
    assert again.settings == spec.settings and again.references == spec.references
    assert sorted(p.name for p in (tmp_path / "sw").iterdir() if p.is_dir()) == sorted(
        f"{s},rounds={n},seed=0" for s in NAMED for n in (2, 4))
    result = run_sweep(again_base, again, tmp_path / "sw", quiet=True)
    assert len(result.skipped) == 4 and not result.ran
    # Edited references reach a finished sweep's manifest (what compare shows); nothing reruns.
    edited = SweepSpec(grid=again.grid, seeds=again.seeds, settings=again.settings,
                       references={"FO-MAML": Reference("0.9 at 40,000 steps")})
    result = run_sweep(again_base, edited, tmp_path / "sw", quiet=True)
    assert len(result.skipped) == 4 and not result.ran
    assert load_sweep(tmp_path / "sw" / "sweep.yaml")[1].references == edited.references
    from fedmaml.results.compare import named_settings

    assert named_settings(tmp_path / "sw")["FO-MAML"].reference == Reference("0.9 at 40,000 steps")
    assert named_settings(tmp_path / "sw")["MOML"].reference is None
    # Trackers log the keys that the settings vary as hyperparameters, with the grid's.
    from fedmaml.tracking import sweep_grid

    assert set(sweep_grid(tmp_path / "sw" / "MOML,rounds=2,seed=0")) == {
        "federated.rounds", "algorithm.name", "algorithm.beta", "algorithm.eta"}


@pytest.mark.parametrize("section, message", [
    ({"settings": {"MOML": {"algorithm.betta": 0.3}}},
     r"sweep\.settings\.MOML\.algorithm\.betta: algorithm\.betta: unknown key"),
    ({"settings": [{"A": {"beta": 0.3}}, {"A": {"beta": 0.5}}]}, r"setting 'A' appears twice"),
    ({"settings": [{"moml": {"beta": 0.3}}, {"MOML": {"beta": 0.5}}]},
     r"settings 'moml' and 'MOML' differ only in case"),
    ({"settings": {"a b": {"beta": 0.3}}}, r"setting name 'a b' is not allowed.*directory"),
    ({"settings": {"x=1": {"beta": 0.3}}}, r"setting name 'x=1' is not allowed"),
    ({"settings": {"../up": {"beta": 0.3}}}, r"setting name '../up' is not allowed"),
    ({"settings": {".hidden": {}}}, r"setting name '.hidden' is not allowed"),
    ({"settings": {"MOML": {"beta": "high"}}}, r"sweep\.settings\.MOML: .*algorithm\.beta"),
    ({"settings": {"MOML": {"seed": 3}}}, r"settings\.MOML\.seed: 'seed' cannot be a grid key"),
    ({"settings": {"MOML": [1, 2]}}, r"sweep\.settings\.MOML: must map config keys to values"),
    ({"settings": {"A": {"beta": 0.3}, "B": {"algorithm.beta": 0.3}}},
     r"settings 'A' and 'B' set the same values"),
    ({"settings": ["MOML"]}, r"sweep\.settings\[0\]: each entry must be one"),
    ({"settings": {}}, r"sweep\.settings: is empty"),
    ({"settings": {"A": {"beta": 0.3}}, "references": {"B": "1.0"}},
     r"sweep\.references\.B: no setting of that name; settings: A"),
    ({"setting": {"A": {}}}, r"sweep\.setting: unknown key; allowed keys: settings, references"),
    ({"settings": {"A": {"beta": 0.3}}, "references": {"A": {"text": "1.0",
                                                              "metric": "unseen.los.avg"}}},
     r"references\.A\.metric: 'unseen\.los\.avg': 'avg' is not a statistic .*allowed: mean"),
    ({"settings": {"A": {"beta": 0.3}}, "references": {"A": {"text": "1.0", "metric": "test.loss"}}},
     r"references\.A\.metric: 'test\.loss': no metric is over 'test' clients; allowed: seen, "),
    ({"settings": {"A": {"beta": 0.3}}, "references": {"A": {"text": "1.0", "metric": 3}}},
     r"references\.A\.metric: expected a metric key, got 3"),
    ({"settings": {"A": {"beta": 0.3}}, "references": {"A": {"metric": "unseen.loss"}}},
     r"references\.A: must be a number or text, got None; a reference with `metric`"),
    ({"settings": {"A": {"beta": 0.3}}, "references": {"A": {"text": "1.0", "rounds": [0]}}},
     r"references\.A\.rounds: expected the federated\.rounds of the budget"),
    ({"settings": {"A": {"beta": 0.3}}, "references": {"A": {"text": "1.0", "steps": 5}}},
     r"references\.A\.steps: unknown key; allowed keys: text, metric, rounds"),
])
def test_bad_named_settings_are_refused_naming_the_setting_and_key(tmp_path, section, message):
    path = write_config(tmp_path, {"sweep": section})
    with pytest.raises(ConfigError, match=message):
        load_sweep(path)


def test_a_reference_says_its_metric_and_budget_or_is_text_alone(tmp_path):
    """A reference names the metric it is a value of as --metric does (a shorthand is read as
    compare reads it) and the rounds of its budget(s); text alone stays allowed (older sweeps)."""
    path = write_config(tmp_path, {"sweep": {
        "settings": {"A": {"beta": 0.3}, "B": {"beta": 0.5}, "C": {"beta": 0.9}},
        "references": {"A": {"text": "1.3 at 5,000 steps", "metric": "unseen.loss", "rounds": 5000},
                       "B": {"text": 0.5, "metric": "loss_after", "rounds": [10, 20]},
                       "C": "2.0 somewhere"}}})
    refs = load_sweep(path)[1].references
    assert refs == {"A": Reference("1.3 at 5,000 steps", "unseen.loss.mean", (5000,)),
                    "B": Reference("0.5", "loss_after", (10, 20)), "C": Reference("2.0 somewhere")}


def test_a_duplicate_name_in_the_settings_mapping_is_refused(tmp_path):
    path = tmp_path / "dup.yaml"
    path.write_text(yaml.safe_dump(TINY) + "sweep:\n  settings:\n    A: {beta: 0.3}\n"
                    "    A: {beta: 0.5}\n", encoding="utf-8")
    with pytest.raises(ConfigError, match="duplicate key 'A'"):
        load_sweep(path)


def test_a_key_set_by_a_setting_and_by_the_grid_is_refused(tmp_path):
    path = write_config(tmp_path, {"sweep": {"settings": {"A": {"beta": 0.3}}}})
    base, spec = load_sweep(path, grid_args=["beta=0.5,0.9"])
    with pytest.raises(ConfigError, match=r"settings\.A: algorithm\.beta is set both by this "
                                          r"setting and by the grid"):
        plan_sweep(base, spec, tmp_path / "sw")
    # a setting that breaks a rule linking keys names the setting and the rule's key
    bad = write_config(tmp_path, {"sweep": {"settings": {"B": {"clients_per_round": 10}},
                                            "grid": {"beta": [0.3, 0.5]}}}, "bad.yaml")
    base, spec = load_sweep(bad)
    with pytest.raises(ConfigError, match=r"grid combination setting B, beta=0.3 is invalid: "
                                          r"federated\.clients_per_round: 10 exceeds"):
        plan_sweep(base, spec, tmp_path / "sw2")


# -- one entry of a mapping key (algorithm.kwargs.lam) ---------------------------------------------

OWN = {"algorithm": {"name": "my_algos:Mine", "kwargs": {"mu": 2}}}  # not imported by planning


def test_a_grid_over_one_algorithm_kwarg_names_its_run_directories_by_it(tmp_path, capsys):
    assert parse_grid_arg("algorithm.kwargs.lam=0.1,0.5") == ("algorithm.kwargs.lam", (0.1, 0.5))
    path = write_config(tmp_path, OWN)
    base, spec = load_sweep(path, grid_args=["algorithm.kwargs.lam=0.1,0.5"], seeds="0")
    runs, _ = plan_sweep(base, spec, tmp_path / "sw")
    assert [r.name for r in runs] == ["algorithm.kwargs.lam=0.1,seed=0",
                                      "algorithm.kwargs.lam=0.5,seed=0"]
    # each run sets lam and keeps the base config's other kwargs
    assert [json.loads(r.config.algorithm.kwargs) for r in runs] == [{"mu": 2, "lam": 0.1},
                                                                     {"mu": 2, "lam": 0.5}]
    assert main(["sweep", str(path), "--grid", "algorithm.kwargs.lam=0.1,0.5", "--seeds", "0",
                 "--sweep-dir", str(tmp_path / "sw"), "--dry-run"]) == 0
    assert "new        algorithm.kwargs.lam=0.5,seed=0" in capsys.readouterr().out
    # in a sweep file's grid and in a named setting, and back from the manifest
    path = write_config(tmp_path, {**OWN, "sweep": {
        "settings": {"weak": {"algorithm.kwargs.lam": 0.01}, "strong": {"algorithm.kwargs.mu": 9}},
        "grid": {"algorithm.kwargs.nu": [1, 2]}, "seeds": [0]}}, "section.yaml")
    base, spec = load_sweep(path)
    assert spec.settings == {"weak": {"algorithm.kwargs.lam": 0.01},
                             "strong": {"algorithm.kwargs.mu": 9}}
    runs = {r.name: r for r in plan_sweep(base, spec, tmp_path / "sw2")[0]}
    assert json.loads(runs["weak,algorithm.kwargs.nu=1,seed=0"].config.algorithm.kwargs) == {
        "mu": 2, "lam": 0.01, "nu": 1}
    assert json.loads(runs["strong,algorithm.kwargs.nu=2,seed=0"].config.algorithm.kwargs) == {
        "mu": 9, "nu": 2}
    write_manifest(tmp_path / "sw2", base, spec)
    assert load_sweep(tmp_path / "sw2" / "sweep.yaml")[1] == spec


@pytest.mark.parametrize("grid, section, message", [
    # an unknown key keeps its error and its suggestion
    (["algoritm.kwargs.lam=0.1,0.5"], None, r"--grid algoritm.kwargs.lam: algoritm.kwargs.lam: "
                                            r"unknown key; did you mean 'algorithm.kwargs'\?"),
    (["kwargs.lam=0.1,0.5"], None, r"an entry of a mapping is set with the mapping's full key: "
                                   r"model.kwargs.lam or algorithm.kwargs.lam"),
    # the whole mapping and one of its entries, in one grid: the order would decide
    (["algorithm.kwargs.lam=0.1,0.5", "algorithm.kwargs={lam: 1},{lam: 2}"], None,
     r"grid: algorithm.kwargs and algorithm.kwargs.lam both set algorithm.kwargs; vary it in "
     r"one place"),
    (["algorithm.kwargs.lam=0.1,0.5"], {"settings": {"A": {"algorithm.kwargs": {"lam": 3}}}},
     r"settings.A: algorithm.kwargs is set both by this setting and by the grid "
     r"\(algorithm.kwargs.lam\)"),
    ([], {"settings": {"A": {"algorithm.kwargs": {"lam": 3}, "algorithm.kwargs.mu": 1}}},
     r"sweep.settings.A.algorithm.kwargs.mu: algorithm.kwargs.mu and algorithm.kwargs both set "
     r"algorithm.kwargs in this setting"),
])
def test_a_mapping_entry_set_twice_or_misspelt_is_refused(tmp_path, grid, section, message):
    path = write_config(tmp_path, {**OWN, **({"sweep": section} if section else {})})
    with pytest.raises(ConfigError, match=message):
        base, spec = load_sweep(path, grid_args=grid)
        plan_sweep(base, spec, tmp_path / "sw")


# -- Lambda patterns, checked for every run before any starts --------------------------------------

HEAD = {"sweep": {"settings": {"MOML-full": {"algorithm.inner_pattern": "full"},
                               "MOML-head": {"algorithm.inner_pattern": "0001"}},
                  "seeds": [0, 1]}}
# the 1-16-1 MLP has two layer groups: '0001' has two bits too many
HEAD_ERROR = (r"setting MOML-head is invalid: algorithm.inner_pattern: pattern '0001' has 4 bits "
              r"per row but the mlp of model.hidden \[16\] has 2 layer groups "
              r"\['layer1', 'layer2'\]")


@pytest.mark.parametrize("options", [["--dry-run"], [], ["--vectorize"], ["--jobs", "2"]])
def test_a_pattern_that_does_not_fit_the_model_stops_the_sweep_before_any_run(tmp_path, capsys,
                                                                              options):
    """A setting's pattern is resolved against the model's layer groups for every run before any
    run trains (and by --dry-run), and the error names the setting and the key."""
    path = write_config(tmp_path, HEAD)
    sweep_dir = tmp_path / "sw"
    assert main(["sweep", str(path), "--sweep-dir", str(sweep_dir), *options]) == 2
    err = capsys.readouterr().err
    assert re.search(HEAD_ERROR, err) and "Traceback" not in err, err
    assert not sweep_dir.exists()  # nothing trained, nothing written


def test_skip_invalid_leaves_out_a_setting_whose_pattern_does_not_fit(tmp_path, capsys):
    path = write_config(tmp_path, HEAD)
    assert main(["sweep", str(path), "--sweep-dir", str(tmp_path / "sw"), "--dry-run",
                 "--skip-invalid"]) == 0
    out = capsys.readouterr().out
    assert "left out (invalid): setting MOML-head: algorithm.inner_pattern: pattern '0001'" in out
    assert "new        MOML-full,seed=1" in out and "MOML-head,seed" not in out
    # a grid value: the combination is named by it
    path = write_config(tmp_path, {}, "grid.yaml")
    with pytest.raises(ConfigError, match=r"grid combination pattern=011 is invalid: "
                                          r"evaluation.pattern: pattern '011' has 3 bits"):
        plan_sweep(*load_sweep(path, grid_args=["evaluation.pattern=01,011"]), tmp_path / "sw2")


def test_a_user_modules_patterns_are_checked_against_its_built_groups(tmp_path):
    """Without model.groups, the groups of a user's module are its built children's: the sweep
    builds it (with the data, for its shapes) once to check every run's patterns."""
    path = write_config(tmp_path, {**HEAD, "model": {"name": "user_models:Residual"}})
    with pytest.raises(ConfigError, match=r"setting MOML-head is invalid: algorithm.inner_pattern: "
                                          r"pattern '0001' has 4 bits per row but "
                                          r"user_models:Residual has 3 layer groups "
                                          r"\['inp', 'block', 'head'\]"):
        plan_sweep(*load_sweep(path), tmp_path / "sw")
    # declared groups are the config's: the module is not built for them
    path = write_config(tmp_path, {**HEAD, "model": {
        "name": "user_models:Residual", "groups": {"body": ["inp", "block"], "head": ["head"]}}},
        "declared.yaml")
    with pytest.raises(ConfigError, match=r"setting MOML-head is invalid: algorithm.inner_pattern: "
                                          r"pattern '0001' has 4 bits per row but "
                                          r"user_models:Residual has 2 layer groups "
                                          r"\['body', 'head'\]"):
        plan_sweep(*load_sweep(path), tmp_path / "sw")


@pytest.mark.parametrize("overrides, shape", [
    ([], (1,)), (["model.hidden=[16]"], (3,)), (["model.hidden=[8,8,8]"], (1, 8, 8)),
    (["model.name=linear"], (5,)),
    (["data.family=digits", "model.name=conv4", "model.conv_width=4"], (1, 12, 12)),
    (["data.family=digits", "model.name=conv4", "model.conv_strided=true"], (3, 9, 9)),
    (["model.name=user_models:Residual", "model.groups={body: [inp, block], head: head}"], (2,)),
], ids=lambda v: "-".join(v) if isinstance(v, list) else None)
def test_the_layer_groups_a_config_gives_are_the_built_models(overrides, shape):
    """What the sweep checks patterns against without building a model is what a run builds."""
    from fedmaml.federated.config_patterns import declared_layer_groups
    from fedmaml.models import build_model

    cfg = load_config(None, overrides)
    declared = declared_layer_groups(cfg.model)
    assert declared.names == build_model(cfg.model, shape, 3).group_names
    # without model.groups, a user's module has the groups of its children: it must be built
    assert declared_layer_groups(load_config(None, ["model.name=user_models:Residual"]).model) \
        is None


def run_without_importing(code: str, *heavy: str) -> None:
    """Run ``code`` in a fresh interpreter and check it imported none of the modules ``heavy``."""
    check = (f"\nimport sys\nheavy = [m for m in {heavy!r} if m in sys.modules]\n"
             "assert not heavy, heavy\n")
    subprocess.run([sys.executable, "-c", code + check], check=True, cwd=ROOT,
                   env={**os.environ, "PYTHONPATH": str(ROOT)})


def test_checking_the_patterns_of_built_in_models_imports_no_torch():
    """The sweep's parent checks every run's patterns before its workers start: for the built-in
    models and declared groups, from the configs alone."""
    code = ("from fedmaml.config import load_config\n"
            "from fedmaml.sweep import SweepSpec, plan_sweep\n"
            "from fedmaml.errors import ConfigError\n"
            "base = load_config('configs/sinewave_centralized.yaml')\n"
            "runs, invalid = plan_sweep(base, SweepSpec({'evaluation.pattern': ('001', '0001'), "
            "'model.name': ('mlp', 'linear', 'conv4')}, (0,)), 'sw', skip_invalid=True)\n"
            "assert [r.name for r in runs] == ['pattern=001,model.name=mlp,seed=0'], runs\n"
            "assert len(invalid) == 5, invalid\n")
    run_without_importing(code, "torch", "flwr")


def test_planning_batches_imports_neither_the_batch_engine_nor_flower_nor_torch():
    """A sweep's parent groups its runs into batches before its workers start: the grouping needs
    the configs alone (fedmaml/engines/batch_plan.py), not the batch engine (seconds to import)."""
    code = ("from fedmaml.config import load_config\n"
            "from fedmaml.engines.batch_plan import batch_key, batch_refusal\n"
            "import fedmaml.sweep\n"
            "a = load_config('configs/sinewave_centralized.yaml')\n"
            "b = load_config('configs/sinewave_centralized.yaml', ['algorithm.eta=0.1', 'seed=3'])\n"
            "c = load_config('configs/sinewave_centralized.yaml', ['model.hidden=[20,20]'])\n"
            "assert batch_key(a) == batch_key(b) != batch_key(c)\n"
            "assert batch_refusal(a) is None and batch_refusal(c) is None\n"
            "assert batch_refusal(load_config('configs/sinewave_centralized.yaml',\n"
            "                                 ['engine.device=cuda'])) == 'batches run on the CPU'\n")
    run_without_importing(code, "torch", "flwr", "fedmaml.engines.run_batch")


_POOL_SCRIPT = '''
import sys, time
from pathlib import Path

from fedmaml.cli import run_command
from fedmaml.federated.checkpoint import stop_on_signals, stop_requested
from fedmaml.sweep import worker_pool


def work(i):
    with stop_on_signals():  # as a run in a worker: Ctrl-C asks it to stop after its round
        Path(sys.argv[1], f"started-{i}").touch()
        while not stop_requested():
            time.sleep(0.05)
        time.sleep(30)  # its round goes on


def main():
    with worker_pool(3) as pool:  # one worker waits for work
        list(pool.map(work, range(2)))


if __name__ == "__main__":
    raise SystemExit(run_command(main))
'''


def test_a_worker_pool_of_a_script_stops_on_ctrl_c_without_tracebacks(tmp_path):
    """Ctrl-C in a terminal reaches the script and its pool's workers: the script says
    ``interrupted`` (exit code 130) and no worker prints a traceback, busy or idle."""
    script = tmp_path / "pool_script.py"
    script.write_text(_POOL_SCRIPT)
    # started as from a terminal: SIGINT at its default, which a test run in the background (a
    # non-interactive shell's `&`) would otherwise pass on ignored
    proc = subprocess.Popen([sys.executable, str(script), str(tmp_path)], cwd=tmp_path, text=True,
                            env={**os.environ, "PYTHONPATH": str(ROOT)}, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, start_new_session=True,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    try:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and len(list(tmp_path.glob("started-*"))) < 2:
            time.sleep(0.05)
        os.killpg(proc.pid, signal.SIGINT)  # as a terminal's Ctrl-C: the whole process group
        out, err = proc.communicate(timeout=60)
    finally:  # whatever happened, nothing of the script is left running
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    assert proc.returncode == 130, err
    # a busy worker may say that it stops before it is killed: that is all it says
    lines = [line for line in err.splitlines() if line.strip()]
    assert lines[-1] == "interrupted", err
    assert all(line.startswith("SIGINT: stopping after this round") for line in lines[:-1]), err
