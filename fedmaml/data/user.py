"""A user's own data as a federation: per-client arrays, checked once, then the usual machinery.

Every way in (arrays from Python, files under ``data.path``, a Flower app's ``load_data``, a
flwr-datasets partitioner; see :mod:`fedmaml.data.user_sources`) ends as a :class:`ClientData`: one
``(x, y)`` per client id, optionally with a held-out ``(x, y)`` per client (a Flower testloader).
:func:`build_user_federation` checks it (shapes, dtypes, label range, NaN/inf, sizes: every problem
names the client and where it came from, before any training), optionally pools and re-partitions
it (``data.partition`` iid, dirichlet, classes; ``natural`` keeps the clients as given), plans each
client's tasks with the pool families' planner (:mod:`fedmaml.data.fewshot`) and returns a
:class:`~fedmaml.data.tasks.Federation` of :class:`~fedmaml.data.tasks.PoolTask` s, so counter-based
support/query draws, held-out evaluation and unseen clients work as for the built-in data sets.

Targets decide the task: integer labels are classification (cross-entropy, ``num_outputs`` = C for
labels ``0..C-1``), float targets regression (MSE, ``num_outputs`` = the target width).
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from functools import partial
from typing import Any

import numpy as np
import torch

from fedmaml.errors import DataError

from .fewshot import TaskPlan, plan_client_tasks, round_robin
from .partition import class_partition, dirichlet_partition, iid_partition
from .seeding import numpy_rng
from .spec import DataSpec
from .tasks import Federation, PoolTask, Task


@dataclass(frozen=True)
class ClientData:
    """Per-client examples, in client order.

    ``where[i]`` says where client ``i`` came from (a file, a partition) for error messages;
    ``test[i]`` is its held-out split when the source has one (else the split is drawn from ``x``).
    """

    ids: tuple[str, ...]
    x: tuple[np.ndarray, ...]
    y: tuple[np.ndarray, ...]
    where: tuple[str, ...]
    test: tuple[tuple[np.ndarray, np.ndarray], ...] | None = None


def order_ids(ids: Sequence[Any]) -> list[Any]:
    """Client ids in a fixed order: numerically when every id is an integer (``2`` before ``10``),
    else as strings. The order decides which clients train and which are unseen (the last ones)."""
    ids = list(ids)
    if all(re.fullmatch(r"-?\d+", str(i)) for i in ids):
        return sorted(ids, key=lambda i: int(str(i)))
    return sorted(ids, key=str)


def as_array(value: Any, what: str) -> np.ndarray:
    """A numpy array from an array, a tensor or a nested list (a tensor is detached and copied)."""
    if isinstance(value, torch.Tensor):
        return value.detach().cpu().numpy()
    try:
        return np.asarray(value)
    except (ValueError, TypeError) as exc:
        raise DataError(f"{what} is not an array ({exc}); give a numpy array or a torch tensor") from exc


def client_data_from_mapping(clients: Mapping[Any, Any], source: str = "arrays") -> ClientData:
    """``{client_id: (x, y)}`` (numpy arrays or tensors) as :class:`ClientData`, ids ordered."""
    if not isinstance(clients, Mapping) or not clients:
        raise DataError(f"{source}: expected a non-empty mapping {{client_id: (x, y)}}, "
                        f"got {type(clients).__name__}")
    ids, xs, ys = [], [], []
    for cid in order_ids(list(clients)):
        pair = clients[cid]
        if not isinstance(pair, (tuple, list)) or len(pair) != 2:
            raise DataError(f"{source}, client {cid!r}: expected a pair (x, y), "
                            f"got {type(pair).__name__}")
        ids.append(str(cid))
        xs.append(as_array(pair[0], f"{source}, client {cid!r}: x"))
        ys.append(as_array(pair[1], f"{source}, client {cid!r}: y"))
    return ClientData(tuple(ids), tuple(xs), tuple(ys), tuple(source for _ in ids))


@dataclass(frozen=True)
class Checked:
    """Validated, cast arrays: x float32, y int64 ``[n]`` or float32 ``[n, d]``."""

    data: ClientData
    task_type: str
    num_outputs: int
    input_shape: tuple[int, ...]


def check_client_data(data: ClientData) -> Checked:
    """Check every client against the first one and cast; errors name the client and the fix."""
    kinds, xs, ys, tests = [], [], [], []
    for i, cid in enumerate(data.ids):
        who = f"{data.where[i]}, client {cid!r}"
        x, y = _check_pair(who, data.x[i], data.y[i])
        xs.append(x)
        ys.append(y)
        kinds.append("classification" if y.dtype.kind in "iu" else "regression")
        if data.test is not None:
            tx, ty = _check_pair(who + " (held-out split)", *data.test[i])
            tests.append((tx, ty))
    first = data.ids[0]
    task_type = kinds[0]
    for i, cid in enumerate(data.ids):
        who = f"{data.where[i]}, client {cid!r}"
        if kinds[i] != task_type:
            raise DataError(
                f"{who}: its targets are {ys[i].dtype} ({kinds[i]}) but client {first!r}'s are "
                f"{ys[0].dtype} ({task_type}); use integer labels 0..C-1 for classification or "
                "float targets for regression in every client")
        pairs = [(xs[i], ys[i])] + ([tests[i]] if tests else [])
        for x, y in pairs:
            if x.shape[1:] != xs[0].shape[1:]:
                raise DataError(f"{who}: inputs have shape {list(x.shape[1:])} per example but "
                                f"client {first!r}'s have {list(xs[0].shape[1:])}; every client "
                                "needs the same input shape")
            if task_type == "regression" and y.shape[1:] != ys[0].shape[1:]:
                raise DataError(f"{who}: targets have shape {list(y.shape[1:])} per example but "
                                f"client {first!r}'s have {list(ys[0].shape[1:])}")
            if task_type == "classification" and y.dtype.kind not in "iu":
                raise DataError(f"{who}: held-out targets are {y.dtype} but training labels are "
                                "integers; use integer labels in both")
    if task_type == "classification":
        num_outputs = _check_labels(data, ys, tests)
        ys = [y.astype(np.int64) for y in ys]
        tests = [(tx, ty.astype(np.int64)) for tx, ty in tests]
    else:
        num_outputs = int(np.prod(ys[0].shape[1:]))
        ys = [y.astype(np.float32) for y in ys]
        tests = [(tx, ty.astype(np.float32)) for tx, ty in tests]
    cast = ClientData(data.ids, tuple(x.astype(np.float32) for x in xs), tuple(ys), data.where,
                      tuple(tests) if data.test is not None else None)
    return Checked(cast, task_type, num_outputs, tuple(xs[0].shape[1:]))


def check_rows(who: str, x: np.ndarray, y: np.ndarray) -> None:
    """Refuse inputs ``x`` and targets ``y`` that are not one row per example each (``who``: the
    file or client named in the error)."""
    if x.ndim == 0 or y.ndim == 0:
        raise DataError(f"{who}: x and y must have one row per example (got shapes "
                        f"{list(x.shape)} and {list(y.shape)})")
    if len(x) != len(y):
        raise DataError(f"{who}: {len(x)} inputs but {len(y)} targets; x and y need one row per "
                        "example each")


def _check_pair(who: str, x: Any, y: Any) -> tuple[np.ndarray, np.ndarray]:
    x, y = np.asarray(x), np.asarray(y)
    if x.dtype.kind not in "biuf":
        raise DataError(f"{who}: inputs have dtype {x.dtype}; expected numbers (float or integer)")
    if y.dtype.kind not in "iuf":
        raise DataError(f"{who}: targets have dtype {y.dtype}; expected integer labels "
                        "(classification) or floats (regression)")
    check_rows(who, x, y)
    if x.ndim == 1:  # one feature per example
        x = x[:, None]
    if y.dtype.kind in "iu":
        if y.ndim == 2 and y.shape[1] == 1:
            y = y[:, 0]
        if y.ndim != 1:
            raise DataError(f"{who}: integer labels have shape {list(y.shape)}; classification "
                            "takes one label per example ([n]); use float targets for regression")
    elif y.ndim == 1:
        y = y[:, None]
    for name, a in (("inputs", x), ("targets", y)):
        if a.dtype.kind == "f" and not np.isfinite(a).all():
            row = int(np.flatnonzero(~np.isfinite(a.reshape(len(a), -1)).all(axis=1))[0])
            raise DataError(f"{who}: {name} of example {row} hold NaN or infinite values; remove "
                            "or impute them before federating")
    return x, y


def _check_labels(data: ClientData, ys: list[np.ndarray], tests: list) -> int:
    seen: set[int] = set()
    for i, cid in enumerate(data.ids):
        for y in [ys[i]] + ([tests[i][1]] if tests else []):
            if len(y) and y.min() < 0:
                raise DataError(f"{data.where[i]}, client {cid!r}: label {int(y.min())} is "
                                "negative; classification labels must be 0..C-1")
            seen.update(np.unique(y).tolist())
    num_classes = max(seen) + 1
    missing = sorted(set(range(num_classes)) - seen)
    if missing:
        raise DataError(
            f"{data.where[0]}: labels run up to {num_classes - 1} but label(s) "
            f"{missing[:10]} occur in no client; classification labels must be 0..C-1 with every "
            "class present (relabel them, e.g. with numpy.unique(y, return_inverse=True))")
    return num_classes


def build_user_federation(data: ClientData, spec: DataSpec, seed: int) -> Federation:
    """Check ``data``, partition it by ``spec.partition`` and plan every client's tasks."""
    checked = check_client_data(data)
    data = checked.data
    wanted = spec.num_clients + spec.unseen_clients
    if spec.partition != "natural" and spec.family != "flower":
        data = _repartition(checked, spec, wanted, numpy_rng(seed, "user/partition"))
    elif len(data.ids) != wanted:
        raise DataError(
            f"{data.where[0]}: the data has {len(data.ids)} clients but data.num_clients + "
            f"data.unseen_clients = {spec.num_clients} + {spec.unseen_clients} = {wanted}; set "
            f"data.num_clients to {len(data.ids) - spec.unseen_clients} (the last "
            "data.unseen_clients clients in id order are the unseen ones)")
    classification = checked.task_type == "classification"
    plans = []
    for i, cid in enumerate(data.ids):
        who = f"{data.where[i]}, client {cid!r}"
        labels = data.y[i] if classification else np.zeros(len(data.y[i]), np.int64)
        rng = numpy_rng(seed, "user/plan", i)
        if data.test is not None:
            if spec.tasks_per_client != 1:
                raise DataError(f"{who}: data.tasks_per_client = {spec.tasks_per_client}, but a "
                                "source with its own held-out split gives one task per client; "
                                "set it to 1")
            if len(labels) == 0 or len(data.test[i][1]) == 0:
                raise DataError(f"{who}: it has {len(labels)} training and "
                                f"{len(data.test[i][1])} held-out examples; it needs at least one "
                                "of each")
            plans.append([TaskPlan(round_robin(np.arange(len(labels)), labels, rng), np.arange(0))])
            continue
        try:
            plans.append(plan_client_tasks(np.arange(len(labels)), labels,
                                           tasks=spec.tasks_per_client, n_way=0,
                                           heldout_fraction=spec.heldout_fraction, rng=rng))
        except DataError as exc:
            raise DataError(f"{who}: {exc}; give it more examples or drop it") from exc
    tensors = tuple(
        (torch.from_numpy(data.x[i]), torch.from_numpy(data.y[i]),
         None if data.test is None else tuple(torch.from_numpy(a) for a in data.test[i]))
        for i in range(len(data.ids)))
    n = spec.num_clients
    return Federation(
        num_clients=n, num_unseen=spec.unseen_clients, input_shape=checked.input_shape,
        num_outputs=checked.num_outputs, task_type=checked.task_type,  # type: ignore[arg-type]
        _client_tasks=partial(_tasks, tensors[:n], tuple(plans[:n]), spec.eval_adapt_size),
        _unseen_tasks=partial(_tasks, tensors[n:], tuple(plans[n:]), spec.eval_adapt_size),
    )


def _repartition(checked: Checked, spec: DataSpec, parts: int, rng: np.random.Generator
                 ) -> ClientData:
    """Pool every client's examples (in client order) and split them by ``data.partition``."""
    data = checked.data
    if data.test is not None:
        raise DataError(f"{data.where[0]}: a source with its own held-out split cannot be "
                        "re-partitioned; use data.partition = 'natural'")
    x, y = np.concatenate(data.x), np.concatenate(data.y)
    source = f"data.path = '{spec.path}'" if spec.path else data.where[0]
    setting = f"{source}, data.partition = {spec.partition!r} over {parts} clients"
    if spec.partition != "iid" and checked.task_type != "classification":
        raise DataError(f"{setting}: {spec.partition!r} splits by label, which needs "
                        "classification labels; use 'iid' or 'natural' for regression targets")
    min_size = 2 * spec.tasks_per_client
    try:
        if spec.partition == "iid":
            idx = iid_partition(len(y), parts, rng, min_size)
        elif spec.partition == "dirichlet":
            idx = dirichlet_partition(y, parts, spec.dirichlet_alpha, rng, min_size)
        else:
            idx = class_partition(y, parts, spec.classes_per_client, rng)
    except DataError as exc:
        raise DataError(f"{setting}: {exc}") from exc
    return ClientData(tuple(str(i) for i in range(parts)), tuple(x[p] for p in idx),
                      tuple(y[p] for p in idx), tuple(f"{source} (part {i} of the {spec.partition} "
                                                      "partition)" for i in range(parts)))


def _tasks(tensors: tuple, plans: tuple[list[TaskPlan], ...], adapt: int, i: int) -> list[Task]:
    x, y, test = tensors[i]
    out: list[Task] = []
    for plan in plans[i]:
        train = torch.from_numpy(plan.train)
        if test is not None:
            out.append(PoolTask(x[train], y[train], test[0], test[1], adapt_size=adapt))
        else:
            held = torch.from_numpy(plan.heldout)
            out.append(PoolTask(x[train], y[train], x[held], y[held], adapt_size=adapt))
    return out


def check_client_sizes(federation: Federation, needed: int, what: str, where: str) -> None:
    """Refuse, before training, a client whose task has fewer training examples than a step needs
    (support + query): such a client would otherwise train on repeated examples."""
    for cid in range(federation.num_clients):
        for t, task in enumerate(federation.client_tasks(cid)):
            if task.num_examples < needed:
                raise DataError(
                    f"{where}, client {cid} in id order (task {t}): {task.num_examples} training "
                    "examples "
                    f"(after holding out its evaluation split) but {what} = {needed}; lower "
                    "algorithm.support_size / query_size or data.heldout_fraction, or give that "
                    "client more examples")
