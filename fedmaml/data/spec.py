"""The data settings a federation is built from, validated once.

:class:`DataSpec` mirrors the config's ``data`` section field for field, so the Python API and the
config share one set of names and defaults. :meth:`DataSpec.from_config` reads any object with these
attributes (or a mapping), so callers can pass the config section as it is.

Not every field matters to every family; :meth:`DataSpec.cache_key` keeps only the ones the family
reads, so changing an unrelated field (say ``dirichlet_alpha`` for a sinusoid run) reuses a built
federation. :data:`FAMILY_FIELDS` is the list of which family reads what.
"""

from __future__ import annotations

import math
import numbers
import os
from collections.abc import Mapping
from dataclasses import dataclass, fields
from typing import Any

from fedmaml.errors import DataError

FAMILIES = ("sinusoid", "sinusoid_grid", "synthetic", "digits", "mnist1d", "omniglot", "femnist",
            "files", "flower")
PARTITIONS = ("iid", "dirichlet", "classes", "natural")
#: Families whose clients are generated on demand from (seed, client id): any number of clients.
GENERATED_FAMILIES = ("sinusoid", "sinusoid_grid", "synthetic")
#: Families built from a finite labelled pool that is partitioned across clients.
POOL_FAMILIES = ("digits", "mnist1d", "omniglot", "femnist")
#: Families whose examples carry a natural client (writer) id, so ``partition: natural`` works.
NATURAL_FAMILIES = ("femnist", "files", "flower")
#: A user's own data (fedmaml/data/user.py): per-client files or a Flower app's load_data.
USER_FAMILIES = ("files", "flower")
#: Families read from files under ``data.path``.
FILE_FAMILIES = ("omniglot", "femnist", "files")
#: The MOML sinewave grid: amplitudes 1..5 times phases pi/5..pi.
GRID_TASKS = 25

_COMMON = ("family", "num_clients", "unseen_clients", "tasks_per_client")
_SINUSOID = ("eval_adapt_size", "eval_heldout_size", "eval_points")
SINUSOID_FAMILIES = ("sinusoid", "sinusoid_grid")
EVAL_POINTS = ("separate", "shared")
_POOL = ("partition", "n_way", "heldout_fraction", "eval_adapt_size")
#: Fields each family reads (besides ``family`` and the client counts); the partition's own
#: parameter is added for pool families (``dirichlet_alpha`` or ``classes_per_client``).
FAMILY_FIELDS: dict[str, tuple[str, ...]] = {
    "sinusoid": _SINUSOID,
    "sinusoid_grid": _SINUSOID,
    "synthetic": ("heldout_fraction", "eval_adapt_size", "synthetic_alpha", "synthetic_beta"),
    "digits": _POOL,
    "mnist1d": _POOL + ("mnist1d_samples",),
    "omniglot": _POOL + ("path",),
    "femnist": _POOL + ("path",),
    "files": ("partition", "heldout_fraction", "eval_adapt_size", "path", "client_column",
              "label_column"),
    "flower": ("heldout_fraction", "eval_adapt_size", "flower_task", "input_column",
               "label_column"),
}
_PARTITION_FIELDS = {"dirichlet": ("dirichlet_alpha",), "classes": ("classes_per_client",)}


@dataclass(frozen=True)
class DataSpec:
    """What data to build: the family, how many clients, how to partition and split it.

    Fields and defaults are those of the config's ``data`` section (``fedmaml.config.DataConfig``;
    a test keeps them equal). ``eval_adapt_size`` is how many training examples personalized
    evaluation adapts on (a pool task with fewer adapts on all of them); ``eval_heldout_size`` is how
    many fresh points a sinusoid task measures on (pool and synthetic tasks measure on their
    ``heldout_fraction`` split). The MOML sinewave protocol is ``DataSpec(family="sinusoid_grid",
    num_clients=25, unseen_clients=5)`` (adapt on 10, measure on 100 are the defaults).
    """

    family: str = "sinusoid"
    path: str = ""
    num_clients: int = 100
    unseen_clients: int = 0
    tasks_per_client: int = 1
    partition: str = "dirichlet"
    dirichlet_alpha: float = 0.5
    classes_per_client: int = 2
    n_way: int = 0
    heldout_fraction: float = 0.2
    eval_adapt_size: int = 10
    eval_heldout_size: int = 100
    eval_points: str = "separate"
    synthetic_alpha: float = 1.0
    synthetic_beta: float = 1.0
    mnist1d_samples: int = 4000
    client_column: str = "client"
    label_column: str = "label"
    input_column: str = ""
    flower_task: str = ""

    @classmethod
    def from_config(cls, data: Any) -> "DataSpec":
        """Read the fields from a config section (attributes) or a mapping; missing ones default."""
        if isinstance(data, cls):
            return data
        if isinstance(data, Mapping):
            values = {f.name: data.get(f.name, f.default) for f in fields(cls)}
        else:
            values = {f.name: getattr(data, f.name, f.default) for f in fields(cls)}
        return cls(**values)

    def __post_init__(self) -> None:
        if self.path is None or isinstance(self.path, os.PathLike):  # YAML null or a Path
            object.__setattr__(self, "path", "" if self.path is None else os.fspath(self.path))
        _check_choice("family", self.family, FAMILIES)
        _check_choice("partition", self.partition, PARTITIONS)
        _check_choice("eval_points", self.eval_points, EVAL_POINTS)
        if not isinstance(self.path, str):
            _fail("path", self.path, "a path string")
        for name in ("client_column", "label_column", "input_column", "flower_task"):
            if not isinstance(getattr(self, name), str):
                _fail(name, getattr(self, name), "a string")
        _check_int("num_clients", self.num_clients, 1)
        _check_int("unseen_clients", self.unseen_clients, 0)
        _check_int("tasks_per_client", self.tasks_per_client, 1)
        _check_int("classes_per_client", self.classes_per_client, 1)
        _check_int("n_way", self.n_way, 0)
        _check_int("eval_adapt_size", self.eval_adapt_size, 1)
        _check_int("eval_heldout_size", self.eval_heldout_size, 1)
        _check_int("mnist1d_samples", self.mnist1d_samples, 10)
        _check_real("dirichlet_alpha", self.dirichlet_alpha, "a number > 0", lambda v: v > 0)
        _check_real("heldout_fraction", self.heldout_fraction, "a number in (0, 1)", lambda v: 0 < v < 1)
        _check_real("synthetic_alpha", self.synthetic_alpha, "a number >= 0", lambda v: v >= 0)
        _check_real("synthetic_beta", self.synthetic_beta, "a number >= 0", lambda v: v >= 0)
        self._check_family_specific()

    def _check_family_specific(self) -> None:
        family = self.family
        if self.partition == "natural" and family not in NATURAL_FAMILIES:
            raise DataError(
                f"data.partition = 'natural' needs data with natural clients; family {family!r} has "
                f"none. Allowed families for 'natural': {', '.join(NATURAL_FAMILIES)}; "
                f"for {family!r} use one of iid, dirichlet, classes"
            )
        if self.n_way and family not in POOL_FAMILIES:
            raise DataError(
                f"data.n_way = {self.n_way} applies to classification pools "
                f"({', '.join(POOL_FAMILIES)}), not to family {family!r}; set it to 0"
            )
        if family == "sinusoid_grid" and self.num_clients * self.tasks_per_client > GRID_TASKS:
            raise DataError(
                f"data.num_clients = {self.num_clients} with data.tasks_per_client = "
                f"{self.tasks_per_client} asks for {self.num_clients * self.tasks_per_client} "
                f"training tasks; family 'sinusoid_grid' has exactly {GRID_TASKS} "
                f"(num_clients * tasks_per_client must be <= {GRID_TASKS})"
            )
        if self.eval_points == "shared" and family not in SINUSOID_FAMILIES:
            raise DataError(
                f"data.eval_points = 'shared' applies to the sinusoid families "
                f"({', '.join(SINUSOID_FAMILIES)}), not to family {family!r}; use 'separate'"
            )
        if self.eval_points == "shared" and self.eval_adapt_size > self.eval_heldout_size:
            raise DataError(
                f"data.eval_adapt_size = {self.eval_adapt_size} exceeds data.eval_heldout_size = "
                f"{self.eval_heldout_size}; with data.eval_points = 'shared' a task adapts on the "
                "first eval_adapt_size of the points it is measured on"
            )
        if family in FILE_FAMILIES and not self.path:
            raise DataError(
                f"data.path is empty; family {family!r} reads its files from data.path "
                + {"omniglot": "(<path>/<alphabet>/<character>/<image>.png)",
                   "femnist": "(<path>/*.json, LEAF format)",
                   "files": "(a directory of <client id>.npz or .pt files, or one .npz or .csv "
                            "file with a client-id column)"}[family]
            )
        if family == "flower" and not self.flower_task:
            raise DataError("data.flower_task is empty; family 'flower' reads a Flower app's task "
                            "module: data.flower_task: 'package.module' (its load_data) or "
                            "'package.module:function'")

    def cache_key(self) -> tuple:
        """The fields this family reads, as a hashable key (paths made absolute)."""
        names = _COMMON + FAMILY_FIELDS[self.family]
        if self.family in POOL_FAMILIES or self.family == "files":
            names += _PARTITION_FIELDS.get(self.partition, ())
        return tuple(
            (n, os.path.abspath(self.path) if n == "path" else getattr(self, n)) for n in names
        )


def _fail(name: str, value: Any, expected: str) -> None:
    raise DataError(f"data.{name} = {value!r} is invalid; expected {expected}")


def _check_choice(name: str, value: Any, allowed: tuple[str, ...]) -> None:
    if value not in allowed:
        _fail(name, value, "one of " + ", ".join(allowed))


def _check_int(name: str, value: Any, minimum: int) -> None:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < minimum:
        _fail(name, value, f"an integer >= {minimum}")


def _check_real(name: str, value: Any, expected: str, ok) -> None:
    if (
        isinstance(value, bool)
        or not isinstance(value, numbers.Real)
        or not math.isfinite(value)
        or not ok(value)
    ):
        _fail(name, value, expected)
