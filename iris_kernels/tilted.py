"""The tilted risk κ_t (docs/math.md#tilted-risk): the reduction behind IRIS's and χ²'s terms.

    κ_t(ℓ) = (1/t)·log((1/N)·Σ_i exp(t·ℓ_i)),   κ_0 = mean(ℓ),   ∂κ_t/∂ℓ = softmax(t·ℓ)

Its statistics vector (layout in ``iris_kernels.distributed``), κ from (possibly merged)
statistics, the autograd.Function that reduces one term (Triton kernel or PyTorch, exactly
twice-differentiable on the PyTorch path), backend resolution, and the public ``tilted_risk``.
``iris_kernels.losses`` re-exports ``tilted_risk``, ``kappa_from_stats`` and ``SERIES_EPS``.
Statistics run in fp64 (fp32 on MPS); nothing here syncs with the host.
"""
from __future__ import annotations

import math
import os
from dataclasses import dataclass
from typing import Tuple, Union

import torch

from .double_backward import no_double_backward
from .distributed import COUNT, LMAX, LMIN, M2, M3, MEAN, NANS, SUMEXP, TMAX

try:  # Triton is optional (Linux only); the PyTorch path covers everything else.
    from .custom_ops import tilted_kernels as _tilted_ops  # ops.tilted_risk, as custom ops under torch.compile
except ImportError:  # pragma: no cover - exercised only where triton is missing
    _tilted_ops = None

__all__ = ["tilted_risk", "kappa_from_stats", "SERIES_EPS"]

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
