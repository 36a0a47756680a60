"""Pure-PyTorch chunked backend: any device, memory O(chunk x V), recomputation in backward.

Forward walks the tokens in chunks, materialising one chunk's logits at a time, and keeps only
the fp32 log-sum-exp (and, for entropy, the entropy H itself) per token. Backward recomputes each
chunk's logits and forms the gradient from the saved statistics. Nothing of size [N, V] is ever
alive. Logits are fp32 from bf16/fp16 inputs too (``linear_fp32``): never rounded to the input
dtype, in the forward or in the backward's recomputation.

Gradients (z = softcap(r)/tau, r = h W^T + b, p = softmax(z), per token with upstream grads
c_lp for log p(y), c_lse for lse and c_ent for the entropy Hk):
    d logp / dz = onehot(y) - p
    d lse  / dz = p
    d Hk   / dz = -p * (log p + Hk)         (Hk = -sum p log p; d(-p_j log p_j)/dz_i and
                                             sum_j p_j = 1 give -p_i (log p_i + Hk))
    which equals -p * (z - E_p[z]) but needs no E_p[z]: log p = z - lse and Hk are both small
    where z, lse and E_p[z] carry a common offset, so nothing of the offset's size cancels.
    dz / dr     = (1 - tanh^2(r/cap)) / tau = (1 - (z*tau/cap)^2) / tau   (1/tau without a cap)
    dh = grad_r @ W,  dW = grad_r^T @ h,  db = sum_k grad_r[k]
"""
from __future__ import annotations

from typing import Optional

import torch

from .amp import no_autocast
from .double_backward import no_double_backward
from .reference import (
    entropy_from_shifted_sums,
    finalize_logprobs,
    linear_fp32,
    masked_entropy,
    safe_targets,
    split_lse,
    transform_logits,
)
from .tuning import torch_chunk_size
from .types import LogprobsParams, accumulation_dtype


def chunk_size_for(vocab_size: int, params: LogprobsParams, device: Optional[torch.device] = None) -> int:
    """Tokens per chunk: ``params.chunk_size``, else 16 MiB of fp32 logits on CPU and the
    workspace budget on CUDA (tuning.torch_chunk_size)."""
    if params.chunk_size is not None:
        return params.chunk_size
    return torch_chunk_size(vocab_size, device, params.workspace_bytes)


def valid_rows(targets: torch.Tensor, vocab_size: int, ignore_index: int) -> torch.Tensor:
    """Rows that carry a gradient: not ignored and with an in-range target."""
    return (targets != ignore_index) & (targets >= 0) & (targets < vocab_size)


def live_rows(row_ok, targets, grad_logp, grad_lse, grad_entropy, params):
    """Rows that receive any upstream gradient; the others must contribute exactly zero."""
    live = row_ok & (grad_logp != 0) if grad_logp is not None else torch.zeros_like(row_ok)
    if grad_lse is not None:
        live = live | (grad_lse != 0)
    if grad_entropy is not None:
        live = live | ((grad_entropy != 0) & (targets != params.ignore_index))
    return live


def matmul_operands(weight, bias):
    """The weight and bias the chunk products read: fp32 copies of bf16/fp16 ones on the CPU.

    The chunk logits must come out in fp32 (``linear_fp32``). On CUDA that is a cuBLAS product
    with fp32 output from the original operands; on the CPU upcasting the weight once per call
    (V x H x 4 bytes, freed when the call ends) beats upcasting it per chunk and beats the bf16
    CPU GEMM (timings in the issue-9 note).
    """
    if weight.device.type == "cuda" or weight.dtype == accumulation_dtype(weight.dtype):
        return weight, bias
    acc = accumulation_dtype(weight.dtype)
    return weight.to(acc), None if bias is None else bias.to(acc)


def _chunk_logits(h, weight, bias, params):
    raw = linear_fp32(h, weight, bias)
    return transform_logits(raw, params, inplace=True)  # a fresh buffer: transform it in place


def logits_grad(
    z: torch.Tensor,
    targets: torch.Tensor,
    lse: torch.Tensor,
    lse_lo: torch.Tensor,
    entropy: Optional[torch.Tensor],
    grad_logp: Optional[torch.Tensor],
    grad_lse: Optional[torch.Tensor],
    grad_entropy: Optional[torch.Tensor],
    row_ok: torch.Tensor,
    params: LogprobsParams,
) -> torch.Tensor:
    """d(loss)/d(raw logits) for one chunk, from the recomputed logits z and the saved stats.

    ``entropy`` is the saved per-row entropy H (unmasked); log p = (z - lse) - lse_lo, in two
    steps (lse + lse_lo would round back to lse), is exact at a large common logit offset.
    Consumes z: the gradient is written over it, so a chunk costs one [chunk, V] buffer (two
    with the entropy, three with the entropy and a soft-cap, whose chain needs z to the end).
    """
    # Every term but the one-hot is a per-row multiple of p: (c_lse - c_lp) * p.
    coef = torch.zeros_like(lse)
    c_lp = None
    if grad_logp is not None:
        c_lp = torch.where(row_ok, grad_logp, torch.zeros_like(grad_logp))
        coef -= c_lp
    if grad_lse is not None:
        coef += grad_lse
    if grad_entropy is not None:
        ignored = targets == params.ignore_index
        c_ent = torch.where(ignored, torch.zeros_like(grad_entropy), grad_entropy)
        # -c_ent * p * (log p + H) (derivation in the module docstring).
        log_p = z - lse[:, None] if params.softcap is not None else z.sub_(lse[:, None])
        log_p.sub_(lse_lo[:, None])
        p = torch.exp(log_p)
        entropy_term = log_p.add_(entropy[:, None]).mul_(p)
        # p = 0 where z = -inf: that term is 0, not 0 * inf = NaN.
        entropy_term.masked_fill_(p == 0, 0.0)
        grad = p.mul_(coef[:, None]).sub_(entropy_term.mul_(c_ent[:, None]))
        del entropy_term, log_p
    elif params.softcap is not None:
        # z is still needed for the cap
        grad = (z - lse[:, None]).sub_(lse_lo[:, None]).exp_().mul_(coef[:, None])
    else:
        grad = z.sub_(lse[:, None]).sub_(lse_lo[:, None]).exp_().mul_(coef[:, None])
    if c_lp is not None:
        grad.scatter_add_(1, safe_targets(targets, grad.shape[1])[:, None].long(), c_lp[:, None])
    # Chain through the soft-cap, 1 - (z tau / cap)^2, and the temperature.
    if params.softcap is not None:
        grad.mul_(z.mul_(params.temperature / params.softcap).square_().neg_().add_(1.0))
    if params.temperature != 1.0:
        grad.div_(params.temperature)
    return grad


class ChunkedLinearLogprobs(torch.autograd.Function):
    """hidden [N, H], weight [V, H], targets [N], bias [V] | None -> (logp, lse, entropy) fp32 [N]."""

    @staticmethod
    @no_autocast  # the chunk products fix their own dtypes (amp.py)
    def forward(ctx, hidden, weight, targets, bias, params: LogprobsParams):
        N, V = hidden.shape[0], weight.shape[0]
        chunk = chunk_size_for(V, params, hidden.device)
        acc = accumulation_dtype(hidden.dtype)
        logp = torch.empty(N, dtype=acc, device=hidden.device)
        lse = torch.empty_like(logp)
        lse_lo = torch.empty_like(logp)  # the fp32 lse's rounding error (reference.split_lse)
        # The per-row entropy H (not E_p[z]): the backward's entropy term needs only H and lse.
        entropy_rows = torch.empty_like(logp) if params.return_entropy else None
        safe = safe_targets(targets, V)
        w_mm, b_mm = matmul_operands(weight, bias)
        for start in range(0, N, chunk):
            sl = slice(start, start + chunk)
            z = _chunk_logits(hidden[sl], w_mm, b_mm, params)
            target_z = z.gather(1, safe[sl, None].long()).squeeze(1)
            # Shift by the row max m in place (z - m is exact in fp32 next to m); a row of -inf
            # logits shifts by 0, giving lse = log 0 = -inf, not NaN.
            top = z.amax(dim=1)
            top = torch.where(torch.isneginf(top), torch.zeros_like(top), top)
            shifted = z.sub_(top[:, None])
            if entropy_rows is not None:
                # S = sum e^(z-m), T = sum e^(z-m) (z-m); H = log S - T/S has no offset to cancel.
                e = torch.exp(shifted)
                sum_exp = e.sum(dim=1)
                # e = 0 where z - m = -inf: clamping gives 0 * finite = 0, not 0 * -inf = NaN.
                sum_exp_z = e.mul_(shifted.clamp_(min=torch.finfo(shifted.dtype).min)).sum(dim=1)
                del e
                entropy_rows[sl] = entropy_from_shifted_sums(sum_exp, sum_exp_z)
            else:
                sum_exp = shifted.exp_().sum(dim=1)  # in place: no second [chunk, V] buffer
            lse_c, lo_c = split_lse(top, sum_exp.log())
            lse[sl], lse_lo[sl] = lse_c, lo_c
            logp[sl] = (target_z - lse_c) - lo_c  # two steps: lse_c + lo_c would round to lse_c
            del z
        logp = finalize_logprobs(logp, targets, V, params.ignore_index)
        if entropy_rows is not None:
            entropy = masked_entropy(entropy_rows, targets, params.ignore_index)
        else:
            entropy = torch.empty(0, dtype=acc, device=hidden.device)
        ctx.params = params
        ctx.save_for_backward(hidden, weight, targets, bias, lse, lse_lo, entropy_rows)
        return logp, lse, entropy

    @staticmethod
    @no_double_backward("torch", supported_by="reference")
    @no_autocast
    def backward(ctx, grad_logp, grad_lse, grad_entropy):
        hidden, weight, targets, bias, lse, lse_lo, entropy_rows = ctx.saved_tensors
        params: LogprobsParams = ctx.params
        if not params.return_entropy:
            grad_entropy = None
        N, V = hidden.shape[0], weight.shape[0]
        chunk = chunk_size_for(V, params, hidden.device)
        need_h, need_w, _, need_b, _ = ctx.needs_input_grad
        grad_h = torch.empty_like(hidden) if need_h else None
        # fp32 accumulation of the weight (and bias) gradient whatever the input dtype.
        acc = accumulation_dtype(hidden.dtype)
        grad_w = torch.zeros(weight.shape, dtype=acc, device=weight.device) if need_w else None
        grad_b = torch.zeros(V, dtype=acc, device=weight.device) if need_b else None
        row_ok = valid_rows(targets, V, params.ignore_index)
        live = live_rows(row_ok, targets, grad_logp, grad_lse, grad_entropy, params)
        w_mm, b_mm = matmul_operands(weight, bias)
        for start in range(0, N, chunk):
            sl = slice(start, start + chunk)
            h = hidden[sl]
            z = _chunk_logits(h, w_mm, b_mm, params)
            g = logits_grad(
                z,
                targets[sl],
                lse[sl],
                lse_lo[sl],
                None if entropy_rows is None else entropy_rows[sl],
                None if grad_logp is None else grad_logp[sl],
                None if grad_lse is None else grad_lse[sl],
                None if grad_entropy is None else grad_entropy[sl],
                row_ok[sl],
                params,
            )
            del z
            # Rows without upstream gradient add nothing, even with a NaN hidden state.
            g.masked_fill_(~live[sl, None], 0.0)
            if grad_h is not None:
                # fp32 product where the weight is fp32 here (CPU); on CUDA a tensor-core product
                # of g rounded to the input dtype, whose error is that of the bf16 result itself.
                grad_h[sl] = (g.to(w_mm.dtype) @ w_mm).to(hidden.dtype)
            if grad_w is not None:
                grad_w.addmm_(g.t(), torch.where(live[sl, None], h, 0.0).to(acc))
            if grad_b is not None:
                grad_b += g.sum(0)
            # Free this chunk's buffer before the next chunk's logits are allocated.
            del g
        grad_w = None if grad_w is None else grad_w.to(weight.dtype)
        grad_b = None if grad_b is None else grad_b.to(bias.dtype)
        return grad_h, grad_w, None, grad_b, None
