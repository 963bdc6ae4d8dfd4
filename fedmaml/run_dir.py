"""The state of a run directory, in one place: which directory a new run gets, whether a run there is
unfinished, whether a resume may continue it with the config it is given, the lock that keeps a
second process out of it, and moving it aside to start again. ``fedmaml run`` (its ``--resume``
and ``--restart``) and ``fedmaml.run`` (its ``resume=`` and ``restart=``) go through the same
checks; only the advice of an error is spelled for the one in use
(``fedmaml.results.run_files.advising_python``).

A run directory (fedmaml/results/recorder.py lists its files) is *new* (absent or empty),
*unfinished* (no ``summary.json``, or status ``interrupted``; ``checkpoint.pt`` when it can
resume) or *finished* (``summary.json`` says completed, diverged or failed). An unfinished run
without a checkpoint (killed before its first one) cannot resume: it can only start again.

Resuming never alters what a run did. The checkpoint holds the config the run was made from
(fedmaml/federated/checkpoint.py); :func:`check_resume` compares it with the config of the resume
and refuses any change but those in :data:`CHANGEABLE_ON_RESUME`, naming every changed key with its
old and new value. An accepted change is written to the checkpoint and to ``config.yaml`` (both
atomically, checkpoint first) and listed in ``config_changes`` of summary.json, so the directory
never claims a config it did not run. See docs/robustness.md, "Resuming a run".
"""

from __future__ import annotations

import datetime
import json
import os
import shlex
import socket
import sys
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

from fedmaml.atomic import atomic_write_text
from fedmaml.config import Config, config_from_flat, config_to_flat, dump_yaml, load_config
from fedmaml.errors import DataError, FedmamlError
from fedmaml.federated.health import run_status

from fedmaml.results.run_files import (BASELINES_DIR, CHECKPOINT_FILE, CONFIG_FILE, read_summary,
                                       restart_command, resume_command)

# torch and flwr (checkpoint.py, recorder.py) are imported where needed, so that a sweep's parent
# process and the CLI's help stay light.

RUN_LOCK = ".run.lock"
HOLDER_SUFFIX = ".holder"  # beside a lock file: who holds it (JSON)
_LOCK_FILES = (RUN_LOCK, RUN_LOCK + HOLDER_SUFFIX)
CONFIG_CHANGES = "config_changes"  # in the checkpoint's app state, then in summary.json


# -- the lock --------------------------------------------------------------------------------------

class DirectoryLock:
    """An exclusive lock on a directory while a process works in it (``filelock``: an OS lock, which
    the kernel releases when the process dies, even by ``kill -9``). Who holds it (pid, host,
    command, since when) is written beside the lock file, because the lock file itself may be
    truncated by a process trying to take it. Another process (or thread) fails at once with a
    FedmamlError naming the holder. ``reentrant``: the holding thread may take it again (one lock
    object per path), so a sweep can lock a run directory and then run the run, which locks it too.
    """

    def __init__(self, directory: str | Path, lock_name: str, what: str, hint: str,
                 reentrant: bool = False) -> None:
        from filelock import FileLock

        self.dir = Path(directory)
        self.path = self.dir / lock_name
        self.holder_file = self.dir / (lock_name + HOLDER_SUFFIX)
        self.what, self.hint = what, hint
        self.lock = FileLock(self.path, timeout=0, is_singleton=reentrant)

    def __enter__(self) -> DirectoryLock:
        from filelock import Timeout

        self.dir.mkdir(parents=True, exist_ok=True)
        try:
            self.lock.acquire()
        except Timeout:
            raise FedmamlError(f"{self.dir}: another {self.what} is running in this directory "
                               f"({self.holder()}); {self.hint}") from None
        if self.lock.lock_counter == 1:
            since = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
            atomic_write_text(self.holder_file, json.dumps({
                "pid": os.getpid(), "host": socket.gethostname(),
                "command": _command(), "since": since}) + "\n")
        return self

    def __exit__(self, *exc: Any) -> None:
        if self.lock.lock_counter == 1:  # the last release: nobody holds it any more
            self.holder_file.unlink(missing_ok=True)
        self.lock.release()

    def holder(self) -> str:
        """``pid N on host H since T: command`` from the file beside the lock (``pid ?`` when the
        holder has not written it yet)."""
        try:
            h = json.loads(self.holder_file.read_text(encoding="utf-8"))
            return f"pid {h['pid']} on host {h['host']} since {h['since']}: {h['command']}"
        except (OSError, ValueError, KeyError, TypeError):
            return "pid ?"


def _command() -> str:
    """This process's command line as the user typed it (``python -m fedmaml`` shows up as the
    path of fedmaml/__main__.py)."""
    argv = list(sys.argv)
    if argv and Path(argv[0]).name in ("__main__.py", "fedmaml"):
        argv[0] = "fedmaml"
    return shlex.join(argv)


def run_lock(run_dir: str | Path) -> DirectoryLock:
    """The lock of a run directory: held by ``fedmaml run`` (and ``--resume``) and by a sweep for
    each run (or each run of a vectorized batch) while it trains."""
    return DirectoryLock(run_dir, RUN_LOCK, "fedmaml run",
                         "wait for it to end, or stop it (Ctrl-C or `kill PID` checkpoints it)",
                         reentrant=True)


def has_content(path: str | Path) -> bool:
    """Does ``path`` hold anything besides a run lock? (A lock left by a killed process does not
    make a directory a run.)"""
    path = Path(path)
    return path.is_dir() and any(p.name not in _LOCK_FILES for p in path.iterdir())


def clear(run_dir: str | Path) -> None:
    """Delete what an attempt left in ``run_dir``, but not its lock (which the caller holds: a new
    lock file would not exclude the processes waiting on the old one)."""
    import shutil

    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        return
    for p in run_dir.iterdir():
        if p.name in _LOCK_FILES:
            continue
        if p.is_dir() and not p.is_symlink():
            shutil.rmtree(p)
        else:
            p.unlink()


def aside_name(run_dir: str | Path, n: int | str) -> str:
    """``.<name>.old-<n>``: hidden, because every scan of run directories (``fedmaml compare``,
    which a sweep directory is given to) skips dot-directories; a visible name would make the old
    attempt count as one more seed of the run that replaced it."""
    return f".{Path(run_dir).name}.old-{n}"


def move_aside(run_dir: str | Path) -> Path:
    """Rename ``run_dir`` to ``.<name>.old-<n>`` beside it (:func:`aside_name`, the first free n)
    under its lock, so that no process is working in it; nothing is deleted. Returns the new
    path."""
    run_dir = Path(run_dir)
    n = 1
    while run_dir.with_name(aside_name(run_dir, n)).exists():
        n += 1
    target = run_dir.with_name(aside_name(run_dir, n))
    with run_lock(run_dir) as lock:
        lock.holder_file.unlink(missing_ok=True)  # it would name this process in the old directory
        os.rename(run_dir, target)
    return target


def restart_hint(run_dir: str | Path) -> str:
    return (f"to start it again from the beginning: {restart_command(run_dir)} (moves "
            f"{run_dir} aside to {aside_name(run_dir, 'N')} beside it; nothing is deleted)")


# -- new and unfinished runs -----------------------------------------------------------------------

def config_differences(a: Config, b: Config,
                       ignore: Iterable[str] = ("output_dir",)) -> list[tuple[str, Any, Any]]:
    """``(key, value in a, value in b)`` for every key that differs, in schema order, leaving out
    ``ignore`` and the ``tracking`` keys (where a run is logged does not change its results)."""
    fa, fb, skip = config_to_flat(a), config_to_flat(b), set(ignore)
    return [(k, fa[k], fb[k]) for k in fa
            if k not in skip and not k.startswith("tracking.") and fa[k] != fb[k]]


def new_run_dir(cfg: Config) -> Path:
    """``<output_dir>/<name>``, or ``<name>-2``, ``-3``... if that exists already. When the last of
    them is an unfinished run of this very config, that is an error saying how to resume it
    (rather than silently starting over in the next directory)."""
    base = Path(cfg.output_dir) / cfg.name
    path, i, last = base, 1, None
    while has_content(path):
        last = path
        i += 1
        path = base.with_name(f"{base.name}-{i}")
    if last is not None:
        refuse_unfinished(last, cfg)
    return path


def refuse_unfinished(run_dir: Path, cfg: Config) -> None:
    """A FedmamlError if ``run_dir`` is an unfinished run of ``cfg`` (same config up to
    output_dir): resume it or start it again, but do not leave it behind unnoticed."""
    from fedmaml.federated import checkpoint

    status = run_status(read_summary(run_dir))
    if status not in (None, "interrupted") or not (run_dir / CONFIG_FILE).exists():
        return
    try:
        if config_differences(load_config(run_dir / CONFIG_FILE), cfg):
            return
    except FedmamlError:  # not a config this version reads: another experiment
        return
    if checkpoint.path_of(run_dir).exists():
        saved = load_checkpoint(run_dir)
        raise FedmamlError(f"{run_dir} is an unfinished run of this config (checkpoint after "
                           f"round {saved['round']} of {cfg.federated.rounds}); resume it with "
                           f"{resume_command(run_dir)}, or {restart_hint(run_dir)}")
    raise FedmamlError(f"{run_dir} is an unfinished run of this config without a checkpoint "
                       f"({no_checkpoint_why(cfg)}); {restart_hint(run_dir)}")


def no_checkpoint_why(cfg: Config) -> str:
    """Why an unfinished run of ``cfg`` has no checkpoint to resume from."""
    every = cfg.federated.checkpoint_every
    if every:
        return (f"federated.checkpoint_every is {every}, a checkpoint every {every} rounds; this "
                "run was killed or crashed before its first one")
    return ("federated.checkpoint_every is 0, so only a stop by Ctrl-C or SIGTERM writes one; this "
            "run was killed or crashed")


def given_run_dir(run_dir: str | Path, resume: bool = False, restart: bool = False) -> None:
    """Check a run directory that the caller names for a run (``fedmaml.run``'s ``run_dir``), before
    anything runs: without ``resume`` or ``restart`` it must be new (absent or empty), so that no
    run is overwritten or mixed with the files (and ``baselines/``) of another; with either, it
    must be new or hold a run (``config.yaml``), so that nothing else is moved aside or resumed.
    A FedmamlError says what the directory holds and how to go on. ``fedmaml run`` does not need
    it: it picks a new directory itself (:func:`new_run_dir`), and its ``--resume`` and
    ``--restart`` take the config of a run directory, so they refuse any other."""
    run_dir = Path(run_dir)
    if not has_content(run_dir):
        return
    if not (run_dir / CONFIG_FILE).exists():
        raise FedmamlError(f"run_dir {run_dir}: holds files but no run (no {CONFIG_FILE}); give "
                           "a new or empty directory")
    if resume or restart:
        return
    status = run_status(read_summary(run_dir))
    runs = [run_dir, *sorted(p for p in (run_dir / BASELINES_DIR).glob("*") if p.is_dir())]
    resumable = any((d / CHECKPOINT_FILE).exists() for d in runs)
    if status in (None, "interrupted"):
        held = "an unfinished run" + ("" if resumable else " without a checkpoint")
    else:
        held = f"a run that ended ({status})" + (
            "; a compare_with baseline of it is unfinished" if resumable else "")
    ways = [f"resume=True continues it ({resume_command(run_dir)})"] if resumable else []
    ways.append(f"restart=True moves it aside and starts again ({restart_command(run_dir)}; "
                f"moved to {aside_name(run_dir, 'N')} beside it, nothing is deleted)")
    raise FedmamlError(f"run_dir {run_dir}: already holds {held}, which a new run would overwrite; "
                       + "; ".join(ways) + "; or give another run_dir")


def check_ended(run_dir: Path, summary: dict[str, Any], cfg: Config, top: Path) -> None:
    """On a resume, a run that ended (``summary``) is kept as it is, and so it must be the run of
    ``cfg``: a longer ``federated.rounds`` cannot extend it, and a config that differs in any key
    a resume may not change (:data:`CHANGEABLE_ON_RESUME`) is another run. ``top``: the run
    directory resumed (``run_dir`` or the one holding it as a baseline)."""
    if summary.get("rounds", cfg.federated.rounds) != cfg.federated.rounds:
        raise FedmamlError(f"{run_dir}: ended ({summary['status']}) with federated.rounds "
                           f"{summary['rounds']}; a run that ended cannot be extended, so {top} "
                           f"cannot resume with federated.rounds {cfg.federated.rounds}; start a "
                           "new run")
    try:
        ran = load_config(run_dir / CONFIG_FILE)
    except FedmamlError:  # no config.yaml this version reads: nothing to compare with
        return
    diff = [(k, a, b) for k, a, b in config_differences(ran, cfg)
            if k not in CHANGEABLE_ON_RESUME]
    if diff:
        shown = "; ".join(f"{k}: {a!r} there, {b!r} now" for k, a, b in diff[:5])
        raise FedmamlError(f"{run_dir}: ended ({summary['status']}) as a run of another config "
                           f"({shown}{'; ...' if len(diff) > 5 else ''}); a resume continues the "
                           f"run of {top} as it was made: give its config, or "
                           f"{restart_hint(top)}, or start a new run elsewhere")


def resumes(run_dir: Path, cfg: Config, top: Path) -> bool:
    """On a resume, whether the unfinished run in ``run_dir`` continues from its checkpoint (True)
    or, never started (an empty directory: a baseline after an interrupted run), starts (False).
    A run that started and has no checkpoint is a FedmamlError: starting it over would replace the
    rounds it ran (its metrics.jsonl) without being asked to. A baseline of ``top`` (its run
    directory inside) starts over instead (False): restarting ``top`` would run again what ended
    there, and the caller says so."""
    if (run_dir / CHECKPOINT_FILE).exists():
        return True
    if not has_content(run_dir) or Path(run_dir) != Path(top):
        return False
    raise FedmamlError(f"{run_dir}: no checkpoint to resume from ({no_checkpoint_why(cfg)}); "
                       f"{restart_hint(top)}")


def load_checkpoint(run_dir: str | Path, top: str | Path | None = None) -> dict[str, Any]:
    """:func:`checkpoint.load`, whose error for a corrupt file also says how to start again
    (``top``: the run directory to restart, when ``run_dir`` is a baseline inside it)."""
    from fedmaml.federated import checkpoint

    try:
        return checkpoint.load(run_dir)
    except DataError as e:
        raise DataError(f"{e}; the run cannot resume from it: {restart_hint(top or run_dir)}") \
            from None


# -- resume checks ---------------------------------------------------------------------------------

def _rounds_ok(saved: dict[str, Any], old: Config, new: Config) -> str | None:
    """Why ``new``'s ``federated.rounds`` cannot continue the checkpoint, or None. The rounds the
    checkpoint ran must be the ones a run of the new length would have run: ``rounds`` must exceed
    the checkpoint's round, and a step-size decay placed at a fraction of the rounds
    (``federated.lr_decay_at``) must not move across a round that already ran."""
    done, rounds = int(saved["round"]), new.federated.rounds
    if rounds <= done:
        return (f"federated.rounds {rounds}: the checkpoint is after round {done}, so the run has "
                f"done more than {rounds} rounds already; give more than {done} rounds")
    from fedmaml.federated.setup import setup_for

    before, after = setup_for(old), setup_for(new)
    moved = [r for r in range(1, done + 1)
             if before.eta_for_round(r) != after.eta_for_round(r)]
    if moved:
        return (f"federated.rounds {old.federated.rounds} -> {rounds} moves the step-size decay "
                f"(federated.lr_decay_at {new.federated.lr_decay_at:g} of the rounds) across "
                f"rounds that already ran ({moved[0]}..{moved[-1]}): the resumed run would not be "
                "the run of the new length; start a new run instead")
    return None


#: Keys a resume may change, and the check of the new value (None: any valid value). Only keys
#: that leave the rounds already run unchanged: the length of the run (checked) and how often it
#: checkpoints. Everything else (even the engine, whose float rounding differs, or tracking, whose
#: backends would hold half a run) stays as the run began.
CHANGEABLE_ON_RESUME: dict[str, Callable[[dict[str, Any], Config, Config], str | None] | None] = {
    "federated.rounds": _rounds_ok,
    "federated.checkpoint_every": None,
    # where the sharded engine runs: a checkpoint holds one bank for all shards (engines/shards.py)
    "engine.shards": None,
    "engine.ray_address": None,
}


def saved_config(saved: dict[str, Any], where: str | Path) -> Config | None:
    """The config a checkpoint was made from (None for a checkpoint of a version that did not keep
    it)."""
    flat = saved.get("config")
    if flat is None:
        return None
    return config_from_flat(flat, source=f"the config kept in the checkpoint of {where}")


def check_resume(run_dir: str | Path, cfg: Config,
                 top: str | Path | None = None) -> Callable[[], None] | None:
    """Refuse to resume ``run_dir``'s checkpoint with ``cfg`` unless every key that differs from the
    checkpoint's config may change (:data:`CHANGEABLE_ON_RESUME`) to the value given. Returns what
    records an accepted change (checkpoint, ``config.yaml``, later ``config_changes`` in
    summary.json), to call once every run of the directory passed its check; None: no change."""
    run_dir = Path(run_dir)
    saved = load_checkpoint(run_dir, top)
    old = saved_config(saved, run_dir)
    if old is None:  # an older checkpoint: nothing to compare with
        return None
    # every key but where the directory was made (tracking too: its backends would hold half a run)
    fa, fb = config_to_flat(old), config_to_flat(cfg)
    diff = [(k, fa[k], fb[k]) for k in fa if k != "output_dir" and fa[k] != fb[k]]
    if not diff:
        return None
    fixed = [(k, a, b) for k, a, b in diff if k not in CHANGEABLE_ON_RESUME]
    if fixed:
        shown = "; ".join(f"{k}: {a!r} in the checkpoint, {b!r} now" for k, a, b in fixed)
        raise FedmamlError(
            f"{run_dir}: the config differs from the one its checkpoint was made from ({shown}); "
            "a resume continues the same run, so these cannot change (was config.yaml edited?). "
            f"Only {', '.join(CHANGEABLE_ON_RESUME)} may change on resume, e.g. "
            f"{resume_command(top or run_dir, rounds=True)}; to run another config, start a new "
            "run")
    for key, _, _ in diff:
        check = CHANGEABLE_ON_RESUME[key]
        why = check(saved, old, cfg) if check is not None else None
        if why is not None:
            raise FedmamlError(f"{run_dir}: cannot resume with {why}")
    return lambda: record_change(run_dir, saved, cfg, diff)


def record_change(run_dir: Path, saved: dict[str, Any], cfg: Config,
                  diff: list[tuple[str, Any, Any]]) -> None:
    """Write an accepted change into the checkpoint (its config, and a note in the app state that
    summary.json reports as ``config_changes``), then ``config.yaml``. The checkpoint goes first:
    killed in between, the next resume sees config.yaml differ from it in the changed keys only,
    and checks and records them again."""
    now = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
    note = {"after_round": int(saved["round"]), "at": now,
            "changes": {k: [a, b] for k, a, b in diff}}
    app = dict(saved["app"])
    app[CONFIG_CHANGES] = [*app.get(CONFIG_CHANGES, []), note]
    from fedmaml.federated import checkpoint

    state = {k: v for k, v in saved.items() if k not in ("format", "config", "config_sha256")}
    checkpoint.save(run_dir, {**state, "app": app}, cfg)
    atomic_write_text(run_dir / CONFIG_FILE, dump_yaml(cfg))

