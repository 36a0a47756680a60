"""The naive, materialised computation: the test oracle and the ``backend="reference"`` baseline.

It builds the full [N, V] logits in fp32 and lets autograd differentiate through them, exactly as
TRL / the SPIN code do. Memory is O(N x V); use it to check the other backends, not to train.
"""
from __future__ import annotations

from typing import Optional

import torch

from .amp import no_autocast
from .types import LogprobsParams, accumulation_dtype


def transform_logits(raw: torch.Tensor, params: LogprobsParams, *, inplace: bool = False) -> torch.Tensor:
    """z = softcap(raw) / temperature, with softcap(r) = cap * tanh(r / cap) when a cap is set.

    ``inplace`` overwrites ``raw`` (the chunked backend owns its chunk's buffer; autograd through
    the reference backend needs the out-of-place form).
    """
    if params.softcap is not None:
        cap = params.softcap
        raw = raw.div_(cap).tanh_().mul_(cap) if inplace else cap * torch.tanh(raw / cap)
    if params.temperature != 1.0:
        raw = raw.div_(params.temperature) if inplace else raw / params.temperature
    return raw


def finalize_logprobs(
    logp: torch.Tensor, targets: torch.Tensor, vocab_size: int, ignore_index: int
) -> torch.Tensor:
    """Exactly 0.0 at ignored positions, NaN at out-of-range targets (never a silent value).

    Shared by every backend so that the rule is written once. Element-wise: no host sync.
    """
    ignored = targets == ignore_index
    out_of_range = ~ignored & ((targets < 0) | (targets >= vocab_size))
    logp = torch.where(out_of_range, torch.full_like(logp, float("nan")), logp)
    return torch.where(ignored, torch.zeros_like(logp), logp)


def masked_entropy(entropy: torch.Tensor, targets: torch.Tensor, ignore_index: int) -> torch.Tensor:
    """The per-row entropy H [N] as returned to the user: 0.0 at ignored positions."""
    return torch.where(targets == ignore_index, torch.zeros_like(entropy), entropy)


def entropy_from_shifted_sums(sum_exp: torch.Tensor, sum_exp_z: torch.Tensor) -> torch.Tensor:
    """Entropy H = log S - T / S from sums over logits shifted by a per-row reference m.

    S = sum_v exp(z_v - m), T = sum_v exp(z_v - m) (z_v - m). With lse = m + log S and
    E_p[z] = m + T / S, H = lse - E_p[z] = log S - T / S: m cancels algebraically, so no two
    numbers of the size of a common logit offset are ever subtracted (lse - E_p[z] in fp32 loses
    everything below ulp(offset), e.g. 4e-3 at an offset of 2e4). A row whose logits are all
    -inf has S = 0 and H = NaN, as before.
    """
    return torch.log(sum_exp) - sum_exp_z / sum_exp


def split_lse(top: torch.Tensor, log_sum: torch.Tensor):
    """(lse, lse_lo): lse = top + log_sum rounded to fp32, and lse_lo, its rounding error.

    top is the row's shift (its max logit), log_sum = log sum_v exp(z_v - top) is small. At a
    large common logit offset, fp32 lse is off by up to ulp(offset) / 2 (4e-3 at 1e5), and
    so would be log p = z - lse and p = exp(log p) in every backward. lse_lo = (top - lse) +
    log_sum recovers that error (Fast2Sum: top - lse is exact by Sterbenz's lemma when |top| >=
    |log_sum|, the case where the error matters), so (z - lse) - lse_lo is log p to fp32
    accuracy of its own size, as with a max-shifted log-softmax. Non-finite rows (all -inf
    logits, NaN) get lse_lo = 0 and keep their lse.
    """
    lse = top + log_sum
    lse_lo = (top - lse) + log_sum
    return lse, torch.where(torch.isfinite(lse_lo), lse_lo, torch.zeros_like(lse_lo))


def linear_fp32(hidden: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor]) -> torch.Tensor:
    """hidden @ weight.T + bias accumulated *and returned* in fp32 (fp64 for fp64 inputs).

    bf16/fp16 inputs are never rounded back to their dtype after the product: a logit of 21.09
    rounded to bf16 is off by 0.03, more than the per-token error budget (1e-4). On CUDA a cuBLAS
    product with fp32 output (torch.mm(..., out_dtype=torch.float32)) avoids copying the
    operands; elsewhere (and on a torch without it) the operands are upcast, which on the CPU is
    also the faster product (bf16 GEMM is emulated on most CPUs).
    """
    acc = accumulation_dtype(hidden.dtype)
    if hidden.dtype == acc and weight.dtype == acc:
        return torch.nn.functional.linear(hidden, weight, bias)
    global _MM_OUT_DTYPE
    if _MM_OUT_DTYPE and hidden.is_cuda and hidden.dtype == weight.dtype:
        try:
            z = torch.mm(hidden, weight.t(), out_dtype=acc)
            return z if bias is None else z.add_(bias)
        except (TypeError, RuntimeError, NotImplementedError):
            _MM_OUT_DTYPE = False  # this build lacks the CUDA kernel: upcast from now on
    return torch.nn.functional.linear(
        hidden.to(acc), weight.to(acc), None if bias is None else bias.to(acc)
    )


# aten::mm.dtype (torch.mm(..., out_dtype=...)) exists from torch 2.8; read from the operator
# registry, so that no device work (and no host sync) is needed to find out.
_MM_OUT_DTYPE = "dtype" in torch.ops.aten.mm.overloads()


class _LinearNoAutocast(torch.autograd.Function):
    """F.linear(x [N, H], w [V, H], b [V] | None) whose backward products also ignore autocast.

    Autograd runs a backward with the caller's autocast state: a plain F.linear's backward inside
    ``torch.autocast`` multiplies in bf16 (gradients off by ~1e-2, amp.py). The backward below is
    the same formulas autograd would use (dx = g w, dw = g^T x, db = sum_n g), written with
    differentiable ops, so the reference stays exactly twice differentiable.
    """

    @staticmethod
    @no_autocast
    def forward(ctx, x, w, b):
        ctx.save_for_backward(x, w)
        ctx.has_bias = b is not None
        return torch.nn.functional.linear(x, w, b)

    @staticmethod
    @no_autocast
    def backward(ctx, g):
        x, w = ctx.saved_tensors
        need_x, need_w, need_b = ctx.needs_input_grad
        return (g @ w if need_x else None, g.t() @ x if need_w else None,
                g.sum(0) if (need_b and ctx.has_bias) else None)


def safe_targets(targets: torch.Tensor, vocab_size: int) -> torch.Tensor:
    """Targets clamped into [0, V) so that a gather can never read out of bounds."""
    return targets.clamp(0, vocab_size - 1)


def reference_linear_logprobs(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    bias: Optional[torch.Tensor],
    params: LogprobsParams,
):
    """Returns (logp, lse, entropy) for flat hidden [N, H] and targets [N]; fp32 (fp64 for fp64 input), [N]."""
    # Upcast, not torch.mm(out_dtype=...): this is the oracle, and autograd must see fp32 logits
    # all the way (its gradient chain never rounds a logit to bf16 either).
    acc = accumulation_dtype(hidden.dtype)
    raw = _LinearNoAutocast.apply(hidden.to(acc), weight.to(acc), None if bias is None else bias.to(acc))
    z = transform_logits(raw, params)
    # Log-probs from logits shifted by the row max m (a constant per row: exact in value and in
    # every derivative): z - m is exact in fp32 (Sterbenz) and small, so log p = (z - m) - log S
    # carries no rounding error of the size of a common logit offset, as z - lse would.
    top = z.detach().amax(dim=-1, keepdim=True)
    # A row of -inf logits shifts by 0 (lse = -inf). A +inf logit (an inf in the hidden state,
    # weight or bias, without a soft-cap) keeps its +inf shift, so the row is NaN (log p, lse,
    # entropy) as on the fused backends: z - lse is inf - inf there, whose limit depends on which
    # logits tie at +inf; the online log-sum-exp of the kernels gives NaN, and so does this.
    top = torch.where(torch.isneginf(top), torch.zeros_like(top), top)
    shifted = z - top
    log_sum = torch.logsumexp(shifted, dim=-1, keepdim=True)
    logp_all = shifted - log_sum
    lse = (top + log_sum).squeeze(-1)
    V = weight.shape[0]
    logp = logp_all.gather(-1, safe_targets(targets, V)[:, None].long()).squeeze(-1)
    logp = finalize_logprobs(logp, targets, V, params.ignore_index)
    entropy = None
    if params.return_entropy:
        # H = -sum p log p from the shifted log-probs (no offset-sized cancellation).
        # p log p with p = 0 (a -inf logit) is 0; a finite stand-in keeps its gradient finite too.
        p = logp_all.exp()
        entropy = -(p * torch.where(p > 0, logp_all, 0.0)).sum(-1)
        entropy = masked_entropy(entropy, targets, params.ignore_index)
    return logp, lse, entropy
