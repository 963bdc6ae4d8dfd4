"""Atomic file writes: a temp file in the target's directory, fsync, then rename over the target.

A crash or kill at any moment leaves either the old file or the new one, never a torn mix.

Permissions are those ``open(path, "w")`` would give: a new file gets ``0o666`` minus the process
umask, a file that is replaced keeps its mode. ``tempfile.mkstemp`` alone creates ``0o600`` files, and
the rename would carry that over: a shared results directory (or TensorBoard run by another user)
could not read them. Files that must stay private (a client's memory, derived from its data, and
checkpoints holding memories) pass ``mode=PRIVATE``: that mode, whatever the umask or the old
file's.
"""

from __future__ import annotations

import io
import os
import stat
import tempfile
from pathlib import Path


def current_umask() -> int:
    """The process umask. Linux reports it in /proc without changing it; elsewhere it can only be read
    by setting it, which is restored at once (a file another thread creates in between could get
    the wrong mode, hence /proc first)."""
    try:
        with open("/proc/self/status", encoding="ascii") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


#: The mode of files only their owner may read (``mode=PRIVATE``).
PRIVATE = 0o600


def _mode_for(path: Path) -> int:
    try:
        return stat.S_IMODE(path.stat().st_mode)
    except FileNotFoundError:
        return 0o666 & ~current_umask()


def atomic_write_bytes(path: str | Path, data: bytes, mode: int | None = None) -> None:
    """``mode``: the file's permissions (e.g. :data:`PRIVATE`); None: follow the umask, or keep
    the mode of the file replaced."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    mode = _mode_for(path) if mode is None else mode
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            if hasattr(os, "fchmod"):  # not on Windows, where modes mean little anyway
                os.fchmod(f.fileno(), mode)
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    _fsync_directory(path.parent)


def _fsync_directory(directory: Path) -> None:
    """Make the rename itself durable: without this a power cut (a device unplugged) may bring back
    the old file after reboot. Not every platform can open a directory (Windows): then skip."""
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def atomic_write_text(path: str | Path, text: str, mode: int | None = None) -> None:
    atomic_write_bytes(path, text.encode(), mode)


def atomic_torch_save(obj: object, path: str | Path, mode: int | None = None) -> None:
    import torch  # lazily: reading run files should not pay for importing torch

    buffer = io.BytesIO()
    torch.save(obj, buffer)
    atomic_write_bytes(path, buffer.getvalue(), mode)
