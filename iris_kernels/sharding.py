"""Sharded lm_head weights at the public entry points (FSDP2 ``DTensor``, DeepSpeed ZeRO-3).

``linear_logprobs``, ``sequence_logprobs`` and ``SelfPlayLoss`` call :func:`full_weights` first,
so the backends only ever see plain, whole tensors.

Why the weight can arrive sharded. Under FSDP2 (``torch.distributed.fsdp.fully_shard``) a
parameter is a ``DTensor`` shard [V / world, H] outside its module's forward. When a trainer
reads ``self.lm_head.weight`` and hands it to the fused op instead of calling ``self.lm_head``
(the whole point of a fused lm-head loss), the head's forward never runs, so FSDP never gathers
it; with tied embeddings the body's forward gathers it and reshards it again before the loss.

Design: gather in the op, differentiably. A ``DTensor`` weight (or bias) becomes a full tensor
with ``DTensor.full_tensor(grad_placements=[Partial("avg")] * mesh.ndim)``: one all-gather in
forward; in backward the full [V, H] gradient is declared *pending an average over the ranks*,
so autograd reduce-scatters it (averaging over every mesh dimension) and the parameter receives
the sharded gradient ``DTensor`` that FSDP2 itself would have produced with its default
reduction (the mean over data-parallel ranks; FSDP adds its own reductions of the body's
gradients to the same ``.grad``, e.g. a tied embedding's). The gathered copy lives for the
call (and until backward), as it would inside the head's own forward.

Why not the owning module's unshard API (``FSDPModule.unshard``): the op receives a tensor,
not a module, and a parameter does not point back to its FSDP unit; unsharding would also rely
on FSDP's end-of-backward callback to reduce-scatter a group whose forward never ran. The
gather above needs nothing but the tensor. Its limit: it always averages; a model that changed
FSDP's reduction (``set_gradient_divide_factor``, or a sum instead of a mean) must gather the
weight itself (``weight.full_tensor(grad_placements=...)``) before calling the op.

The gathered weight keeps the shard's dtype. Under an FSDP2 ``MixedPrecisionPolicy`` whose
param_dtype differs from the stored dtype, the head's forward would have cast it; here the op's
dtype check asks for ``weight.to(hidden.dtype)`` (differentiable; the cast is local to the shard).

Out of scope: vocabulary-parallel (tensor-parallel) heads, where each rank should compute the
log-softmax over its own vocabulary slice and combine partial log-sum-exps; here a ``DTensor``
weight is always gathered whole, so every rank computes over the full vocabulary. A ``DTensor``
*hidden* (sequence/tensor-parallel activations) is refused with a TypeError.

DeepSpeed ZeRO-3 is not gathered here: outside a gathering context its parameters are empty
placeholders (``numel() == 0``, the real shape in ``ds_shape``) and the gather is DeepSpeed's
own collective on a module, so such a placeholder raises a ValueError naming the argument and
the context to use (``deepspeed.zero.GatheredParameters``), never a size error from inside.
A gathered ZeRO-3 weight must still be whole when the backward runs: ``GatheredParameters``
releases it when its ``with`` block ends, so a backward run after the block would read an empty
placeholder; :func:`guard_zero3_backward` turns that into a ValueError saying to run the backward
inside the block too (inside the DeepSpeed engine, DeepSpeed gathers it again for the backward).
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch

__all__ = ["full_weights", "check_not_distributed", "guard_zero3_backward"]


def _dtensor_type():
    # torch.distributed is optional in some builds; without it no tensor can be a DTensor.
    try:
        from torch.distributed.tensor import DTensor
    except ImportError:  # pragma: no cover - every supported torch build has it
        return None
    return DTensor


def _is_zero3_placeholder(t: torch.Tensor) -> bool:
    """A DeepSpeed ZeRO-3 parameter whose data is not gathered (only its partition is local).

    DeepSpeed tags its parameters with ``ds_id`` / ``ds_status`` (ZeroParamStatus: AVAILABLE,
    NOT_AVAILABLE, INFLIGHT) and keeps the full shape in ``ds_shape``; the tensor itself is an
    empty [0] placeholder until gathered. Checked by attribute, so deepspeed need not be installed.
    """
    if not (hasattr(t, "ds_id") or hasattr(t, "ds_status")):
        return False
    status = getattr(getattr(t, "ds_status", None), "name", None)
    return status not in (None, "AVAILABLE") or t.numel() == 0


def _gather(name: str, t: Optional[torch.Tensor], dtensor) -> Optional[torch.Tensor]:
    if t is None or not isinstance(t, torch.Tensor):
        return t  # None, or a non-tensor that the caller's validation rejects by name
    if dtensor is not None and isinstance(t, dtensor):
        from torch.distributed.tensor import Partial

        # Backward: the gradient of the full tensor is a per-rank partial result whose mean over
        # the ranks is the data-parallel gradient; redistributing Partial("avg") -> the weight's
        # own placements (Shard(0) under FSDP2) is a reduce-scatter, giving FSDP's sharded gradient.
        return t.full_tensor(grad_placements=[Partial("avg")] * t.device_mesh.ndim)
    if _is_zero3_placeholder(t):
        shape = tuple(getattr(t, "ds_shape", ()) or ())
        raise ValueError(
            f"{name} is a DeepSpeed ZeRO-3 parameter that is not gathered (local shape {tuple(t.shape)}, "
            f"full shape {shape or 'unknown'}). Call this inside the forward of the module that owns it "
            f"(run through the DeepSpeed engine), or wrap the call in "
            f"`with deepspeed.zero.GatheredParameters([{name}], modifier_rank=None):` "
            f"(a gradient then only flows inside the engine's forward)"
        )
    return t


def full_weights(hidden, /, **tensors: Optional[torch.Tensor]) -> Tuple[Optional[torch.Tensor], ...]:
    """The given weights/biases as whole tensors, in keyword order: ``w, b = full_weights(h, weight=w, bias=b)``.

    ``hidden`` (the activations of the same call) is only checked: a ``DTensor`` hidden raises
    TypeError (tensor/sequence parallelism is out of scope).

    * plain tensors and None pass through unchanged (no copy, no collective);
    * an FSDP2 ``DTensor`` (any mesh, e.g. Shard(0) over the data-parallel ranks) is gathered
      with ``full_tensor`` — one all-gather; differentiable, its backward delivers the averaged,
      sharded gradient (see the module docstring); every rank of the mesh must make the call;
    * a DeepSpeed ZeRO-3 placeholder raises ValueError naming the argument and how to gather it.

    The keyword names are used in error messages only.
    """
    check_not_distributed(hidden=hidden)
    dtensor = _dtensor_type()
    return tuple(_gather(name, t, dtensor) for name, t in tensors.items())


def check_not_distributed(**tensors: Optional[torch.Tensor]) -> None:
    """TypeError for a ``DTensor`` activation (tensor/sequence-parallel hidden states: out of scope)."""
    dtensor = _dtensor_type()
    if dtensor is None:
        return
    for name, t in tensors.items():
        if isinstance(t, dtensor):
            raise TypeError(
                f"{name} is a DTensor (placements {tuple(t.placements)}): tensor/sequence-parallel "
                f"activations are not supported (vocabulary-parallel heads are out of scope); pass the "
                f"local tensor of a data-parallel rank (e.g. {name}.full_tensor() or {name}.to_local())"
            )


def _is_zero3_param(t) -> bool:
    return isinstance(t, torch.Tensor) and (hasattr(t, "ds_id") or hasattr(t, "ds_status"))


class _Zero3BackwardGuard(torch.autograd.Function):
    """Identity on the op's outputs; its backward runs just before the op's and checks that
    the ZeRO-3 weights the op saved are still gathered (DeepSpeed empties a released parameter's
    data in place, so the op's own backward would fail with a bare size mismatch)."""

    @staticmethod
    def forward(ctx, names, params, *outputs):
        ctx.names, ctx.params = names, params
        return tuple(o.view_as(o) for o in outputs)

    @staticmethod
    def backward(ctx, *grads):
        for name, p in zip(ctx.names, ctx.params):
            if p.numel() == 0:
                shape = tuple(getattr(p, "ds_shape", ()) or ())
                raise ValueError(
                    f"{name} is a DeepSpeed ZeRO-3 parameter that was released before the backward (local shape "
                    f"{tuple(p.shape)}, full shape {shape or 'unknown'}): with "
                    f"`deepspeed.zero.GatheredParameters`, run the backward inside the same `with` block as the "
                    f"forward, or call the op inside the forward of a module run by the DeepSpeed engine, which "
                    f"gathers the weight again for the backward")
        return (None, None) + grads


def guard_zero3_backward(weights: dict, *outputs):
    """``outputs`` unchanged (None passes through), with a backward check that the DeepSpeed ZeRO-3
    parameters among ``weights`` (name -> tensor or None) are still gathered when the backward
    runs. Free (no autograd node) when no weight is a ZeRO-3 parameter."""
    found = [(n, w) for n, w in weights.items() if _is_zero3_param(w) and w.requires_grad]
    live = [o for o in outputs if o is not None and o.requires_grad]
    if not found or not live or not torch.is_grad_enabled():
        return outputs
    guarded = iter(_Zero3BackwardGuard.apply(tuple(n for n, _ in found), tuple(w for _, w in found), *live))
    return tuple(next(guarded) if (o is not None and o.requires_grad) else o for o in outputs)
