"""Sequence-level self-play losses on per-sequence summed log-probs (docs/math.md: #tilted-risk, #objective, #baselines, #normalisation-scopes).

Every loss takes the same four tensors — the policy's and the frozen reference's summed log-probs
of the annotated ("real", [n]) and synthetic ([m]) responses — and returns a 0-dim fp32 loss:

    loss = iris_loss(policy_real, policy_syn, ref_real, ref_syn, alpha=0.5, beta=1.0)
    loss, metrics = spin_loss(..., return_metrics=True)
    loss_fn = get_loss("chi2")

Shared keywords: ``return_metrics`` (also return a dict of detached 0-dim fp32 tensors; building
it never synchronises with the host), ``scope``/``group``/``stats`` (normalisation scope, see
``iris_kernels.distributed``), ``backend`` ("auto" | "triton" | "torch", for the tilted-risk
terms). Loss-specific hyper-parameters are keyword-only.

Numerics. The batch-level arithmetic (log-ratios, per-sample losses, normalisers) runs in fp64:
it touches n + m scalars, so it costs nothing next to the per-token work, and it keeps
g = β·(s_θ − s_ref) exact for summed log-probs in the hundreds, where an fp32 difference would
lose four digits. Reference log-probs are treated as constants (detached). Inputs may be any
float dtype on any device; no function here calls ``.item()`` or otherwise syncs with the host.
"""
from __future__ import annotations

import inspect
import math
import os
from dataclasses import dataclass
from typing import Any, Callable, Dict, Mapping, NamedTuple, Optional, Tuple, Union

import torch

from .double_backward import no_double_backward
from .distributed import (
    COUNT,
    DENOMINATOR,
    LMAX,
    LMIN,
    M2,
    M3,
    MEAN,
    NANS,
    NUMERATOR,
    RATIO,
    SUMEXP,
    SUMEXP2,
    TILTED,
    TMAX,
    StepStats,
    TermStats,
    all_gather_term_stats,
    check_scope,
    world_size,
)

try:  # Triton is optional (Linux only); the PyTorch path covers everything else.
    from .custom_ops import tilted_kernels as _tilted_ops  # ops.tilted_risk, as custom ops under torch.compile
except ImportError:  # pragma: no cover - exercised only where triton is missing
    _tilted_ops = None

__all__ = [
    "tilted_risk",
    "iris_loss",
    "spin_loss",
    "dpo_loss",
    "space_loss",
    "chi2_loss",
    "chi2_logratio_loss",
    "sft_loss",
    "LOSSES",
    "get_loss",
    "loss_term_stats",
]

# Below |t|·(max ℓ − min ℓ) <= SERIES_EPS, κ_t is evaluated by its series (ops/tilted_risk.py
# explains the error balance; with fp64 accumulation both sides of the switch are ~1e-11 exact).
SERIES_EPS = 1e-3
_BACKENDS = ("auto", "triton", "torch")


# =============================================================================================
# Tilted risk: κ_t(ℓ) = (1/t)·log((1/N)·Σ exp(t·ℓ_i)), κ_0 = mean, ∂κ_t/∂ℓ = softmax(t·ℓ)
# =============================================================================================
def _acc_dtype(device: torch.device) -> torch.dtype:
    # MPS has no fp64; there the statistics run in fp32 (less accurate for tiny |t|, still exact at 0).
    return torch.float32 if device.type == "mps" else torch.float64


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def _resolve_backend(backend: str, device: torch.device) -> str:
    if backend not in _BACKENDS:
        raise ValueError(f"backend must be one of {_BACKENDS}, got {backend!r}")
    if backend == "auto":
        return "triton" if device.type == "cuda" and _tilted_ops is not None else "torch"
    if backend == "triton":
        if _tilted_ops is None:
            raise ValueError("backend='triton' needs the triton package, which is not importable")
        if device.type != "cuda" and not _interpreting():
            raise ValueError(
                "backend='triton' on a non-CUDA tensor needs the Triton interpreter: set "
                "TRITON_INTERPRET=1 before importing iris_kernels"
            )
    return backend


def _tilt(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """t·x, with t = 0 tilting nothing, even an infinite x (0·inf would be NaN)."""
    return torch.where(t == 0, torch.zeros_like(x), t * x)


def _tilted_stats_torch(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """The kernel's statistics vector (layout in iris_kernels.distributed), in PyTorch.

    Two passes where the kernel does one (the moments here are centred on the exact mean); the
    results agree to rounding, which the tests check.
    """
    x = x.to(t.dtype)
    tx = _tilt(x, t)
    tmax = tx.max()
    tmax = torch.where(torch.isinf(tmax), torch.zeros_like(tmax), tmax)  # the shift; see the kernel
    e = torch.exp(tx - tmax)
    mean = x.mean()
    dev = x - mean
    dev2 = dev * dev
    return torch.stack(
        [
            torch.full((), x.shape[0], dtype=t.dtype, device=x.device),
            tmax,
            e.sum(),
            (e * e).sum(),
            mean,
            dev2.sum(),
            (dev2 * dev).sum(),
            x.max(),
            x.min(),
            torch.isnan(x).sum().to(t.dtype),
        ]
    )


def kappa_from_stats(stats: torch.Tensor, t: torch.Tensor, series_eps: float = SERIES_EPS) -> torch.Tensor:
    """κ_t from a (possibly merged) statistics vector; mirrors the kernel's finalisation.

    exact:  κ_t = (TMAX + log SUMEXP − log N)/t         (log-mean-exp with the max shift)
    series: κ_t = mean + t·(M2/(2N) + t·M3/(6N))        (cumulant expansion; exact at t = 0)

    ``series_eps``: SERIES_EPS, passed in by the autograd.Function from its params: the global
    read inside the traced Function made torch.compile(dynamic=True) fail at a loss's second
    tilted term (torch 2.13: "lift_tracked_freevar_to_input should not be called on root
    SubgraphTracer").
    """
    cnt, tmax, sumexp, mean, m2, m3 = (stats[i] for i in (COUNT, TMAX, SUMEXP, MEAN, M2, M3))
    use_series = (t == 0) | (t.abs() * (stats[LMAX] - stats[LMIN]) <= series_eps)
    t_safe = torch.where(t == 0, torch.ones_like(t), t)  # the exact branch is discarded at t = 0
    exact = (tmax + torch.log(sumexp) - torch.log(cnt)) / t_safe
    series = mean + t * (m2 / (2.0 * cnt) + t * m3 / (6.0 * cnt))
    kappa = torch.where(use_series, series, exact)
    kappa = torch.where(t == 0, mean, kappa)
    return torch.where(stats[NANS] > 0, torch.full_like(kappa, float("nan")), kappa)


def _tilted_weights_torch(x: torch.Tensor, t: torch.Tensor, stats: torch.Tensor) -> torch.Tensor:
    # softmax(t·x) under the shift and normaliser of `stats` (local or global); derivation beside
    # the backward kernel in ops/tilted_risk.py.
    w = torch.exp(_tilt(x.to(t.dtype), t) - stats[TMAX]) / stats[SUMEXP]
    return torch.where(stats[NANS] > 0, torch.full_like(w, float("nan")), w)


def _local_tilted_stats(x: torch.Tensor, t: torch.Tensor, backend: str,
                        series_eps: float = SERIES_EPS) -> Tuple[torch.Tensor, torch.Tensor]:
    """(κ_t, statistics) of a 1-D batch: one kernel launch on the Triton path."""
    if backend == "triton":
        return _tilted_ops.tilted_risk_fwd(x, t, series_eps)
    stats = _tilted_stats_torch(x, t)
    return kappa_from_stats(stats, t, series_eps), stats


@dataclass(frozen=True)
class _TiltedParams:
    backend: str
    # Multiplies the gradient only (the value is the scope's κ): undoes data-parallel averaging.
    grad_scale: float = 1.0
    series_eps: float = SERIES_EPS  # read from here inside the Function (see kappa_from_stats)


class _TiltedRisk(torch.autograd.Function):
    """ℓ [N], t (0-dim fp64), stats (global/precomputed or None) -> (κ, statistics used).

    κ stays in the accumulation dtype (fp64): a loss adds its terms before the one cast to fp32,
    so two large terms that cancel do not each carry an fp32 rounding error into the sum.
    """

    @staticmethod
    def forward(ctx, x, t, stats, params: _TiltedParams):
        if stats is None:
            kappa, stats = _local_tilted_stats(x, t, params.backend, params.series_eps)
        else:
            kappa = kappa_from_stats(stats, t, params.series_eps)
        ctx.save_for_backward(x, t, stats)
        ctx.params = params
        ctx.mark_non_differentiable(stats)
        return kappa, stats

    @staticmethod
    def backward(ctx, grad_kappa, _grad_stats):
        if ctx.params.backend == "triton":
            return _tilted_backward_triton(ctx, grad_kappa, _grad_stats)
        x, t, stats = ctx.saved_tensors
        p: _TiltedParams = ctx.params
        # dL/dℓ_i = dL/dκ · w_i, w = softmax(t·ℓ) (the backward kernel's comment has the
        # derivation). Differentiable a second time (create_graph=True): w is evaluated from the
        # detached statistics, so autograd would see a constant; instead it is multiplied by a
        # factor that is exactly 1 in value and carries the derivative of the softmax,
        #     w_i · e^(δ_i) / (1 + Σ_j w_j (e^(δ_j) − 1)),  δ = t·ℓ − detach(t·ℓ) (= 0),
        # whose derivative at δ = 0 is ∂w_i/∂ℓ_k = t (w_i [i = k] − w_i w_k), the Hessian of κ_t
        # (∂S/∂ℓ_k = t e_k for S = Σ e_j, with this rank's share e_k / S = w_k under global stats).
        w = _tilted_weights_torch(x.detach(), t, stats)
        if torch.is_grad_enabled() and x.requires_grad:
            finite = torch.where(torch.isfinite(x), x, torch.zeros_like(x)).to(t.dtype)
            tilted = _tilt(finite, t)
            delta = tilted - tilted.detach()
            # Non-finite weights (an infinite ℓ) keep their first-order value; they must not
            # turn the (zero-valued) sum into NaN for every entry.
            w_finite = torch.where(torch.isfinite(w), w, torch.zeros_like(w))
            w = w * torch.exp(delta) / (1.0 + (w_finite * torch.expm1(delta)).sum())
        dx = w * (grad_kappa.to(t.dtype) * p.grad_scale)
        return dx.to(x.dtype), None, None, None


@no_double_backward("triton", supported_by="torch")
def _tilted_backward_triton(ctx, grad_kappa, _grad_stats):
    x, t, stats = ctx.saved_tensors
    p: _TiltedParams = ctx.params
    acc = torch.float64 if x.dtype == torch.float64 else torch.float32
    dx = _tilted_ops.tilted_risk_bwd(x, t, stats, grad_kappa.float(), p.grad_scale, acc)
    return dx.to(x.dtype), None, None, None


def _as_t(name: str, t: Union[float, torch.Tensor], device: torch.device) -> torch.Tensor:
    """t as a 0-dim accumulation-dtype tensor on ``device``; validated without a host sync."""
    acc = _acc_dtype(device)
    if isinstance(t, torch.Tensor):
        if t.dim() != 0:
            raise ValueError(f"{name} must be a Python float or a 0-dim tensor, got shape {tuple(t.shape)}")
        if not (t.dtype.is_floating_point or t.dtype in (torch.int32, torch.int64)):
            raise TypeError(f"{name} must be a real number, got a {t.dtype} tensor")
        if t.requires_grad:
            raise ValueError(f"{name} must not require grad: the losses are not differentiated with respect to it")
        # non_blocking only towards an accelerator: a non-blocking copy to the CPU may be read
        # before it has landed.
        return t.detach().to(device=device, dtype=acc, non_blocking=device.type != "cpu")
    if isinstance(t, bool) or not isinstance(t, (int, float)):
        raise TypeError(f"{name} must be a Python float or a 0-dim tensor, got {type(t).__name__}")
    if not torch.compiler.is_compiling() and not math.isfinite(t):  # see _value_checks
        raise ValueError(f"{name} must be finite, got {t}")
    # torch.full launches a fill kernel with t as an argument: no host-to-device copy to wait for.
    if torch.compiler.is_compiling():
        # A symbolic t as torch.full's fill value is specialised (one recompilation per new α);
        # as a tensor-arithmetic operand it stays a graph input. 0 + t is exact.
        return torch.zeros((), dtype=acc, device=device) + t
    return torch.full((), float(t), dtype=acc, device=device)


def tilted_risk(losses: torch.Tensor, t: Union[float, torch.Tensor], *, backend: str = "auto") -> torch.Tensor:
    """Tilted risk κ_t(ℓ) = (1/t)·log((1/N)·Σ_i exp(t·ℓ_i)) of a 1-D batch; κ_0 = mean(ℓ).

    Args:
        losses: [N] (N ≥ 1), any float dtype, any device. NaN anywhere gives NaN (value and
            every gradient entry).
        t: the tilt, a Python float or a 0-dim tensor (a tensor stays on the device; it is not
            differentiated). Any real value: t > 0 emphasises large losses, t < 0 small ones.
        backend: "auto" (Triton on CUDA, PyTorch elsewhere), "triton" (the kernel; on CPU only
            through the interpreter, TRITON_INTERPRET=1) or "torch".

    Returns a 0-dim fp32 tensor; its gradient is softmax(t·ℓ) (uniform 1/N at t = 0), in the
    dtype of ``losses``. The value is continuous through t = 0 (series near 0, see SERIES_EPS)
    and accurate to fp32 rounding for every t (fp64 statistics). Exactly twice-differentiable
    on the torch backend; the triton backend raises a RuntimeError at the second differentiation.
    """
    if not isinstance(losses, torch.Tensor):
        raise TypeError(f"losses must be a torch.Tensor, got {type(losses).__name__}")
    if not losses.dtype.is_floating_point:
        raise TypeError(f"losses must be a floating-point tensor, got {losses.dtype}")
    if losses.dim() != 1:
        raise ValueError(f"losses must be 1-D [N], got shape {tuple(losses.shape)}")
    if losses.shape[0] == 0:
        raise ValueError("losses must not be empty")
    be = _resolve_backend(backend, losses.device)
    tt = _as_t("t", t, losses.device)
    kappa, _ = _TiltedRisk.apply(losses, tt, None, _TiltedParams(be))
    return kappa.float()


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


# =============================================================================================
# IRIS (docs/math.md#objective)
# =============================================================================================
def _iris_terms(policy_real, policy_syn, ref_real, ref_syn, *, alpha, beta: float = 1.0):
    _check_inputs(policy_real, policy_syn, ref_real, ref_syn)
    beta = _check_positive("beta", beta)
    if isinstance(alpha, torch.Tensor) or not _value_checks():
        if not isinstance(alpha, torch.Tensor) and (isinstance(alpha, bool) or not isinstance(alpha, (int, float))):
            raise TypeError(f"alpha must be a Python float or a 0-dim tensor, got {type(alpha).__name__}")
        alpha_t = _as_t("alpha", alpha, policy_real.device)
        # A tensor α cannot be sign-checked without a host sync; a negative one poisons the tilt
        # with NaN instead, so the loss and every gradient come out NaN (never silently wrong).
        alpha_t = torch.where((alpha_t < 0) | ~torch.isfinite(alpha_t), torch.full_like(alpha_t, float("nan")), alpha_t)
    else:
        if isinstance(alpha, bool) or not isinstance(alpha, (int, float)):
            raise TypeError(f"alpha must be a Python float or a 0-dim tensor, got {type(alpha).__name__}")
        if not (math.isfinite(alpha) and alpha >= 0):
            raise ValueError(f"alpha must be a finite number >= 0 (alpha < 0 swaps the roles of the terms), got {alpha}")
        alpha_t = _as_t("alpha", alpha, policy_real.device)
    g_real = _log_ratio(policy_real, ref_real, beta)
    g_syn = _log_ratio(policy_syn, ref_syn, beta)
    # L = κ_{1−α}(−g_R) + κ_α(g_S). Gradient: ∂L/∂g_R = −softmax((1−α)·(−g_R)) = −softmax((α−1)·g_R)
    # and ∂L/∂g_S = softmax(α·g_S), the weights of docs/math.md#gradient, via the κ backward. At α = 0 and
    # α = 1 one tilt is exactly 0 and κ_0 is the mean: the docs/math.md#limits table, with no branch.
    terms = {
        "real": _Term(TILTED, -g_real, t=1.0 - alpha_t),
        "syn": _Term(TILTED, g_syn, t=alpha_t),
    }
    return terms, {"alpha": alpha_t}


def _iris_metrics(loss, values, stats, extras):
    m = {"loss": loss, "estimate": -loss, "alpha": extras["alpha"]}
    for name, sign in (("real", -1.0), ("syn", 1.0)):
        st = stats[name]
        nan = st[NANS] > 0
        ess = torch.where(nan, torch.full_like(st[SUMEXP], float("nan")), st[SUMEXP] ** 2 / st[SUMEXP2])
        m[f"{name}/kappa"] = values[name]
        m[f"{name}/ess"] = ess
        m[f"{name}/max_weight"] = torch.where(nan, torch.full_like(ess, float("nan")), 1.0 / st[SUMEXP])
        m[f"{name}/mean_g"] = sign * st[MEAN]
    return _detached(m)


def iris_loss(
    policy_real: torch.Tensor,
    policy_syn: torch.Tensor,
    ref_real: torch.Tensor,
    ref_syn: torch.Tensor,
    *,
    alpha: Union[float, torch.Tensor],
    beta: float = 1.0,
    return_metrics: bool = False,
    scope: str = "rank",
    group: Any = None,
    stats: Optional[StepStats] = None,
    backend: str = "auto",
):
    """IRIS loss L = κ_{1−α}(−g over real) + κ_α(g over synthetic), g = β·(s_θ − s_ref).

    Equals −J_α, the negated Rényi variational bound of docs/math.md#objective:
        L = 1/(1−α)·log E_R[e^{−(1−α)g}] + 1/α·log E_S[e^{αg}],
    with the exact limits at α = 0 (log E_R e^{−g} + E_S g) and α = 1 (−E_R g + log E_S e^{g},
    Donsker–Varadhan), continuous in α through both. Its gradient is
        ∇L = −Σ_R softmax((α−1)·g_R)_i ∇g_i + Σ_S softmax(α·g_S)_j ∇g_j.

    Args:
        policy_real, ref_real: [n] summed log-probs of the annotated responses (n ≥ 1).
        policy_syn, ref_syn: [m] summed log-probs of the synthetic responses (m ≥ 1, m ≠ n allowed).
        alpha: α ≥ 0, a Python float or a 0-dim tensor (e.g. from a schedule; read on the device,
            never synced). A tensor's sign cannot be checked without a sync: a negative tensor α
            makes the loss and its gradients NaN; a negative float raises ValueError.
        beta: β > 0 (default 1.0, the theory's value).
        return_metrics: also return metrics (below).
        scope, group, stats: normalisation scope (``iris_kernels.distributed``). Default "rank":
            the normalisers run over these tensors; "global" all-gathers statistics over
            ``group`` so every rank gets the single-process value and gradient; ``stats`` are
            precomputed step statistics from a ``StepNormalizer`` (gradient accumulation).
        backend: tilted-risk backend, "auto" | "triton" | "torch".

    Returns the 0-dim fp32 loss, or (loss, metrics) with detached 0-dim fp32 tensors:
    ``loss``, ``estimate`` (J = −L), ``alpha``, and per term ("real", "syn") ``kappa`` (the term's
    κ), ``ess`` (1/Σw², in samples), ``max_weight`` and ``mean_g``. Under the "global" scope (or
    with ``stats``) the term metrics are those of the whole step's batch.
    """
    _check_options(scope, backend)
    terms, extras = _iris_terms(policy_real, policy_syn, ref_real, ref_syn, alpha=alpha, beta=beta)
    values, used = _reduce_terms("iris", terms, scope=scope, group=group, stats=stats, backend=backend,
                                 hparams={"alpha": alpha, "beta": beta})
    loss = (values["real"] + values["syn"]).float()  # one rounding, after the terms are summed in fp64
    if return_metrics:
        return loss, _iris_metrics(loss, values, used, extras)
    return loss


# =============================================================================================
# Baselines (docs/math.md#baselines)
# =============================================================================================
_PAIR_VARIANTS = ("sigmoid", "hinge")


def _pair_terms(policy_real, policy_syn, ref_real, ref_syn, *, beta: float = 0.1, variant: str = "sigmoid"):
    _check_inputs(policy_real, policy_syn, ref_real, ref_syn, paired=True)
    beta = _check_positive("beta", beta)
    if variant not in _PAIR_VARIANTS:
        raise ValueError(f"variant must be one of {_PAIR_VARIANTS}, got {variant!r}")
    # z_i = β·[(s_θ(y_i) − s_ref(y_i)) − (s_θ(y'_i) − s_ref(y'_i))], the implicit reward margin.
    z = _log_ratio(policy_real, ref_real, beta) - _log_ratio(policy_syn, ref_syn, beta)
    # sigmoid: softplus(−z) = −log σ(z), ∂/∂z = −σ(−z).  hinge: relu(1 − z), ∂/∂z = −[z < 1].
    ell = torch.nn.functional.softplus(-z) if variant == "sigmoid" else torch.relu(1.0 - z)
    g_real = _log_ratio(policy_real, ref_real, beta).detach()
    g_syn = _log_ratio(policy_syn, ref_syn, beta).detach()
    return {"pair": _term_mean(ell)}, {"margin": z.detach(), "g_real": g_real, "g_syn": g_syn}


def _pair_metrics(loss, values, stats, extras):
    z = extras["margin"]
    return _detached(
        {
            "loss": loss,  # no "estimate": SPIN's/DPO's −L estimates no divergence (docs/math.md#divergence-estimates)
            "real/mean_g": extras["g_real"].mean(),
            "syn/mean_g": extras["g_syn"].mean(),
            "margin": z.mean(),
            "accuracy": (z > 0).to(z.dtype).mean(),
        }
    )


def _pair_loss(name, policy_real, policy_syn, ref_real, ref_syn, *, beta, variant, return_metrics, scope, group, stats, backend):
    _check_options(scope, backend)
    terms, extras = _pair_terms(policy_real, policy_syn, ref_real, ref_syn, beta=beta, variant=variant)
    values, used = _reduce_terms(name, terms, scope=scope, group=group, stats=stats, backend=backend,
                                 hparams={"beta": beta, "variant": variant})
    loss = values["pair"].float()
    if return_metrics:
        return loss, _pair_metrics(loss, values, used, extras)
    return loss


def spin_loss(
    policy_real: torch.Tensor,
    policy_syn: torch.Tensor,
    ref_real: torch.Tensor,
    ref_syn: torch.Tensor,
    *,
    beta: float = 0.1,
    variant: str = "sigmoid",
    return_metrics: bool = False,
    scope: str = "rank",
    group: Any = None,
    stats: Optional[StepStats] = None,
    backend: str = "auto",
):
    """SPIN (Chen et al., ICML 2024): mean_i softplus(−β·[(s_θ − s_ref)(y_i) − (s_θ − s_ref)(y'_i)]).

    The real and synthetic tensors are PAIRED (row i of each is the same prompt), so n = m is
    required. The reference is the opponent θ_t; at θ = θ_t the loss is log 2. ``variant="hinge"``
    uses relu(1 − β·Δ). Metrics: ``loss``, ``real/mean_g``, ``syn/mean_g`` (g = β·log-ratio),
    ``margin`` (mean β·Δ) and ``accuracy`` (fraction of pairs with Δ > 0), computed over the local
    tensors. Other arguments as :func:`iris_loss`.
    """
    return _pair_loss(
        "spin", policy_real, policy_syn, ref_real, ref_syn, beta=beta, variant=variant,
        return_metrics=return_metrics, scope=scope, group=group, stats=stats, backend=backend,
    )


def dpo_loss(
    policy_real: torch.Tensor,
    policy_syn: torch.Tensor,
    ref_real: torch.Tensor,
    ref_syn: torch.Tensor,
    *,
    beta: float = 0.1,
    variant: str = "sigmoid",
    return_metrics: bool = False,
    scope: str = "rank",
    group: Any = None,
    stats: Optional[StepStats] = None,
    backend: str = "auto",
):
    """DPO (Rafailov et al., 2023): SPIN's formula with the real responses as "chosen", the
    synthetic ones as "rejected" and a FIXED reference model (SPIN's reference moves each
    iteration). Paired, n = m. Arguments and metrics as :func:`spin_loss`.
    """
    return _pair_loss(
        "dpo", policy_real, policy_syn, ref_real, ref_syn, beta=beta, variant=variant,
        return_metrics=return_metrics, scope=scope, group=group, stats=stats, backend=backend,
    )


def _space_terms(policy_real, policy_syn, ref_real, ref_syn, *, mu: float = 1.0, beta: float = 1.0):
    _check_inputs(policy_real, policy_syn, ref_real, ref_syn)
    mu = _check_positive("mu", mu)
    beta = _check_positive("beta", beta)
    log_mu = math.log(mu)
    r_real = _log_ratio(policy_real, ref_real, beta)
    r_syn = _log_ratio(policy_syn, ref_syn, beta)
    # NCE: −log σ(r − log μ) = softplus(−(r − log μ)) on data; −μ·log σ(log μ − r) = μ·softplus(r − log μ)
    # on noise. Gradients by autograd: ∂/∂r = −σ(log μ − r) and μ·σ(r − log μ).
    terms = {
        "real": _term_mean(torch.nn.functional.softplus(log_mu - r_real)),
        "syn": _term_mean(mu * torch.nn.functional.softplus(r_syn - log_mu)),
    }
    return terms, {"g_real": r_real.detach(), "g_syn": r_syn.detach()}


def _mean_g_metrics(loss, values, stats, extras, bound: str):
    # −L is a lower bound on a divergence whose name the key carries (docs/math.md#divergence-estimates).
    return _detached(
        {"loss": loss, bound: -loss, "real/mean_g": extras["g_real"].mean(), "syn/mean_g": extras["g_syn"].mean()}
    )


def space_loss(
    policy_real: torch.Tensor,
    policy_syn: torch.Tensor,
    ref_real: torch.Tensor,
    ref_syn: torch.Tensor,
    *,
    mu: float = 1.0,
    beta: float = 1.0,
    return_metrics: bool = False,
    scope: str = "rank",
    group: Any = None,
    stats: Optional[StepStats] = None,
    backend: str = "auto",
):
    """SPACE-style noise-contrastive loss with μ noise samples per data sample (docs/math.md#baselines):

        L = −mean_R log σ(r − log μ) − μ·mean_S log σ(log μ − r),   r = β·(s_θ − s_ref).

    β defaults to 1 (the plain log-ratio of the standard NCE form). n ≠ m allowed. At θ = θ_t
    and μ = 1 the loss is 2·log 2. Metrics: ``loss``, ``js_bound`` (−L: at μ = 1 a lower bound on
    2·JS(p_data, p_θt) − log 4, reached at the optimum), ``real/mean_g``, ``syn/mean_g`` (mean r),
    local. Other arguments as :func:`iris_loss`.
    """
    _check_options(scope, backend)
    terms, extras = _space_terms(policy_real, policy_syn, ref_real, ref_syn, mu=mu, beta=beta)
    values, used = _reduce_terms("space", terms, scope=scope, group=group, stats=stats, backend=backend,
                                 hparams={"mu": mu, "beta": beta})
    loss = (values["real"] + values["syn"]).float()  # one rounding, after the terms are summed in fp64
    if return_metrics:
        return loss, _mean_g_metrics(loss, values, used, extras, "js_bound")
    return loss


def _chi2_terms(policy_real, policy_syn, ref_real, ref_syn, *, beta: float = 1.0):
    _check_inputs(policy_real, policy_syn, ref_real, ref_syn)
    beta = _check_positive("beta", beta)
    g_real = _log_ratio(policy_real, ref_real, beta)
    g_syn = _log_ratio(policy_syn, ref_syn, beta)
    # The means of e^{g} and e^{2g} in the log domain: κ_1(g_R) = log mean e^{g_R} and
    # κ_2(g_S) = ½·log mean e^{2g_S}, each by the tilted-risk reduction (log-sum-exp shifted by
    # the batch max), so no e^{g} is formed before the one exponentiation of the loss below.
    # ∂κ_1/∂g_i = softmax(g_R)_i and ∂κ_2/∂g_j = softmax(2g_S)_j; the loss's chain rule then gives
    # ∂L/∂g_i = −2·e^{κ_1}·softmax(g_R)_i = −2·e^{g_i}/n and ∂L/∂g_j = 2·e^{2κ_2}·softmax(2g_S)_j = 2·e^{2g_j}/m.
    one = torch.ones((), dtype=g_real.dtype, device=g_real.device)
    terms = {"real": _Term(TILTED, g_real, t=one), "syn": _Term(TILTED, g_syn, t=2.0 * one)}
    return terms, {"g_real": g_real.detach(), "g_syn": g_syn.detach()}


def _chi2_combine(values: Mapping[str, torch.Tensor]) -> torch.Tensor:
    # −2·mean_R e^{g} + mean_S e^{2g} + 1 from the two κ; exp in the accumulation dtype (fp64),
    # which overflows only when the loss itself is beyond fp64's range (g ≳ 354): then inf, and
    # the trainer's non-finite guard skips the step.
    return -2.0 * torch.exp(values["real"]) + torch.exp(2.0 * values["syn"]) + 1.0


def chi2_loss(
    policy_real: torch.Tensor,
    policy_syn: torch.Tensor,
    ref_real: torch.Tensor,
    ref_syn: torch.Tensor,
    *,
    beta: float = 1.0,
    return_metrics: bool = False,
    scope: str = "rank",
    group: Any = None,
    stats: Optional[StepStats] = None,
    backend: str = "auto",
):
    """χ² loss with the density-ratio witness (docs/math.md#baselines):

        L = −2·mean_R e^{g} + mean_S e^{2g} + 1,   g = β·(s_θ − s_ref).

    It is −(the Pearson-χ² variational bound) with the witness h = 2(e^{g} − 1), whose pointwise
    optimum h* = 2(p/q − 1) a ratio e^{g} = p_θ/p_θt CAN reach: at β = 1 the exact per-iteration
    minimiser over a free model is p_data (one step), and at it −L = χ²(p_data ‖ p_θt).
    0 at θ = θ_t. Computed stably in the log domain (each mean as a tilted risk, log-sum-exp with
    the batch max; one exponentiation of each κ at the end, in fp64). n ≠ m allowed.
    Metrics: ``loss``, ``chi2_bound`` (−L, a lower bound on χ²(p_data ‖ p_θt)), ``real/mean_g``, ``syn/mean_g``,
    ``real/ess``, ``syn/ess`` (of the weights e^{g_i}, e^{2g_j}). Other arguments as :func:`iris_loss`.
    """
    _check_options(scope, backend)
    terms, extras = _chi2_terms(policy_real, policy_syn, ref_real, ref_syn, beta=beta)
    values, used = _reduce_terms("chi2", terms, scope=scope, group=group, stats=stats, backend=backend,
                                 hparams={"beta": beta})
    loss = _chi2_combine(values).float()
    if return_metrics:
        m = {"loss": loss, "chi2_bound": -loss}
        for name in ("real", "syn"):
            st = used[name]
            nan = st[NANS] > 0
            m[f"{name}/mean_g"] = st[MEAN]
            m[f"{name}/ess"] = torch.where(nan, torch.full_like(st[SUMEXP], float("nan")), st[SUMEXP] ** 2 / st[SUMEXP2])
        return loss, _detached(m)
    return loss


def _chi2_logratio_terms(policy_real, policy_syn, ref_real, ref_syn, *, beta: float = 1.0):
    _check_inputs(policy_real, policy_syn, ref_real, ref_syn)
    beta = _check_positive("beta", beta)
    h_real = _log_ratio(policy_real, ref_real, beta)
    h_syn = _log_ratio(policy_syn, ref_syn, beta)
    # Pearson-χ² variational form with h = g: ∂/∂h is −1 on data and 1 + h/2 on synthetic samples.
    terms = {"real": _term_mean(-h_real), "syn": _term_mean(h_syn + 0.25 * h_syn * h_syn)}
    return terms, {"g_real": h_real.detach(), "g_syn": h_syn.detach()}


def chi2_logratio_loss(
    policy_real: torch.Tensor,
    policy_syn: torch.Tensor,
    ref_real: torch.Tensor,
    ref_syn: torch.Tensor,
    *,
    beta: float = 1.0,
    return_metrics: bool = False,
    scope: str = "rank",
    group: Any = None,
    stats: Optional[StepStats] = None,
    backend: str = "auto",
):
    """The first "χ²" loss, kept under its honest name: the Pearson-χ² variational form with the
    LOG-ratio as witness (docs/math.md#baselines):

        L = −mean_R h + mean_S (h + h²/4),   h = β·(s_θ − s_ref).

    A valid bound for any h, but its pointwise optimum h* = 2(p/q − 1) is a density-ratio witness
    a log-ratio cannot reach, so its per-iteration optimum is NOT p_data (from KL 0.41 one exact
    iteration reaches 0.043). Its first gradient at θ = θ_t equals IRIS's. n ≠ m allowed; 0 at
    θ = θ_t. Metrics: ``loss``, ``chi2_bound`` (−L, a looser lower bound on χ²(p_data ‖ p_θt)),
    ``real/mean_g``, ``syn/mean_g``, local. Other
    arguments as :func:`iris_loss`.
    """
    _check_options(scope, backend)
    terms, extras = _chi2_logratio_terms(policy_real, policy_syn, ref_real, ref_syn, beta=beta)
    values, used = _reduce_terms("chi2_logratio", terms, scope=scope, group=group, stats=stats, backend=backend,
                                 hparams={"beta": beta})
    loss = (values["real"] + values["syn"]).float()  # one rounding, after the terms are summed in fp64
    if return_metrics:
        return loss, _mean_g_metrics(loss, values, used, extras, "chi2_bound")
    return loss


def _sft_terms(policy_real, policy_syn=None, ref_real=None, ref_syn=None, *, num_tokens_real=None):
    _check_logps("policy_real", policy_real)
    if num_tokens_real is not None:
        if not isinstance(num_tokens_real, torch.Tensor):
            raise TypeError(
                "num_tokens_real must be a tensor [n] of per-sequence response-token counts, got "
                f"{type(num_tokens_real).__name__}"
            )
        if num_tokens_real.dtype == torch.bool or num_tokens_real.dtype.is_complex:
            raise TypeError(f"num_tokens_real must be an integer or float tensor, got {num_tokens_real.dtype}")
        if num_tokens_real.shape != policy_real.shape:
            raise ValueError(
                f"num_tokens_real shape {tuple(num_tokens_real.shape)} must equal policy_real shape "
                f"{tuple(policy_real.shape)}"
            )
        if num_tokens_real.device != policy_real.device:
            raise ValueError(
                f"num_tokens_real is on {num_tokens_real.device} but policy_real is on {policy_real.device}"
            )
    acc = _acc_dtype(policy_real.device)
    s = policy_real.to(acc)
    # Token-level mean over the batch, −Σ_i s_i / Σ_i T_i (what a causal-LM cross-entropy over the
    # response tokens gives): ∂/∂s_i = −1/Σ T. Under the "global" scope Σ T is the step's total.
    # Without token counts, the sequence-level mean −Σ_i s_i / n.
    if num_tokens_real is None:
        denominator = torch.full((), float(s.shape[0]), dtype=acc, device=s.device)
    else:
        denominator = num_tokens_real.detach().to(acc).sum()
    term = _Term(RATIO, -s, denominator=denominator)
    return {"real": term}, {"s_real": s.detach()}


def sft_loss(
    policy_real: torch.Tensor,
    policy_syn: Optional[torch.Tensor] = None,
    ref_real: Optional[torch.Tensor] = None,
    ref_syn: Optional[torch.Tensor] = None,
    *,
    num_tokens_real: Optional[torch.Tensor] = None,
    return_metrics: bool = False,
    scope: str = "rank",
    group: Any = None,
    stats: Optional[StepStats] = None,
    backend: str = "auto",
):
    """Supervised fine-tuning on the annotated responses: the token-level negative log-likelihood

        L = −Σ_i s_θ(y_i) / Σ_i T_i

    where ``num_tokens_real`` [n] holds T_i, the number of response tokens summed into
    ``policy_real[i]`` (counts must be positive; not checked, which would sync). Without it
    (``None``, so that the common four-argument call works) the loss is the sequence-level mean
    −Σ_i s_θ(y_i) / n. The synthetic and
    reference arguments are accepted for the common signature and ignored (pass None). Under the
    "global" scope or with ``stats`` the token total is the whole step's. Metrics: ``loss``,
    ``real/mean_s`` (mean summed log-prob, local).
    """
    _check_options(scope, backend)
    terms, extras = _sft_terms(policy_real, policy_syn, ref_real, ref_syn, num_tokens_real=num_tokens_real)
    values, used = _reduce_terms("sft", terms, scope=scope, group=group, stats=stats, backend=backend)
    loss = values["real"].float()
    if return_metrics:
        return loss, _detached({"loss": loss, "real/mean_s": extras["s_real"].mean()})
    return loss


# =============================================================================================
# Registry
# =============================================================================================
LOSSES: Dict[str, Callable] = {
    "iris": iris_loss,
    "spin": spin_loss,
    "dpo": dpo_loss,
    "space": space_loss,
    "chi2": chi2_loss,
    "chi2_logratio": chi2_logratio_loss,
    "sft": sft_loss,
}

_TERM_BUILDERS: Dict[str, Callable] = {
    "iris": _iris_terms,
    "spin": _pair_terms,
    "dpo": _pair_terms,
    "space": _space_terms,
    "chi2": _chi2_terms,
    "chi2_logratio": _chi2_logratio_terms,
    "sft": _sft_terms,
}


def get_loss(name: str) -> Callable:
    """The loss function registered under ``name`` (one of ``LOSSES``)."""
    if not isinstance(name, str) or name not in LOSSES:
        raise ValueError(f"unknown loss {name!r}; valid names: {', '.join(sorted(LOSSES))}")
    return LOSSES[name]


# Per-batch keywords: they go with each call, not with the loss's configuration.
_BATCH_KEYWORDS = frozenset({"num_tokens_real"})
_CALL_KEYWORDS = frozenset({"return_metrics", "scope", "group", "stats"})


def check_loss_hparams(name: str, hparams: Mapping[str, Any], *, partial: bool = False) -> None:
    """Validate a loss's hyper-parameters up front (names and values), before any batch is seen.

    Unknown names, α < 0 or non-finite, β or μ ≤ 0 and an unknown SPIN/DPO variant raise
    ValueError/TypeError naming the argument. A tensor α is accepted unchecked (checking its sign
    would synchronise; a negative one makes the loss NaN). ``partial``: some hyper-parameters
    (α, for a caller that supplies it per step) are given later; don't require them here.
    """
    fn = get_loss(name)
    keywords = {
        k for k, p in inspect.signature(fn).parameters.items() if p.kind is inspect.Parameter.KEYWORD_ONLY
    } - _CALL_KEYWORDS - _BATCH_KEYWORDS
    for key, value in hparams.items():
        if key not in keywords:
            raise ValueError(f"unknown hyper-parameter {key!r} for loss {name!r}; it takes {sorted(keywords)}")
        if key == "alpha" and not isinstance(value, torch.Tensor):
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                raise TypeError(f"alpha must be a Python float or a 0-dim tensor, got {type(value).__name__}")
            if not (math.isfinite(value) and value >= 0):
                raise ValueError(f"alpha must be a finite number >= 0, got {value}")
        elif key in ("beta", "mu"):
            _check_positive(key, value)
        elif key == "variant" and value not in _PAIR_VARIANTS:
            raise ValueError(f"variant must be one of {_PAIR_VARIANTS}, got {value!r}")
    if not partial and "alpha" in keywords and "alpha" not in hparams:
        raise ValueError(f"alpha is required for loss {name!r}")


def loss_name(loss: Union[str, Callable]) -> str:
    """Registry name of a loss given by name or by function."""
    if callable(loss):
        for name, fn in LOSSES.items():
            if fn is loss:
                return name
        raise ValueError(f"{loss!r} is not a registered loss; valid names: {', '.join(sorted(LOSSES))}")
    get_loss(loss)
    return loss


@torch.no_grad()
def loss_term_stats(
    loss: Union[str, Callable], policy_real, policy_syn, ref_real, ref_syn, *, backend: str = "auto", **hparams
) -> Dict[str, TermStats]:
    """Detached local statistics of each term of ``loss`` on one micro-batch (no graph built).

    What ``StepNormalizer.observe`` records; hyper-parameters are validated as by the loss.
    """
    name = loss_name(loss)
    terms, _ = _TERM_BUILDERS[name](policy_real, policy_syn, ref_real, ref_syn, **hparams)
    be = _resolve_backend(backend, next(iter(terms.values())).ell.device)
    return {k: _term_local_stats(term, be) for k, term in terms.items()}
