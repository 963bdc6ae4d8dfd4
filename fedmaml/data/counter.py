"""Counter-based random numbers: every draw is a hash of ``(key, words...)``, computed with tensor ops.

A client's round data must be a pure function of ``(seed, client id, round)`` (ARCHITECTURE.md), and
a vectorized engine must draw a whole cohort's data at once. A sequential generator
(``torch.Generator``, one per client) does the first but not the second: each client's stream is
advanced by its own Python calls. Here the ``i``-th number of a stream is a hash of the stream's key
and ``i``, so a cohort's numbers are one broadcast tensor expression over (client, slot, element),
and one client's numbers are the same expression with a client axis of one: the same bits whatever
the cohort, the engine or the order of calls.

The hash is MurmurHash3 (x86, 32 bit) over 32-bit words, computed on int64 tensors whose values stay
below 2**32 between steps. A 32x32-bit product can exceed 2**63; int64 multiplication wraps modulo
2**64 on every backend torch runs on (two's complement hardware), which keeps the low 32 bits exact
(tests/test_counter.py checks every bit against a plain-Python reference, so a backend that did not
wrap would fail there, not silently). Its output passes the usual avalanche tests; for simulation data
(indices, uniform inputs) that is what matters. Streams are built in two steps so that the long
axis (elements) is mixed in last: ``Stream.of(keys).child(purpose, h, b)`` costs a few ops on the
``[clients, slots]`` state, and ``bits(n)`` mixes the element counter and finalizes.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

_MASK = 0xFFFFFFFF
_C1, _C2 = 0xCC9E2D51, 0x1B873593
_F1, _F2 = 0x85EBCA6B, 0xC2B2AE35
#: Pads positions that must sort after every real hash (real values are < 2**32).
SORT_LAST = 1 << 40


# Every step works on Python ints and on int64 tensors alike: words and states that are plain
# integers (seeds, purposes) are mixed in Python, and only per-element words cost tensor ops.
Word = Tensor | int


def _mul(x: Word, c: int) -> Word:
    """``x * c mod 2**32`` for ``0 <= x, c < 2**32`` (the int64 product wraps; its low bits stay)."""
    return (x * c) & _MASK


def _rotl(x: Word, r: int) -> Word:
    return ((x << r) & _MASK) | (x >> (32 - r))


def _mix(h: Word, word: Word) -> Word:
    """One MurmurHash3 body step: mix a 32-bit word into the state ``h``."""
    k = _mul(_rotl(_mul(word & _MASK, _C1), 15), _C2)
    h = _rotl(h ^ k, 13)
    return (h * 5 + 0xE6546B64) & _MASK


def _finalize(h: Word, length: int) -> Word:
    h = h ^ (4 * length)
    h = h ^ (h >> 16)
    h = _mul(h, _F1)
    h = h ^ (h >> 13)
    h = _mul(h, _F2)
    return h ^ (h >> 16)


def murmur3(words: Sequence[Word], device: torch.device | str = "cpu") -> Tensor:
    """MurmurHash3_x86_32 (seed 0) of the little-endian 32-bit ``words``, broadcast elementwise."""
    h: Word = 0
    for w in words:
        h = _mix(h, w)
    return torch.as_tensor(_finalize(h, len(words)), dtype=torch.int64, device=device)


def _split64(value: int) -> tuple[int, int]:
    return value & _MASK, (value >> 32) & _MASK


def derive_keys(seed: int, ids: Sequence[int] | Tensor, purpose: int,
                device: torch.device | str = "cpu") -> Tensor:
    """``[len(ids), 2]`` int64: a 64-bit key (two 32-bit words) per id for one ``purpose`` (any
    integer below 2**64) under a run seed. Distinct triples get independent-looking keys; 64 bits
    keep keys apart over millions of ids."""
    ids = torch.as_tensor(ids, dtype=torch.int64, device=device)
    if ids.numel() and (int(ids.min()) < 0 or int(ids.max()) > _MASK):
        raise ValueError("ids must be in 0..2**32-1")
    words = [*_split64(int(seed)), *_split64(int(purpose))]  # plain ints first: mixed in Python
    return torch.stack([murmur3([*words, part, ids], device) for part in (0x5EED0, 0x5EED1)],
                       dim=-1)


def round_keys(seed: int, client_ids: Sequence[int] | Tensor, server_round: int,
               device: torch.device | str = "cpu") -> Tensor:
    """``[C, 2]``: the key of each client's round stream (the purpose is the round)."""
    return derive_keys(seed, client_ids, server_round, device)


class Stream:
    """Keyed counters: ``state`` is the hash state after the key and the slot words (any shape)."""

    def __init__(self, state: Tensor, length: int) -> None:
        self.state, self.length = state, length

    @classmethod
    def of(cls, keys: Tensor) -> "Stream":
        """Streams of ``[..., 2]`` keys (``round_keys``); the state has the keys' leading shape."""
        return cls(_mix(_mix(0, keys[..., 0]), keys[..., 1]), 2)

    def child(self, *words: Tensor | int) -> "Stream":
        """A sub-stream per value of ``words`` (broadcast against the state)."""
        h = self.state
        for w in words:
            h = _mix(h, w)
        return Stream(h, self.length + len(words))

    def expand(self) -> "Stream":
        """The same streams with one more trailing axis (for words that broadcast over two axes)."""
        return Stream(self.state.unsqueeze(-1), self.length)

    def flat(self) -> "Stream":
        """The same streams along one axis (row-major)."""
        return Stream(self.state.reshape(-1), self.length)

    def select(self, index: Tensor) -> "Stream":
        """The streams at ``index`` of the state's first axis (e.g. one row per slot)."""
        return Stream(self.state[index], self.length)

    def bits(self, n: int) -> Tensor:
        """``[*state.shape, n]`` int64 in ``0 .. 2**32-1``: elements ``0..n-1`` of every stream."""
        counter = torch.arange(n, dtype=torch.int64, device=self.state.device)
        return _finalize(_mix(self.state.unsqueeze(-1), counter), self.length + 1)

    def uniform(self, n: int, dtype: torch.dtype = torch.float32) -> Tensor:
        """``[*state.shape, n]`` uniform in ``[0, 1)`` on a 2**-24 grid (exact in float32)."""
        return (self.bits(n) >> 8).to(dtype) * (1.0 / (1 << 24))

    def below(self, bound: Tensor, n: int) -> Tensor:
        """``[*state.shape, n]`` integers uniform in ``0 .. bound-1`` (``bound`` broadcasts against
        the state; Lemire's multiply-shift, bias below 2**-32 * bound)."""
        return (self.bits(n) * bound.unsqueeze(-1)) >> 32

    def first_of_permutation(self, size: Tensor, n: int, width: int) -> Tensor:
        """``[*state.shape, n]``: the first ``n`` entries of a uniform random permutation of
        ``0 .. size-1`` per stream (``n <= size``), computed over ``width >= max(size)`` positions.
        Positions at or beyond a stream's size sort last, so the result does not depend on
        ``width``: a client draws the same indices alone as in any cohort."""
        keys = self.bits(width)
        position = torch.arange(width, dtype=torch.int64, device=keys.device)
        keys = torch.where(position < size.unsqueeze(-1), keys, SORT_LAST)
        return torch.argsort(keys, dim=-1, stable=True)[..., :n]
