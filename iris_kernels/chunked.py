"""Pure-PyTorch chunked backend: any device, memory O(chunk x V), recomputation in backward.

Forward walks the tokens in chunks, materialising one chunk's logits at a time, and keeps only
the fp32 log-sum-exp (and, for entropy, E_p[z]) per token. Backward recomputes each chunk's logits
and forms the gradient from the saved statistics. Nothing of size [N, V] is ever alive.

Gradients (z = softcap(r)/tau, r = h W^T + b, p = softmax(z), per token with upstream grads
c_lp for log p(y), c_lse for lse and c_ent for the entropy Hk):
    d logp / dz = onehot(y) - p
    d lse  / dz = p
    d Hk   / dz = -p * (z - E_p[z])         (Hk = lse - E_p[z]; differentiate both terms)
    dz / dr     = (1 - tanh^2(r/cap)) / tau = (1 - (z*tau/cap)^2) / tau   (1/tau without a cap)
    dh = grad_r @ W,  dW = grad_r^T @ h,  db = sum_k grad_r[k]
"""
from __future__ import annotations

from typing import Optional

import torch

from .reference import entropy_from_stats, finalize_logprobs, safe_targets, transform_logits
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


def _chunk_logits(h, weight, bias, params):
    raw = torch.nn.functional.linear(h, weight, bias).to(accumulation_dtype(h.dtype))
    return transform_logits(raw, params, inplace=True)  # a fresh buffer: transform it in place


def logits_grad(
    z: torch.Tensor,
    targets: torch.Tensor,
    lse: torch.Tensor,
    mean_z: Optional[torch.Tensor],
    grad_logp: Optional[torch.Tensor],
    grad_lse: Optional[torch.Tensor],
    grad_entropy: Optional[torch.Tensor],
    row_ok: torch.Tensor,
    params: LogprobsParams,
) -> torch.Tensor:
    """d(loss)/d(raw logits) for one chunk, from the recomputed logits z and the saved stats.

    Consumes z: the gradient is written over it, so a chunk costs one [chunk, V] buffer (two
    with the entropy, whose term needs z next to p).
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
        p = torch.exp(z - lse[:, None])
        # p = 0 where z = -inf: that term is 0, not 0 * inf = NaN.
        entropy_term = torch.where(p > 0, p * (z - mean_z[:, None]), 0.0)
        grad = p.mul_(coef[:, None]).sub_(entropy_term.mul_(c_ent[:, None]))
        del entropy_term
    elif params.softcap is not None:
        grad = torch.exp(z - lse[:, None]).mul_(coef[:, None])  # z is still needed for the cap
    else:
        grad = z.sub_(lse[:, None]).exp_().mul_(coef[:, None])
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
    def forward(ctx, hidden, weight, targets, bias, params: LogprobsParams):
        N, V = hidden.shape[0], weight.shape[0]
        chunk = chunk_size_for(V, params, hidden.device)
        acc = accumulation_dtype(hidden.dtype)
        logp = torch.empty(N, dtype=acc, device=hidden.device)
        lse = torch.empty_like(logp)
        mean_z = torch.empty_like(logp) if params.return_entropy else None
        safe = safe_targets(targets, V)
        for start in range(0, N, chunk):
            sl = slice(start, start + chunk)
            z = _chunk_logits(hidden[sl], weight, bias, params)
            target_z = z.gather(1, safe[sl, None].long()).squeeze(1)
            if mean_z is not None:
                lse_c = torch.logsumexp(z, dim=-1)
                p = torch.softmax(z, dim=-1)  # renormalised: exp(z - lse) drifts when |z| is huge
                mean_z[sl] = torch.where(p > 0, p * z, 0.0).sum(-1)
                del p
            else:
                # log-sum-exp in place over the chunk's logits (no second [chunk, V] buffer);
                # a row of -inf logits shifts by 0, giving lse = log 0 = -inf, not NaN.
                top = z.amax(dim=1)
                top = torch.where(torch.isneginf(top), torch.zeros_like(top), top)
                lse_c = top + z.sub_(top[:, None]).exp_().sum(dim=1).log_()
            lse[sl] = lse_c
            logp[sl] = target_z - lse_c
            del z
        logp = finalize_logprobs(logp, targets, V, params.ignore_index)
        if mean_z is not None:
            entropy = entropy_from_stats(lse, mean_z, targets, params.ignore_index)
        else:
            entropy = torch.empty(0, dtype=acc, device=hidden.device)
        ctx.params = params
        ctx.save_for_backward(hidden, weight, targets, bias, lse, mean_z)
        return logp, lse, entropy

    @staticmethod
    def backward(ctx, grad_logp, grad_lse, grad_entropy):
        hidden, weight, targets, bias, lse, mean_z = ctx.saved_tensors
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
        for start in range(0, N, chunk):
            sl = slice(start, start + chunk)
            h = hidden[sl]
            z = _chunk_logits(h, weight, bias, params)
            g = logits_grad(
                z,
                targets[sl],
                lse[sl],
                None if mean_z is None else mean_z[sl],
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
                grad_h[sl] = (g.to(weight.dtype) @ weight).to(hidden.dtype)
            if grad_w is not None:
                grad_w.addmm_(g.t(), torch.where(live[sl, None], h, 0.0).to(acc))
            if grad_b is not None:
                grad_b += g.sum(0)
            # Free this chunk's buffer before the next chunk's logits are allocated.
            del g
        grad_w = None if grad_w is None else grad_w.to(weight.dtype)
        grad_b = None if grad_b is None else grad_b.to(bias.dtype)
        return grad_h, grad_w, None, grad_b, None
