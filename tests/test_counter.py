"""Counter-based random numbers (fedmaml/data/counter.py): SplitMix64 exactly, keys and streams that are
pure functions of their inputs, the same bits from Python ints and uint64 arrays, and derived draws
with the distributions they claim."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from fedmaml.data.counter import (GAMMA, Stream, combine, derive_keys, mix64, round_keys,
                                  sample_without_replacement, splitmix64)

M = (1 << 64) - 1


def reference_splitmix64(seed: int, n: int) -> list[int]:
    """SplitMix64 (Steele, Lea, Flood 2014; Vigna's C reference) in plain Python integers."""
    out, state = [], seed
    for _ in range(n):
        state = (state + GAMMA) & M
        z = state
        z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & M
        z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & M
        out.append(z ^ (z >> 31))
    return out


def test_splitmix64_matches_the_reference_and_its_published_outputs():
    # SplitMix64 seeded with 0: the first outputs of the reference implementation
    assert [int(v) for v in splitmix64(np.uint64(0), 3)] == [
        0xE220A8397B1DCDAF, 0x6E789E6AA1B965F4, 0x06C45D188009454F]
    rng = np.random.default_rng(0)
    seeds = rng.integers(0, 2**63, 50, dtype=np.uint64) * np.uint64(2) + np.uint64(1)  # full range
    got = splitmix64(seeds, 7)
    for s, row in zip(seeds.tolist(), got.tolist()):
        assert row == reference_splitmix64(s, 7)


def test_python_ints_and_arrays_give_the_same_bits():
    words = [0, 1, 2**32 + 5, M, 123456789]
    assert [int(mix64(w)) for w in words] == mix64(np.array(words, dtype=np.uint64)).tolist()
    assert [combine(7, w) for w in words] == combine(np.uint64(7), np.array(
        words, dtype=np.uint64)).tolist()


def test_keys_are_a_function_of_seed_client_and_round_only():
    a = round_keys(1, [5, 9, 2], 3)
    assert a[1] == round_keys(1, [9], 3)[0]  # the same alone as among others
    assert len(set(round_keys(1, list(range(100_000)), 3).tolist())) == 100_000
    for other in (round_keys(2, [5], 3), round_keys(1, [5], 4), round_keys(1, [6], 3)):
        assert other[0] != a[0]


def test_uniform_below_and_permutations_have_their_distributions():
    s = Stream(round_keys(0, list(range(200)), 1))
    u = s.uniform(500)
    assert u.shape == (200, 500) and u.dtype == torch.float32
    assert 0 <= float(u.min()) and float(u.max()) < 1
    assert abs(float(u.mean()) - 0.5) < 0.005 and abs(float(u.var()) - 1 / 12) < 0.002
    counts = torch.bincount(s.below(7, 500).flatten(), minlength=7)
    assert counts.numel() == 7 and (counts - 200 * 500 / 7).abs().max() < 0.03 * 200 * 500 / 7
    size = np.array([10, 3, 6] * 66 + [10, 10])
    perm = s.first_of_permutation(size, 3, 10)
    for row, n in zip(perm.tolist(), size.tolist()):
        assert len(set(row)) == 3 and max(row) < n
    assert torch.equal(perm, s.first_of_permutation(size, 3, 25))  # padding changes nothing
    first = torch.bincount(s.first_of_permutation(10, 1, 10).flatten(), minlength=10)
    assert first.min() >= 8  # every position can come first (200 draws, 20 expected each)
    # sub-streams differ from each other and from their parent
    assert not torch.equal(s.child(0).uniform(5), s.child(1).uniform(5))


@pytest.mark.parametrize("n,k", [(25, 3), (1000, 10), (10, 9), (12, 3), (1_000_000, 50),
                                 (2 ** 40, 32), (1000, 33)])
def test_sampling_without_replacement_is_uniform_distinct_and_the_same_in_any_batch(n, k):
    keys = derive_keys(np.arange(400), np.full((400, 1), 5), 0xC1)[:, 0]
    rows = sample_without_replacement(keys, n, k)
    assert rows.shape == (400, k)
    for row in rows.tolist():  # k distinct ids below n, sorted
        assert len(set(row)) == k and row == sorted(row) and 0 <= row[0] and row[-1] < n
    # the same key gives the same cohort alone (a run alone: Python integers for k <= 32) as
    # inside any batch (arrays)
    for r in range(400):
        assert np.array_equal(sample_without_replacement(keys[r:r + 1], n, k)[0], rows[r])
    if n <= 1000 and k < n:  # every id is about equally likely: within 5 standard deviations
        counts = np.bincount(rows.ravel(), minlength=n)
        expected = 400 * k / n
        assert np.abs(counts - expected).max() < 5 * np.sqrt(expected) + 1


def test_per_seed_keys_equal_the_keys_of_each_seed():
    seeds = np.array([0, 3, 2 ** 40 + 5])
    ids = np.array([[1, 2], [0, 9], [4, 4]])
    batched = derive_keys(seeds, ids, 17)
    for r in range(3):
        assert np.array_equal(batched[r], derive_keys(int(seeds[r]), ids[r], 17))
