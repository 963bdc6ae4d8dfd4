"""Pattern-restricted adaptation (docs/algorithms.md#layer-groups-and-lambda-patterns): values
against an independent masked reference, prefix caching, exactness of the all-ones case, frozen
groups, and compute really skipped."""

import pytest
import torch

from fedmaml.core.adaptation import adapt
from fedmaml.core.evaluation import personalized_metrics
from fedmaml.core.losses import accuracy
from fedmaml.core.patterns import Pattern
from helpers import single_thread  # noqa: F401  (autouse fixture)
from helpers import (OpCounter, assert_params_close, assert_params_equal, cast, group_of, leaves,
                     max_abs_diff, problem, reference_adapt)

ALPHA = 0.3

# Patterns written for a model with n groups (input side first, head last).
PATTERNS = {
    "full1": lambda n: "1" * n,
    "full3": lambda n: "1" * n + "x3",
    "head3": lambda n: "0" * (n - 1) + "1x3",
    "body2": lambda n: "1" * (n - 1) + "0x2",
    "full_then_head": lambda n: "1" * n + "|" + "0" * (n - 1) + "1x2",
    "zero_rows": lambda n: "|".join(["0" * n, "00" + "1" * (n - 2), "0" * n, "0" * (n - 1) + "1"]),
    "non_monotone": lambda n: "|".join(["0" * (n - 3) + "101", "01" + "0" * (n - 2),
                                        "0" * (n - 1) + "1"]),
    "middle_only": lambda n: "0" + "1" * (n - 2) + "0x2",
    "none": lambda n: "none",
}


def pattern_for(model, key):
    p = Pattern.parse(PATTERNS[key](model.num_groups))
    return p.validate(model.group_names, model.name)


def adapted_groups(p: Pattern) -> set[int]:
    return {g for s in range(p.steps) for g in p.adapted(s)}


@pytest.mark.parametrize("name", ["mlp", "conv4"])
@pytest.mark.parametrize("key", list(PATTERNS))
def test_matches_masked_reference_float64(name, key):
    model, w, batch, loss_fn = problem(name)
    x, y = batch(1)
    p = pattern_for(model, key)
    ref = reference_adapt(model, w, x, y, loss_fn, p, ALPHA)
    for cache in (True, False):
        for diff in (False, True):
            got = adapt(model, w, x, y, loss_fn, p, ALPHA, cache_prefix=cache, differentiable=diff)
            assert list(got) == list(w)  # same keys, same order
            assert_params_close(got, ref, atol=1e-10, what=f"{name} {p} cache={cache} diff={diff}")
    # non-vacuous: every adapted group really moved (weights; a conv bias followed by batch-norm
    # has a zero gradient)
    groups = group_of(model)
    for k in w:
        if groups[k] in adapted_groups(p) and k.endswith("weight"):
            assert not torch.allclose(ref[k], w[k]), (k, p)


@pytest.mark.parametrize("name", ["mlp", "conv4"])
@pytest.mark.parametrize("key", ["head3", "full_then_head", "zero_rows", "non_monotone", "body2"])
def test_cached_equals_uncached_float32(name, key):
    model, w, batch, loss_fn = problem(name, dtype=torch.float32)
    x, y = batch(2, dtype=torch.float32)
    p = pattern_for(model, key)
    for diff in (False, True):
        a = adapt(model, w, x, y, loss_fn, p, ALPHA, cache_prefix=True, differentiable=diff)
        b = adapt(model, w, x, y, loss_fn, p, ALPHA, cache_prefix=False, differentiable=diff)
        assert all(v.dtype == torch.float32 for v in a.values())
        assert_params_close(a, b, atol=1e-6, what=f"{name} {p} diff={diff}")


def _plain_maml(model, params, x, y, loss_fn, steps, alpha):
    theta = {k: v.detach() for k, v in params.items()}
    for _ in range(steps):
        theta = {k: v.detach().requires_grad_(True) for k, v in theta.items()}
        names = list(theta)
        g = torch.autograd.grad(loss_fn(model.forward(theta, x), y), [theta[n] for n in names])
        theta = {n: (theta[n] - alpha * gi).detach() for n, gi in zip(names, g)}
    return theta


@pytest.mark.parametrize("name", ["mlp", "conv4"])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_all_ones_is_plain_maml_exactly(name, dtype):
    model, w, batch, loss_fn = problem(name, dtype=dtype)
    x, y = batch(3, dtype=dtype)
    for steps in (1, 3):
        p = Pattern.full(model.num_groups, steps)
        ref = _plain_maml(model, w, x, y, loss_fn, steps, ALPHA)
        for cache in (True, False):
            got = adapt(model, w, x, y, loss_fn, p, ALPHA, cache_prefix=cache)
            assert_params_equal(got, ref, what=f"{name} {steps} steps cache={cache}")


@pytest.mark.parametrize("name", ["mlp", "conv4"])
@pytest.mark.parametrize("key", ["head3", "body2", "zero_rows", "non_monotone", "middle_only",
                                 "none"])
def test_frozen_groups_bitwise_unchanged(name, key):
    model, w, batch, loss_fn = problem(name)
    x, y = batch(4)
    before = {k: v.clone() for k, v in w.items()}
    p = pattern_for(model, key)
    groups = group_of(model)
    for diff in (False, True):
        got = adapt(model, w, x, y, loss_fn, p, ALPHA, differentiable=diff)
        for k in w:
            if groups[k] not in adapted_groups(p):
                assert torch.equal(got[k], w[k]), (k, p)
            elif k.endswith("weight"):
                assert not torch.equal(got[k], w[k]), (k, p)
    assert_params_equal(w, before, what="adapt must not modify its input")


def test_first_order_result_is_detached_and_second_order_is_not():
    model, w, batch, loss_fn = problem("mlp")
    x, y = batch(5)
    wl = leaves(w)
    p = Pattern.parse("0011x2")
    fo = adapt(model, wl, x, y, loss_fn, p, ALPHA)
    assert not any(v.requires_grad for v in fo.values())
    so = adapt(model, wl, x, y, loss_fn, p, ALPHA, differentiable=True)
    assert all(so[k].requires_grad for k in model.names_of([2, 3]))
    # frozen groups are the very same tensors (identity), still connected to w
    assert all(so[k] is wl[k] for k in model.names_of([0, 1]))
    # and the differentiable result carries a graph through the cached prefix to the frozen layers
    g = torch.autograd.grad(model.forward(so, x).sum(), wl["layer1.weight"])[0]
    assert g.abs().sum() > 0


@pytest.mark.parametrize("name", ["mlp", "conv4"])
def test_trajectory_holds_params_before_each_step(name):
    model, w, batch, loss_fn = problem(name)
    x, y = batch(6)
    p = pattern_for(model, "zero_rows")
    traj = []
    out = adapt(model, w, x, y, loss_fn, p, ALPHA, trajectory=traj)
    assert len(traj) == p.steps
    for s in range(p.steps):
        prefix = Pattern(p.rows[:s])
        expected = reference_adapt(model, w, x, y, loss_fn, prefix, ALPHA)
        assert_params_close(traj[s], expected, atol=1e-10, what=f"trajectory[{s}]")
    assert_params_close(out, reference_adapt(model, w, x, y, loss_fn, p, ALPHA), atol=1e-10)


@pytest.mark.parametrize("text", ["001", "0001x2", "000001"])
def test_wrong_width_pattern_is_rejected(text):
    """A pattern with fewer bits than the model has groups must not silently adapt the wrong groups
    (e.g. '001' on Conv-4 would adapt conv3)."""
    from fedmaml.errors import PatternError
    model, w, batch, loss_fn = problem("conv4")
    x, y = batch(7)
    with pytest.raises(PatternError, match="conv1"):
        adapt(model, w, x, y, loss_fn, Pattern.parse(text), ALPHA)


def test_tensor_alpha_equals_float_alpha():
    model, w, batch, loss_fn = problem("conv4")
    x, y = batch(7)
    p = pattern_for(model, "full_then_head")
    a = adapt(model, w, x, y, loss_fn, p, ALPHA)
    b = adapt(model, w, x, y, loss_fn, p, torch.tensor(ALPHA, dtype=torch.float64))
    assert max_abs_diff(a, b) < 1e-14


# -- compute really skipped -----------------------------------------------------------------------

CONV_INPUT_SIDE = {(12, 12): "conv1", (6, 6): "conv2", (3, 3): "conv3", (2, 2): "conv4"}


def _conv_layer(input_shape):
    return CONV_INPUT_SIDE[tuple(input_shape[-2:])]


@pytest.mark.parametrize("diff", [False, True])
def test_head_only_runs_no_conv_backward_and_caches_the_body(diff):
    model, w, batch, loss_fn = problem("conv4")
    x, y = batch(8)
    steps = 3
    p = Pattern.top(model.num_groups, 1, steps)
    with OpCounter() as cached:
        adapt(model, w, x, y, loss_fn, p, ALPHA, cache_prefix=True, differentiable=diff)
    with OpCounter() as uncached:
        adapt(model, w, x, y, loss_fn, p, ALPHA, cache_prefix=False, differentiable=diff)
    for c in (cached, uncached):
        assert c.counts["convolution_backward"] == 0, c.counts
        assert c.conv_backward == []
    assert cached.counts["convolution"] == 4  # each conv layer once, in total
    assert uncached.counts["convolution"] == 4 * steps  # each conv layer once per step
    # full adaptation, for contrast, does run conv backward (4 layers per step)
    with OpCounter() as full:
        adapt(model, w, x, y, loss_fn, Pattern.full(model.num_groups, steps), ALPHA,
              differentiable=diff)
    assert full.counts["convolution_backward"] == 4 * steps


@pytest.mark.parametrize("cache", [True, False])
def test_backprop_stops_at_lowest_adapted_group(cache):
    model, w, batch, loss_fn = problem("conv4")
    x, y = batch(9)
    steps = 2
    p = Pattern.parse("00111x2")  # lowest adapted group: conv3
    with OpCounter() as c:
        adapt(model, w, x, y, loss_fn, p, ALPHA, cache_prefix=cache)
    layers = [(_conv_layer(inp), mask) for inp, _, mask in c.conv_backward]
    assert sorted(layers) == sorted([("conv3", (False, True, True)),
                                     ("conv4", (True, True, True))] * steps), layers
    # conv1/conv2 forward: once in total with caching, once per step without
    n_conv_fwd = c.counts["convolution"]
    assert n_conv_fwd == (2 + 2 * steps if cache else 4 * steps), c.counts
    # a schedule "full, then conv3+": the first step goes all the way down, later ones stop at conv3
    p2 = Pattern.parse("11111|00111")
    with OpCounter() as c2:
        adapt(model, w, x, y, loss_fn, p2, ALPHA, cache_prefix=cache)
    layers2 = sorted(_conv_layer(inp) for inp, _, _ in c2.conv_backward)
    assert layers2 == sorted(["conv1", "conv2", "conv3", "conv4", "conv3", "conv4"])
    # the first conv never computes a gradient for the (constant) images
    assert all(mask[0] is False for inp, _, mask in c2.conv_backward if _conv_layer(inp) == "conv1")


def test_personalized_metrics_adapts_then_measures():
    model, w, batch, loss_fn = problem("conv4")
    xa, ya = batch(10)
    xh, yh = batch(11, k=9)
    p = pattern_for(model, "full_then_head")
    m = personalized_metrics(model, loss_fn, w, xa, ya, xh, yh, p, ALPHA, classification=True)
    theta = reference_adapt(model, w, xa, ya, loss_fn, p, ALPHA)
    out = model.forward(theta, xh)
    assert abs(float(m["loss"]) - float(loss_fn(out, yh))) < 1e-10
    assert float(m["accuracy"]) == float(accuracy(out, yh))
    assert not m["loss"].requires_grad
    model2, w2, batch2, loss2 = problem("mlp")
    xa, ya = batch2(12)
    m2 = personalized_metrics(model2, loss2, cast(w2), xa, ya, xa, ya, Pattern.parse("none"),
                              ALPHA, classification=False)
    assert set(m2) == {"loss"}
    assert abs(float(m2["loss"]) - float(loss2(model2.forward(w2, xa), ya))) < 1e-12


@pytest.mark.parametrize("ctx", [torch.no_grad, torch.inference_mode])
def test_adaptation_works_under_no_grad_and_inference_mode(ctx):
    """Evaluation code may wrap adaptation in no_grad/inference_mode; torch.func.grad must still
    produce the same adapted parameters."""
    model, w, batch, loss_fn = problem("conv4")
    x, y = batch(13)
    p = pattern_for(model, "full_then_head")
    ref = adapt(model, w, x, y, loss_fn, p, ALPHA)
    with ctx():
        got = adapt(model, w, x, y, loss_fn, p, ALPHA)
    assert_params_equal(got, ref)
