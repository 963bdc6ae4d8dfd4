"""FedProx's Synthetic(alpha, beta) classification clients (Li et al. 2020), generated lazily.

Each task is one FedProx "user": a softmax-regression model ``y = argmax(W x + b)`` with
``W [60 x 10], b [10] ~ N(u, 1)``, ``u ~ N(0, alpha)``, and inputs ``x ~ N(v, Sigma)`` with
``v ~ N(B, 1)``, ``B ~ N(0, beta)``, ``Sigma = diag(j^-1.2)``. ``alpha`` controls how much the
clients' models differ, ``beta`` how much their inputs differ. As in the FedProx generator,
``N(0, alpha)`` and ``N(0, beta)`` use alpha and beta as the standard deviation. The number of
examples is ``lognormal(4, 2) + 50`` as in FedProx, capped at ``MAX_SAMPLES`` (FedProx's draw is
heavy-tailed; a few clients would otherwise hold tens of thousands of examples).

A task is a pure function of (run seed, client id, task index), so a million clients are free until
asked for; unseen clients use a separate stream, so they are new users.
"""

from __future__ import annotations

from functools import partial

import numpy as np
import torch

from .fewshot import stratified_split
from .seeding import numpy_rng
from .spec import DataSpec
from .tasks import Federation, PoolTask, Task

DIMENSION = 60
NUM_CLASSES = 10
MIN_SAMPLES, MAX_SAMPLES = 50, 500
_STD = np.arange(1, DIMENSION + 1, dtype=np.float64) ** (-1.2 / 2)  # sqrt of Sigma's diagonal


def synthetic_task(
    rng: np.random.Generator,
    alpha: float,
    beta: float,
    heldout_fraction: float,
    adapt_size: int | None = None,
) -> PoolTask:
    """Draw one Synthetic(alpha, beta) user from ``rng`` and split off its held-out examples."""
    n = int(min(rng.lognormal(4, 2) + MIN_SAMPLES, MAX_SAMPLES))
    u = rng.normal(0.0, alpha)
    w = rng.normal(u, 1.0, (DIMENSION, NUM_CLASSES))
    b = rng.normal(u, 1.0, NUM_CLASSES)
    v = rng.normal(rng.normal(0.0, beta), 1.0, DIMENSION)
    x = v + rng.standard_normal((n, DIMENSION)) * _STD
    y = np.argmax(x @ w + b, axis=1)
    train, heldout = stratified_split(y, heldout_fraction, rng)
    xt = torch.from_numpy(x.astype(np.float32))
    yt = torch.from_numpy(y.astype(np.int64))
    train_t, heldout_t = torch.from_numpy(train), torch.from_numpy(heldout)
    return PoolTask(xt[train_t], yt[train_t], xt[heldout_t], yt[heldout_t], adapt_size=adapt_size)


def build_synthetic(spec: DataSpec, seed: int) -> Federation:
    """Synthetic(alpha, beta) clients and unseen clients, generated on demand."""
    args = (
        spec.tasks_per_client,
        spec.synthetic_alpha,
        spec.synthetic_beta,
        spec.heldout_fraction,
        spec.eval_adapt_size,
    )
    return Federation(
        num_clients=spec.num_clients,
        num_unseen=spec.unseen_clients,
        input_shape=(DIMENSION,),
        num_outputs=NUM_CLASSES,
        task_type="classification",
        _client_tasks=partial(_tasks, seed, "synthetic/train", *args),
        _unseen_tasks=partial(_tasks, seed, "synthetic/unseen", *args),
    )


def _tasks(
    seed: int,
    stream: str,
    count: int,
    alpha: float,
    beta: float,
    heldout_fraction: float,
    adapt_size: int,
    cid: int,
) -> list[Task]:
    return [
        synthetic_task(numpy_rng(seed, stream, cid, t), alpha, beta, heldout_fraction, adapt_size)
        for t in range(count)
    ]
