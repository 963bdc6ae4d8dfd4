"""scikit-learn's handwritten digits (1797 8x8 images, 10 classes), shipped with scikit-learn.

The smallest real image data set available offline: small enough for quick runs and tests, and
image-shaped (``[n, 1, 8, 8]``, pixels scaled from 0..16 to [0, 1]) so both the MLP (which flattens)
and Conv-4 can take it.
"""

from __future__ import annotations

from functools import lru_cache

import numpy as np

from .pools import LabelledPool

NUM_CLASSES = 10


@lru_cache(maxsize=1)
def load_digits_pool() -> LabelledPool:
    """All 1797 digits as one pool (loaded once per process)."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    x = (digits.images / 16.0).astype(np.float32)[:, None, :, :]
    return LabelledPool.from_arrays(x, digits.target.astype(np.int64), NUM_CLASSES)
