"""A clear error, at the second differentiation, for backward passes that are not differentiable.

The fused backends compute their gradients with kernels (or in-place chunk arithmetic) that
autograd cannot see. Left alone, differentiating such a gradient again (gradient penalties,
Hessian-vector products, meta-learning) silently drops this function's curvature: the result
is the curvature of the other terms only. ``torch.autograd.function.once_differentiable`` does
not help there: it raises only when an upstream gradient itself requires grad, and in
``grad(logp.sum() + f(x), x, create_graph=True)`` the upstream gradient of ``logp`` is a
constant, while the missing dependence is on the saved inputs.

``no_double_backward`` runs the wrapped backward under ``torch.no_grad()`` and, when the caller
builds a graph (``create_graph=True``) and any upstream gradient or saved tensor requires grad,
routes the computed gradients through an identity node whose own backward raises. The first
backward is unchanged (same values, no copies); the error comes only if that node is reached.
"""
from __future__ import annotations

import functools
from typing import Callable, Union

import torch


def double_backward_message(backend: str, supported_by: str) -> str:
    return f"double backward is not supported by backend '{backend}'; use backend='{supported_by}'"


class _RaiseOnBackward(torch.autograd.Function):
    """Identity on the first ``count`` tensors; differentiating through it raises."""

    @staticmethod
    def forward(ctx, message, count, *tensors):
        ctx.message = message
        # detach(): new tensors sharing storage (no copy); the others are only graph edges.
        return tuple(t.detach() for t in tensors[:count])

    @staticmethod
    def backward(ctx, *grads):
        raise RuntimeError(ctx.message)


def no_double_backward(backend: Union[str, Callable], supported_by: str):
    """Decorator for the ``backward`` staticmethod of an autograd.Function.

    ``backend`` is the backend's name, or a callable ``ctx -> name`` when one Function serves
    several backends; ``supported_by`` names the backend whose gradient is differentiable.
    """

    def decorate(backward):
        @functools.wraps(backward)
        def wrapper(ctx, *grad_outputs):
            with torch.no_grad():
                grads = backward(ctx, *grad_outputs)
            if not torch.is_grad_enabled():
                return grads  # an ordinary backward: nothing to guard
            sources = [t for t in (*grad_outputs, *ctx.saved_tensors)
                       if isinstance(t, torch.Tensor) and t.requires_grad]
            present = [i for i, g in enumerate(grads) if isinstance(g, torch.Tensor)]
            if not sources or not present:
                return grads
            name = backend(ctx) if callable(backend) else backend
            guarded = _RaiseOnBackward.apply(
                double_backward_message(name, supported_by), len(present),
                *(grads[i] for i in present), *sources,
            )
            out = list(grads)
            for i, g in zip(present, guarded):
                out[i] = g
            return tuple(out)

        return wrapper

    return decorate
