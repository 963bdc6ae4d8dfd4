"""The core is vmappable (docs/algorithms.md#moml-the-memory): ``torch.func.vmap`` over a cohort
of clients gives the same results as a per-client loop: for the task step, the memory helpers and
a client update."""

import pytest
import torch
from torch.func import vmap

from fedmaml.algorithms import Hyper, RoundData, client_update
from fedmaml.algorithms.moml import MOML
from fedmaml.core import memory as mem
from fedmaml.core.params import stack, unstack
from fedmaml.core.patterns import Pattern
from fedmaml.core.task_step import StepConfig, task_step
from helpers import single_thread  # noqa: F401  (autouse fixture)
from helpers import assert_params_close, assert_params_equal, problem, random_like

COHORT = 3
PATTERNS = {
    ("mlp", "head"): "0001x2",
    ("mlp", "mixed"): "1111|0111|0001",  # the prefix cache advances twice
    ("conv4", "head"): "00001x2",
    ("conv4", "mixed"): "11111|00111|00001",
}


def cohort(batch_fn, seed, k):
    return batch_fn(seed, k=k, dtype=torch.float32, lead=(COHORT,))


def at(batch, i):
    return batch[0][i], batch[1][i]


@pytest.mark.parametrize("estimator", ["first_order", "second_order", "hessian_free",
                                       "hessian_free/normalized"])
@pytest.mark.parametrize("name, kind", list(PATTERNS))
def test_vmapped_task_step_equals_loop(name, kind, estimator):
    model, w, batch, loss_fn = problem(name, dtype=torch.float32)
    p = Pattern.parse(PATTERNS[name, kind]).validate(model.group_names)
    estimator, _, perturbation = estimator.partition("/")
    cfg = StepConfig(alpha=0.2, beta=0.5, estimator=estimator, inner_pattern=p, memory_pattern=p,
                     hf_delta=0.1,  # FD amplifies float32 rounding by alpha/delta
                     hf_perturbation=perturbation or "absolute")
    S, Q, E = cohort(batch, 1, 5), cohort(batch, 2, 4), cohort(batch, 3, 5)
    U = stack([{k: w[k] + 0.1 * d for k, d in random_like(w, 10 + i).items()}
               for i in range(COHORT)])

    def step(w_, u, s, q, e):
        return task_step(model, loss_fn, cfg, w_, u, s, q, e)

    Uv, Gv, Mv = vmap(step, in_dims=(None, 0, 0, 0, 0))(w, U, S, Q, E)
    for i in range(COHORT):
        u_i, g_i, m_i = step(w, unstack(U)[i], at(S, i), at(Q, i), at(E, i))
        assert_params_close(unstack(Uv)[i], u_i, atol=1e-5, what=f"u' client {i}")
        assert_params_close(unstack(Gv)[i], g_i, atol=1e-5, rtol=1e-4, what=f"G client {i}")
        for k in m_i:
            assert torch.allclose(Mv[k][i], m_i[k], atol=1e-5), k
    # the clients really differ (the batched result is not one client's result broadcast)
    assert not torch.allclose(Gv[model.names_of([model.num_groups - 1])[0]][0],
                              Gv[model.names_of([model.num_groups - 1])[0]][1])


def test_vmapped_task_step_without_memory():
    model, w, batch, loss_fn = problem("conv4", dtype=torch.float32)
    p = Pattern.parse("00011|00001")
    cfg = StepConfig(alpha=0.2, beta=1.0, estimator="second_order", inner_pattern=p,
                     memory_pattern=p)
    S, Q = cohort(batch, 4, 5), cohort(batch, 5, 4)
    Uv, Gv, _ = vmap(lambda s, q: task_step(model, loss_fn, cfg, w, None, s, q))(S, Q)
    for i in range(COHORT):
        u_i, g_i, _ = task_step(model, loss_fn, cfg, w, None, at(S, i), at(Q, i))
        assert_params_close(unstack(Uv)[i], u_i, atol=1e-5)
        assert_params_close(unstack(Gv)[i], g_i, atol=1e-5, rtol=1e-4)


def test_vmapped_gather_and_scatter():
    model, w, _, _ = problem("mlp", dtype=torch.float32)
    m = stack([random_like(w, i) for i in range(4)])
    idx = torch.tensor([3, 0, 2])
    got = vmap(lambda i: mem.gather(m, i))(idx)
    for j, i in enumerate(idx.tolist()):
        assert_params_equal(unstack(got)[j], unstack(m)[i])
    us = stack([random_like(w, 50 + j) for j in range(3)])
    out = vmap(lambda i, u: mem.scatter(m, i, u))(idx, us)
    for j, i in enumerate(idx.tolist()):
        assert_params_equal({k: v[j] for k, v in out.items()},
                            mem.scatter(m, torch.tensor(i), unstack(us)[j]))


@pytest.mark.parametrize("policy", ["keep", "decay_to_w"])
@pytest.mark.parametrize("estimator", ["first_order", "second_order"])
def test_vmapped_moml_client_update_equals_loop(policy, estimator):
    """A whole LocalMOML client update (H local steps, B tasks per step, memory gather/scatter)
    vmapped over a cohort of clients with stacked memories and round data."""
    model, w, batch, loss_fn = problem("mlp", dtype=torch.float32)
    p = Pattern.parse("1111|0011")
    step = StepConfig(alpha=0.2, beta=0.4, estimator=estimator, inner_pattern=p, memory_pattern=p)
    H, B, n = 2, 2, 3
    hp = Hyper(step=step, eta=0.1, local_steps=H, tasks_per_step=B, memory_policy=policy)
    g = torch.Generator().manual_seed(0)
    index = torch.stack([torch.stack([torch.randperm(n, generator=g)[:B] for _ in range(H)])
                         for _ in range(COHORT)])  # [C, H, B]
    xs, ys = batch(1, k=5, dtype=torch.float32, lead=(COHORT, H, B))
    xq, yq = batch(2, k=4, dtype=torch.float32, lead=(COHORT, H, B))
    memory = stack([stack([{k: w[k] + 0.1 * d for k, d in random_like(w, 10 * c + i).items()}
                           for i in range(n)]) for c in range(COHORT)])  # [C, n, ...]

    def update(w_, m, ti, xs_, ys_, xq_, yq_):
        data = RoundData(ti, (xs_, ys_), (xq_, yq_))
        return client_update(MOML, model, loss_fn, hp, w_, m, data)

    Dv, Mv, Metv = vmap(update, in_dims=(None, 0, 0, 0, 0, 0, 0))(w, memory, index, xs, ys, xq, yq)
    for c in range(COHORT):
        d, m, met = update(w, unstack(memory)[c], index[c], xs[c], ys[c], xq[c], yq[c])
        assert_params_close(unstack(Dv)[c], d, atol=1e-5, what=f"delta client {c}")
        assert_params_close(unstack(Mv)[c], m, atol=1e-5, what=f"memory client {c}")
        for k in met:
            assert torch.allclose(Metv[k][c], met[k], atol=1e-5)
