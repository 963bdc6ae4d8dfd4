"""Counter-based random numbers: every draw is a hash of ``(key, position)``, vectorized with numpy.

A client's round data must be a pure function of ``(seed, client id, round)`` (ARCHITECTURE.md), and
a vectorized engine must draw a whole cohort's data at once. A sequential generator
(``torch.Generator``, one per client) does the first but not the second: each client's stream is
advanced by its own Python calls. Here the ``i``-th number of a stream is a hash of the stream's key
and ``i``, so a cohort's numbers are one broadcast array expression over (client, slot, element),
and one client's numbers are the same expression with a client axis of one: the same bits whatever
the cohort, the engine or the order of calls.

The generator is SplitMix64 (Steele, Lea, Flood 2014; Java's ``SplittableRandom``): element ``i``
of the stream with key ``k`` is ``mix64(k + (i + 1) * GAMMA)``, and keys are derived by mixing the
run seed, the ids and purposes into 64 bits. Arithmetic is on numpy ``uint64`` (which wraps modulo
2**64 by definition) or on Python ints masked to 64 bits, with the same code: words that are plain
integers (seeds, purposes) cost no array operations, and one client's draw costs a handful of small
array operations (tests/test_counter.py checks the published SplitMix64 outputs).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Union

import numpy as np
import torch
from torch import Tensor

_M64 = (1 << 64) - 1
GAMMA = 0x9E3779B97F4A7C15
_Z1, _Z2 = 0xBF58476D1CE4E5B9, 0x94D049BB133111EB

Word = Union[int, np.ndarray]


def _u64(x: Word) -> Word:
    if isinstance(x, (int, np.integer)):
        return int(x) & _M64
    x = np.asarray(x)
    return x if x.dtype == np.uint64 else x.astype(np.uint64)


def mix64(z: Word) -> Word:
    """SplitMix64's output function (a bijection of 64-bit words with full avalanche)."""
    if isinstance(z, int):
        z = ((z ^ (z >> 30)) * _Z1) & _M64
        z = ((z ^ (z >> 27)) * _Z2) & _M64
        return z ^ (z >> 31)
    z = (z ^ (z >> np.uint64(30))) * np.uint64(_Z1)  # uint64 arithmetic wraps
    z ^= z >> np.uint64(27)
    z *= np.uint64(_Z2)
    z ^= z >> np.uint64(31)
    return z


def combine(key: Word, word: Word) -> Word:
    """A key derived from ``key`` and one more integer word (any array broadcasts)."""
    word = _u64(word)
    if isinstance(word, np.ndarray) and word.size == 1 and (
            isinstance(key, int) or word.ndim <= np.ndim(key)):
        word = int(word.reshape(()))  # broadcasting it changes no shape: mix it in Python
    if not isinstance(word, int):
        return mix64(np.asarray(key, dtype=np.uint64) ^ mix64(word + np.uint64(GAMMA)))
    word = mix64((word + GAMMA) & _M64)
    if isinstance(key, int):
        return mix64(key ^ word)
    key = np.asarray(key, dtype=np.uint64)
    if key.size == 1:  # one stream (one client's draw): Python ints beat tiny array operations
        return np.full(key.shape, mix64(int(key.reshape(())) ^ word), dtype=np.uint64)
    return mix64(key ^ np.uint64(word))


_STEPS: dict[int, np.ndarray] = {}


def splitmix64(key: Word, n: int) -> np.ndarray:
    """``[*shape(key), n]`` uint64: elements ``0..n-1`` of the streams keyed by ``key``."""
    steps = _STEPS.get(n)
    if steps is None:
        steps = np.arange(1, n + 1, dtype=np.uint64) * np.uint64(GAMMA)
        if len(_STEPS) < 256:
            _STEPS[n] = steps
    return mix64(np.asarray(key, dtype=np.uint64)[..., None] + steps)


def derive_keys(seed: int | np.ndarray, ids: Sequence[int] | np.ndarray, purpose: int
                ) -> np.ndarray:
    """``[len(ids)]`` uint64: a 64-bit key per id for one ``purpose`` under a run seed. With
    ``seed`` an array ``[R]`` (the runs of a vectorized sweep) and ``ids`` ``[R, C]``: ``[R, C]``,
    row ``r`` equal to ``derive_keys(seed[r], ids[r], purpose)``."""
    if np.ndim(seed):
        seeds = np.asarray(seed, dtype=np.int64).reshape(-1)
        ids = np.asarray(ids, dtype=np.int64).reshape(len(seeds), -1)
        if ids.size and ids.min() < 0:
            raise ValueError("ids must be >= 0")
        prefix = combine(combine(mix64(seeds.astype(np.uint64) + np.uint64(GAMMA)),
                                 int(purpose)), 0xC0)
        return np.asarray(combine(prefix[:, None], ids.astype(np.uint64)), dtype=np.uint64)
    ids = np.asarray(ids, dtype=np.int64).reshape(-1)
    if len(ids) and ids.min() < 0:
        raise ValueError("ids must be >= 0")
    prefix = combine(combine(mix64((int(seed) + GAMMA) & _M64), int(purpose)), 0xC0)
    return np.asarray(combine(prefix, ids.astype(np.uint64)), dtype=np.uint64).reshape(-1)


def sample_without_replacement(keys: np.ndarray, n: int, k: int) -> np.ndarray:
    """``[R, k]`` int64, each row sorted: ``k`` distinct values of ``0 .. n-1`` drawn uniformly per
    stream key (``keys``: ``[R]``), a function of the key alone.

    For ``4 k < n`` a row holds the first ``k`` distinct values of the stream's uniform integers
    (in order of first appearance, which is a uniform sample without replacement); expected work
    ``O(k)`` whatever ``n``. Otherwise it is the first ``k`` of a uniform permutation of ``n``."""
    keys = np.asarray(keys, dtype=np.uint64).reshape(-1)
    if k <= 0 or not len(keys):
        return np.zeros((len(keys), max(k, 0)), dtype=np.int64)
    if k > n:
        raise ValueError(f"cannot draw {k} distinct values below {n}")
    if 4 * k >= n:
        picked = Stream(keys).first_of_permutation(n, k, n).numpy()
        return np.sort(picked, axis=1)
    m = k + max(8, k // 4)
    if len(keys) == 1 and k <= 32:  # one small draw (a run alone): Python ints beat tiny arrays
        return np.asarray([_first_distinct(int(keys[0]), n, k)], dtype=np.int64)
    while True:  # a longer prefix of the same streams until every row has k distinct values
        u = (splitmix64(keys, m) >> np.uint64(11)).astype(np.float64) * 2.0 ** -53
        candidates = np.floor(u * n).astype(np.int64)  # bias below n * 2**-53
        order = np.argsort(candidates, axis=1, kind="stable")
        ordered = np.take_along_axis(candidates, order, axis=1)
        first = np.ones(ordered.shape, dtype=bool)
        first[:, 1:] = ordered[:, 1:] != ordered[:, :-1]  # stable: the earliest of equals
        keep = np.empty_like(first)
        np.put_along_axis(keep, order, first, axis=1)
        rank = np.cumsum(keep, axis=1)
        if (rank[:, -1] >= k).all():
            return np.sort(candidates[keep & (rank <= k)].reshape(len(keys), k), axis=1)
        m *= 2


def _first_distinct(key: int, n: int, k: int) -> list[int]:
    """One row of :func:`sample_without_replacement`'s rejection path in Python integers: the
    stream's elements in order (``mix64(key + (i + 1) * GAMMA)``), the same float64 arithmetic
    (``(bits >> 11) * 2**-53`` and its conversion are exact), the first ``k`` distinct candidates
    (a longer prefix only appends to them), sorted."""
    seen: dict[int, None] = {}
    i = 0
    while len(seen) < k:
        i += 1
        z = mix64((key + i * GAMMA) & _M64)
        seen.setdefault(math.floor(((z >> 11) * 2.0 ** -53) * n), None)
    return sorted(seen)


def round_keys(seed: int | np.ndarray, client_ids: Sequence[int] | np.ndarray, server_round: int
               ) -> np.ndarray:
    """The key of each client's round stream, a function of (seed, client id, round) only (the
    purpose is the round): ``[C]`` uint64 for one seed, ``[R, C]`` for seeds ``[R]`` (a batch of
    runs) and ids ``[R, C]``. Every engine draws a client's round data from this key."""
    return derive_keys(seed, client_ids, server_round)


class Stream:
    """Keyed counters: ``key`` is a uint64 array (any shape), one stream per entry."""

    def __init__(self, key: np.ndarray) -> None:
        self.key = np.asarray(key, dtype=np.uint64)

    def child(self, *words: Word) -> "Stream":
        """A sub-stream per value of ``words`` (broadcast against the keys)."""
        key: Word = self.key
        for w in words:
            key = combine(key, w)
        return Stream(key)

    def expand(self) -> "Stream":
        """The same streams with one more trailing axis (for words that broadcast over two axes)."""
        return Stream(self.key[..., None])

    def flat(self) -> "Stream":
        """The same streams along one axis (row-major)."""
        return Stream(self.key.reshape(-1))

    def select(self, index: Sequence[int] | np.ndarray) -> "Stream":
        """The streams at ``index`` of the first axis."""
        return Stream(self.key[np.asarray(index, dtype=np.int64)])

    def bits(self, n: int) -> np.ndarray:
        """``[*key.shape, n]`` uint64: elements ``0..n-1`` of every stream."""
        return splitmix64(self.key, n)

    def uniform(self, n: int, dtype: torch.dtype = torch.float32) -> Tensor:
        """``[*key.shape, n]`` uniform in ``[0, 1)`` on a 2**-24 grid (exact in float32)."""
        top = (self.bits(n) >> np.uint64(40)).astype(np.float64) * (1.0 / (1 << 24))
        return torch.from_numpy(top).to(dtype)

    def below(self, bound: np.ndarray | int, n: int) -> Tensor:
        """``[*key.shape, n]`` int64 uniform in ``0 .. bound-1`` (``bound`` < 2**31 broadcasts against
        the keys; Lemire's multiply-shift on the top 32 bits, bias below 2**-32 * bound)."""
        top = self.bits(n) >> np.uint64(32)
        bound = np.asarray(bound, dtype=np.uint64)[..., None]
        return torch.from_numpy(((top * bound) >> np.uint64(32)).astype(np.int64))

    def first_of_permutation(self, size: np.ndarray | int, n: int, width: int) -> Tensor:
        """``[*key.shape, n]`` int64: the first ``n`` entries of a uniform random permutation of
        ``0 .. size-1`` per stream (``n <= size``), computed over ``width >= max(size)`` positions.
        Positions at or beyond a stream's size sort last, so the result does not depend on
        ``width``: a client draws the same indices alone as in any cohort."""
        keys = self.bits(width)
        position = np.arange(width, dtype=np.int64)
        keys = np.where(position < np.asarray(size, dtype=np.int64)[..., None], keys,
                        np.uint64(_M64))
        return torch.from_numpy(np.argsort(keys, axis=-1, kind="stable")[..., :n].astype(np.int64))
