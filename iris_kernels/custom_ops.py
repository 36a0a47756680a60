"""The fused log-prob backends as ``torch.library`` custom ops, so ``torch.compile`` traces through them.

Why. ``TritonLinearLogprobs`` / ``ChunkedLinearLogprobs`` are Python ``autograd.Function``s whose
forward loops over chunks or launches Triton kernels on raw pointers; dynamo cannot (and should
not) look inside them, and an opaque call is a graph break. Registered as custom ops with fake
(meta) implementations and a registered autograd formula, they become single nodes of the graph:
dynamo and AOTAutograd need only their output shapes, and the backward graph calls the backward op.

What. Two ops, both thin wrappers that run the existing autograd.Function's own ``forward`` /
``backward`` with a stand-in ``ctx`` (so eager and compiled runs execute the very same kernels):

* ``iris_kernels::linear_logprobs_fwd(hidden, weight, targets, bias?, <params>, backend)
  -> (logp [N], lse [N], entropy [N] or [0], mean_z [N] or [0])`` — mean_z = E_p[z], the second
  statistic the backward needs with the entropy;
* ``iris_kernels::linear_logprobs_bwd(hidden, weight, targets, bias?, lse, mean_z, grad_logp?,
  grad_lse?, grad_entropy?, <params>, backend, need_hidden, need_weight, need_bias)
  -> (grad_hidden, grad_weight, grad_bias)``, each [0] when not needed (an op cannot return None).

``<params>`` are ``LogprobsParams``' fields as scalars (ignore_index, temperature, softcap,
return_entropy, chunk_size): a dataclass is not a schema type. They are compile-time constants.

When. ``linear_logprobs`` routes through the ops only while ``torch.compiler.is_compiling()``;
eager calls keep calling ``Function.apply`` directly (no dispatcher overhead, no change).
The ops are not differentiable twice (their backward has no autograd formula): a double
backward through a compiled step raises, as it does through the eager Functions.
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch
from torch import Tensor

from .autograd import TritonLinearLogprobs
from .chunked import ChunkedLinearLogprobs
from .types import LogprobsParams, accumulation_dtype

__all__ = ["linear_logprobs_op", "apply_backend"]

_FUNCTIONS = {"triton": TritonLinearLogprobs, "torch": ChunkedLinearLogprobs}


class _Ctx:
    """Stands in for autograd's ctx: the Functions only use save_for_backward / saved_tensors,
    needs_input_grad and plain attributes."""

    def __init__(self, needs_input_grad=(True, True, False, True, False)):
        self.needs_input_grad = needs_input_grad
        self.saved_tensors = ()

    def save_for_backward(self, *tensors):
        self.saved_tensors = tensors

    def mark_non_differentiable(self, *tensors):
        pass

    def set_materialize_grads(self, value):
        pass


def _params(ignore_index, temperature, softcap, return_entropy, chunk_size) -> LogprobsParams:
    return LogprobsParams(ignore_index=ignore_index, temperature=temperature, softcap=softcap,
                          return_entropy=return_entropy, chunk_size=chunk_size)


def _none_if_empty(t: Optional[Tensor]) -> Optional[Tensor]:
    return None if t is None or t.numel() == 0 else t


# The bodies run eagerly even when called from a compiled graph: dynamo must not re-trace the
# backends' Python (chunk loops, Triton launches, the Triton interpreter) from inside the op.
@torch.library.custom_op("iris_kernels::linear_logprobs_fwd", mutates_args=())
def linear_logprobs_fwd(
    hidden: Tensor, weight: Tensor, targets: Tensor, bias: Optional[Tensor],
    ignore_index: int, temperature: float, softcap: Optional[float], return_entropy: bool,
    chunk_size: Optional[int], backend: str,
) -> Tuple[Tensor, Tensor, Tensor, Tensor]:
    return _forward(hidden, weight, targets, bias, ignore_index, temperature, softcap, return_entropy,
                    chunk_size, backend)


@torch.compiler.disable
def _forward(hidden, weight, targets, bias, ignore_index, temperature, softcap, return_entropy, chunk_size, backend):
    ctx = _Ctx()
    params = _params(ignore_index, temperature, softcap, return_entropy, chunk_size)
    logp, lse, entropy = _FUNCTIONS[backend].forward(ctx, hidden, weight, targets, bias, params)
    mean_z = ctx.saved_tensors[5] if len(ctx.saved_tensors) > 5 else None
    if mean_z is None or not return_entropy:
        mean_z = lse.new_empty(0)
    if not return_entropy:
        entropy = lse.new_empty(0)
    # Outputs of a custom op may not alias each other or an input.
    return logp, lse, entropy, mean_z


@linear_logprobs_fwd.register_fake
def _(hidden, weight, targets, bias, ignore_index, temperature, softcap, return_entropy, chunk_size, backend):
    n = hidden.shape[0]
    acc = accumulation_dtype(hidden.dtype)
    full = hidden.new_empty(n, dtype=acc)
    stat = hidden.new_empty(n if return_entropy else 0, dtype=acc)
    return full, torch.empty_like(full), stat, torch.empty_like(stat)


@torch.library.custom_op("iris_kernels::linear_logprobs_bwd", mutates_args=())
def linear_logprobs_bwd(
    hidden: Tensor, weight: Tensor, targets: Tensor, bias: Optional[Tensor], lse: Tensor, mean_z: Tensor,
    grad_logp: Optional[Tensor], grad_lse: Optional[Tensor], grad_entropy: Optional[Tensor],
    ignore_index: int, temperature: float, softcap: Optional[float], return_entropy: bool,
    chunk_size: Optional[int], backend: str, need_hidden: bool, need_weight: bool, need_bias: bool,
) -> Tuple[Tensor, Tensor, Tensor]:
    return _backward_op(hidden, weight, targets, bias, lse, mean_z, grad_logp, grad_lse, grad_entropy, ignore_index,
                        temperature, softcap, return_entropy, chunk_size, backend, need_hidden, need_weight, need_bias)


@torch.compiler.disable
def _backward_op(hidden, weight, targets, bias, lse, mean_z, grad_logp, grad_lse, grad_entropy, ignore_index,
                 temperature, softcap, return_entropy, chunk_size, backend, need_hidden, need_weight, need_bias):
    ctx = _Ctx((need_hidden, need_weight, False, need_bias and bias is not None, False))
    ctx.params = _params(ignore_index, temperature, softcap, return_entropy, chunk_size)
    ctx.saved_tensors = (hidden, weight, targets, bias, lse, _none_if_empty(mean_z) if return_entropy else None)
    grads = _FUNCTIONS[backend].backward(ctx, grad_logp, grad_lse, grad_entropy)
    gh, gw, gb = grads[0], grads[1], grads[3]
    empty = hidden.new_empty(0)
    return (empty if gh is None else gh, empty.clone() if gw is None else gw,
            empty.clone() if gb is None else gb)


@linear_logprobs_bwd.register_fake
def _(hidden, weight, targets, bias, lse, mean_z, grad_logp, grad_lse, grad_entropy, ignore_index, temperature,
      softcap, return_entropy, chunk_size, backend, need_hidden, need_weight, need_bias):
    gh = torch.empty_like(hidden) if need_hidden else hidden.new_empty(0)
    gw = torch.empty_like(weight) if need_weight else hidden.new_empty(0)
    gb = torch.empty_like(bias) if (need_bias and bias is not None) else hidden.new_empty(0)
    return gh, gw, gb


_SCALARS = ("ignore_index", "temperature", "softcap", "return_entropy", "chunk_size", "backend")


def _setup_context(ctx, inputs, output):
    hidden, weight, targets, bias = inputs[:4]
    ctx.scalars = inputs[4:]
    ctx.has_bias = bias is not None
    _, lse, _, mean_z = output
    ctx.save_for_backward(hidden, weight, targets, bias, lse, mean_z)


def _backward(ctx, grad_logp, grad_lse, grad_entropy, _grad_mean_z):
    hidden, weight, targets, bias, lse, mean_z = ctx.saved_tensors
    need_h, need_w, _, need_b = ctx.needs_input_grad[:4]
    return_entropy = ctx.scalars[3]
    gh, gw, gb = linear_logprobs_bwd(
        hidden, weight, targets, bias, lse, mean_z,
        grad_logp, grad_lse, grad_entropy if return_entropy else None,
        *ctx.scalars, need_h, need_w, bool(need_b and ctx.has_bias),
    )
    return (gh if need_h else None, gw if need_w else None, None,
            gb if (need_b and ctx.has_bias) else None) + (None,) * len(_SCALARS)


linear_logprobs_fwd.register_autograd(_backward, setup_context=_setup_context)


def linear_logprobs_op(backend: str, hidden, weight, targets, bias, params: LogprobsParams):
    """(logp, lse, entropy) through the custom op; same contract as ``Function.apply``."""
    logp, lse, entropy, _ = linear_logprobs_fwd(
        hidden, weight, targets, bias, params.ignore_index, params.temperature, params.softcap,
        params.return_entropy, params.chunk_size, backend,
    )
    return logp, lse, entropy


def apply_backend(backend: str, hidden, weight, targets, bias, params: LogprobsParams):
    """``backend`` ("triton" or "torch"): its ``Function.apply`` in eager mode, the registered
    custom op while torch.compile traces."""
    if torch.compiler.is_compiling():
        return linear_logprobs_op(backend, hidden, weight, targets, bias, params)
    return _FUNCTIONS[backend].apply(hidden, weight, targets, bias, params)


# ----------------------------------------------------------------------------- tilted-risk kernels
# The losses' Triton path (ops/tilted_risk.py) launches its kernels from inside an autograd.Function
# that dynamo does trace (its torch path is plain tensor code); the two launches are made opaque
# here so that only they, not the Triton launcher, are hidden from the compiler.
@torch.library.custom_op("iris_kernels::tilted_risk_fwd", mutates_args=())
def tilted_risk_fwd_op(x: Tensor, t: Tensor, series_eps: float) -> Tuple[Tensor, Tensor]:
    return _tilted_fwd(x, t, series_eps)


@torch.compiler.disable
def _tilted_fwd(x, t, series_eps):
    from .ops import tilted_risk

    return tilted_risk.tilted_risk_fwd(x, t, series_eps)


@tilted_risk_fwd_op.register_fake
def _(x, t, series_eps):
    from .ops.tilted_risk import NUM_STATS

    return x.new_empty((), dtype=torch.float64), x.new_empty(NUM_STATS, dtype=torch.float64)


@torch.library.custom_op("iris_kernels::tilted_risk_bwd", mutates_args=())
def tilted_risk_bwd_op(x: Tensor, t: Tensor, stats: Tensor, grad: Tensor, grad_scale: float,
                       out_dtype: torch.dtype) -> Tensor:
    return _tilted_bwd(x, t, stats, grad, grad_scale, out_dtype)


@torch.compiler.disable
def _tilted_bwd(x, t, stats, grad, grad_scale, out_dtype):
    from .ops import tilted_risk

    return tilted_risk.tilted_risk_bwd(x, t, stats, grad, grad_scale, out_dtype)


@tilted_risk_bwd_op.register_fake
def _(x, t, stats, grad, grad_scale, out_dtype):
    return x.new_empty(x.shape[0], dtype=out_dtype)


class tilted_kernels:  # noqa: N801 - stands in for the ops.tilted_risk module in losses.py
    """``ops.tilted_risk``'s two entry points: direct kernel launches in eager mode, the custom
    ops above while torch.compile traces."""

    @staticmethod
    def tilted_risk_fwd(x, t, series_eps):
        if torch.compiler.is_compiling():
            return tilted_risk_fwd_op(x, t, series_eps)
        return _tilted_fwd(x, t, series_eps)

    @staticmethod
    def tilted_risk_bwd(x, t, stats, grad, grad_scale, out_dtype):
        if torch.compiler.is_compiling():
            return tilted_risk_bwd_op(x, t, stats, grad, float(grad_scale), out_dtype)
        return _tilted_bwd(x, t, stats, grad, grad_scale, out_dtype)
