"""autograd.Function glue between the Triton kernels and PyTorch.

Forward: one launch of the log-sum-exp kernel (the logits never leave registers) and a merge of
the per-split statistics; saves only hidden, weight, bias, targets and the fp32 lse (N floats),
plus the per-row entropy H (N floats) when the entropy is asked for.
Backward: one launch of the recompute-and-accumulate kernel for any upstream gradient.
"""
from __future__ import annotations

import os

import torch

from .chunked import valid_rows
from .ops.logprobs_bwd import logprobs_bwd
from .ops.logprobs_fwd import logprobs_fwd
from .double_backward import no_double_backward
from .reference import finalize_logprobs, masked_entropy
from .types import LogprobsParams


def interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


# (BLOCK_N, BLOCK_V, BLOCK_H, num_warps) for the compiled kernels: the largest tiles that ptxas
# fits in 255 registers without spilling for sm_90 with every feature flag on (the backward also
# holds the gradient tile and the live-row mask, hence its narrower hidden step);
# tests/test_kernels_compile.py checks this without a GPU. Not yet timed on hardware.
GPU_FWD_TILES = (128, 128, 32, 8)
GPU_BWD_TILES = (64, 128, 16, 8)
# The interpreter's cost grows with programs x loop steps, not FLOPs: few, large tiles.
INTERPRETER_TILES = (32, 128, 64, 4)


def tile_config(hidden: torch.Tensor, forward: bool):
    if interpreting() or hidden.device.type != "cuda":
        return INTERPRETER_TILES
    return GPU_FWD_TILES if forward else GPU_BWD_TILES


class TritonLinearLogprobs(torch.autograd.Function):
    """hidden [N, H], weight [V, H] (row-contiguous), targets [N], bias [V] | None -> fp32 [N] x 3."""

    @staticmethod
    def forward(ctx, hidden, weight, targets, bias, params: LogprobsParams):
        V = weight.shape[0]
        upcast = interpreting()
        lse, target_z, entropy_rows, lse_lo = logprobs_fwd(
            hidden, weight, targets, bias,
            inv_temperature=1.0 / params.temperature,
            softcap=params.softcap,
            with_entropy=params.return_entropy,
            upcast=upcast,
            tiles=tile_config(hidden, forward=True),
            with_lse_lo=True,
        )
        # Two steps: lse + lse_lo would round back to lse (exact at a large logit offset).
        logp = finalize_logprobs((target_z - lse) - lse_lo, targets, V, params.ignore_index)
        if params.return_entropy:
            entropy = masked_entropy(entropy_rows, targets, params.ignore_index)
        else:
            entropy = torch.empty(0, dtype=torch.float32, device=hidden.device)
        ctx.params = params
        ctx.save_for_backward(hidden, weight, targets, bias, lse, lse_lo, entropy_rows)
        return logp, lse, entropy

    @staticmethod
    @no_double_backward("triton", supported_by="reference")
    def backward(ctx, grad_logp, grad_lse, grad_entropy):
        hidden, weight, targets, bias, lse, lse_lo, entropy_rows = ctx.saved_tensors
        params: LogprobsParams = ctx.params
        need_h, need_w, _, need_b, _ = ctx.needs_input_grad
        V = weight.shape[0]
        zeros = torch.zeros_like(lse)
        # A constant output (0.0 at ignored rows, NaN at out-of-range targets) has no gradient.
        row_ok = valid_rows(targets, V, params.ignore_index)
        grad_logp = zeros if grad_logp is None else torch.where(row_ok, grad_logp.float(), zeros)
        if grad_lse is not None:
            grad_lse = grad_lse.float().contiguous()
        if params.return_entropy and grad_entropy is not None:
            ignored = targets == params.ignore_index
            grad_entropy = torch.where(ignored, zeros, grad_entropy.float())
        else:
            grad_entropy = None
        grad_h, grad_w, grad_b = logprobs_bwd(
            hidden, weight, targets, bias, lse, entropy_rows,
            grad_logp.contiguous(), grad_lse, grad_entropy,
            need_hidden=need_h, need_weight=need_w, need_bias=need_b and bias is not None,
            inv_temperature=1.0 / params.temperature,
            softcap=params.softcap,
            temperature=params.temperature,
            upcast=interpreting(),
            tiles=tile_config(hidden, forward=False),
            lse_lo=lse_lo,
        )
        return (
            None if grad_h is None else grad_h.to(hidden.dtype),
            None if grad_w is None else grad_w.to(weight.dtype),
            None,
            None if grad_b is None else grad_b.to(bias.dtype),
            None,
        )
