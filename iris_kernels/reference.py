"""The naive, materialised computation: the test oracle and the ``backend="reference"`` baseline.

It builds the full [N, V] logits in fp32 and lets autograd differentiate through them, exactly as
TRL / the SPIN code do. Memory is O(N x V); use it to check the other backends, not to train.
"""
from __future__ import annotations

from typing import Optional

import torch

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


def entropy_from_stats(lse, mean_z, targets, ignore_index):
    """Entropy Hk = lse - E_p[z] from the streamed statistics; 0.0 at ignored positions."""
    entropy = lse - mean_z
    return torch.where(targets == ignore_index, torch.zeros_like(entropy), entropy)


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
    raw = torch.nn.functional.linear(hidden, weight, bias).to(accumulation_dtype(hidden.dtype))
    z = transform_logits(raw, params)
    lse = torch.logsumexp(z, dim=-1)
    logp_all = z - lse[:, None]
    V = weight.shape[0]
    logp = logp_all.gather(-1, safe_targets(targets, V)[:, None].long()).squeeze(-1)
    logp = finalize_logprobs(logp, targets, V, params.ignore_index)
    entropy = None
    if params.return_entropy:
        # H = -sum p log p; computed from the normalised log-probs for accuracy.
        # p log p with p = 0 (a -inf logit) is 0; a finite stand-in keeps its gradient finite too.
        p = logp_all.exp()
        entropy = -(p * torch.where(p > 0, logp_all, 0.0)).sum(-1)
        entropy = torch.where(targets == params.ignore_index, torch.zeros_like(entropy), entropy)
    return logp, lse, entropy
