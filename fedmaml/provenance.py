"""Where a result came from: the fedmaml version, the git commit of the code and whether the
working tree had uncommitted changes, and the versions of the libraries that decide the numbers.

Every summary.json (fedmaml/results/recorder.py), pattern-selection record and results JSON of
simulations/ records :func:`provenance` under the key ``provenance``, so a number in docs/results.md
can be traced to the code that produced it (docs/results.md, "Reproducing a documented run").
A run takes it when it starts (:func:`run_provenance`), not when it ends: a commit made while a long
run trains is not the code that ran. A resumed run keeps its first segment's provenance (it travels
in the checkpoint) and lists the code of each resume that differs under ``resumed_with``.

The commit is read with ``git`` only when the imported package sits at the top of a git checkout
(``<checkout>/fedmaml``); an installed wheel has no ``.git`` next to it and records its version
alone (``git_commit`` and ``git_dirty`` are null). ``git_dirty`` counts changes to tracked files
only: results and other untracked files in the checkout do not make every run "dirty".
Standard library only, computed once per process.
"""

from __future__ import annotations

import functools
import platform
import subprocess
from importlib import metadata
from pathlib import Path
from typing import Any

from fedmaml.version import __version__

#: Libraries whose version can change a run's numbers (kernels, random streams, aggregation).
LIBRARIES = ("torch", "numpy", "flwr")
_GIT_TIMEOUT = 30.0  # seconds; a loaded machine can take a while for `git status`


def _git(checkout: Path, *args: str) -> str | None:
    """``git -C checkout args`` standard output, or None when git is missing or fails."""
    try:
        done = subprocess.run(["git", "-C", str(checkout), *args], capture_output=True, text=True,
                              timeout=_GIT_TIMEOUT, check=False)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return done.stdout if done.returncode == 0 else None


def git_state(package_dir: Path | None = None) -> tuple[str | None, bool | None]:
    """(commit, dirty) of the checkout holding ``package_dir`` (default: this package), or
    (None, None) when the package is not at the top of a git checkout (an installed wheel)."""
    package_dir = Path(__file__).resolve().parent if package_dir is None else package_dir
    checkout = package_dir.parent
    # `.git` is a directory in a clone and a file in a worktree. Requiring it right next to the
    # package keeps a wheel installed in a venv inside some other repository from reporting that
    # repository's commit.
    if not (checkout / ".git").exists():
        return None, None
    commit = _git(checkout, "rev-parse", "HEAD")
    if commit is None:
        return None, None
    status = _git(checkout, "status", "--porcelain", "--untracked-files=no")
    return commit.strip(), None if status is None else bool(status.strip())


def _version(distribution: str) -> str | None:
    try:
        return metadata.version(distribution)
    except metadata.PackageNotFoundError:
        return None


@functools.lru_cache(maxsize=1)
def provenance() -> dict[str, Any]:
    """``{"fedmaml_version", "git_commit", "git_dirty", "python", "torch", "numpy", "flwr"}``
    (JSON-ready). Cached: copy it before changing it, as :func:`with_provenance` does."""
    commit, dirty = git_state()
    record: dict[str, Any] = {"fedmaml_version": __version__, "git_commit": commit,
                              "git_dirty": dirty, "python": platform.python_version()}
    record.update({name: _version(name) for name in LIBRARIES})
    return record


def with_provenance(record: dict[str, Any]) -> dict[str, Any]:
    """``record`` with a ``provenance`` entry (a new dict; ``record`` is not changed)."""
    return {**record, "provenance": dict(provenance())}


def run_provenance(started: dict[str, Any] | None = None) -> dict[str, Any]:
    """The provenance of a run, taken at its start. ``started``: what a run that resumes recorded
    at its own start (kept in its checkpoint); it stays, and this process's provenance is added
    to its ``resumed_with`` list when it differs from the code that ran last. None (a new run, or
    a checkpoint of a version that kept none): this process's provenance."""
    now = dict(provenance())
    if started is None:
        return now
    record = {**started, "resumed_with": list(started.get("resumed_with", []))}
    last = record["resumed_with"][-1] if record["resumed_with"] else started
    if any(last.get(k) != v for k, v in now.items()):
        record["resumed_with"].append(now)
    if not record["resumed_with"]:
        del record["resumed_with"]
    return record
