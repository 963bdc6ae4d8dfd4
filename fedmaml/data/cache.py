"""Cache of expensive-to-build arrays (generated or decoded data sets), in memory and on disk.

Simulation actors are separate processes that each build their data; generating MNIST-1D or
decoding thousands of Omniglot PNGs in every one of them wastes seconds to minutes. Arrays are
stored as ``<cache dir>/<name>-<hash of key>.npz`` (written to a temporary file and renamed, so a
crashed or concurrent writer never leaves a half-written file under the final name, via
:mod:`fedmaml.atomic`) and memoized
per process. The key must describe everything the arrays depend on (generator arguments, package
version, or a digest of the source files' names, sizes and mtimes).

The cache directory is ``$FEDMAML_CACHE_DIR`` if set, else ``$XDG_CACHE_HOME/fedmaml``, else
``~/.cache/fedmaml``. A cache that cannot be written only costs the rebuild next time (a warning).
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import threading
import warnings
import zipfile
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import numpy as np

from fedmaml.atomic import atomic_write_bytes

Arrays = dict[str, np.ndarray]

_MEMORY: dict[tuple[str, str], Arrays] = {}
_LOCK = threading.Lock()


def cache_dir() -> Path:
    """Where cached arrays live (see the module docstring)."""
    env = os.environ.get("FEDMAML_CACHE_DIR")
    if env:
        return Path(env)
    xdg = os.environ.get("XDG_CACHE_HOME")
    return (Path(xdg) if xdg else Path.home() / ".cache") / "fedmaml"


def key_digest(key: Mapping[str, Any]) -> str:
    """A short stable digest of a JSON-serialisable key."""
    text = json.dumps(key, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:20]


def files_digest(root: Path, files: list[Path]) -> str:
    """A digest of files' names (relative to ``root``), sizes and modification times.

    Part of a cache key for data decoded from files: editing, adding or removing a file changes it.
    """
    h = hashlib.sha256(str(root.resolve()).encode())
    for f in files:
        st = f.stat()
        h.update(f"\0{f.relative_to(root)}\0{st.st_size}\0{st.st_mtime_ns}".encode())
    return h.hexdigest()


def cached_arrays(name: str, key: Mapping[str, Any], build: Callable[[], Arrays]) -> Arrays:
    """Return ``build()``'s arrays, from process memory or disk when the same key was built before.

    The returned arrays are shared between callers: treat them as read-only.
    """
    digest = key_digest(key)
    with _LOCK:
        if (name, digest) in _MEMORY:
            return _MEMORY[(name, digest)]
        path = cache_dir() / f"{name}-{digest}.npz"
        arrays = _load(path)
        if arrays is None:
            arrays = build()
            _store(path, arrays)
        _MEMORY[(name, digest)] = arrays
        return arrays


def clear_memory() -> None:
    """Forget the in-process copies (the disk cache stays)."""
    with _LOCK:
        _MEMORY.clear()


def _load(path: Path) -> Arrays | None:
    try:
        with np.load(path, allow_pickle=False) as archive:
            return {k: archive[k] for k in archive.files}
    except FileNotFoundError:
        return None
    except (OSError, ValueError, EOFError, KeyError, zipfile.BadZipFile):
        return None  # unreadable cache entry: rebuild and overwrite it


def _store(path: Path, arrays: Arrays) -> None:
    buffer = io.BytesIO()
    np.savez(buffer, **arrays)
    try:
        atomic_write_bytes(path, buffer.getvalue())
    except OSError as exc:
        warnings.warn(f"fedmaml could not cache data at {path} ({exc}); it will be rebuilt next time")
