"""Where a user's per-client arrays come from: files, a Flower app's ``load_data``, flwr-datasets.

Each reader returns a :class:`~fedmaml.data.user.ClientData`; checking and planning are
:mod:`fedmaml.data.user`'s. The layouts (docs/custom.md, "Your own data"):

* ``data.family: files``, ``data.path`` a directory: one ``<client id>.npz`` (arrays ``x``, ``y``)
  or ``<client id>.pt`` (``torch.save`` of ``{"x": ..., "y": ...}`` or ``(x, y)``) per client;
* ``data.path`` one ``.npz`` (arrays ``x``, ``y`` and the client ids under ``data.client_column``)
  or one ``.csv`` (or ``.parquet``) with a header (``data.label_column``, ``data.client_column``, every other
  column an input feature);
* ``data.family: flower``, ``data.flower_task: "package.module"`` (or ``"package.module:function"``):
  ``load_data(partition_id, num_partitions) -> (trainloader, testloader)``, as in Flower's PyTorch
  quickstart; batches are ``(x, y)`` pairs or dicts keyed by ``data.input_column`` /
  ``data.label_column``. The loaders are iterated once per process;
* Python: :func:`save_client_arrays` writes ``{client_id: (x, y)}`` as such a directory (the data
  must be files so that every process of a run, e.g. Ray actors, reads the same clients), and
  :func:`partitioner_clients` converts a flwr-datasets ``Partitioner`` or ``FederatedDataset``.

One ``.parquet`` file is read like the CSV file when pyarrow is installed (``fedmaml[datasets]``).
"""

from __future__ import annotations

import csv
import importlib
import io
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch

from fedmaml.atomic import atomic_write_bytes
from fedmaml.data.user import check_rows
from fedmaml.errors import DataError

from .cache import cache_dir, key_digest
from .spec import DataSpec
from .user import ClientData, as_array, client_data_from_mapping, order_ids

DIR_LAYOUT = "a directory of <client id>.npz (arrays x, y) or <client id>.pt ({'x': ..., 'y': ...}) files"
FILE_LAYOUT = ("one .npz file (arrays x, y and the client ids under data.client_column), one .csv "
               "file with a header row or one .parquet file")


def read_files(spec: DataSpec) -> ClientData:
    """The clients under ``spec.path`` (a directory of per-client files, or one NPZ/CSV file)."""
    path = Path(spec.path)
    if path.is_dir():
        return _read_directory(path)
    if not path.is_file():
        raise DataError(f"data.path = '{spec.path}' does not exist; expected {DIR_LAYOUT}, or "
                        f"{FILE_LAYOUT}")
    suffix = path.suffix.lower()
    if suffix == ".npz":
        return _read_npz_table(path, spec)
    if suffix == ".csv":
        return _read_csv(path, spec)
    if suffix == ".parquet":
        return _read_parquet(path, spec)
    raise DataError(f"data.path = '{spec.path}': cannot read {suffix or 'extensionless'} files; "
                    f"expected {FILE_LAYOUT}, or {DIR_LAYOUT}")


def _read_directory(root: Path) -> ClientData:
    files = [f for f in root.iterdir() if f.suffix.lower() in (".npz", ".pt") and f.is_file()]
    if not files:
        raise DataError(f"data.path = '{root}' holds no .npz or .pt files; expected {DIR_LAYOUT}")
    by_id: dict[str, Path] = {}
    for f in files:
        if f.stem in by_id:
            raise DataError(f"{f} and {by_id[f.stem]} are both client {f.stem!r}; keep one")
        by_id[f.stem] = f
    ids = order_ids(list(by_id))
    xs, ys = [], []
    for cid in ids:
        x, y = _read_client_file(by_id[cid])
        xs.append(x)
        ys.append(y)
    return ClientData(tuple(ids), tuple(xs), tuple(ys), tuple(str(by_id[c]) for c in ids))


def _read_client_file(f: Path) -> tuple[np.ndarray, np.ndarray]:
    if f.suffix.lower() == ".npz":
        try:
            with np.load(f, allow_pickle=False) as archive:
                content = {k: archive[k] for k in archive.files}
        except (OSError, ValueError) as exc:
            raise DataError(f"{f}: not a readable .npz file ({exc})") from exc
    else:
        try:
            content = torch.load(f, map_location="cpu", weights_only=True)
        except Exception as exc:  # torch raises many types for a bad file
            raise DataError(f"{f}: not a readable .pt file ({type(exc).__name__}: {exc})") from exc
        if isinstance(content, (tuple, list)) and len(content) == 2:
            content = {"x": content[0], "y": content[1]}
    if not isinstance(content, Mapping) or "x" not in content or "y" not in content:
        found = sorted(content) if isinstance(content, Mapping) else type(content).__name__
        raise DataError(f"{f}: expected arrays 'x' and 'y' (found {found}); save the client's "
                        "inputs as x and its targets as y")
    return as_array(content["x"], f"{f}: x"), as_array(content["y"], f"{f}: y")


def _group(path: Path, x: np.ndarray, y: np.ndarray, client: np.ndarray | None,
           spec: DataSpec) -> ClientData:
    if client is None:
        if spec.partition == "natural":
            raise DataError(f"{path}: data.partition = 'natural' needs a client-id column "
                            f"'{spec.client_column}' (data.client_column); add it, or choose "
                            "data.partition iid, dirichlet or classes to split the examples")
        return ClientData(("all",), (x,), (y,), (str(path),))
    keys = [str(c) for c in client.tolist()]
    clients: dict[str, list[int]] = {}
    for row, key in enumerate(keys):
        clients.setdefault(key, []).append(row)
    ids = order_ids(list(clients))
    return ClientData(tuple(ids), tuple(x[clients[c]] for c in ids),
                      tuple(y[clients[c]] for c in ids), tuple(str(path) for _ in ids))


def _read_npz_table(path: Path, spec: DataSpec) -> ClientData:
    try:
        with np.load(path, allow_pickle=False) as archive:
            content = {k: archive[k] for k in archive.files}
    except (OSError, ValueError) as exc:
        raise DataError(f"{path}: not a readable .npz file ({exc})") from exc
    if "x" not in content or "y" not in content:
        raise DataError(f"{path}: expected arrays 'x' and 'y' (found {sorted(content)}); "
                        f"expected {FILE_LAYOUT}")
    x, y, client = content["x"], content["y"], content.get(spec.client_column)
    # Checked here, before the client column picks rows: split by client, the rows of a y of
    # another length would belong to other examples (or not exist).
    check_rows(str(path), x, y)
    if client is not None and len(client) != len(x):
        raise DataError(f"{path}: '{spec.client_column}' has {len(client)} entries for "
                        f"{len(x)} examples; give one client id per example")
    return _group(path, x, y, client, spec)


def _read_csv(path: Path, spec: DataSpec) -> ClientData:
    try:
        with open(path, newline="", encoding="utf-8") as fh:
            rows = list(csv.reader(fh))
    except (OSError, UnicodeDecodeError) as exc:
        raise DataError(f"{path}: not a readable CSV file ({exc})") from exc
    if len(rows) < 2:
        raise DataError(f"{path}: expected a header row and at least one example row")
    header, body = [h.strip() for h in rows[0]], rows[1:]
    for line, row in enumerate(body, start=2):
        if len(row) != len(header):
            raise DataError(f"{path}, line {line}: {len(row)} values for {len(header)} columns")
    columns = {}
    for j, name in enumerate(header):
        values = [row[j].strip() for row in body]
        if name == spec.client_column:
            columns[name] = np.array(values)
        else:
            integer = name == spec.label_column and all(re.fullmatch(r"[+-]?\d+", v) for v in values)
            columns[name] = _numbers(path, name, values, integer)
    return _from_columns(path, columns, spec)


def _read_parquet(path: Path, spec: DataSpec) -> ClientData:
    try:
        import pyarrow.parquet as pq
    except ImportError:
        raise DataError(f"{path}: reading Parquet needs pyarrow (pip install 'fedmaml[datasets]'"
                        " or pyarrow); or convert the file to CSV or NPZ") from None
    try:
        table = pq.read_table(path)
    except Exception as exc:  # pyarrow raises its own error types for a bad file
        raise DataError(f"{path}: not a readable Parquet file ({exc})") from exc
    columns = {}
    for name in table.column_names:
        values = np.asarray(table.column(name).to_pylist())
        if name != spec.client_column and values.dtype.kind not in "biuf":
            raise DataError(f"{path}: column '{name}' holds {values.dtype} values, not numbers; "
                            "input and target columns must be numeric")
        columns[name] = values
    return _from_columns(path, columns, spec)


def _from_columns(path: Path, columns: dict[str, np.ndarray], spec: DataSpec) -> ClientData:
    """A table's columns: the label, the client ids (if present), every other one an input."""
    if spec.label_column not in columns:
        raise DataError(f"{path}: no column '{spec.label_column}' (data.label_column) among "
                        f"{list(columns)}; set data.label_column to the target's column")
    inputs = [h for h in columns if h not in (spec.label_column, spec.client_column)]
    if not inputs:
        raise DataError(f"{path}: no input columns besides '{spec.label_column}' and "
                        f"'{spec.client_column}'")
    x = np.stack([columns[name] for name in inputs], axis=1)
    return _group(path, x, columns[spec.label_column], columns.get(spec.client_column), spec)


def _numbers(path: Path, name: str, values: list[str], integer: bool) -> np.ndarray:
    try:
        return np.array([int(v) if integer else float(v) for v in values],
                        dtype=np.int64 if integer else np.float64)
    except ValueError:
        bad = next(i for i, v in enumerate(values) if not _is_number(v))
        raise DataError(f"{path}, line {bad + 2}: column '{name}' holds {values[bad]!r}, not a "
                        "number; input and target columns must be numeric") from None


def _is_number(v: str) -> bool:
    try:
        float(v)
        return True
    except ValueError:
        return False


# ------------------------------------------------------------------------------ Flower task module


def read_flower_task(spec: DataSpec) -> ClientData:
    """Every partition's ``(trainloader, testloader)`` from ``spec.flower_task``, as arrays."""
    load_data = import_load_data(spec.flower_task)
    parts = spec.num_clients + spec.unseen_clients
    ids, xs, ys, tests, where = [], [], [], [], []
    for pid in range(parts):
        here = f"data.flower_task = {spec.flower_task!r}, partition {pid}"
        loaders = load_data(pid, parts)
        if not isinstance(loaders, (tuple, list)) or len(loaders) != 2:
            raise DataError(f"{here}: load_data returned {type(loaders).__name__}; expected "
                            "(trainloader, testloader)")
        x, y = loader_arrays(loaders[0], spec, here + " trainloader")
        tx, ty = loader_arrays(loaders[1], spec, here + " testloader")
        ids.append(str(pid))
        xs.append(x)
        ys.append(y)
        tests.append((tx, ty))
        where.append(f"data.flower_task = {spec.flower_task!r}")
    return ClientData(tuple(ids), tuple(xs), tuple(ys), tuple(where), tuple(tests))


def import_load_data(target: str) -> Any:
    """``package.module`` (its ``load_data``) or ``package.module:function``, imported."""
    module_name, _, attr = target.partition(":")
    attr = attr or "load_data"
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise DataError(f"data.flower_task = {target!r}: cannot import {module_name!r} ({exc}); "
                        "the module must be importable (installed, or on PYTHONPATH) in every "
                        "process of the run") from exc
    fn = getattr(module, attr, None)
    if not callable(fn):
        raise DataError(f"data.flower_task = {target!r}: {module_name} has no function {attr!r}; "
                        "expected load_data(partition_id, num_partitions) -> (trainloader, "
                        "testloader)")
    return fn


def loader_arrays(loader: Any, spec: DataSpec, where: str) -> tuple[np.ndarray, np.ndarray]:
    """Iterate a DataLoader (or any iterable of batches) once and concatenate its batches."""
    xs, ys = [], []
    for batch in loader:
        if isinstance(batch, Mapping):
            x, y = _batch_columns(batch, spec, where)
        elif isinstance(batch, (tuple, list)) and len(batch) == 2:
            x, y = batch
        else:
            raise DataError(f"{where}: a batch is {type(batch).__name__}; expected (x, y) or a "
                            f"dict with '{spec.label_column}' and an input column")
        xs.append(as_array(x, f"{where}: inputs"))
        ys.append(as_array(y, f"{where}: targets"))
    if not xs:
        raise DataError(f"{where}: the loader yielded no batches")
    return np.concatenate(xs), np.concatenate(ys)


def _batch_columns(batch: Mapping, spec: DataSpec, where: str) -> tuple[Any, Any]:
    if spec.label_column not in batch:
        raise DataError(f"{where}: batch keys {sorted(batch)} lack '{spec.label_column}' "
                        "(data.label_column)")
    if spec.input_column:
        if spec.input_column not in batch:
            raise DataError(f"{where}: batch keys {sorted(batch)} lack '{spec.input_column}' "
                            "(data.input_column)")
        return batch[spec.input_column], batch[spec.label_column]
    others = [k for k in batch if k != spec.label_column]
    if len(others) != 1:
        raise DataError(f"{where}: batch keys {sorted(batch)}: set data.input_column to the one "
                        "holding the inputs")
    return batch[others[0]], batch[spec.label_column]


# --------------------------------------------------------------------------------- Python helpers


def save_client_arrays(clients: Mapping[Any, Any], directory: str | Path | None = None) -> Path:
    """Write ``{client_id: (x, y)}`` as one ``<client id>.npz`` per client and return the directory.

    Without ``directory`` the files go to fedmaml's cache (``$FEDMAML_CACHE_DIR``), under a name
    derived from the arrays' contents, so saving the same data again reuses it. Use the result as
    ``data.path`` with ``data.family: files`` and ``data.partition: natural`` (:func:`files_config`).
    """
    data = client_data_from_mapping(clients, "save_client_arrays")
    encoded = {}
    for cid, x, y in zip(data.ids, data.x, data.y):
        if not re.fullmatch(r"[A-Za-z0-9_.-]+", cid) or cid.startswith("."):
            raise DataError(f"save_client_arrays, client {cid!r}: a client id becomes a file name; "
                            "use letters, digits, '_', '-' and '.'")
        buffer = io.BytesIO()
        np.savez(buffer, x=x, y=y)
        encoded[cid] = buffer.getvalue()
    if directory is None:
        digest = key_digest({c: key_digest({"b": b.hex()}) for c, b in encoded.items()})
        directory = cache_dir() / f"clients-{digest}"
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    for cid, content in encoded.items():
        atomic_write_bytes(directory / f"{cid}.npz", content)
    return directory


def files_config(path: str | Path, unseen_clients: int = 0) -> dict[str, Any]:
    """The ``data`` section for per-client files at ``path`` (all clients used, the last
    ``unseen_clients`` in id order unseen)."""
    count = len(read_files(DataSpec(family="files", path=str(path), partition="natural")).ids)
    return {"family": "files", "path": str(path), "partition": "natural",
            "num_clients": count - unseen_clients, "unseen_clients": unseen_clients}


def partitioner_clients(source: Any, input_column: str, label_column: str = "label",
                        split: str = "train", id_column: str = "") -> dict[Any, tuple[np.ndarray, np.ndarray]]:
    """``{partition id: (x, y)}`` from a flwr-datasets ``Partitioner`` (with its dataset assigned)
    or a ``FederatedDataset`` (its ``split`` partitioner), for :func:`save_client_arrays`.

    ``id_column`` (e.g. the ``partition_by`` column of a ``NaturalIdPartitioner``) keys each client
    by its one value in that column instead of by partition number."""
    if hasattr(source, "partitioners"):  # a FederatedDataset
        partitioners = source.partitioners
        if split not in partitioners:
            raise DataError(f"the FederatedDataset has no partitioner for split {split!r}; "
                            f"it has {sorted(partitioners)}")
        count = partitioners[split].num_partitions
        load = lambda i: source.load_partition(i, split)  # noqa: E731
    elif hasattr(source, "load_partition") and hasattr(source, "num_partitions"):
        count, load = source.num_partitions, source.load_partition
    else:
        raise DataError(f"expected a flwr-datasets Partitioner or FederatedDataset, got "
                        f"{type(source).__name__}")
    out = {}
    for i in range(count):
        part = load(i)
        for column in (input_column, label_column):
            if column not in part.column_names:
                raise DataError(f"partition {i}: no column {column!r}; columns are "
                                f"{part.column_names}")
        numeric = part.with_format("numpy")
        key: Any = i
        if id_column:
            values = np.unique(np.asarray(numeric[id_column])) if len(part) else []
            if len(values) != 1:
                raise DataError(f"partition {i}: id_column {id_column!r} holds {len(values)} "
                                "distinct values; it must hold one per partition")
            key = values[0].item()
        out[key] = (np.asarray(numeric[input_column]), np.asarray(numeric[label_column]))
    return out
