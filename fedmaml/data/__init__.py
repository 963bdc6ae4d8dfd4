"""Task families and federated partitions, built offline and seeded.

``build_federation(data, seed)`` is the one entry point: it reads the config's ``data`` section (or a
:class:`DataSpec`, or a mapping) and returns a :class:`~fedmaml.data.tasks.Federation` whose clients
are deterministic functions of (data settings, seed, client id), so every process rebuilds the same
clients. Built federations are cached per process (simulation actors call this repeatedly), keyed by
the fields the family reads and the seed.

Families (``data.family``), shapes and what they read:

=============== ===================== ========= ==================================================
family          inputs (per example)  outputs   notes
=============== ===================== ========= ==================================================
sinusoid        float32 ``[1]``       ``[1]``   Finn et al.; lazy, any number of clients
sinusoid_grid   float32 ``[1]``       ``[1]``   MOML's 25 grid tasks; unseen = random test tasks
synthetic       float32 ``[60]``      10        FedProx Synthetic(alpha, beta); lazy
digits          float32 ``[1, 8, 8]`` 10        scikit-learn digits, 1797 images in [0, 1]
mnist1d         float32 ``[40]``      10        generated locally, ``mnist1d_samples`` examples
omniglot        float32 ``[1,28,28]`` #chars    ``<path>/<alphabet>/<character>/*.png``
femnist         float32 ``[1,28,28]`` 62        LEAF JSON files ``<path>/*.json``
files           the user's            the data  per-client ``.npz``/``.pt`` files or one NPZ/CSV file
flower          the user's            the data  a Flower app's ``load_data`` (``data.flower_task``)
=============== ===================== ========= ==================================================

Regression targets are float32 ``[n, 1]``; classification targets int64 ``[n]`` (``0..n_way-1`` when
``n_way > 0``, global labels otherwise). Pool families (digits, mnist1d, omniglot, femnist) are
partitioned (``data.partition``: iid, dirichlet, classes, natural for femnist) over
``num_clients + unseen_clients`` clients; see :mod:`fedmaml.data.pools` and
:mod:`fedmaml.data.fewshot`. Generated families ignore ``data.partition`` (except that 'natural' is
rejected) and create each client on demand from (seed, client id). The user families (files,
flower) are read and checked by :mod:`fedmaml.data.user_sources` and :mod:`fedmaml.data.user`
(docs/custom.md, "Your own data").
"""

from __future__ import annotations

import numbers
import threading
from collections import OrderedDict
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Any

from fedmaml.errors import ConfigError, DataError

from . import cache
from .digits import load_digits_pool
from .femnist import load_femnist_pool
from .mnist1d import load_mnist1d_pool
from .omniglot import load_omniglot_pool
from .pools import LabelledPool, build_pool_federation
from .sinusoid import SinusoidTask, build_sinusoid, build_sinusoid_grid
from .spec import FAMILIES, PARTITIONS, DataSpec
from .synthetic import build_synthetic
from .tasks import Federation, PoolTask, Task
from .user import build_user_federation
from .user_sources import (files_config, partitioner_clients, read_files, read_flower_task,
                           save_client_arrays)

if TYPE_CHECKING:  # an annotation only: the data layer stays usable without the config package
    from fedmaml.config.schema import DataConfig

__all__ = [
    "FAMILIES",
    "PARTITIONS",
    "DataSpec",
    "Federation",
    "LabelledPool",
    "PoolTask",
    "SinusoidTask",
    "Task",
    "build_federation",
    "clear_cache",
    "files_config",
    "load_pool",
    "partitioner_clients",
    "save_client_arrays",
]

#: How many built federations a process keeps (least recently used are dropped).
FEDERATION_CACHE_SIZE = 16

_POOL_LOADERS: dict[str, Callable[[DataSpec], LabelledPool]] = {
    "digits": lambda spec: load_digits_pool(),
    "mnist1d": lambda spec: load_mnist1d_pool(spec.mnist1d_samples),
    "omniglot": lambda spec: load_omniglot_pool(spec.path),
    "femnist": lambda spec: load_femnist_pool(spec.path),
}
_GENERATED_BUILDERS: dict[str, Callable[[DataSpec, int], Federation]] = {
    "sinusoid": build_sinusoid,
    "sinusoid_grid": build_sinusoid_grid,
    "synthetic": build_synthetic,
}
_USER_READERS = {"files": read_files, "flower": read_flower_task}

_FEDERATIONS: OrderedDict[tuple, Federation] = OrderedDict()
_LOCK = threading.Lock()


def build_federation(data: DataConfig | DataSpec | Mapping[str, Any], seed: int) -> Federation:
    """The federation described by ``data`` (a config section, :class:`DataSpec` or mapping)."""
    spec = DataSpec.from_config(data)
    if isinstance(seed, bool) or not isinstance(seed, numbers.Integral) or seed < 0:
        raise ConfigError(f"seed = {seed!r} is invalid; expected an integer >= 0")
    seed = int(seed)
    key = (spec.cache_key(), seed)
    with _LOCK:
        if key in _FEDERATIONS:
            _FEDERATIONS.move_to_end(key)
            return _FEDERATIONS[key]
        if spec.family in _GENERATED_BUILDERS:
            federation = _GENERATED_BUILDERS[spec.family](spec, seed)
        elif spec.family in _USER_READERS:
            federation = build_user_federation(_USER_READERS[spec.family](spec), spec, seed)
        else:
            federation = build_pool_federation(load_pool(spec), spec, seed)
        _FEDERATIONS[key] = federation
        while len(_FEDERATIONS) > FEDERATION_CACHE_SIZE:
            _FEDERATIONS.popitem(last=False)
        return federation


def load_pool(data: DataConfig | DataSpec | Mapping[str, Any]) -> LabelledPool:
    """The whole labelled pool of a pool family (digits, mnist1d, omniglot, femnist)."""
    spec = DataSpec.from_config(data)
    if spec.family not in _POOL_LOADERS:
        raise DataError(
            f"data.family = {spec.family!r} is generated, it has no pool; pool families: "
            + ", ".join(_POOL_LOADERS)
        )
    return _POOL_LOADERS[spec.family](spec)


def clear_cache() -> None:
    """Forget built federations and in-memory data sets (the on-disk cache stays)."""
    with _LOCK:
        _FEDERATIONS.clear()
    load_digits_pool.cache_clear()
    cache.clear_memory()
