"""MOML's memory (docs/algorithms.md#moml-the-memory), the algorithms' client updates, the server
side and the federated/centralized equivalence (docs/algorithms.md#federated-localmoml), each
against an independent plain-loop reference."""

import dataclasses

import pytest
import torch

from fedmaml.algorithms import (Hyper, RoundData, client_update, draw_cohort, draw_round,
                                get_algorithm,
                                initial_memory)
from fedmaml.algorithms.fedavg import FEDAVG
from fedmaml.algorithms.fedmeta import FEDMETA
from fedmaml.algorithms.moml import MOML
from fedmaml.algorithms.per_fedavg import PER_FEDAVG
from fedmaml.algorithms.reptile import REPTILE
from fedmaml.core import memory as mem
from fedmaml.core.params import stack, unstack
from fedmaml.core.patterns import Pattern
from fedmaml.core.server import ServerOptimizer, _weighted_rows, aggregate, aggregate_stacked
from fedmaml.core.task_step import StepConfig, task_step
from fedmaml.data.counter import round_keys
from fedmaml.data.sinusoid import SinusoidTask
from fedmaml.data.tasks import PoolTask
from helpers import single_thread  # noqa: F401  (autouse fixture)
from helpers import (assert_params_close, assert_params_equal, leaves, problem, random_like,
                     reference_adapt, reference_grad, reference_vjp, rel_err)

ALPHA = 0.3
P_MLP = Pattern.parse("1111|0001")


def hyper(estimator="first_order", beta=1.0, eta=0.2, H=1, B=1, pattern=P_MLP, policy="keep",
          **step_kw):
    step = StepConfig(alpha=ALPHA, beta=beta, estimator=estimator, inner_pattern=pattern,
                      memory_pattern=pattern, hf_delta=1e-5, **step_kw)
    return Hyper(step=step, eta=eta, local_steps=H, tasks_per_step=B, support_size=5, query_size=4,
                 init_support_size=6, memory_policy=policy)


def make_round(batch_fn, seed, H, B, n_tasks, extra=False, init=False, index=None):
    g = torch.Generator().manual_seed(seed)
    if index is None:
        index = torch.stack([torch.randperm(n_tasks, generator=g)[:B] for _ in range(H)])
    return RoundData(
        task_index=index,
        support=batch_fn(seed + 1, k=5, lead=(H, B)),
        query=batch_fn(seed + 2, k=4, lead=(H, B)),
        extra=batch_fn(seed + 3, k=5, lead=(H, B)) if extra else None,
        init=batch_fn(seed + 4, k=6, lead=(n_tasks,)) if init else None,
    )


def random_memory(w, n_tasks, seed):
    return stack([{k: w[k] + 0.3 * d for k, d in random_like(w, seed + i).items()}
                  for i in range(n_tasks)])


# -- memory rules ---------------------------------------------------------------------------------

def test_momentum_update_formula_and_detach():
    model, w, _, _ = problem("mlp")
    u, a = leaves(random_like(w, 1)), leaves(random_like(w, 2))
    out = mem.momentum_update(u, a, 0.3)
    for k in w:
        assert torch.allclose(out[k], 0.7 * u[k] + 0.3 * a[k], atol=1e-15)
        assert not out[k].requires_grad
    exact = mem.momentum_update(u, a, 1.0)
    assert_params_equal(exact, {k: v.detach() for k, v in a.items()})
    keep = mem.momentum_update(u, a, 0.0)
    assert_params_equal(keep, {k: v.detach() for k, v in u.items()})


def test_decay_to_w():
    model, w, _, _ = problem("mlp")
    m = random_memory(w, 3, seed=5)
    out = mem.decay_to_w(m, w, 0.25)
    for k in w:
        assert out[k].shape == m[k].shape
        for i in range(3):
            assert torch.allclose(out[k][i], 0.75 * m[k][i] + 0.25 * w[k], atol=1e-15)


def test_gather_and_scatter():
    model, w, _, _ = problem("mlp")
    m = random_memory(w, 4, seed=7)
    before = {k: v.clone() for k, v in m.items()}
    for i in range(4):
        assert_params_equal(mem.gather(m, torch.tensor(i)), unstack(m)[i])
    u = random_like(w, 99)
    out = mem.scatter(m, torch.tensor(2), u)
    for i in range(4):
        assert_params_equal(unstack(out)[i], u if i == 2 else unstack(m)[i])
    assert_params_equal(m, before, what="scatter must not modify its input")
    # a single task (the shortcut without index_select/where): the same results, input untouched
    one = random_memory(w, 1, seed=8)
    one_before = {k: v.clone() for k, v in one.items()}
    assert_params_equal(mem.gather(one, torch.tensor(0)), unstack(one)[0])
    assert_params_equal(unstack(mem.scatter(one, torch.tensor(0), u))[0], u)
    assert_params_equal(one, one_before, what="scatter must not modify its input")


def test_init_memory_is_adaptation_of_w():
    model, w, batch, loss_fn = problem("mlp")
    init = batch(3, k=6, lead=(3,))
    hp = hyper()
    m = initial_memory(model, loss_fn, hp, w, init)
    for i in range(3):
        ref = reference_adapt(model, w, init[0][i], init[1][i], loss_fn, P_MLP, ALPHA)
        assert_params_close(unstack(m)[i], ref, atol=1e-12)


# -- beta = 1 is FO-MAML / Per-FedAvg exactly -----------------------------------------------------

@pytest.mark.parametrize("estimator", ["first_order", "second_order", "hessian_free"])
@pytest.mark.parametrize("name", ["mlp", "conv4"])
def test_beta_one_task_step_is_maml_bitwise(name, estimator):
    model, w, batch, loss_fn = problem(name)
    p = Pattern.parse("1111|0001" if name == "mlp" else "11111|00001")
    cfg = StepConfig(alpha=ALPHA, beta=1.0, estimator=estimator, inner_pattern=p, memory_pattern=p)
    s, q, e = batch(1), batch(2), batch(3)
    u = random_like(w, 4)  # any memory: beta = 1 forgets it
    u1, g1, m1 = task_step(model, loss_fn, cfg, w, u, s, q, e)
    u0, g0, m0 = task_step(model, loss_fn, cfg, w, None, s, q, e)
    assert_params_equal(u1, u0)
    assert_params_equal(g1, g0)
    assert all(torch.equal(m1[k], m0[k]) for k in m0)
    if estimator == "first_order":  # and it is FO-MAML: the gradient at A(w; S)
        a = reference_adapt(model, w, *s, loss_fn, p, ALPHA)
        assert_params_close(u0, a, atol=1e-12)
        assert_params_close(g0, reference_grad(model, a, *q, loss_fn), atol=1e-10)


@pytest.mark.parametrize("estimator", ["first_order", "hessian_free"])
def test_beta_one_moml_client_update_is_per_fedavg_bitwise(estimator):
    model, w, batch, loss_fn = problem("mlp")
    hp = hyper(estimator=estimator, beta=1.0, H=3, B=2)
    data = make_round(batch, 10, H=3, B=2, n_tasks=4, extra=True)
    memory = random_memory(w, 4, seed=20)
    d_moml, mem_out, m_moml = client_update(MOML, model, loss_fn, hp, w, memory, data)
    d_pf, none, m_pf = client_update(PER_FEDAVG, model, loss_fn, hp, w, None, data)
    assert none is None
    assert_params_equal(d_moml, d_pf)
    assert m_moml.keys() == m_pf.keys() and all(torch.equal(m_moml[k], m_pf[k]) for k in m_pf)
    # FedMeta is the same local step
    d_fm, _, _ = client_update(FEDMETA, model, loss_fn, hp, w, None, data)
    assert_params_equal(d_fm, d_pf)
    # tasks never sampled in the round keep their memory bit for bit
    touched = set(data.task_index.flatten().tolist())
    for i in range(4):
        if i not in touched:
            assert_params_equal(unstack(mem_out)[i], unstack(memory)[i])


# -- MOML local round against a plain loop ---------------------------------------------------------

def _reference_round(model, loss_fn, hp, w, memory, data, estimator, decay=False):
    """Plain-loop LocalMOML round: returns (w_H, memories as a list)."""
    H, B = data.task_index.shape
    mems = unstack(memory)
    n = len(mems)
    alpha = ALPHA * (n / B if decay else 1.0)  # MOML-V2: only the memory update uses n/B * alpha
    p, beta = hp.step.inner_pattern, hp.step.beta
    for h in range(H):
        grads, new = [], list(mems)
        if decay:
            new = [{k: (1 - beta) * u[k] + beta * w[k] for k in w} for u in mems]
        for b in range(B):
            i = int(data.task_index[h, b])
            xs, ys = data.support[0][h, b], data.support[1][h, b]
            xq, yq = data.query[0][h, b], data.query[1][h, b]
            a = reference_adapt(model, w, xs, ys, loss_fn, p, alpha)
            u = {k: (1 - beta) * mems[i][k] + beta * a[k] for k in w}
            new[i] = u
            v = reference_grad(model, u, xq, yq, loss_fn)
            grads.append(v if estimator == "first_order"
                         else reference_vjp(model, w, xs, ys, loss_fn, p, ALPHA, v))
        mems = new
        w = {k: w[k] - hp.eta * sum(g[k] for g in grads) / B for k in w}
    return w, mems


@pytest.mark.parametrize("estimator", ["first_order", "second_order"])
def test_moml_round_matches_plain_loop(estimator):
    model, w, batch, loss_fn = problem("mlp")
    hp = hyper(estimator=estimator, beta=0.4, H=3, B=2)
    data = make_round(batch, 30, H=3, B=2, n_tasks=4)
    memory = random_memory(w, 4, seed=40)
    delta, mem_out, metrics = client_update(MOML, model, loss_fn, hp, w, memory, data)
    w_ref, mems_ref = _reference_round(model, loss_fn, hp, w, memory, data, estimator)
    assert_params_close({k: w[k] + delta[k] for k in w}, w_ref, atol=1e-10)
    for i in range(4):
        assert_params_close(unstack(mem_out)[i], mems_ref[i], atol=1e-10, what=f"memory {i}")
    assert set(metrics) == {"loss_after"}  # loss_before is asked for (algorithm.loss_before)
    _, _, more = client_update(MOML, model, loss_fn, dataclasses.replace(
        hp, step=dataclasses.replace(hp.step, loss_before=True)), w, memory, data)
    assert set(more) == {"loss_before", "loss_after"}
    assert torch.equal(more["loss_after"], metrics["loss_after"])


@pytest.mark.parametrize("estimator", ["first_order", "second_order"])
def test_decay_to_w_policy_matches_plain_loop(estimator):
    model, w, batch, loss_fn = problem("mlp")
    hp = hyper(estimator=estimator, beta=0.3, H=2, B=1, policy="decay_to_w",
               pattern=Pattern.parse("1111"))
    data = make_round(batch, 50, H=2, B=1, n_tasks=3)
    memory = random_memory(w, 3, seed=60)
    delta, mem_out, _ = client_update(MOML, model, loss_fn, hp, w, memory, data)
    w_ref, mems_ref = _reference_round(model, loss_fn, hp, w, memory, data, estimator,
                                       decay=True)
    assert_params_close({k: w[k] + delta[k] for k in w}, w_ref, atol=1e-10)
    for i in range(3):
        assert_params_close(unstack(mem_out)[i], mems_ref[i], atol=1e-10, what=f"memory {i}")


def test_keep_and_reinit_policies():
    model, w, batch, loss_fn = problem("mlp")
    hp = hyper(beta=0.5, H=1, B=1)
    index = torch.tensor([[1]])
    memory = random_memory(w, 3, seed=70)
    # keep: the given memory is used, unsampled tasks are untouched
    data = make_round(batch, 80, H=1, B=1, n_tasks=3, index=index)
    _, kept, _ = client_update(MOML, model, loss_fn, hp, w, memory, data)
    for i in (0, 2):
        assert_params_equal(unstack(kept)[i], unstack(memory)[i])
    a = reference_adapt(model, w, data.support[0][0, 0], data.support[1][0, 0], loss_fn, P_MLP,
                        ALPHA)
    assert_params_close(unstack(kept)[1], {k: 0.5 * unstack(memory)[1][k] + 0.5 * a[k] for k in w},
                        atol=1e-12)
    # reinit (init data given): memories restart from A(w; S_0), whatever was passed in
    data = make_round(batch, 80, H=1, B=1, n_tasks=3, index=index, init=True)
    _, fresh, _ = client_update(MOML, model, loss_fn, hp, w, memory, data)
    for i in (0, 2):
        ref = reference_adapt(model, w, data.init[0][i], data.init[1][i], loss_fn, P_MLP, ALPHA)
        assert_params_close(unstack(fresh)[i], ref, atol=1e-12)


# -- baselines ------------------------------------------------------------------------------------

def test_reptile_direction():
    model, w, batch, loss_fn = problem("mlp")
    hp = hyper(H=2, B=2, eta=0.7)
    data = make_round(batch, 90, H=2, B=2, n_tasks=3)
    delta, _, _ = client_update(REPTILE, model, loss_fn, hp, w, None, data)
    ref = dict(w)
    for h in range(2):
        dirs = []
        for b in range(2):
            x = torch.cat([data.support[0][h, b], data.query[0][h, b]])
            y = torch.cat([data.support[1][h, b], data.query[1][h, b]])
            theta = reference_adapt(model, ref, x, y, loss_fn, P_MLP, ALPHA)
            dirs.append({k: ref[k] - theta[k] for k in w})
        ref = {k: ref[k] - 0.7 * (dirs[0][k] + dirs[1][k]) / 2 for k in w}
    assert_params_close({k: w[k] + delta[k] for k in w}, ref, atol=1e-12)


def test_fedavg_is_sgd_on_support_and_query():
    model, w, batch, loss_fn = problem("mlp")
    hp = hyper(H=3, B=2, eta=0.1, loss_before=True)
    data = make_round(batch, 100, H=3, B=2, n_tasks=3)
    delta, memory, metrics = client_update(FEDAVG, model, loss_fn, hp, w, None, data)
    assert memory is None
    ref = dict(w)
    for h in range(3):
        gs = []
        for b in range(2):
            x = torch.cat([data.support[0][h, b], data.query[0][h, b]])
            y = torch.cat([data.support[1][h, b], data.query[1][h, b]])
            gs.append(reference_grad(model, ref, x, y, loss_fn))
        ref = {k: ref[k] - 0.1 * (gs[0][k] + gs[1][k]) / 2 for k in w}
    assert_params_close({k: w[k] + delta[k] for k in w}, ref, atol=1e-12)
    # loss_before of the first step is the query loss at w_r
    assert metrics["loss_before"].ndim == 0


def test_registry_and_extra_batch_needs():
    assert get_algorithm("moml") is MOML and get_algorithm("reptile") is REPTILE
    with pytest.raises(ValueError, match=r"algorithm.name: 'maml\+\+' is not allowed; allowed"):
        get_algorithm("maml++")
    assert MOML.needs_extra_batch(hyper("hessian_free"))
    assert not MOML.needs_extra_batch(hyper("second_order"))
    assert not FEDAVG.needs_extra_batch(hyper("hessian_free"))


def test_draw_round_shapes_and_disjoint_batches():
    tasks = [PoolTask(torch.arange(40.0).reshape(20, 2) + 100 * t, torch.zeros(20, 1),
                      torch.zeros(3, 2), torch.zeros(3, 1)) for t in range(4)]
    hp = hyper(H=3, B=2)
    data = draw_round(tasks, hp, round_keys(0, [7], 1)[0], extra=True, init=True)
    assert data.task_index.shape == (3, 2)
    assert data.support[0].shape == (3, 2, 5, 2) and data.query[0].shape == (3, 2, 4, 2)
    assert data.extra[0].shape == (3, 2, 5, 2) and data.init[0].shape == (4, 6, 2)
    for h in range(3):
        assert len(set(data.task_index[h].tolist())) == 2  # B distinct tasks per step
        for b in range(2):
            t = int(data.task_index[h, b])
            rows = [tuple(r.tolist()) for part in (data.support, data.query, data.extra)
                    for r in part[0][h, b]]
            assert len(set(rows)) == len(rows)  # support, query and S' disjoint
            assert all(100 * t <= r[0] < 100 * t + 40 for r in rows)  # drawn from the right task


def test_a_cohort_draw_is_each_clients_own_draw():
    """draw_cohort stacks exactly what each client draws alone (pools of unequal sizes, and sinusoid
    tasks), whoever else is in the cohort; other keys draw other data."""
    pools = [[PoolTask(torch.randn(size, 3), torch.arange(size), torch.zeros(1, 3),
                       torch.zeros(1, dtype=torch.int64)) for size in (sizes, sizes + 7, 4)]
             for sizes in (5, 30, 12)]
    waves = [[SinusoidTask(1.3 + c, 0.5 * t, x_range=(-1.3, 2.7)) for t in range(3)]
             for c in range(3)]
    hp = hyper(H=2, B=2)
    for clients in (pools, waves):
        keys = round_keys(3, [10, 11, 12], 4)
        cohort = draw_cohort(clients, hp, keys, extra=True, init=True)
        for c, tasks in enumerate(clients):
            alone = draw_round(tasks, hp, keys[c], extra=True, init=True)
            assert torch.equal(cohort.task_index[c], alone.task_index)
            for part in ("support", "query", "extra", "init"):
                for j in range(2):
                    assert torch.equal(getattr(cohort, part)[j][c], getattr(alone, part)[j]), part
        other = draw_round(clients[0], hp, round_keys(3, [10], 5)[0], extra=True, init=True)
        assert not torch.equal(other.support[0], cohort.support[0][0])


# -- server ---------------------------------------------------------------------------------------

def test_aggregate():
    a = {"x": torch.tensor([1.0, 2.0], dtype=torch.float64)}
    b = {"x": torch.tensor([3.0, 6.0], dtype=torch.float64)}
    assert torch.allclose(aggregate([a, b], [1, 3], "weighted")["x"],
                          torch.tensor([2.5, 5.0], dtype=torch.float64))
    assert torch.allclose(aggregate([a, b], [1, 3], "uniform")["x"],
                          torch.tensor([2.0, 4.0], dtype=torch.float64))
    with pytest.raises(ValueError):
        aggregate([a, b], [1, 3], "median")
    with pytest.raises(ValueError):
        aggregate([], [], "uniform")


@pytest.mark.parametrize("weighting", ["weighted", "uniform"])
@pytest.mark.parametrize("n", [5, 600])  # 600: more than one chunk of AGGREGATE_CHUNK updates
def test_aggregate_stacked_equals_aggregate(weighting, n):
    g = torch.Generator().manual_seed(0)
    deltas = [{"w": torch.randn(4, 3, generator=g), "b": torch.randn(3, generator=g)}
              for _ in range(n)]
    counts = [1 + (7 * i) % 5 for i in range(n)]
    stacked = {k: torch.stack([d[k] for d in deltas]) for k in deltas[0]}
    got, want = aggregate_stacked(stacked, counts, weighting), aggregate(deltas, counts, weighting)
    assert all(torch.equal(got[k], want[k]) for k in want)
    with pytest.raises(ValueError, match="weighted' or 'uniform"):
        aggregate_stacked(stacked, counts, "median")
    with pytest.raises(ValueError, match="no parameter dicts"):
        aggregate_stacked({k: v[:0] for k, v in stacked.items()}, [], weighting)


def _deltas(w, n):
    return [random_like(w, 200 + i, scale=0.1) for i in range(n)]


def test_server_sgd_is_exact():
    model, w, _, _ = problem("mlp")
    opt = ServerOptimizer("sgd", lr=0.5)
    cur = w
    for d in _deltas(w, 3):
        new = opt.step(cur, d)
        assert_params_equal(new, {k: cur[k] + 0.5 * d[k] for k in w})
        cur = new
    assert ServerOptimizer("sgd", lr=1.0).step(w, _deltas(w, 1)[0]).keys() == w.keys()
    with pytest.raises(ValueError):
        ServerOptimizer("rmsprop")


@pytest.mark.parametrize("kind", ["momentum", "adam"])
def test_server_momentum_and_adam_match_torch_optim(kind):
    model, w, _, _ = problem("mlp")
    ours = ServerOptimizer(kind, lr=0.05, momentum=0.8, betas=(0.9, 0.99), eps=1e-6)
    tensors = {k: v.clone().requires_grad_(True) for k, v in w.items()}
    if kind == "momentum":
        ref = torch.optim.SGD(list(tensors.values()), lr=0.05, momentum=0.8)
    else:
        ref = torch.optim.Adam(list(tensors.values()), lr=0.05, betas=(0.9, 0.99), eps=1e-6)
    cur = w
    for d in _deltas(w, 5):
        cur = ours.step(cur, d)
        for k, t in tensors.items():
            t.grad = -d[k]
        ref.step()
        assert_params_close(cur, {k: t.detach() for k, t in tensors.items()}, atol=1e-13,
                            rtol=1e-12, what=kind)
    assert ours.steps == 5


@pytest.mark.parametrize("kind", ["sgd", "momentum", "adam"])
def test_a_server_optimizer_over_stacked_runs_equals_one_per_run(kind):
    """A vectorized sweep steps R runs at once: per-run rates ``lr [R]`` and step counts
    ``steps [R]`` along the leading axis give each run exactly its own optimizer's steps."""
    _, w, _, _ = problem("mlp")
    lrs, runs = (0.05, 0.2, 0.01), 3
    alone = [ServerOptimizer(kind, lr=lr, momentum=0.8, betas=(0.9, 0.99), eps=1e-6)
             for lr in lrs]
    stacked = ServerOptimizer(kind, lr=torch.tensor(lrs, dtype=torch.float64), momentum=0.8,
                              betas=(0.9, 0.99), eps=1e-6, steps=torch.zeros(runs,
                                                                           dtype=torch.float64))
    cur_alone = [w] * runs
    cur = {k: torch.stack([v] * runs) for k, v in w.items()}
    for step in range(4):
        deltas = [random_like(w, 300 + 10 * step + r, scale=0.1) for r in range(runs)]
        cur_alone = [opt.step(c, d) for opt, c, d in zip(alone, cur_alone, deltas)]
        cur = stacked.step(cur, {k: torch.stack([d[k] for d in deltas]) for k in w})
        for r in range(runs):
            assert_params_close({k: v[r] for k, v in cur.items()}, cur_alone[r], atol=1e-13,
                                rtol=1e-12, what=f"{kind} run {r} step {step}")
    assert stacked.steps.tolist() == [4.0] * runs


# -- federated round == centralized MOML step ------------------------------------------------------

@pytest.mark.parametrize("estimator", ["first_order", "second_order", "hessian_free"])
@pytest.mark.parametrize("weighting", ["uniform", "weighted"])
def test_federated_round_is_one_centralized_moml_step(estimator, weighting):
    """H=1, server_lr=1, one task per client, B participants == w - eta * mean_i G_i (§5)."""
    model, w, batch, loss_fn = problem("mlp")
    n = 3
    hp = hyper(estimator=estimator, beta=0.4, eta=0.25, H=1, B=1)
    central = make_round(batch, 300, H=1, B=n, n_tasks=n, extra=True,
                         index=torch.arange(n).reshape(1, n))
    memory = random_memory(w, n, seed=310)

    # federated: client i holds task i (a one-task memory) and sees the same batches
    deltas, mems = [], []
    for i in range(n):
        part = lambda b: None if b is None else (b[0][:, i:i + 1], b[1][:, i:i + 1])  # noqa: E731
        data = RoundData(torch.zeros(1, 1, dtype=torch.long), part(central.support),
                         part(central.query), part(central.extra))
        one = {k: v[i:i + 1] for k, v in memory.items()}
        d, m, _ = client_update(MOML, model, loss_fn, hp, w, one, data)
        deltas.append(d)
        mems.append(unstack(m)[0])
    w_fed = ServerOptimizer("sgd", lr=1.0).step(w, aggregate(deltas, [9] * n, weighting))

    # centralized: one MOML step over the n tasks (one silo, B = n)
    hp_c = dataclasses.replace(hp, tasks_per_step=n)
    d_c, mem_c, _ = client_update(MOML, model, loss_fn, hp_c, w, memory, central)
    assert_params_close(w_fed, {k: w[k] + d_c[k] for k in w}, atol=1e-14, rtol=1e-12)
    for i in range(n):
        assert_params_equal(mems[i], unstack(mem_c)[i], what=f"memory {i}")

    # and it is w - eta * mean_i G_i with G_i from the task step
    gs = []
    for i in range(n):
        s, q, e = [(b[0][0, i], b[1][0, i])
                   for b in (central.support, central.query, central.extra)]
        _, g, _ = task_step(model, loss_fn, hp.step, w, unstack(memory)[i], s, q, e)
        gs.append(g)
    expected = {k: w[k] - 0.25 * sum(g[k] for g in gs) / n for k in w}
    assert_params_close(w_fed, expected, atol=1e-14, rtol=1e-12)


def test_memory_init_from_the_initial_model():
    """``memory_init: initial_model``: a first memory adapts w_0, not the round's w (then moves
    with the round's step as usual); without w_0 the update refuses to guess."""
    model, w, batch, loss_fn = problem("mlp")
    w0 = random_like(w, seed=90)
    hp = dataclasses.replace(hyper(beta=0.5, H=1, B=1), memory_init="initial_model")
    index = torch.tensor([[1]])
    data = make_round(batch, 91, H=1, B=1, n_tasks=3, index=index, init=True)
    _, memory, _ = client_update(MOML, model, loss_fn, hp, w, None, data, initial=w0)
    for i in (0, 2):  # not sampled: exactly A(w_0; S_0)
        ref = reference_adapt(model, w0, data.init[0][i], data.init[1][i], loss_fn, P_MLP, ALPHA)
        assert_params_close(unstack(memory)[i], ref, atol=1e-12)
    u0 = reference_adapt(model, w0, data.init[0][1], data.init[1][1], loss_fn, P_MLP, ALPHA)
    a = reference_adapt(model, w, data.support[0][0, 0], data.support[1][0, 0], loss_fn, P_MLP,
                        ALPHA)
    assert_params_close(unstack(memory)[1], {k: 0.5 * u0[k] + 0.5 * a[k] for k in w}, atol=1e-12)
    # the default adapts the round's w instead: a different memory
    _, current, _ = client_update(MOML, model, loss_fn, hyper(beta=0.5, H=1, B=1), w, None, data)
    assert rel_err(unstack(current)[0], unstack(memory)[0]) > 1e-3
    with pytest.raises(ValueError, match="initial_model"):
        client_update(MOML, model, loss_fn, hp, w, None, data)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_the_weighted_sum_of_rows_is_tensordots_to_the_bit(dtype):
    # aggregate_stacked's kernel skips tensordot's Python wrapper: rows of one value (a bias of
    # width 1) take its dot product, others its [1, n] @ [n, size] product
    gen = torch.Generator().manual_seed(0)
    for n in (1, 2, 3, 17, 256):
        for tail in ((), (1,), (40,), (40, 1), (1, 40), (40, 40), (3, 3, 2), (1, 1)):
            rows = torch.randn(n, *tail, generator=gen, dtype=dtype)
            coef = torch.rand(n, generator=gen, dtype=dtype) * 100
            got, want = _weighted_rows(coef[None], rows), torch.tensordot(coef, rows, dims=1)
            assert got.shape == want.shape and torch.equal(got, want), (n, tail)
