"""Gradients of a scalar loss with respect to a parameter dict, in eager mode and under torch.func.

``torch.func.grad`` is what makes the client updates vmappable and differentiable (second order),
but on its own it costs ~120 us of Python per call (pytree flattening, tensor wrapping), more than
the gradient itself for a linear head or a small MLP. Outside any ``torch.func`` transform the same
gradient comes from ``torch.autograd.grad`` on fresh leaves, which runs the same backward kernels
without that overhead; inside a transform (``vmap`` by the vectorized engine, ``vjp`` for second
order) we must use ``torch.func.grad``.
"""

from __future__ import annotations

from typing import Callable

import torch
from torch import Tensor

from fedmaml.core.params import Params, detach


def in_transform() -> bool:
    """Whether a ``torch.func`` transform (vmap, grad, vjp, ...) is active."""
    return torch._C._functorch.peek_interpreter_stack() is not None


def grad_and_value(fn: Callable[..., Tensor], wrt: Params, *args) -> tuple[Params, Tensor]:
    """``(d fn(wrt, *args) / d wrt, fn(wrt, *args))``, like ``torch.func.grad_and_value(fn)``.

    ``wrt``'s tensors are treated as new leaves. Everything else ``fn`` sees must be a constant (no
    part of an outer autograd graph): the eager path returns results detached from any graph, so
    for gradients that must stay differentiable use ``torch.func`` directly.
    """
    if in_transform() or torch.is_inference_mode_enabled():  # inference tensors refuse autograd
        return torch.func.grad_and_value(fn)(detach(wrt), *args)
    leaves = {k: v.detach().requires_grad_() for k, v in wrt.items()}
    try:
        with torch.enable_grad():
            value = fn(leaves, *args)
            if not leaves or not value.requires_grad:  # nothing to differentiate: zero gradients
                return {k: torch.zeros_like(v) for k, v in leaves.items()}, value.detach()
            grads = torch.autograd.grad(value, list(leaves.values()), allow_unused=True)
    except RuntimeError:
        # Autograd refuses some inputs torch.func accepts (inference tensors made earlier); a real
        # error in ``fn`` is raised again by torch.func, with the same message.
        return torch.func.grad_and_value(fn)(detach(wrt), *args)
    # an unused tensor has a zero gradient, as torch.func.grad reports it
    return ({k: torch.zeros_like(v) if g is None else g
             for (k, v), g in zip(leaves.items(), grads)}, value.detach())
