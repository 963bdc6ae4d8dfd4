"""Fast paths that must not change a single number: eager gradients (fedmaml.core.autodiff) against
torch.func and finite differences, and the forward-only max-pool against F.max_pool2d."""

import pytest
import torch
import torch.nn.functional as F

from fedmaml.core.autodiff import grad_and_value, in_transform
from fedmaml.models.base import _pool_views, max_pool_2x2


def _loss(p, x, y):
    h = torch.tanh(x @ p["w1"] + p["b1"])
    return ((h @ p["w2"] - y) ** 2).mean()


def _problem():
    g = torch.Generator().manual_seed(0)
    p = {"w1": torch.randn(3, 4, generator=g, dtype=torch.float64),
         "b1": torch.randn(4, generator=g, dtype=torch.float64),
         "w2": torch.randn(4, 2, generator=g, dtype=torch.float64)}
    x = torch.randn(5, 3, generator=g, dtype=torch.float64)
    y = torch.randn(5, 2, generator=g, dtype=torch.float64)
    return p, x, y


def test_eager_gradient_equals_torch_func_and_finite_differences():
    p, x, y = _problem()
    assert not in_transform()
    grads, value = grad_and_value(_loss, p, x, y)
    ref_grads, ref_value = torch.func.grad_and_value(_loss)(p, x, y)
    assert torch.equal(value, ref_value)
    for k in p:
        assert torch.allclose(grads[k], ref_grads[k], rtol=0, atol=1e-14), k
    eps = 1e-6
    for k in p:
        flat = p[k].flatten()
        for i in range(flat.numel()):
            plus, minus = flat.clone(), flat.clone()
            plus[i] += eps
            minus[i] -= eps
            fd = (_loss({**p, k: plus.view_as(p[k])}, x, y)
                  - _loss({**p, k: minus.view_as(p[k])}, x, y)) / (2 * eps)
            assert abs(float(fd) - float(grads[k].flatten()[i])) < 1e-8, (k, i)
    # the caller's tensors are untouched and the result is not part of any graph
    assert all(not t.requires_grad for t in p.values())
    assert not value.requires_grad and all(not g.requires_grad for g in grads.values())


def test_eager_gradient_under_no_grad_inference_mode_and_vmap():
    p, x, y = _problem()
    ref, _ = torch.func.grad_and_value(_loss)(p, x, y)
    for ctx in (torch.no_grad, torch.inference_mode):
        with ctx():
            got, _ = grad_and_value(_loss, p, x, y)
        for k in p:
            assert torch.allclose(got[k], ref[k], rtol=0, atol=1e-14), (ctx, k)
    # under vmap (the vectorized engine) the torch.func path runs: same values per batch element
    xs, ys = torch.stack([x, 2 * x]), torch.stack([y, -y])
    batched, _ = torch.func.vmap(lambda xi, yi: grad_and_value(_loss, p, xi, yi))(xs, ys)
    for i in range(2):
        single, _ = grad_and_value(_loss, p, xs[i], ys[i])
        for k in p:
            assert torch.allclose(batched[k][i], single[k], rtol=0, atol=1e-13), (i, k)


def test_an_unused_tensor_gets_a_zero_gradient_like_torch_func():
    p, x, y = _problem()
    p = {**p, "unused": torch.ones(3, dtype=torch.float64)}
    got, _ = grad_and_value(_loss, p, x, y)
    ref, _ = torch.func.grad_and_value(_loss)(p, x, y)
    assert torch.equal(got["unused"], torch.zeros(3, dtype=torch.float64))
    assert torch.equal(ref["unused"], got["unused"])


def test_edge_cases_autograd_refuses_give_what_torch_func_gives():
    p, x, y = _problem()
    # nothing to differentiate (a step whose groups hold no tensors), or a loss that ignores wrt
    grads, value = grad_and_value(lambda q, x_, y_: (x_ ** 2).sum(), {}, x, y)
    assert grads == {} and torch.equal(value, (x ** 2).sum())
    grads, _ = grad_and_value(lambda q, x_, y_: (x_ ** 2).sum(), {"w": p["w1"]}, x, y)
    assert torch.equal(grads["w"], torch.zeros_like(p["w1"]))
    # inputs made under inference_mode, used outside it
    with torch.inference_mode():
        x_inf, y_inf = x.clone(), y.clone()
    got, value = grad_and_value(_loss, p, x_inf, y_inf)
    ref, ref_value = torch.func.grad_and_value(_loss)(p, x, y)
    assert torch.equal(value, ref_value)
    assert all(torch.allclose(got[k], ref[k], rtol=0, atol=1e-14) for k in p)
    # a real error in the loss is still raised
    with pytest.raises(RuntimeError):
        grad_and_value(lambda q, x_, y_: q["w1"] @ y_, p, x, y)


@pytest.mark.parametrize("shape", [(2, 3, 8, 8), (2, 3, 7, 7), (1, 2, 5, 8), (3, 1, 1, 1)])
def test_forward_only_pool_equals_max_pool2d(shape):
    g = torch.Generator().manual_seed(1)
    h = torch.randn(*shape, generator=g).relu()  # ReLU zeros make ties, as in ConvBlock
    ref = F.max_pool2d(h, 2, ceil_mode=True)
    assert torch.equal(max_pool_2x2(h), ref)  # no gradient: the strided-views path
    with torch.no_grad():
        assert torch.equal(max_pool_2x2(h.requires_grad_()), ref)
    # vmapped over a leading batch dimension (the vectorized engine)
    hs = torch.stack([h.detach(), 2 * h.detach()])
    assert torch.equal(torch.func.vmap(max_pool_2x2)(hs),
                       torch.stack([ref, F.max_pool2d(2 * h.detach(), 2, ceil_mode=True)]))


def test_pool_gradients_equal_max_pool2d_on_either_path():
    """With a gradient flowing, F.max_pool2d runs; the strided-views path, had a reverse-mode
    gradient reached it, gives the same gradient wherever ties sit at ReLU's zeros."""
    g = torch.Generator().manual_seed(2)
    x = torch.randn(2, 3, 7, 7, generator=g, dtype=torch.float64)
    v = torch.randn(2, 3, 4, 4, generator=g, dtype=torch.float64)

    def ref(z):
        return (F.max_pool2d(torch.relu(z), 2, ceil_mode=True) * v).sum()

    def ours(z):
        return (max_pool_2x2(torch.relu(z)) * v).sum()

    def views(z):
        return (_pool_views(torch.relu(z)) * v).sum()

    assert torch.equal(torch.func.grad(ours)(x), torch.func.grad(ref)(x))
    assert torch.allclose(torch.func.grad(views)(x), torch.func.grad(ref)(x), rtol=0, atol=0)
