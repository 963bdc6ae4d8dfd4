"""A resume cannot alter a run (fedmaml/run_dir.py): a changed config is refused naming every
changed key; ``federated.rounds`` may grow (or shrink to above the checkpoint) and then ends
bitwise equal to a run of the new length, with the change recorded; a run directory is locked
while a process works in it, and a killed holder does not block it; a corrupt checkpoint, or none
(a run killed before its first), says how to start again, and ``--restart`` does so without
deleting anything; a run that ended says there is nothing to resume."""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from fedmaml.cli import main
from fedmaml.config import dump_yaml, load_config
from fedmaml.errors import DataError
from fedmaml.experiment import run_experiment
from fedmaml.federated import checkpoint
from fedmaml.results.compare import find_run_dirs
from fedmaml.results.recorder import read_metrics, read_summary
from fedmaml.run_dir import has_content, run_lock
from tests.test_checkpoint import stop_after, without_timing  # noqa: F401 - a fixture

REPO = Path(__file__).resolve().parents[1]
# MOML (client memories) with Adam on the server (optimizer state): what a resume must carry over.
BASE = ("algorithm.name=moml", "federated.eval_every=2", "federated.server_optimizer=adam",
        "federated.server_lr=0.01")


def interrupted(tiny_config, tmp_path: Path, stop_after, *extra: str, rounds: int = 4,  # noqa: F811
                after: int = 2) -> tuple[Path, object]:
    """A run of ``rounds`` rounds stopped (with a checkpoint) after round ``after``."""
    cfg = tiny_config(*BASE, f"federated.rounds={rounds}", *extra)
    stop_after(after)
    run_dir = run_experiment(cfg, quiet=True, run_dir=tmp_path / "cut")
    stop_after(10 ** 6)
    assert read_summary(run_dir)["status"] == "interrupted"
    assert checkpoint.load(run_dir)["round"] == after
    return run_dir, cfg


def edit_config(run_dir: Path, **updates) -> None:
    """Edit config.yaml as a user with a text editor would."""
    from fedmaml.config import replace_paths

    cfg = replace_paths(load_config(run_dir / "config.yaml"), updates)
    (run_dir / "config.yaml").write_text(dump_yaml(cfg))


def cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "fedmaml", *args], capture_output=True, text=True,
                          env={**os.environ, "PYTHONPATH": str(REPO)}, timeout=300)


def same_model(a: Path, b: Path) -> bool:
    ma, mb = (torch.load(d / "model.pt", weights_only=True) for d in (a, b))
    return ma.keys() == mb.keys() and all(torch.equal(ma[k], mb[k]) for k in ma)


# -- a changed config ------------------------------------------------------------------------------

def test_an_edited_config_is_refused_naming_every_changed_key(tiny_config, tmp_path, stop_after,  # noqa: F811
                                                              capsys):
    run_dir, cfg = interrupted(tiny_config, tmp_path, stop_after)
    before = checkpoint.path_of(run_dir).read_bytes()
    edit_config(run_dir, **{"algorithm.eta": 0.05, "algorithm.beta": 0.7})
    assert main(["run", "--resume", str(run_dir), "--quiet"]) == 2
    err = capsys.readouterr().err
    assert (f"algorithm.eta: {cfg.algorithm.eta!r} in the checkpoint, 0.05 now; algorithm.beta: "
            f"{cfg.algorithm.beta!r} in the checkpoint, 0.7 now") in err
    assert "may change on resume" in err and "federated.rounds=N" in err
    # nothing ran: the checkpoint is as it was, and the run is still unfinished
    assert checkpoint.path_of(run_dir).read_bytes() == before
    assert read_summary(run_dir)["status"] == "interrupted"


def test_an_override_of_a_fixed_key_on_resume_is_refused(tiny_config, tmp_path, stop_after,  # noqa: F811
                                                          capsys):
    run_dir, _ = interrupted(tiny_config, tmp_path, stop_after)
    assert main(["run", "--resume", str(run_dir), "algorithm.eta=0.05", "--quiet"]) == 2
    err = capsys.readouterr().err
    assert "--resume: algorithm.eta cannot change when a run resumes (it would alter the rounds " \
        "already run)" in err
    assert ("only federated.rounds, federated.checkpoint_every, engine.shards, "
            "engine.ray_address may") in err
    # a tracking key changes no round: the reason is where the rounds were logged
    assert main(["run", "--resume", str(run_dir), "tracking.backends=[tensorboard]",
                 "--quiet"]) == 2
    err = capsys.readouterr().err
    assert "--resume: tracking.backends cannot change when a run resumes (its trackers would " \
        "hold half a run" in err and "alter the rounds" not in err


def test_the_checkpoint_keeps_the_config_and_its_hash(tiny_config, tmp_path, stop_after,  # noqa: F811
                                                      capsys):
    from fedmaml.config import config_to_flat

    run_dir, cfg = interrupted(tiny_config, tmp_path, stop_after)
    saved = checkpoint.load(run_dir)
    assert saved["config"] == config_to_flat(cfg)
    # the hash is the SHA-256 of the keys (but output_dir), computed here independently
    import hashlib

    flat = {k: v for k, v in config_to_flat(cfg).items() if k != "output_dir"}
    assert saved["config_sha256"] == hashlib.sha256(
        json.dumps(flat, sort_keys=True).encode()).hexdigest()
    # and it is checked: a stored config edited by hand (say, to change eta past the resume check)
    # no longer matches its hash, and the resume is refused with the way forward
    raw = torch.load(checkpoint.path_of(run_dir), weights_only=True)
    raw["config"]["algorithm.eta"] = 0.05
    torch.save(raw, checkpoint.path_of(run_dir))
    with pytest.raises(DataError, match="the config stored in it does not match its config_sha256"):
        checkpoint.load(run_dir)
    assert main(["run", "--resume", str(run_dir), "--quiet"]) == 2
    err = capsys.readouterr().err
    assert "does not match its config_sha256" in err and "fedmaml run --restart" in err


# -- changing the number of rounds -----------------------------------------------------------------

def test_extending_the_rounds_equals_a_run_of_the_longer_length_bitwise(
        tiny_config, tmp_path, stop_after, capsys):  # noqa: F811
    run_dir, cfg = interrupted(tiny_config, tmp_path, stop_after, rounds=4, after=2)
    assert main(["run", "--resume", str(run_dir), "federated.rounds=6", "--quiet"]) == 0
    full = run_experiment(tiny_config(*BASE, "federated.rounds=6"), quiet=True,
                          run_dir=tmp_path / "full")
    rows_full, rows_cut = read_metrics(full), read_metrics(run_dir)
    assert [r["round"] for r in rows_cut] == list(range(7))
    assert [without_timing(r) for r in rows_cut] == [without_timing(r) for r in rows_full]
    assert same_model(full, run_dir)
    summary = read_summary(run_dir)
    assert summary["status"] == "completed" and summary["rounds"] == 6
    # the directory says what it ran: the config now, and when and how it changed
    assert load_config(run_dir / "config.yaml").federated.rounds == 6
    (change,) = summary["config_changes"]
    assert change["after_round"] == 2 and change["changes"] == {"federated.rounds": [4, 6]}
    assert change["at"].endswith("+00:00")
    a, b = without_timing(summary), without_timing(read_summary(full))
    a.pop("config_changes")
    assert a == b


def test_rounds_at_or_below_the_checkpoint_are_refused(tiny_config, tmp_path, stop_after,  # noqa: F811
                                                       capsys):
    run_dir, _ = interrupted(tiny_config, tmp_path, stop_after, rounds=4, after=2)
    for rounds in (1, 2):
        assert main(["run", "--resume", str(run_dir), f"federated.rounds={rounds}", "--quiet"]) == 2
        err = capsys.readouterr().err
        assert (f"cannot resume with federated.rounds {rounds}: the checkpoint is after round 2"
                in err), err
        assert "give more than 2 rounds" in err
    # the directory still claims the config it ran
    assert load_config(run_dir / "config.yaml").federated.rounds == 4
    assert read_summary(run_dir)["status"] == "interrupted"


def test_extending_across_a_decay_that_already_happened_is_refused(tiny_config, tmp_path,
                                                                   stop_after, capsys):  # noqa: F811
    # eta decays after half the rounds: after round 2 of 4, rounds 3.. of 6. The checkpoint after
    # round 3 ran round 3 with the decayed eta, which a run of 6 rounds would not have.
    run_dir, _ = interrupted(tiny_config, tmp_path, stop_after, "federated.lr_decay_at=0.5",
                             rounds=4, after=3)
    assert main(["run", "--resume", str(run_dir), "federated.rounds=6", "--quiet"]) == 2
    err = capsys.readouterr().err
    assert "moves the step-size decay (federated.lr_decay_at 0.5 of the rounds) across rounds " \
           "that already ran (3..3)" in err, err


def test_extending_before_the_decay_point_is_allowed(tiny_config, tmp_path, stop_after):  # noqa: F811
    run_dir, _ = interrupted(tiny_config, tmp_path, stop_after, "federated.lr_decay_at=0.5",
                             rounds=4, after=2)
    assert main(["run", "--resume", str(run_dir), "federated.rounds=6", "--quiet"]) == 0
    full = run_experiment(tiny_config(*BASE, "federated.lr_decay_at=0.5", "federated.rounds=6"),
                          quiet=True, run_dir=tmp_path / "full")
    assert [without_timing(r) for r in read_metrics(run_dir)] == \
        [without_timing(r) for r in read_metrics(full)]
    assert same_model(full, run_dir)


# -- the lock --------------------------------------------------------------------------------------

def test_a_second_resume_is_refused_naming_the_holder_then_works(tiny_config, tmp_path,
                                                                 stop_after):  # noqa: F811
    run_dir, _ = interrupted(tiny_config, tmp_path, stop_after)
    with run_lock(run_dir):  # this process works in the directory
        other = cli("run", "--resume", str(run_dir), "--quiet")
        assert other.returncode == 2, other.stderr
        assert f"{run_dir}: another fedmaml run is running in this directory (pid {os.getpid()} " \
               "on host " in other.stderr
        assert "since 20" in other.stderr  # the holder's start time (ISO 8601)
        holder = json.loads((run_dir / ".run.lock.holder").read_text())
        assert holder["pid"] == os.getpid() and holder["command"]
    assert not (run_dir / ".run.lock.holder").exists()  # released: nobody holds it
    again = cli("run", "--resume", str(run_dir), "--quiet")
    assert again.returncode == 0, again.stderr
    assert read_summary(run_dir)["status"] == "completed"


@contextlib.contextmanager
def held_by_another_process(run_dir: Path):
    """A process that takes the run directory's lock and keeps it until killed; yields it once it
    holds the lock (it says so: no waiting on time)."""
    code = ("import sys; from fedmaml.run_dir import run_lock\n"
            "held = run_lock(sys.argv[1]).__enter__(); print('locked', flush=True); "
            "sys.stdin.read()\n")
    holder = subprocess.Popen([sys.executable, "-c", code, str(run_dir)], stdin=subprocess.PIPE,
                              stdout=subprocess.PIPE, text=True,
                              env={**os.environ, "PYTHONPATH": str(REPO)})
    try:
        assert holder.stdout.readline().strip() == "locked"
        yield holder
    finally:
        if holder.poll() is None:
            holder.kill()
            holder.wait(timeout=60)


def test_a_killed_holder_does_not_block_the_directory(tiny_config, tmp_path, stop_after):  # noqa: F811
    run_dir, _ = interrupted(tiny_config, tmp_path, stop_after)
    with held_by_another_process(run_dir) as holder:
        refused = cli("run", "--resume", str(run_dir), "--quiet")
        assert refused.returncode == 2
        assert f"(pid {holder.pid} on host" in refused.stderr
        holder.kill()  # SIGKILL: no clean-up in the holder; the kernel drops its lock
        holder.wait(timeout=60)
    assert (run_dir / ".run.lock.holder").exists()  # stale information, ignored
    resumed = cli("run", "--resume", str(run_dir), "--quiet")
    assert resumed.returncode == 0, resumed.stderr
    assert read_summary(run_dir)["status"] == "completed"


def test_the_lock_is_released_after_an_end_a_stop_and_an_error(tiny_config, tmp_path,
                                                               stop_after):  # noqa: F811
    run_dir, cfg = interrupted(tiny_config, tmp_path, stop_after)  # a stop (as by Ctrl-C)
    assert not run_lock(run_dir).lock.is_locked
    edit_config(run_dir, **{"algorithm.eta": 0.05})
    with pytest.raises(Exception, match="algorithm.eta"):  # an error
        run_experiment(load_config(run_dir / "config.yaml"), quiet=True, run_dir=run_dir,
                       resume=True)
    assert not run_lock(run_dir).lock.is_locked
    run_experiment(cfg, quiet=True, run_dir=tmp_path / "whole")  # a normal end
    assert not run_lock(tmp_path / "whole").lock.is_locked


def test_a_directory_holding_only_a_lock_is_new(tiny_config, tmp_path):
    from fedmaml.run_dir import new_run_dir

    cfg = tiny_config()
    base = Path(cfg.output_dir) / cfg.name
    with run_lock(base):
        pass  # a killed process could leave this behind
    assert not has_content(base) and new_run_dir(cfg) == base


def test_a_batch_locks_each_of_its_run_directories(tiny_config, tmp_path):
    from fedmaml.config import replace_paths
    from fedmaml.sweep import execute_batch

    cfgs = [replace_paths(tiny_config(), {"seed": s, "name": f"r{s}"}) for s in (0, 1)]
    dirs = [tmp_path / c.name for c in cfgs]
    with held_by_another_process(dirs[1]) as holder:
        outcomes = execute_batch(cfgs, dirs)
    assert all(f"another fedmaml run is running in this directory (pid {holder.pid}" in error
               for _, error in outcomes), outcomes
    assert not has_content(dirs[0])  # nothing ran
    assert [error for _, error in execute_batch(cfgs, dirs)] == [None, None]
    assert all(read_summary(d)["status"] == "completed" for d in dirs)


# -- a corrupt checkpoint --------------------------------------------------------------------------

def test_a_corrupt_checkpoint_says_how_to_start_again_and_restart_does(
        tiny_config, tmp_path, stop_after, capsys):  # noqa: F811
    run_dir, cfg = interrupted(tiny_config, tmp_path, stop_after)
    checkpoint.path_of(run_dir).write_bytes(b"not a checkpoint")
    hint = f"`fedmaml run --restart {run_dir}` (moves {run_dir} aside to .cut.old-N beside it"
    assert main(["run", "--resume", str(run_dir), "--quiet"]) == 2
    err = capsys.readouterr().err
    assert "is unreadable" in err and hint in err, err
    # running the config again finds the unfinished run and says the same
    config = tmp_path / "c.yaml"
    config.write_text(dump_yaml(cfg))
    moved = tmp_path / "runs" / "tiny"
    moved.parent.mkdir(parents=True, exist_ok=True)
    os.rename(run_dir, moved)  # where the config puts it
    assert main(["run", str(config), "--quiet"]) == 2
    err = capsys.readouterr().err
    assert "is unreadable" in err and f"fedmaml run --restart {moved}" in err, err

    assert main(["run", "--restart", str(moved), "--quiet"]) == 0
    old = tmp_path / "runs" / ".tiny.old-1"
    assert (old / "checkpoint.pt").read_bytes() == b"not a checkpoint"  # nothing deleted
    assert read_summary(moved)["status"] == "completed"
    full = run_experiment(cfg, quiet=True, run_dir=tmp_path / "full")
    assert [without_timing(r) for r in read_metrics(moved)] == \
        [without_timing(r) for r in read_metrics(full)]
    assert same_model(full, moved)
    # a second restart takes the next free name
    assert main(["run", "--restart", str(moved), "--quiet"]) == 0
    assert (tmp_path / "runs" / ".tiny.old-2" / "summary.json").exists()
    # the old attempts are not more seeds of the run: compare (given a sweep-like parent) skips them
    assert find_run_dirs([tmp_path / "runs"]) == [moved.resolve()]


def test_a_directory_whose_run_ended_cannot_be_extended_and_the_refusal_changes_nothing(
        tiny_config, tmp_path, stop_after, capsys):  # noqa: F811
    # the run completes its 4 rounds, then its fedavg baseline is stopped: the directory cannot be
    # extended (the run that ended would keep 4 rounds), and the refusal changes nothing
    cfg = tiny_config(*BASE, "federated.rounds=4", "compare_with=fedavg")
    stop_after(7)  # a stop request at the 8th end of a round: round 2 of the baseline
    run_dir = run_experiment(cfg, quiet=True, run_dir=tmp_path / "cut")
    stop_after(10 ** 6)
    baseline = run_dir / "baselines" / "fedavg"
    assert read_summary(run_dir)["status"] == "completed"
    assert read_summary(baseline)["status"] == "interrupted"
    saved = checkpoint.path_of(baseline).read_bytes()
    assert main(["run", "--resume", str(run_dir), "federated.rounds=6", "--quiet"]) == 2
    err = capsys.readouterr().err
    assert (f"{run_dir}: ended (completed) with federated.rounds 4; a run that ended cannot be "
            "extended") in err, err
    assert checkpoint.path_of(baseline).read_bytes() == saved
    assert load_config(baseline / "config.yaml").federated.rounds == 4
    # resumed as it was, the baseline finishes
    assert main(["run", "--resume", str(run_dir), "--quiet"]) == 0
    assert read_summary(baseline)["status"] == "completed"


def test_an_interrupted_baseline_names_the_command_that_resumes_it_and_the_baselines_after_it(
        tiny_config, tmp_path, stop_after):  # noqa: F811
    # stopped in round 2 of the first of two baselines: its summary's advice must resume the run's
    # directory (which goes on to the second baseline), not the baseline's own directory (which
    # would finish the first baseline alone and never start the second)
    cfg = tiny_config(*BASE, "federated.rounds=4", "compare_with=[fedavg, reptile]")
    stop_after(7)  # a stop request at the 8th end of a round: round 2 of the first baseline
    run_dir = run_experiment(cfg, quiet=True, run_dir=tmp_path / "cut")
    stop_after(10 ** 6)
    first, second = run_dir / "baselines" / "fedavg", run_dir / "baselines" / "reptile"
    assert read_summary(first)["message"] == ("interrupted after round 2; resume with `fedmaml run "
                                              f"--resume {run_dir}`")
    assert not second.exists()
    assert main(["run", "--resume", str(run_dir), "--quiet"]) == 0
    assert [read_summary(d)["status"] for d in (run_dir, first, second)] == ["completed"] * 3


def killed_without_a_checkpoint(cfg, run_dir: Path, at: int) -> None:
    """Run ``cfg`` in another process and kill it (SIGKILL: nothing more is written) once it has
    recorded round ``at``."""
    config = run_dir.parent / "killed.yaml"
    config.write_text(dump_yaml(cfg))
    script = ("import os, signal\n"
              "from fedmaml.config import load_config\n"
              "from fedmaml.federated import health\n"
              "from fedmaml.experiment import run_experiment\n"
              "observe = health.RunHealth.observe\n"
              "def kill(self, row, last_error=''):\n"
              "    observe(self, row, last_error)\n"
              f"    if row['round'] == {at}: os.kill(os.getpid(), signal.SIGKILL)\n"
              "health.RunHealth.observe = kill\n"
              f"run_experiment(load_config({str(config)!r}), quiet=True, run_dir={str(run_dir)!r})\n")
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                          env={**os.environ, "PYTHONPATH": str(REPO)}, timeout=300)
    assert done.returncode == -9, done.stderr


def test_resume_without_a_checkpoint_is_refused_and_keeps_the_rounds_run(tiny_config, tmp_path,
                                                                         capsys):
    # killed with federated.checkpoint_every 0: no checkpoint, the rows of rounds 0..2 on disk
    run_dir = tmp_path / "killed"
    killed_without_a_checkpoint(tiny_config(*BASE, "federated.rounds=6"), run_dir, at=2)
    assert not checkpoint.path_of(run_dir).exists() and read_summary(run_dir) is None
    rows = (run_dir / "metrics.jsonl").read_bytes()
    assert [r["round"] for r in read_metrics(run_dir)] == [0, 1, 2]
    assert main(["run", "--resume", str(run_dir)]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: {run_dir}: no checkpoint to resume from (federated."
                          "checkpoint_every is 0, so only a stop by Ctrl-C or SIGTERM writes one; "
                          "this run was killed or crashed); to start it again"), err
    assert f"`fedmaml run --restart {run_dir}`" in err, err
    assert (run_dir / "metrics.jsonl").read_bytes() == rows  # not started over
    # the way it offers
    assert main(["run", "--restart", str(run_dir), "--quiet"]) == 0
    assert read_summary(run_dir)["status"] == "completed"
    assert (tmp_path / ".killed.old-1" / "metrics.jsonl").read_bytes() == rows


def test_a_baseline_without_a_checkpoint_starts_again_and_the_run_that_ended_stays(
        tiny_config, tmp_path, capsys):
    """A baseline killed without a checkpoint (its rows on disk, no summary): --resume starts the
    baseline again, saying so, rather than refusing and offering to restart what ended too."""
    run_dir = run_experiment(tiny_config(*BASE, "compare_with=fedavg"), quiet=True,
                             run_dir=tmp_path / "top")
    baseline = run_dir / "baselines" / "fedavg"
    (baseline / "summary.json").unlink()  # as a SIGKILL leaves it: rows, no summary, no checkpoint
    assert not checkpoint.path_of(baseline).exists()
    metrics = (run_dir / "metrics.jsonl").read_bytes()
    assert main(["run", "--resume", str(run_dir)]) == 0
    err = capsys.readouterr().err
    assert "baseline fedavg: no checkpoint to resume from (federated.checkpoint_every is 0" in err
    assert read_summary(baseline)["status"] == "completed"
    assert (run_dir / "metrics.jsonl").read_bytes() == metrics  # the run that ended stays


def test_resume_of_a_completed_run_says_there_is_nothing_to_resume(tiny_config, tmp_path, capsys):
    run_dir = run_experiment(tiny_config(*BASE, "compare_with=fedavg"), quiet=True,
                             run_dir=tmp_path / "done")
    metrics = (run_dir / "metrics.jsonl").read_bytes()
    assert main(["run", "--resume", str(run_dir)]) == 0
    out, err = capsys.readouterr()
    assert (f"{run_dir}: nothing to resume: the run and its baselines already ended (completed, "
            "baseline fedavg completed)") in err, err
    assert f"run directory {run_dir}" in out  # and its table, as before
    assert (run_dir / "metrics.jsonl").read_bytes() == metrics


def test_a_sweep_does_not_resume_a_run_with_a_changed_base_config(tiny_config, tmp_path,
                                                                 stop_after, monkeypatch):  # noqa: F811
    # the run directories of a sweep are named after the grid values only: a base config edited
    # between invocations finds the interrupted run, which must not continue with another eta
    from fedmaml.config import replace_paths
    from fedmaml.sweep import SweepSpec, run_sweep

    base = tiny_config(*BASE, "federated.rounds=4")
    spec = SweepSpec(grid={"algorithm.beta": (0.3,)}, seeds=(0,))
    stop_after(2)
    with pytest.raises(KeyboardInterrupt):
        run_sweep(base, spec, tmp_path / "sw", quiet=True)
    stop_after(10 ** 6)
    run = tmp_path / "sw" / "beta=0.3,seed=0"
    before = checkpoint.path_of(run).read_bytes()
    result = run_sweep(replace_paths(base, {"algorithm.eta": 0.05}), spec, tmp_path / "sw",
                       quiet=True)
    assert f"algorithm.eta: {base.algorithm.eta!r} in the checkpoint, 0.05 now" in \
        result.failed["beta=0.3,seed=0"]
    assert checkpoint.path_of(run).read_bytes() == before
    # the sweep with its own config continues the run
    result = run_sweep(base, spec, tmp_path / "sw", quiet=True)
    assert result.ran == ["beta=0.3,seed=0"] and not result.failed


# -- provenance across a resume --------------------------------------------------------------------

def test_a_resumed_run_keeps_the_provenance_of_its_start(tiny_config, tmp_path, stop_after,  # noqa: F811
                                                         monkeypatch):
    """The code that started a run is what its summary names; a resume by other code is listed
    beside it, not in its place. (Two commits stand in for a merge between the segments: the
    commit is read through git_state, which is replaced here, not Flower or torch.)"""
    from fedmaml import provenance

    def code_at(commit: str) -> None:
        monkeypatch.setattr(provenance, "git_state", lambda *a: (commit, False))
        provenance.provenance.cache_clear()

    try:
        code_at("a" * 40)
        run_dir, _ = interrupted(tiny_config, tmp_path, stop_after)
        assert read_summary(run_dir)["provenance"]["git_commit"] == "a" * 40
        code_at("b" * 40)
        run_experiment(load_config(run_dir / "config.yaml"), quiet=True, run_dir=run_dir,
                       resume=True)
        record = read_summary(run_dir)["provenance"]
        assert read_summary(run_dir)["status"] == "completed"
        assert record["git_commit"] == "a" * 40  # the first segment's code
        assert [r["git_commit"] for r in record["resumed_with"]] == ["b" * 40]
    finally:
        provenance.provenance.cache_clear()
