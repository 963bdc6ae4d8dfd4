"""Derived random streams: every random choice in ``fedmaml.data`` is a pure function of ids.

A client's data must be rebuilt identically by any process (simulation actor, real device) from the
run seed and the client id alone, and must not depend on which other clients were built first. So
each purpose ("sinusoid/train", "partition", ...) and each id gets its own independent stream,
derived with numpy's ``SeedSequence`` (the documented way to split seeds into independent streams).
"""

from __future__ import annotations

import zlib

import numpy as np


def seed_sequence(seed: int, stream: str, *ids: int) -> np.random.SeedSequence:
    """The seed sequence of one purpose (``stream``) and ids under a run seed."""
    return np.random.SeedSequence(entropy=int(seed), spawn_key=(zlib.crc32(stream.encode()), *ids))


def numpy_rng(seed: int, stream: str, *ids: int) -> np.random.Generator:
    """A numpy Generator for one purpose and ids."""
    return np.random.Generator(np.random.PCG64(seed_sequence(seed, stream, *ids)))


def derived_seed(seed: int, stream: str, *ids: int) -> int:
    """A 64-bit integer seed (e.g. for ``torch.Generator.manual_seed``) for one purpose and ids."""
    return int(seed_sequence(seed, stream, *ids).generate_state(1, np.uint64)[0])
