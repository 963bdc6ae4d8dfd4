"""Counter-based random numbers (fedmaml/data/counter.py): the hash is MurmurHash3, keys and streams
are pure functions of their inputs, and the derived draws have the distributions they claim."""

from __future__ import annotations

import random

import torch

from fedmaml.data.counter import Stream, murmur3, round_keys

M = 0xFFFFFFFF


def reference_murmur3(words: list[int]) -> int:
    """MurmurHash3_x86_32 with seed 0 in plain Python integers (no overflow anywhere)."""
    rotl = lambda x, r: ((x << r) | (x >> (32 - r))) & M  # noqa: E731
    h = 0
    for k in words:
        k = rotl(k * 0xCC9E2D51 & M, 15) * 0x1B873593 & M
        h = (rotl(h ^ k, 13) * 5 + 0xE6546B64) & M
    h ^= 4 * len(words)
    h ^= h >> 16
    h = h * 0x85EBCA6B & M
    h ^= h >> 13
    h = h * 0xC2B2AE35 & M
    return h ^ (h >> 16)


def test_murmur3_matches_the_reference_on_full_32_bit_words():
    assert int(murmur3([0])) == 0x2362F9DE  # the published test vector: four zero bytes, seed 0
    rng = random.Random(0)
    words = [[rng.getrandbits(32) for _ in range(5)] for _ in range(2000)]
    words += [[M] * 5, [0] * 5]
    got = murmur3([torch.tensor([w[i] for w in words]) for i in range(5)])
    assert got.tolist() == [reference_murmur3(w) for w in words]
    # plain-int words (mixed in Python) and tensor words give the same hash
    mixed = murmur3([*words[0][:3], torch.tensor([w[3] for w in words]), words[0][4]])
    assert int(mixed[0]) == reference_murmur3(words[0])


def test_keys_are_a_function_of_seed_client_and_round_only():
    a = round_keys(1, [5, 9, 2], 3)
    assert torch.equal(a[1], round_keys(1, [9], 3)[0])  # the same alone as among others
    assert len({tuple(k) for k in round_keys(1, list(range(1000)), 3).tolist()}) == 1000
    for other in (round_keys(2, [5], 3), round_keys(1, [5], 4), round_keys(1, [6], 3)):
        assert not torch.equal(other[0], a[0])


def test_uniform_below_and_permutations_have_their_distributions():
    s = Stream.of(round_keys(0, list(range(200)), 1))
    u = s.uniform(500)
    assert u.shape == (200, 500) and u.dtype == torch.float32
    assert 0 <= float(u.min()) and float(u.max()) < 1
    assert abs(float(u.mean()) - 0.5) < 0.005 and abs(float(u.var()) - 1 / 12) < 0.002
    counts = torch.bincount(s.below(torch.tensor(7), 500).flatten(), minlength=7)
    assert counts.numel() == 7 and (counts - 200 * 500 / 7).abs().max() < 0.03 * 200 * 500 / 7
    size = torch.tensor([10, 3, 6] * 66 + [10, 10])
    perm = s.first_of_permutation(size, 3, 10)
    for row, n in zip(perm.tolist(), size.tolist()):
        assert len(set(row)) == 3 and max(row) < n
    assert torch.equal(perm, s.first_of_permutation(size, 3, 25))  # padding changes nothing
    first = torch.bincount(s.first_of_permutation(torch.tensor(10), 1, 10).flatten(), minlength=10)
    assert first.min() >= 8  # every position can come first (200 draws, 20 expected each)
