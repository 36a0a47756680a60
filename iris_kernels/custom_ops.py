"""The fused log-prob backends as ``torch.library`` custom ops, so ``torch.compile`` traces through them.

Why. ``TritonLinearLogprobs`` / ``ChunkedLinearLogprobs`` are Python ``autograd.Function``s whose
forward loops over chunks or launches Triton kernels on raw pointers; dynamo cannot (and should
not) look inside them, and an opaque call is a graph break. Registered as custom ops with fake
(meta) implementations and a registered autograd formula, they become single nodes of the graph:
dynamo and AOTAutograd need only their output shapes, and the backward graph calls the backward op.

What. Two ops, both thin wrappers that run the existing autograd.Function's own ``forward`` /
``backward`` with a stand-in ``ctx`` (so eager and compiled runs execute the very same kernels):

* ``iris_kernels::linear_logprobs_fwd(hidden, weight, targets, bias?, backend, <params>)
  -> (logp [N], lse [N], entropy [N] or [0], extras [N] or [0] each)``;
* ``iris_kernels::linear_logprobs_bwd(hidden, weight, targets, bias?, lse, extras, grad_logp?,
  grad_lse?, grad_entropy?, need_hidden, need_weight, need_bias, backend, <params>)
  -> (grad_hidden, grad_weight, grad_bias)``, each [0] when not needed (an op cannot return None).

``<params>`` are ``LogprobsParams``' fields as scalars (``PARAM_FIELDS``): a dataclass is not a
schema type. They are compile-time constants. ``extras`` are the statistics the Function saves
for its backward beyond lse (``SAVED_EXTRAS``), passed from the forward op to the backward op.

When. ``linear_logprobs`` routes through the ops only while ``torch.compiler.is_compiling()``;
eager calls keep calling ``Function.apply`` directly (no dispatcher overhead, no change).
The ops are not differentiable twice: the backward op's own backward raises a clear error.
"""
from __future__ import annotations

import math
from typing import List, Optional, Tuple

import torch
from torch import Tensor

from .autograd import TritonLinearLogprobs
from .chunked import ChunkedLinearLogprobs
from .frozen_head import FrozenHeadLinearLogprobs, frozen_head_applies
from .types import LogprobsParams, accumulation_dtype

__all__ = ["linear_logprobs_op", "apply_backend"]

_FUNCTIONS = {"triton": TritonLinearLogprobs, "torch": ChunkedLinearLogprobs}

# LogprobsParams' fields, in order, as the ops' scalar arguments (tests/test_compile.py checks
# that this matches the dataclass).
PARAM_FIELDS = ("ignore_index", "temperature", "softcap", "return_entropy", "chunk_size", "bwd", "compact",
                "workspace_bytes", "num_valid", "fwd")

# What each Function saves after (hidden, weight, targets, bias, lse): per-row [N] statistics in
# the accumulation dtype; True marks one that exists only with return_entropy (None otherwise).
# The fake implementation builds its outputs from this; opcheck in the tests compares it with
# the real forward, so a change of the Functions' saved tensors fails there, not silently.
SAVED_EXTRAS = {"triton": (False, True), "torch": (False, True)}  # lse_lo, per-row entropy H


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


def _params(*values) -> LogprobsParams:
    return LogprobsParams(**dict(zip(PARAM_FIELDS, values)))


# The bodies run eagerly even when called from a compiled graph: dynamo must not re-trace the
# backends' Python (chunk loops, Triton launches, the Triton interpreter) from inside the op.
@torch.library.custom_op("iris_kernels::linear_logprobs_fwd", mutates_args=())
def linear_logprobs_fwd(
    hidden: Tensor, weight: Tensor, targets: Tensor, bias: Optional[Tensor], backend: str,
    ignore_index: int, temperature: float, softcap: Optional[float], return_entropy: bool,
    chunk_size: Optional[int], bwd: str, compact: bool, workspace_bytes: int, num_valid: Optional[int],
    fwd: str,
) -> Tuple[Tensor, Tensor, Tensor, List[Tensor]]:
    return _forward(hidden, weight, targets, bias, backend, ignore_index, temperature, softcap, return_entropy,
                    chunk_size, bwd, compact, workspace_bytes, num_valid, fwd)


@torch.compiler.disable
def _forward(hidden, weight, targets, bias, backend, *scalars):
    ctx = _Ctx()
    params = _params(*scalars)
    # linear_logprobs skips its value checks of these floats while torch.compile traces (they
    # may be symbolic there); here they are concrete, so a compiled call still refuses bad ones.
    for name in ("temperature", "softcap"):
        value = getattr(params, name)
        if value is not None and not (math.isfinite(value) and value > 0):
            raise ValueError(f"{name} must be a finite number > 0, got {value}")
    logp, lse, entropy = _FUNCTIONS[backend].forward(ctx, hidden, weight, targets, bias, params)
    saved = ctx.saved_tensors
    if len(saved) != 5 + len(SAVED_EXTRAS[backend]) or saved[4] is not lse:
        raise RuntimeError(f"iris_kernels.custom_ops: the {backend} backend's saved tensors changed; "
                           "update SAVED_EXTRAS")
    # An op returns tensors only (no None) that alias neither each other nor an input: absent
    # statistics and the unused entropy are [0].
    extras = [lse.new_empty(0) if t is None else t for t in saved[5:]]
    if not params.return_entropy:
        entropy = lse.new_empty(0)
    return logp, lse, entropy, extras


@linear_logprobs_fwd.register_fake
def _(hidden, weight, targets, bias, backend, ignore_index, temperature, softcap, return_entropy, *rest):
    n = hidden.shape[0]
    acc = accumulation_dtype(hidden.dtype)

    def vec(present):
        return hidden.new_empty(n if present else 0, dtype=acc)

    extras = [vec(return_entropy or not entropy_only) for entropy_only in SAVED_EXTRAS[backend]]
    return vec(True), vec(True), vec(return_entropy), extras


@torch.library.custom_op("iris_kernels::linear_logprobs_bwd", mutates_args=())
def linear_logprobs_bwd(
    hidden: Tensor, weight: Tensor, targets: Tensor, bias: Optional[Tensor], lse: Tensor, extras: List[Tensor],
    grad_logp: Optional[Tensor], grad_lse: Optional[Tensor], grad_entropy: Optional[Tensor],
    need_hidden: bool, need_weight: bool, need_bias: bool, backend: str,
    ignore_index: int, temperature: float, softcap: Optional[float], return_entropy: bool,
    chunk_size: Optional[int], bwd: str, compact: bool, workspace_bytes: int, num_valid: Optional[int],
    fwd: str,
) -> Tuple[Tensor, Tensor, Tensor]:
    return _backward_op(hidden, weight, targets, bias, lse, extras, grad_logp, grad_lse, grad_entropy, need_hidden,
                        need_weight, need_bias, backend, ignore_index, temperature, softcap, return_entropy,
                        chunk_size, bwd, compact, workspace_bytes, num_valid, fwd)


@torch.compiler.disable
def _backward_op(hidden, weight, targets, bias, lse, extras, grad_logp, grad_lse, grad_entropy, need_hidden,
                 need_weight, need_bias, backend, *scalars):
    need_bias = need_bias and bias is not None
    ctx = _Ctx((need_hidden, need_weight, False, need_bias, False))
    ctx.params = params = _params(*scalars)
    saved_extras = [None if (entropy_only and not params.return_entropy) else t
                    for t, entropy_only in zip(extras, SAVED_EXTRAS[backend])]
    ctx.saved_tensors = (hidden, weight, targets, bias, lse, *saved_extras)
    grads = _FUNCTIONS[backend].backward(ctx, grad_logp, grad_lse, grad_entropy if params.return_entropy else None)
    gh, gw, gb = grads[0], grads[1], grads[3]
    return (hidden.new_empty(0) if gh is None else gh, hidden.new_empty(0) if gw is None else gw,
            hidden.new_empty(0) if gb is None else gb)


@linear_logprobs_bwd.register_fake
def _(hidden, weight, targets, bias, lse, extras, grad_logp, grad_lse, grad_entropy, need_hidden, need_weight,
      need_bias, *rest):
    gh = torch.empty_like(hidden) if need_hidden else hidden.new_empty(0)
    gw = torch.empty_like(weight) if need_weight else hidden.new_empty(0)
    gb = torch.empty_like(bias) if (need_bias and bias is not None) else hidden.new_empty(0)
    return gh, gw, gb


def _setup_context(ctx, inputs, output):
    # As in the Functions: an output nobody differentiates arrives as None, not as zeros that would
    # switch on its kernel path (issue 16, item 8); the backward op takes Optional gradients.
    ctx.set_materialize_grads(False)
    hidden, weight, targets, bias, backend = inputs[:5]
    ctx.backend, ctx.scalars, ctx.has_bias = backend, inputs[5:], bias is not None
    _, lse, _, extras = output
    ctx.num_extras = len(extras)
    ctx.save_for_backward(hidden, weight, targets, bias, lse, *extras)


def _backward(ctx, grad_logp, grad_lse, grad_entropy, _grad_extras):
    hidden, weight, targets, bias, lse, *extras = ctx.saved_tensors
    need_h, need_w, _, need_b = ctx.needs_input_grad[:4]
    need_b = bool(need_b and ctx.has_bias)
    gh, gw, gb = linear_logprobs_bwd(hidden, weight, targets, bias, lse, extras, grad_logp, grad_lse, grad_entropy,
                                     need_h, need_w, need_b, ctx.backend, *ctx.scalars)
    return (gh if need_h else None, gw if need_w else None, None, gb if need_b else None,
            None) + (None,) * len(PARAM_FIELDS)


linear_logprobs_fwd.register_autograd(_backward, setup_context=_setup_context)


def _no_second_backward(ctx, *grads):
    raise RuntimeError("double backward is not supported by the fused log-prob backends (their compiled "
                       "backward is one opaque op); use backend='reference'")


def _setup_nothing(ctx, inputs, output):
    pass


# The backward op differentiated again (create_graph=True through a compiled step): a clear error.
linear_logprobs_bwd.register_autograd(_no_second_backward, setup_context=_setup_nothing)


def linear_logprobs_op(backend: str, hidden, weight, targets, bias, params: LogprobsParams):
    """(logp, lse, entropy) through the custom op; same contract as ``Function.apply``."""
    logp, lse, entropy, _ = linear_logprobs_fwd(
        hidden, weight, targets, bias, backend, *(getattr(params, f) for f in PARAM_FIELDS))
    return logp, lse, entropy


def apply_backend(backend: str, hidden, weight, targets, bias, params: LogprobsParams):
    """``backend`` ("triton" or "torch"): its ``Function.apply`` in eager mode, the registered
    custom op while torch.compile traces. A triton call where only the hidden state needs a
    gradient takes the frozen-head path (frozen_head.py: two vocabulary products in all)."""
    if torch.compiler.is_compiling():
        return linear_logprobs_op(backend, hidden, weight, targets, bias, params)
    if backend == "triton" and frozen_head_applies(hidden, weight, bias, params):
        return FrozenHeadLinearLogprobs.apply(hidden, weight, targets, bias, params)
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


class tilted_kernels:  # noqa: N801 - stands in for the ops.tilted_risk module in tilted.py
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
