"""What every loss is built from (docs/math.md#normalisation-scopes): terms and their reduction.

A loss is a sum of terms; each term reduces per-sample values ℓ either by a tilted risk κ_t
(``iris_kernels.tilted``) or by a ratio Σℓ/D (a mean, or SFT's token-level mean). ``_reduce_terms``
evaluates every term of a loss under its normalisation scope ("micro" | "rank" | "global", or
precomputed ``StepStats``; see ``iris_kernels.distributed``). Also the input and option checks
and the small helpers the losses share (fp64 log-ratios, detached metrics). Internal: the losses
in ``iris_kernels.losses`` and ``iris_kernels.baselines`` are its only users.
"""
from __future__ import annotations

import math
from typing import Any, Dict, Mapping, NamedTuple, Optional, Tuple

import torch

from .distributed import (
    DENOMINATOR,
    NUMERATOR,
    RATIO,
    TILTED,
    StepStats,
    TermStats,
    all_gather_term_stats,
    check_scope,
    world_size,
)
from .tilted import _BACKENDS, _TiltedParams, _TiltedRisk, _acc_dtype, _local_tilted_stats, _resolve_backend


# =============================================================================================
# Plain (ratio) terms: value = Σ ℓ_i / D, D = count (a mean) or a token count (SFT)
# =============================================================================================
class _Ratio(torch.autograd.Function):
    """ℓ [N], stats [Σℓ, D] (local or global) -> Σℓ/D (accumulation dtype); dL/dℓ_i = grad_scale · dL/dvalue / D."""

    @staticmethod
    def forward(ctx, x, stats, grad_scale: float):
        ctx.save_for_backward(stats)
        ctx.shape, ctx.dtype, ctx.grad_scale = x.shape, x.dtype, grad_scale
        return stats[NUMERATOR] / stats[DENOMINATOR]

    @staticmethod
    def backward(ctx, grad):
        # Exactly twice-differentiable as written: the value is linear in ℓ (D is a detached
        # count), so the gradient is constant in ℓ and linear in ``grad``, which autograd records
        # under create_graph=True.
        (stats,) = ctx.saved_tensors
        g = grad.to(stats.dtype) * ctx.grad_scale / stats[DENOMINATOR]
        return g.expand(ctx.shape).to(ctx.dtype), None, None


# =============================================================================================
# Terms: every loss is a sum of reductions (tilted or ratio) of per-sample values ℓ
# =============================================================================================
class _Term(NamedTuple):
    kind: str  # TILTED or RATIO
    ell: torch.Tensor  # [k], accumulation dtype, differentiable
    t: Optional[torch.Tensor] = None  # TILTED: the tilt (0-dim)
    denominator: Optional[torch.Tensor] = None  # RATIO: D (0-dim), detached


def _term_local_stats(term: _Term, backend: str) -> TermStats:
    if term.kind == TILTED:
        _, stats = _local_tilted_stats(term.ell.detach(), term.t, backend)
    else:
        stats = torch.stack([term.ell.detach().sum(), term.denominator])
    return TermStats(term.kind, stats)


def _reduce_terms(
    loss: str,
    terms: Mapping[str, _Term],
    *,
    scope: str,
    group: Any,
    stats: Optional[StepStats],
    backend: str,
    hparams: Optional[Mapping[str, Any]] = None,
) -> Tuple[Dict[str, torch.Tensor], Dict[str, torch.Tensor]]:
    """Each term's value (accumulation dtype) under the scope, and the statistics it used."""
    check_scope(scope)
    device = next(iter(terms.values())).ell.device
    be = _resolve_backend(backend, device)
    grad_scale = 1.0
    used: Optional[Dict[str, TermStats]] = None
    if stats is not None:
        if not isinstance(stats, StepStats):
            raise TypeError(f"stats must be a StepStats (from StepNormalizer), got {type(stats).__name__}")
        if stats.loss != loss:
            raise ValueError(f"stats were computed for loss {stats.loss!r}, not {loss!r}")
        if scope != stats.scope:
            raise ValueError(f"stats were computed for scope {stats.scope!r} but scope={scope!r}")
        if set(stats.terms) != set(terms):
            raise ValueError(f"stats hold terms {sorted(stats.terms)}, the loss has {sorted(terms)}")
        _check_stats_hparams(stats, hparams or {})
        used, grad_scale = dict(stats.terms), stats.grad_scale
    elif scope == "global" and world_size(group) > 1:
        with torch.no_grad():
            local = {name: _term_local_stats(term, be) for name, term in terms.items()}
        used, grad_scale = all_gather_term_stats(local, group), float(world_size(group))

    values, used_stats = {}, {}
    for name, term in terms.items():
        st = None if used is None else used[name].values.to(device=device, dtype=_acc_dtype(device))
        if term.kind == TILTED:
            values[name], used_stats[name] = _TiltedRisk.apply(term.ell, term.t, st, _TiltedParams(be, grad_scale))
        else:
            if st is None:
                st = _term_local_stats(term, be).values
            values[name], used_stats[name] = _Ratio.apply(term.ell, st, grad_scale), st
    return values, used_stats


# --------------------------------------------------------------------------------------------- validation
def _check_stats_hparams(stats: StepStats, hparams: Mapping[str, Any]) -> None:
    """Statistics made under another α, β or μ would silently give another loss: refuse them.

    Python numbers are compared; a tensor hyper-parameter only by identity (comparing values
    would synchronise with the device).
    """
    for name, value in hparams.items():
        if name not in stats.hparams:
            continue
        made = stats.hparams[name]
        if isinstance(made, torch.Tensor) or isinstance(value, torch.Tensor):
            same = made is value or not (isinstance(made, torch.Tensor) and isinstance(value, torch.Tensor))
        else:
            same = made == value
        if not same:
            raise ValueError(f"stats were computed with {name}={made!r}, but this call has {name}={value!r}")


def _check_logps(name: str, x: Any) -> torch.Tensor:
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor of per-sequence log-probs, got {type(x).__name__}")
    if not x.dtype.is_floating_point:
        raise TypeError(f"{name} must be a floating-point tensor, got {x.dtype}")
    if x.dim() != 1:
        raise ValueError(f"{name} must be 1-D (one summed log-prob per sequence), got shape {tuple(x.shape)}")
    if x.shape[0] == 0:
        raise ValueError(f"{name} is empty: every term needs at least one sequence")
    return x


def _check_inputs(policy_real, policy_syn, ref_real, ref_syn, *, paired: bool = False) -> None:
    for name, x in (("policy_real", policy_real), ("policy_syn", policy_syn), ("ref_real", ref_real), ("ref_syn", ref_syn)):
        _check_logps(name, x)
    for pol_name, pol, ref_name, ref in (
        ("policy_real", policy_real, "ref_real", ref_real),
        ("policy_syn", policy_syn, "ref_syn", ref_syn),
    ):
        if ref.shape != pol.shape:
            raise ValueError(f"{ref_name} shape {tuple(ref.shape)} must equal {pol_name} shape {tuple(pol.shape)}")
    device = policy_real.device
    for name, x in (("policy_syn", policy_syn), ("ref_real", ref_real), ("ref_syn", ref_syn)):
        if x.device != device:
            raise ValueError(f"{name} is on {x.device} but policy_real is on {device}")
    if paired and policy_syn.shape != policy_real.shape:
        raise ValueError(
            "this loss needs paired samples: policy_syn/ref_syn must have the same length as "
            f"policy_real/ref_real ({policy_syn.shape[0]} != {policy_real.shape[0]})"
        )


def _check_options(scope: Any, backend: Any) -> None:
    check_scope(scope)
    if backend not in _BACKENDS:
        raise ValueError(f"backend must be one of {_BACKENDS}, got {backend!r}")


def _value_checks() -> bool:
    """False while torch.compile traces: a float that changes between calls is a symbolic float
    there, on which math.isfinite is a graph break (an error under fullgraph=True) and a
    comparison a guard that recompiles for every new value. So under tracing the Python-float
    hyper-parameters (α, β, μ, t) are type-checked only; a negative or non-finite α turns the
    loss and its gradients into NaN instead (as a tensor α always does)."""
    return not torch.compiler.is_compiling()


def _check_positive(name: str, value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name} must be a Python float, got {type(value).__name__}")
    if _value_checks() and not (math.isfinite(value) and value > 0):
        raise ValueError(f"{name} must be a finite number > 0, got {value}")
    return float(value)


def _log_ratio(policy: torch.Tensor, ref: torch.Tensor, beta: float) -> torch.Tensor:
    # fp64: s_θ and s_ref are sums over hundreds of tokens; their fp32 difference would keep only
    # ~3 significant digits of a small g. The fp32 → fp64 casts are exact.
    acc = _acc_dtype(policy.device)
    return beta * (policy.to(acc) - ref.detach().to(acc))


def _term_mean(ell: torch.Tensor) -> _Term:
    return _Term(RATIO, ell, denominator=torch.full((), ell.shape[0], dtype=ell.dtype, device=ell.device))


def _detached(metrics: Mapping[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
    return {k: v.detach().float() for k, v in metrics.items()}
