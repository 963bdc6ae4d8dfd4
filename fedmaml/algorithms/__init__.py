"""Algorithms: one module each, all written against :mod:`fedmaml.core` (no flwr, no ray).

``get_algorithm(name)`` returns an object with ``name``, ``uses_memory``, ``needs_extra_batch(hp)``
and ``local_round(...)``; servers aggregate every algorithm's updates the same way
(:func:`fedmaml.core.server.aggregate` and a server optimizer).
"""

from __future__ import annotations

from fedmaml.algorithms.base import (Algorithm, Hyper, RoundData, client_update, draw_cohort,
                                     draw_round, initial_memory)
from fedmaml.algorithms.fedavg import FEDAVG
from fedmaml.algorithms.fedmeta import FEDMETA
from fedmaml.algorithms.moml import MOML
from fedmaml.algorithms.per_fedavg import PER_FEDAVG
from fedmaml.algorithms.reptile import REPTILE

ALGORITHMS: dict[str, Algorithm] = {a.name: a for a in (MOML, PER_FEDAVG, FEDMETA, REPTILE, FEDAVG)}

__all__ = ["ALGORITHMS", "Algorithm", "Hyper", "RoundData", "client_update", "draw_cohort",
           "draw_round", "get_algorithm", "initial_memory"]


def get_algorithm(name: str) -> Algorithm:
    try:
        return ALGORITHMS[name]
    except KeyError:
        raise ValueError(f"unknown algorithm {name!r}; allowed: {sorted(ALGORITHMS)}") from None
