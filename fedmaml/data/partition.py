"""Split a labelled pool's example indices across clients: iid, Dirichlet, k classes, natural.

Plain numpy with a caller-seeded ``Generator`` (flwr-datasets' partitioners need the Hugging Face
``datasets`` package, which fedmaml does not depend on). Every function returns one index array per
part; parts are disjoint. Errors say what does not fit (the caller adds which setting caused it).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from fedmaml.errors import DataError

#: Dirichlet draws are repeated this many times before topping up short parts.
DIRICHLET_ATTEMPTS = 10


def iid_partition(
    n: int, num_parts: int, rng: np.random.Generator, min_size: int = 1
) -> list[np.ndarray]:
    """Shuffle and cut into ``num_parts`` near-equal parts (sizes differ by at most one)."""
    _check_enough(n, num_parts, min_size)
    return [np.sort(p) for p in np.array_split(rng.permutation(n), num_parts)]


def dirichlet_partition(
    labels: np.ndarray,
    num_parts: int,
    alpha: float,
    rng: np.random.Generator,
    min_size: int = 2,
) -> list[np.ndarray]:
    """Per class, split its examples across parts in proportions ``p ~ Dir(alpha * 1)``.

    Small ``alpha`` gives each part few classes (label skew); large ``alpha`` approaches iid
    (Hsu et al. 2019, as in flwr-datasets' DirichletPartitioner). Every part must get at least
    ``min_size`` examples (one to train on, one held out, per task): the whole draw is repeated up to
    ``DIRICHLET_ATTEMPTS`` times, and if some part is still short, random examples are moved to it
    from the currently largest parts. The top-up touches only the few short parts and slightly lessens
    their skew; it keeps the build from failing at small ``alpha`` with many parts.
    """
    labels = np.asarray(labels)
    _check_enough(len(labels), num_parts, min_size)
    by_class = [np.flatnonzero(labels == c) for c in np.unique(labels)]
    for _ in range(DIRICHLET_ATTEMPTS):
        parts: list[list[np.ndarray]] = [[] for _ in range(num_parts)]
        for idx in by_class:
            idx = rng.permutation(idx)
            proportions = rng.dirichlet(np.full(num_parts, float(alpha)))
            cuts = (np.cumsum(proportions)[:-1] * len(idx)).astype(int)
            for part, chunk in zip(parts, np.split(idx, cuts)):
                part.append(chunk)
        merged = [np.concatenate(p) for p in parts]
        if min(len(p) for p in merged) >= min_size:
            return [np.sort(p) for p in merged]
    return [np.sort(p) for p in _top_up(merged, min_size, rng)]


def _top_up(parts: list[np.ndarray], min_size: int, rng: np.random.Generator) -> list[np.ndarray]:
    parts = [rng.permutation(p) for p in parts]
    for i in range(len(parts)):
        while len(parts[i]) < min_size:
            donor = max(range(len(parts)), key=lambda j: len(parts[j]))
            take = min(min_size - len(parts[i]), len(parts[donor]) - min_size)
            parts[i] = np.concatenate([parts[i], parts[donor][:take]])
            parts[donor] = parts[donor][take:]
    return parts


def class_partition(
    labels: np.ndarray, num_parts: int, k: int, rng: np.random.Generator
) -> list[np.ndarray]:
    """Give every part exactly ``k`` distinct classes (McMahan et al.'s pathological non-iid).

    Classes are shuffled into a cycle and part ``i`` takes the ``k`` consecutive classes starting at
    position ``i * k``; each class's examples are then split evenly among the parts holding it. This
    balances how many parts share a class, and while ``num_parts * k`` does not exceed the number of
    classes no two parts share one, so later parts (unseen clients) get classes no earlier part has
    (e.g. Omniglot characters never seen in training). Classes past ``num_parts * k`` go unused.
    """
    labels = np.asarray(labels)
    classes = np.unique(labels)
    if not 1 <= k <= len(classes):
        raise DataError(f"{k} classes per part were asked for but there are only {len(classes)} classes")
    cycle = rng.permutation(classes)
    holders: dict[int, list[int]] = {}
    for i in range(num_parts):
        for j in range(k):
            holders.setdefault(int(cycle[(i * k + j) % len(classes)]), []).append(i)
    parts: list[list[np.ndarray]] = [[] for _ in range(num_parts)]
    for c, owners in holders.items():
        idx = rng.permutation(np.flatnonzero(labels == c))
        if len(idx) < len(owners):
            raise DataError(
                f"class {c} has {len(idx)} examples but {len(owners)} parts share it, so some would "
                f"get none of it"
            )
        for owner, chunk in zip(owners, np.array_split(idx, len(owners))):
            parts[owner].append(chunk)
    return [np.sort(np.concatenate(p)) for p in parts]


def natural_partition(
    groups: Sequence[np.ndarray], num_parts: int, rng: np.random.Generator, min_size: int = 2
) -> tuple[list[np.ndarray], list[int]]:
    """Pick ``num_parts`` natural groups (e.g. writers) at random, each with ``min_size`` examples.

    Returns the chosen groups' index arrays and their positions in ``groups``. Groups that are too
    small to give one training and one held-out example per task are skipped.
    """
    eligible = [g for g, idx in enumerate(groups) if len(idx) >= min_size]
    if len(eligible) < num_parts:
        raise DataError(
            f"{num_parts} clients were asked for but only {len(eligible)} of {len(groups)} natural "
            f"clients have at least {min_size} examples"
        )
    chosen = [eligible[i] for i in rng.permutation(len(eligible))[:num_parts]]
    return [np.asarray(groups[g]) for g in chosen], chosen


def _check_enough(n: int, num_parts: int, min_size: int) -> None:
    if n < num_parts * min_size:
        raise DataError(
            f"{n} examples cannot give {num_parts} parts at least {min_size} examples each "
            f"(needs {num_parts * min_size})"
        )
