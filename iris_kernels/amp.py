"""Autocast does not re-type the op's own products (issue 19).

Inside ``torch.autocast`` (accelerate's ``mixed_precision``, a user's ``with autocast():``
around a step) every ``F.linear`` / ``torch.mm`` / ``addmm`` is re-typed to the autocast dtype,
including the ones the backends use to form the logits and their gradients: the logits came out
in bf16 (a logit of 21.09 off by 0.03, beyond the per-token budget of 1e-4) and the backwards
mixed bf16 products into fp32 buffers (``scatter``/``index_copy_`` dtype errors). The op already
fixes the dtype of each of its products itself (fp32 accumulation and output from bf16/fp16
inputs, ``reference.linear_fp32``), so autocast has nothing to add: each backend's forward and
backward run with autocast disabled for the inputs' device type, and the op gives inside
autocast exactly what it gives outside (values, gradients and dtypes).

Why an explicit ``torch.autocast(device_type, enabled=False)`` scope and not
``torch.amp.custom_fwd`` / ``custom_bwd``: those take one ``device_type`` at decoration time
while the op serves CUDA, CPU and other devices; ``custom_fwd(cast_inputs=torch.float32)`` would
copy a bf16 [V, H] weight to fp32 and change the op's dtype contract, and without
``cast_inputs`` it leaves autocast on in the forward (the bug). The inputs need no cast here:
``linear_logprobs`` requires hidden, weight and bias of one dtype (outside autocast as inside),
and callers that mix an fp32 head with bf16 hidden states under autocast cast explicitly
(``train/modeling.output_projection``, ``integrations.trl.install_iris_head``).
"""
from __future__ import annotations

import contextlib
import functools

import torch


def autocast_off(device_type: str):
    """A context in which autocast is disabled for ``device_type`` (a no-op where autocast
    does not exist for that device)."""
    is_available = getattr(torch.amp, "is_autocast_available", None)
    if is_available is not None and not is_available(device_type):
        return contextlib.nullcontext()
    return torch.autocast(device_type, enabled=False)


def _device_type(args):
    for a in args:
        if isinstance(a, torch.Tensor):
            return a.device.type
    return None


def no_autocast(fn):
    """Run ``fn`` with autocast disabled for the device of its first tensor argument.

    For ``autograd.Function.forward`` / ``backward`` (ctx is skipped: it is not a tensor) and
    plain functions alike. Autograd runs a backward with the caller's autocast state, so the
    backward needs the scope as much as the forward.
    """

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        device_type = _device_type(args)
        if device_type is None:
            return fn(*args, **kwargs)
        with autocast_off(device_type):
            return fn(*args, **kwargs)

    return wrapper
