"""FEMNIST from LEAF's JSON files: ``<path>/*.json``, one client per writer.

Each file is ``{"users": [...], "num_samples": [...], "user_data": {user: {"x": [[784 floats]],
"y": [ints]}}}`` (LEAF's ``data/all_data`` or ``data/train`` output). A writer appearing in several
files (LEAF's train and test files) has its examples concatenated. Images are ``[n, 1, 28, 28]``
float32 with pixel values as stored; labels 0..61 (digits, upper case, lower case). Parsing the JSON
is slow for the full data set, so the arrays are cached in memory and on disk, keyed by the files'
names, sizes and mtimes.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np

from fedmaml.errors import DataError

from .cache import cached_arrays, files_digest
from .pools import LabelledPool

NUM_CLASSES = 62
SIDE = 28
PIXELS = SIDE * SIDE
LAYOUT = ('<path>/*.json, each {"users": [...], "num_samples": [...], '
          '"user_data": {user: {"x": [[784 floats], ...], "y": [labels 0..61]}}}')


def load_femnist_pool(path: str) -> LabelledPool:
    """All writers under ``path`` as one pool, with each writer as a natural group."""
    root = Path(path)
    if not root.is_dir():
        raise DataError(f"data.path = '{path}': FEMNIST directory not found; expected {LAYOUT}")
    files = sorted(root.glob("*.json"))
    if not files:
        raise DataError(f"data.path = '{path}': no .json files; expected {LAYOUT}")

    def build() -> dict[str, np.ndarray]:
        writers: dict[str, list[tuple[np.ndarray, np.ndarray]]] = {}
        for f in files:
            for user, x, y in read_leaf_file(f):
                writers.setdefault(user, []).append((x, y))
        names = sorted(writers)
        if not names:
            raise DataError(f"data.path = '{path}': the .json files list no users; expected {LAYOUT}")
        xs = [x for name in names for x, _ in writers[name]]
        ys = [y for name in names for _, y in writers[name]]
        counts = [sum(len(y) for _, y in writers[name]) for name in names]
        return {
            "x": np.concatenate(xs).reshape(-1, 1, SIDE, SIDE),
            "y": np.concatenate(ys),
            "writers": np.array(names, dtype=str),
            "offsets": np.cumsum([0] + counts).astype(np.int64),
        }

    arrays = cached_arrays("femnist", {"files": files_digest(root, files)}, build)
    offsets = arrays["offsets"]
    groups = tuple(np.arange(offsets[i], offsets[i + 1]) for i in range(len(offsets) - 1))
    return LabelledPool.from_arrays(
        arrays["x"], arrays["y"], NUM_CLASSES,
        groups=groups, group_names=tuple(str(w) for w in arrays["writers"]),
    )


def read_leaf_file(path: Path) -> list[tuple[str, np.ndarray, np.ndarray]]:
    """``[(user, x float32 [n, 784], y int64 [n]), ...]`` from one LEAF file; problems raise."""
    try:
        with open(path, encoding="utf-8") as fh:
            content = json.load(fh)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise DataError(f"{path}: not a readable JSON file ({exc}); expected {LAYOUT}") from exc
    if not isinstance(content, dict):
        raise DataError(f"{path}: top level is {type(content).__name__}, expected an object; {LAYOUT}")
    for key in ("users", "user_data"):
        if key not in content:
            raise DataError(f"{path}: missing key '{key}'; expected {LAYOUT}")
    users, user_data = content["users"], content["user_data"]
    if not isinstance(users, list) or not isinstance(user_data, dict):
        raise DataError(f"{path}: 'users' must be a list and 'user_data' an object; expected {LAYOUT}")
    counts = content.get("num_samples")
    if counts is not None and (not isinstance(counts, list) or len(counts) != len(users)):
        raise DataError(f"{path}: 'num_samples' must be a list with one count per user ({len(users)})")
    out = []
    for i, user in enumerate(users):
        if user not in user_data:
            raise DataError(f"{path}: user {user!r} is listed in 'users' but missing from 'user_data'")
        x, y = _user_arrays(path, str(user), user_data[user])
        if counts is not None and counts[i] != len(y):
            raise DataError(
                f"{path}: user {user!r} has num_samples = {counts[i]!r} but {len(y)} examples"
            )
        out.append((str(user), x, y))
    return out


def _user_arrays(path: Path, user: str, data: Any) -> tuple[np.ndarray, np.ndarray]:
    where = f"{path}: user {user!r}"
    if not isinstance(data, dict) or "x" not in data or "y" not in data:
        raise DataError(f"{where}: expected an object with keys 'x' and 'y'")
    x, y = data["x"], data["y"]
    if not isinstance(x, list) or not isinstance(y, list) or len(x) != len(y):
        raise DataError(f"{where}: 'x' and 'y' must be lists of the same length")
    for j, row in enumerate(x):
        if not isinstance(row, list) or len(row) != PIXELS:
            got = f"{len(row)} values" if isinstance(row, list) else type(row).__name__
            raise DataError(f"{where}: x[{j}] has {got}, expected {PIXELS} (a flattened 28x28 image)")
    try:
        x_arr = np.asarray(x, dtype=np.float32).reshape(len(x), PIXELS)
        y_arr = np.asarray(y)
    except (TypeError, ValueError) as exc:
        raise DataError(f"{where}: 'x' must hold numbers ({exc})") from exc
    bad = np.flatnonzero(~np.isfinite(x_arr).all(axis=1))
    if len(bad):  # JSON readers accept NaN and Infinity; a model trained on them only diverges
        raise DataError(f"{where}: x[{bad[0]}] holds NaN or infinite values ({len(bad)} such "
                        "record(s)); pixel values must be finite numbers")
    if len(y) and (
        not np.issubdtype(y_arr.dtype, np.integer) or y_arr.min() < 0 or y_arr.max() >= NUM_CLASSES
    ):
        raise DataError(f"{where}: 'y' must be integers in 0..{NUM_CLASSES - 1}")
    return x_arr, y_arr.astype(np.int64)
