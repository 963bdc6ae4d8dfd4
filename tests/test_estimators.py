"""Meta-gradient estimators (docs/algorithms.md#meta-gradient-estimators) against an independent
unrolled reference, finite differences, and the memory point at which MOML evaluates them
(docs/algorithms.md#moml-the-memory)."""

import pytest
import torch

from fedmaml.core.adaptation import adapt
from fedmaml.core.estimators import adapt_with_vjp, hessian_free_product, loss_grad
from fedmaml.core.params import dot, lerp
from fedmaml.core.patterns import Pattern
from fedmaml.core.task_step import StepConfig, task_step
from helpers import single_thread  # noqa: F401  (autouse fixture)
from helpers import (assert_params_close, assert_params_equal, group_of, problem, random_like,
                     reference_adapt, reference_grad, reference_meta_grad, reference_vjp, rel_err)

ALPHA = 0.3

MLP_PATTERNS = ["1111", "1111x3", "0001x2", "0011x2", "0110|0011", "1111|0001x2", "0000|0010",
                "none"]
CONV_PATTERNS = ["11111", "00011|00001", "00100|00001", "11111|00001"]
CASES = [("mlp", p) for p in MLP_PATTERNS] + [("conv4", p) for p in CONV_PATTERNS]


def cfg_for(p, estimator, beta=1.0, memory_pattern=None, **kw):
    return StepConfig(alpha=ALPHA, beta=beta, estimator=estimator, inner_pattern=p,
                      memory_pattern=p if memory_pattern is None else memory_pattern, **kw)


def frozen_names(model, p):
    adapted = {g for s in range(p.steps) for g in p.adapted(s)}
    return [k for k, g in group_of(model).items() if g not in adapted]


@pytest.mark.parametrize("name, text", CASES)
def test_second_order_equals_unrolled_reference(name, text):
    model, w, batch, loss_fn = problem(name)
    p = Pattern.parse(text).validate(model.group_names)
    (xs, ys), (xq, yq) = batch(1), batch(2)
    ref = reference_meta_grad(model, w, xs, ys, xq, yq, loss_fn, p, ALPHA)

    # adapt_with_vjp: the adapted params and J^T v, with v at A(w)
    for cache in (True, False):
        adapted, vjp = adapt_with_vjp(model, w, xs, ys, loss_fn, p, ALPHA, cache_prefix=cache)
        assert_params_close(adapted, reference_adapt(model, w, xs, ys, loss_fn, p, ALPHA),
                            atol=1e-10)
        v = reference_grad(model, adapted, xq, yq, loss_fn)
        assert_params_close(vjp(v), ref, atol=1e-10, what=f"vjp {p} cache={cache}")

    # task_step with u=None, beta=1 (FedMeta second order)
    u, g, m = task_step(model, loss_fn, cfg_for(p, "second_order", loss_before=True), w, None,
                        (xs, ys), (xq, yq))
    assert_params_close(g, ref, atol=1e-10, what=f"task_step {p}")
    assert not any(t.requires_grad for t in g.values())
    assert abs(float(m["loss_after"]) - float(loss_fn(model.forward(u, xq), yq))) < 1e-12
    assert abs(float(m["loss_before"]) - float(loss_fn(model.forward(w, xq), yq))) < 1e-12

    # frozen groups get a nonzero meta-gradient through the cross terms, and it is not just v
    if p.steps:
        for k in frozen_names(model, p):
            if k.endswith("weight"):
                assert g[k].abs().max() > 1e-8, (k, p)
        v = reference_grad(model, u, xq, yq, loss_fn)
        assert rel_err(g, v) > 1e-4  # the second-order correction is really there


@pytest.mark.parametrize("name, text", [("mlp", "0011|0001"), ("mlp", "1111x2"),
                                        ("conv4", "00111|00001")])
def test_second_order_matches_finite_differences(name, text):
    model, w, batch, loss_fn = problem(name)
    p = Pattern.parse(text)
    (xs, ys), (xq, yq) = batch(3), batch(4)
    _, g, _ = task_step(model, loss_fn, cfg_for(p, "second_order"), w, None, (xs, ys), (xq, yq))

    def f(params):
        theta = adapt(model, params, xs, ys, loss_fn, p, ALPHA)
        return float(loss_fn(model.forward(theta, xq), yq))

    d = random_like(w, seed=5)
    eps = 1e-5
    fd = (f({k: w[k] + eps * d[k] for k in w}) - f({k: w[k] - eps * d[k] for k in w})) / (2 * eps)
    directional = float(dot(g, d))
    assert abs(fd - directional) <= 1e-6 * max(1.0, abs(fd)), (fd, directional)
    # a first-order estimate is visibly different along the same direction
    _, g_fo, _ = task_step(model, loss_fn, cfg_for(p, "first_order"), w, None, (xs, ys), (xq, yq))
    assert abs(float(dot(g_fo, d)) - fd) > 1e-4 * max(1.0, abs(fd))


@pytest.mark.parametrize("name, text", [("mlp", "1111"), ("mlp", "0011x3"), ("mlp", "1111|0001x2"),
                                        ("conv4", "11111"), ("conv4", "00011|00001")])
def test_hessian_free_with_support_batch_approximates_second_order(name, text):
    model, w, batch, loss_fn = problem(name)
    p = Pattern.parse(text)
    (xs, ys), (xq, yq), (xe, ye) = batch(6), batch(7), batch(8)
    _, g_so, _ = task_step(model, loss_fn, cfg_for(p, "second_order"), w, None, (xs, ys), (xq, yq))
    cfg = cfg_for(p, "hessian_free", hf_delta=1e-5)
    _, g_hf, _ = task_step(model, loss_fn, cfg, w, None, (xs, ys), (xq, yq), hf_batch=(xs, ys))
    assert rel_err(g_hf, g_so) < 1e-4, rel_err(g_hf, g_so)
    # with an independent batch S' it is a different (noisy) estimate
    _, g_ind, _ = task_step(model, loss_fn, cfg, w, None, (xs, ys), (xq, yq), hf_batch=(xe, ye))
    assert rel_err(g_ind, g_so) > 1e-3, rel_err(g_ind, g_so)
    # and it equals the product written out by hand on the trajectory
    traj = []
    u = adapt(model, w, xs, ys, loss_fn, p, ALPHA, trajectory=traj)
    v = reference_grad(model, u, xq, yq, loss_fn)
    out = dict(v)
    groups = group_of(model)
    for s in reversed(range(p.steps)):
        mask = {k: float(p.rows[s][groups[k]]) for k in w}
        plus = {k: traj[s][k] + 1e-5 * mask[k] * out[k] for k in w}
        minus = {k: traj[s][k] - 1e-5 * mask[k] * out[k] for k in w}
        gp, gm = reference_grad(model, plus, xe, ye, loss_fn), reference_grad(model, minus, xe, ye,
                                                                              loss_fn)
        out = {k: out[k] - ALPHA * (gp[k] - gm[k]) / 2e-5 for k in w}
    assert_params_close(g_ind, out, atol=1e-9, what="HF by hand")


def test_hessian_free_needs_an_extra_batch():
    model, w, batch, loss_fn = problem("mlp")
    with pytest.raises(ValueError, match="hf_batch"):
        task_step(model, loss_fn, cfg_for(Pattern.parse("1111"), "hessian_free"), w, None,
                  batch(1), batch(2))


def test_hessian_free_product_of_none_pattern_is_identity():
    model, w, batch, loss_fn = problem("mlp")
    v = random_like(w, 3)
    out = hessian_free_product(model, [], v, *batch(1), loss_fn, Pattern.parse("none"), ALPHA,
                               1e-4)
    assert_params_equal(out, v)


@pytest.mark.parametrize("beta", [1.0, 0.4])
def test_first_order_is_the_gradient_at_the_memory(beta):
    model, w, batch, loss_fn = problem("mlp")
    p = Pattern.parse("1111|0001")
    (xs, ys), (xq, yq) = batch(9), batch(10)
    u = random_like(w, seed=11, scale=0.5)
    u_new, g, m = task_step(model, loss_fn, cfg_for(p, "first_order", beta=beta), w, u, (xs, ys),
                            (xq, yq))
    a = reference_adapt(model, w, xs, ys, loss_fn, p, ALPHA)
    expected_u = {k: (1 - beta) * u[k] + beta * a[k] for k in w}
    assert_params_close(u_new, expected_u, atol=1e-12)
    assert_params_close(g, reference_grad(model, expected_u, xq, yq, loss_fn), atol=1e-10)
    assert abs(float(m["loss_after"]) - float(loss_fn(model.forward(expected_u, xq), yq))) < 1e-12
    g2, loss = loss_grad(model, u_new, xq, yq, loss_fn)
    assert_params_equal(g, g2)


@pytest.mark.parametrize("name, text", [("mlp", "0011x2"), ("mlp", "1111|0001"),
                                        ("conv4", "00011|00001")])
@pytest.mark.parametrize("estimator", ["second_order", "hessian_free"])
def test_moml_second_order_uses_v_at_the_memory(name, text, estimator):
    """MOML: G = J_A(w)^T v with v = grad L(u'; Q) at the (new) memory u', not at A(w)."""
    model, w, batch, loss_fn = problem(name)
    p = Pattern.parse(text)
    (xs, ys), (xq, yq) = batch(12), batch(13)
    beta = 0.35
    u = random_like(w, seed=14, scale=0.3)
    u = {k: w[k] + u[k] for k in w}
    cfg = cfg_for(p, estimator, beta=beta, hf_delta=1e-5)
    u_new, g, _ = task_step(model, loss_fn, cfg, w, u, (xs, ys), (xq, yq), hf_batch=(xs, ys))
    a = reference_adapt(model, w, xs, ys, loss_fn, p, ALPHA)
    expected_u = {k: (1 - beta) * u[k] + beta * a[k] for k in w}
    assert_params_close(u_new, expected_u, atol=1e-12)
    v = reference_grad(model, expected_u, xq, yq, loss_fn)
    ref = reference_vjp(model, w, xs, ys, loss_fn, p, ALPHA, v)
    if estimator == "second_order":
        assert_params_close(g, ref, atol=1e-10)
    else:
        assert rel_err(g, ref) < 1e-4
    # ... and not J^T evaluated with v at A(w)
    wrong = reference_vjp(model, w, xs, ys, loss_fn, p, ALPHA,
                          reference_grad(model, a, xq, yq, loss_fn))
    assert rel_err(g, wrong) > 1e-3


@pytest.mark.parametrize("estimator", ["second_order", "hessian_free"])
def test_separate_memory_and_inner_patterns(estimator):
    """The memory follows memory_pattern; the Jacobian is that of inner_pattern."""
    model, w, batch, loss_fn = problem("mlp")
    mem_p, inner_p = Pattern.parse("1111x2"), Pattern.parse("0011|0001")
    (xs, ys), (xq, yq) = batch(15), batch(16)
    u = {k: w[k] + 0.2 * d for k, d in random_like(w, 17).items()}
    cfg = cfg_for(inner_p, estimator, beta=0.5, memory_pattern=mem_p, hf_delta=1e-5)
    u_new, g, _ = task_step(model, loss_fn, cfg, w, u, (xs, ys), (xq, yq), hf_batch=(xs, ys))
    a = reference_adapt(model, w, xs, ys, loss_fn, mem_p, ALPHA)
    expected_u = lerp(u, a, 0.5)
    assert_params_close(u_new, expected_u, atol=1e-12)
    v = reference_grad(model, expected_u, xq, yq, loss_fn)
    ref = reference_vjp(model, w, xs, ys, loss_fn, inner_p, ALPHA, v)
    assert rel_err(g, ref) < (1e-10 if estimator == "second_order" else 1e-4)


@pytest.mark.parametrize("estimator", ["first_order", "second_order", "hessian_free"])
def test_scale_by_beta(estimator):
    model, w, batch, loss_fn = problem("mlp")
    p = Pattern.parse("0011|0001")
    (xs, ys), (xq, yq), extra = batch(18), batch(19), batch(20)
    u = random_like(w, 21)
    plain = cfg_for(p, estimator, beta=0.3)
    scaled = cfg_for(p, estimator, beta=0.3, scale_by_beta=True)
    u1, g1, m1 = task_step(model, loss_fn, plain, w, u, (xs, ys), (xq, yq), extra)
    u2, g2, m2 = task_step(model, loss_fn, scaled, w, u, (xs, ys), (xq, yq), extra)
    assert_params_equal(u1, u2)
    assert_params_equal(g2, {k: 0.3 * v for k, v in g1.items()})
    assert StepConfig.__dataclass_fields__["scale_by_beta"].default is False  # default off (§3)


@pytest.mark.parametrize("name, text", [("mlp", "1111"), ("mlp", "1111|0001x2"),
                                        ("conv4", "00011|00001")])
def test_normalized_hessian_free_equals_the_hand_product_and_second_order(name, text):
    """``hf_perturbation: normalized`` steps ``d / ||P_s v||`` along ``v`` at every step ``s``."""
    model, w, batch, loss_fn = problem(name)
    p = Pattern.parse(text)
    (xs, ys), (xq, yq), (xe, ye) = batch(22), batch(23), batch(24)
    _, g_so, _ = task_step(model, loss_fn, cfg_for(p, "second_order"), w, None, (xs, ys), (xq, yq))
    cfg = cfg_for(p, "hessian_free", hf_delta=1e-5, hf_perturbation="normalized")
    _, g_hf, _ = task_step(model, loss_fn, cfg, w, None, (xs, ys), (xq, yq), hf_batch=(xs, ys))
    assert rel_err(g_hf, g_so) < 1e-4, rel_err(g_hf, g_so)

    _, g_ind, _ = task_step(model, loss_fn, cfg, w, None, (xs, ys), (xq, yq), hf_batch=(xe, ye))
    traj = []
    u = adapt(model, w, xs, ys, loss_fn, p, ALPHA, trajectory=traj)
    out = reference_grad(model, u, xq, yq, loss_fn)
    groups = group_of(model)
    for s in reversed(range(p.steps)):
        mask = {k: float(p.rows[s][groups[k]]) for k in w}
        norm = sum(float((mask[k] * out[k]).pow(2).sum()) for k in w) ** 0.5
        step = 1e-5 / norm
        plus = {k: traj[s][k] + step * mask[k] * out[k] for k in w}
        minus = {k: traj[s][k] - step * mask[k] * out[k] for k in w}
        gp, gm = (reference_grad(model, q, xe, ye, loss_fn) for q in (plus, minus))
        out = {k: out[k] - ALPHA * (gp[k] - gm[k]) / (2 * step) for k in w}
    assert_params_close(g_ind, out, atol=1e-9, what="normalized HF by hand")


def test_normalized_hessian_free_is_linear_in_v_and_absolute_is_not():
    """Scaling ``v`` scales the normalized estimate exactly (the same points are probed); the
    absolute step probes ``d * c * v``, far outside the linear regime for a large ``c``."""
    model, w, batch, loss_fn = problem("mlp")
    p = Pattern.parse("1111x2")
    xs, ys = batch(25)
    traj = []
    adapt(model, w, xs, ys, loss_fn, p, ALPHA, trajectory=traj)
    v = random_like(w, 26)
    big = {k: 1e4 * t for k, t in v.items()}
    for kind, expect_linear in (("normalized", True), ("absolute", False)):
        small_out = hessian_free_product(model, traj, v, xs, ys, loss_fn, p, ALPHA, 1e-3, kind)
        big_out = hessian_free_product(model, traj, big, xs, ys, loss_fn, p, ALPHA, 1e-3, kind)
        err = rel_err(big_out, {k: 1e4 * t for k, t in small_out.items()})
        assert (err < 1e-8) if expect_linear else (err > 1e-3), (kind, err)


def test_normalized_hessian_free_of_a_zero_v_is_zero():
    model, w, batch, loss_fn = problem("mlp")
    p = Pattern.parse("1111")
    xs, ys = batch(27)
    traj = []
    adapt(model, w, xs, ys, loss_fn, p, ALPHA, trajectory=traj)
    zero = {k: torch.zeros_like(t) for k, t in w.items()}
    out = hessian_free_product(model, traj, zero, xs, ys, loss_fn, p, ALPHA, 1e-3, "normalized")
    assert_params_equal(out, zero)


def test_unknown_hf_perturbation_is_refused():
    with pytest.raises(ValueError, match="hf_perturbation 'relative'.*absolute.*normalized"):
        cfg_for(Pattern.parse("1111"), "hessian_free", hf_perturbation="relative")
