"""The names of a run directory's files and reading them back: one home for what the recorder
writes (fedmaml/results/recorder.py) and what the run-directory logic, the sweep and compare read;
and the commands that resume or restart a run, as the user in front of them gives them.

Standard library only, so that a sweep's parent process, ``fedmaml compare`` and the CLI's checks
of a run directory do not import torch (the recorder does, for model.pt).
"""

from __future__ import annotations

import contextlib
import contextvars
import json
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

CONFIG_FILE = "config.yaml"  # the resolved config
METRICS_FILE = "metrics.jsonl"  # one line per round, appended
SUMMARY_FILE = "summary.json"  # written last: a directory that has one holds a run that ended
MODEL_FILE = "model.pt"  # the final meta-model
CHECKPOINT_FILE = "checkpoint.pt"  # while a run can be resumed (fedmaml/federated/checkpoint.py)
#: A run's ``compare_with`` baselines run inside its directory: ``<run dir>/baselines/<algorithm>``.
BASELINES_DIR = "baselines"


def run_dirs_of(run_dir: str | Path, compare_with: Iterable[str]) -> list[Path]:
    """A run directory and those of its ``compare_with`` baselines, in the order they run."""
    return [Path(run_dir), *(Path(run_dir) / BASELINES_DIR / name for name in compare_with)]


def main_run_of(run_dir: str | Path) -> Path | None:
    """The run directory a baseline's directory belongs to (None: ``run_dir`` is not a
    baseline's)."""
    parent = Path(run_dir).parent
    if parent.name == BASELINES_DIR and (parent.parent / CONFIG_FILE).is_file():
        return parent.parent
    return None


# -- the advice: `fedmaml run --resume DIR` or `fedmaml.run(..., resume=True)` ----------------------

_FROM_PYTHON: contextvars.ContextVar[bool] = contextvars.ContextVar("fedmaml_from_python",
                                                                   default=False)


@contextlib.contextmanager
def advising_python() -> Iterator[None]:
    """While it runs, the errors of the run-directory checks (fedmaml/run_dir.py) tell how to go
    on with ``fedmaml.run``'s arguments (``resume=True``, ``restart=True``) rather than with
    ``fedmaml run``'s options: the checks are the same, only the way to act on them differs."""
    token = _FROM_PYTHON.set(True)
    try:
        yield
    finally:
        _FROM_PYTHON.reset(token)


def resume_command(run_dir: str | Path, rounds: bool = False, python: bool | None = None
                   ) -> str:
    """How the user resumes the run in ``run_dir`` (``rounds``: giving it a new
    ``federated.rounds``). A baseline resumes with its run, which goes on to the baselines after
    it. ``python``: in ``fedmaml.run``'s words or the CLI's (None: as :func:`advising_python`
    says; a message saved in a run's files takes the CLI's, whichever thread writes it)."""
    run_dir = main_run_of(run_dir) or run_dir
    if _FROM_PYTHON.get() if python is None else python:
        more = ', **{"federated.rounds": N}' if rounds else ""
        return f"`fedmaml.run(..., run_dir={str(run_dir)!r}, resume=True{more})`"
    return f"`fedmaml run --resume {run_dir}{' federated.rounds=N' if rounds else ''}`"


def restart_command(run_dir: str | Path) -> str:
    """How the user starts ``run_dir`` again from the beginning (it is moved aside first:
    ``fedmaml.run_dir.move_aside``)."""
    if _FROM_PYTHON.get():
        return f"`fedmaml.run(..., run_dir={str(run_dir)!r}, restart=True)`"
    return f"`fedmaml run --restart {run_dir}`"


def read_metrics(run_dir: str | Path) -> list[dict[str, Any]]:
    with open(Path(run_dir) / METRICS_FILE, encoding="utf-8") as f:
        return parse_metrics(f)


def parse_metrics(lines: Iterable[str]) -> list[dict[str, Any]]:
    """The rows of metrics.jsonl lines (blank lines skipped)."""
    return [json.loads(line) for line in lines if line.strip()]


def read_summary(run_dir: str | Path) -> dict[str, Any] | None:
    """summary.json, or None when there is none (a run not finished, or a directory of another
    kind)."""
    path = Path(run_dir) / SUMMARY_FILE
    return json.loads(path.read_text(encoding="utf-8")) if path.exists() else None
