"""Algorithms: one module each, all written against :mod:`fedmaml.core` (no flwr, no ray).

Every algorithm is an :class:`Algorithm` (a client update and a server rule; docs/custom.md, "Your
own algorithm"); ``get_algorithm(name, kwargs)`` returns a built-in one by name or a user's by
import path ``package.module:Name``.
"""

from __future__ import annotations

from fedmaml.algorithms.base import (Algorithm, Hyper, RoundData, client_update, draw_cohort,
                                     draw_round, has_server_rule, initial_memory)
from fedmaml.algorithms.registry import ALGORITHMS, get_algorithm, register

__all__ = ["ALGORITHMS", "Algorithm", "Hyper", "RoundData", "client_update", "draw_cohort",
           "draw_round", "get_algorithm", "has_server_rule", "initial_memory", "register"]
