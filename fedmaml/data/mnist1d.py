"""MNIST-1D (Greydanus 2020): 1-D, 40-sample sequences of 10 digit templates, generated locally.

``mnist1d.data.make_dataset`` builds the data set from its arguments in about a second per 5000
samples, without network access (only ``get_dataset`` downloads). The data set is a fixed function of
its arguments (mnist1d's own defaults, ``seed = 42``, with ``num_samples`` from the spec), so it is
cached in memory and on disk (:mod:`fedmaml.data.cache`); the run seed only changes the partition.
mnist1d's train/test split is ignored: both halves form one pool that fedmaml partitions itself.

Inputs are float32 ``[n, 40]`` (standardised by mnist1d), labels 0..9; ``n = 10 * (num_samples // 10)``.
"""

from __future__ import annotations

import random
from contextlib import contextmanager
from importlib.metadata import PackageNotFoundError, version

import numpy as np

from fedmaml.errors import DataError

from .cache import cached_arrays
from .pools import LabelledPool

NUM_CLASSES = 10


def load_mnist1d_pool(num_samples: int) -> LabelledPool:
    """The MNIST-1D pool with ``num_samples`` examples (a multiple of 10, rounded down)."""
    try:
        from mnist1d.data import get_dataset_args, make_dataset
    except ImportError as exc:  # a declared dependency, but say what to install if it is missing
        raise DataError(f"data.family = 'mnist1d' needs the 'mnist1d' package ({exc})") from exc

    args = get_dataset_args()
    args.num_samples = int(num_samples)
    key = {name: value for name, value in vars(args).items() if name != "url"}
    try:
        package_version = version("mnist1d")
    except PackageNotFoundError:
        package_version = "unknown"

    def build() -> dict[str, np.ndarray]:
        with _global_rng_preserved():  # make_dataset reseeds the global `random` and numpy RNGs
            data = make_dataset(args)
        x = np.concatenate([data["x"], data["x_test"]]).astype(np.float32)
        y = np.concatenate([data["y"], data["y_test"]]).astype(np.int64)
        return {"x": x, "y": y}

    arrays = cached_arrays("mnist1d", {"args": key, "mnist1d": package_version}, build)
    return LabelledPool.from_arrays(arrays["x"], arrays["y"], NUM_CLASSES)


@contextmanager
def _global_rng_preserved():
    py_state, np_state = random.getstate(), np.random.get_state()
    try:
        yield
    finally:
        random.setstate(py_state)
        np.random.set_state(np_state)
