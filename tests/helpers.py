"""Shared test utilities for the meta-learning core: small float64 problems, an independent
"multiply the update by the mask" reference adaptation, and a dispatch-mode op counter.

The references here are deliberately naive (plain ``torch.autograd`` over *all* parameters, the
update multiplied by the pattern's 0/1 mask) so that they share no code path with
``fedmaml.core.adaptation`` beyond the model's forward function.
"""

from __future__ import annotations

import collections

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from fedmaml.core.losses import cross_entropy, mse
from fedmaml.core.patterns import Pattern
from fedmaml.models import conv4, mlp

@pytest.fixture(autouse=True, scope="module")
def single_thread():
    """These problems are tiny: intra-op threads only add overhead (and thrash badly on a loaded
    2-core machine: ~8x slower). Use one thread in the modules that import this fixture, then
    restore the previous setting."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


# -- small problems -------------------------------------------------------------------------------

MLP_SHAPE = (3,)
CONV_SHAPE = (1, 12, 12)  # 12 -> 6 -> 3 -> 2 -> 1 with ceil-mode pooling
NUM_CLASSES = 3


def cast(params, dtype=torch.float64):
    return {k: v.detach().to(dtype) for k, v in params.items()}


def small_mlp():
    """4 layer groups: 3-6-5-4-1, ReLU, regression."""
    return mlp(MLP_SHAPE, [6, 5, 4], 1)


def small_conv():
    """Conv-4, width 4, on 1x12x12 images, 3 classes: groups conv1..conv4, head."""
    return conv4(CONV_SHAPE, NUM_CLASSES, width=4)


def mlp_batch(seed: int, k: int = 7, dtype=torch.float64, lead: tuple[int, ...] = ()):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(*lead, k, *MLP_SHAPE, generator=g, dtype=torch.float64)
    y = torch.sin(x.sum(-1, keepdim=True) * 2.0) + 0.3 * torch.randn(*lead, k, 1, generator=g,
                                                                        dtype=torch.float64)
    return x.to(dtype), y.to(dtype)


def conv_batch(seed: int, k: int = 6, dtype=torch.float64, lead: tuple[int, ...] = ()):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(*lead, k, *CONV_SHAPE, generator=g, dtype=torch.float64)
    y = torch.randint(0, NUM_CLASSES, (*lead, k), generator=g)
    return x.to(dtype), y


# name -> (model factory, batch factory, loss)
PROBLEMS = {
    "mlp": (small_mlp, mlp_batch, mse),
    "conv4": (small_conv, conv_batch, cross_entropy),
}


def problem(name: str, dtype=torch.float64, seed: int = 0):
    make_model, make_batch, loss_fn = PROBLEMS[name]
    model = make_model()
    return model, cast(model.init(seed), dtype), make_batch, loss_fn


def random_like(params, seed: int, scale: float = 1.0):
    g = torch.Generator().manual_seed(seed)
    return {k: scale * torch.randn(v.shape, generator=g, dtype=torch.float64).to(v.dtype)
            for k, v in params.items()}


# -- independent references -----------------------------------------------------------------------

def group_of(model) -> dict[str, int]:
    return {n: g for g, names in enumerate(model.group_params) for n in names}


def reference_adapt(model, params, x, y, loss_fn, pattern: Pattern, alpha: float,
                    create_graph: bool = False):
    """Plain loop: gradient w.r.t. ALL parameters, update multiplied by the pattern's 0/1 mask.

    With ``create_graph=True`` the result is a differentiable function of ``params`` (which must
    then be leaves with ``requires_grad``); otherwise it is detached.
    """
    groups = group_of(model)
    if create_graph:
        theta = dict(params)
    else:
        theta = {k: v.detach().clone() for k, v in params.items()}
    for s in range(pattern.steps):
        row = pattern.rows[s]
        if not create_graph:
            theta = {k: v.detach().requires_grad_(True) for k, v in theta.items()}
        loss = loss_fn(model.forward(theta, x), y)
        names = list(theta)
        grads = torch.autograd.grad(loss, [theta[n] for n in names], create_graph=create_graph)
        theta = {n: theta[n] - alpha * float(row[groups[n]]) * g for n, g in zip(names, grads)}
        if not create_graph:
            theta = {k: v.detach() for k, v in theta.items()}
    return theta


def leaves(params):
    return {k: v.detach().clone().requires_grad_(True) for k, v in params.items()}


def reference_meta_grad(model, w, xs, ys, xq, yq, loss_fn, pattern, alpha):
    """``grad_w L(A(w); Q)`` through the masked, unrolled adaptation (create_graph)."""
    wl = leaves(w)
    adapted = reference_adapt(model, wl, xs, ys, loss_fn, pattern, alpha, create_graph=True)
    loss = loss_fn(model.forward(adapted, xq), yq)
    names = list(wl)
    grads = torch.autograd.grad(loss, [wl[n] for n in names], allow_unused=True)
    return {n: torch.zeros_like(wl[n]) if g is None else g for n, g in zip(names, grads)}


def reference_vjp(model, w, xs, ys, loss_fn, pattern, alpha, v):
    """``J_A(w)^T v`` through the masked, unrolled adaptation."""
    wl = leaves(w)
    adapted = reference_adapt(model, wl, xs, ys, loss_fn, pattern, alpha, create_graph=True)
    names = list(wl)
    out = [adapted[n] for n in names]
    grads = torch.autograd.grad(out, [wl[n] for n in names], grad_outputs=[v[n] for n in names],
                                allow_unused=True)
    return {n: torch.zeros_like(wl[n]) if g is None else g for n, g in zip(names, grads)}


def reference_grad(model, params, x, y, loss_fn):
    p = leaves(params)
    loss = loss_fn(model.forward(p, x), y)
    names = list(p)
    return dict(zip(names, torch.autograd.grad(loss, [p[n] for n in names])))


# -- comparisons ----------------------------------------------------------------------------------

def max_abs_diff(a, b) -> float:
    assert set(a) == set(b), (sorted(a), sorted(b))
    return max(float((a[k].detach() - b[k].detach()).abs().max()) for k in a)


def flat(p) -> torch.Tensor:
    return torch.cat([v.detach().reshape(-1) for v in p.values()])


def rel_err(a, b) -> float:
    fa, fb = flat(a), flat({k: b[k] for k in a})
    return float((fa - fb).norm() / fb.norm().clamp_min(1e-300))


def assert_params_close(a, b, atol: float, rtol: float = 0.0, what: str = ""):
    assert set(a) == set(b), (what, sorted(a), sorted(b))
    for k in a:
        assert a[k].shape == b[k].shape, (what, k, a[k].shape, b[k].shape)
        ok = torch.allclose(a[k].detach(), b[k].detach(), atol=atol, rtol=rtol)
        assert ok, (f"{what}: {k} differs by {float((a[k] - b[k]).abs().max()):.3e} "
                    f"(atol {atol}, rtol {rtol})")


def assert_params_equal(a, b, what: str = ""):
    assert set(a) == set(b), (what, sorted(a), sorted(b))
    for k in a:
        assert torch.equal(a[k], b[k]), (
            f"{what}: {k} not bitwise equal, max diff {float((a[k] - b[k]).abs().max()):.3e}")


# -- op counting ----------------------------------------------------------------------------------

class OpCounter(TorchDispatchMode):
    """Counts the aten ops that actually run (by overload-packet name, e.g. ``convolution``,
    ``convolution_backward``) and records every ``convolution_backward`` call as
    ``(input shape, weight shape, output_mask)``. Works under ``torch.func`` transforms: the mode
    sees the ops after the functorch layers have been unwrapped, i.e. the real work."""

    def __init__(self) -> None:
        super().__init__()
        self.counts: collections.Counter = collections.Counter()
        self.conv_backward: list[tuple[tuple[int, ...], tuple[int, ...], tuple[bool, ...]]] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = func.overloadpacket.__name__
        self.counts[name] += 1
        if name == "convolution_backward":
            mask = kwargs.get("output_mask", args[10] if len(args) > 10 else None)
            self.conv_backward.append((tuple(args[1].shape), tuple(args[2].shape),
                                       tuple(bool(b) for b in mask)))
        return func(*args, **kwargs)


class SimulatedClock:
    """``time.monotonic`` and ``time.sleep`` for a module that polls (monkeypatched in as its
    ``time``): time moves only when it sleeps, so its polling schedule is checked exactly, however
    loaded the machine is."""

    def __init__(self) -> None:
        self.now, self.sleeps = 0.0, []

    def monotonic(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        self.sleeps.append(seconds)
        self.now += seconds
