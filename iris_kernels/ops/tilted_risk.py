"""Triton kernels for the tilted risk κ_t(ℓ) = (1/t)·log((1/N)·Σ_i exp(t·ℓ_i)) over a 1-D batch.

Forward: ONE pass over the batch accumulating a fixed-size statistics vector (layout below) and
κ_t itself. Backward: the gradient ∂κ_t/∂ℓ_i = softmax(t·ℓ)_i, scaled by the upstream gradient.

Everything batch-level runs in fp64. The batch is a few thousand sequences at most, so the cost is
nil, and it buys accuracy where fp32 fails: κ_t divides the log-sum-exp by t, so its rounding error
ε·log(N) is amplified by 1/|t| (in fp32, ~1e-3 absolute at t = 1e-4). In fp64 the exact formula
stays accurate down to |t|·(max ℓ − min ℓ) = SERIES_EPS (1e-3, passed by the caller), below which
the series
    κ_t = mean + (t/2)·var + (t²/6)·μ₃ + O(t³·spread⁴)
is used; at the switch both are within ~1e-11·spread of the truth, far below the fp32 output.
Choosing the switch by |t|·spread rather than |t| alone keeps the truncation error relative to the
batch's own scale (log-ratios range from 1e-3 to 1e3).

Statistics layout (fp64, NUM_STATS values). The vector is mergeable: the stats of a concatenated
batch follow from the stats of its parts (see ``iris_kernels.distributed.merge_stats``), which is
what global normalisation over micro-batches and ranks uses.
    COUNT    N
    TMAX     max_i t·ℓ_i                     (the log-sum-exp shift; 0 where that max is ±inf)
    SUMEXP   Σ_i exp(t·ℓ_i − TMAX)           (≥ 1)
    SUMEXP2  Σ_i exp(2·(t·ℓ_i − TMAX))       (for the effective sample size 1/Σw²)
    MEAN     (1/N)·Σ_i ℓ_i
    M2       Σ_i (ℓ_i − MEAN)²
    M3       Σ_i (ℓ_i − MEAN)³
    LMAX     max_i ℓ_i
    LMIN     min_i ℓ_i
    NANS     number of NaN inputs (any NaN makes κ and every weight NaN)

Only @triton.jit code and launch helpers live here; validation is the caller's job
(``iris_kernels.losses.tilted_risk``). The launch helpers take a 1-D tensor (any float dtype, any
stride, N ≥ 1) and t as a 0-dim fp64 tensor on the same device, so that a scheduled α that is a
tensor is read on the device and never synchronised to the host.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

# Slot order of the statistics vector; the kernel stores slot k at stats_ptr + k (the names live
# in iris_kernels.distributed, where the vectors are merged).
NUM_STATS = 10

# The forward is a single program looping over the batch (N is the number of sequences, not
# tokens). Large tiles keep the interpreter fast (cost ∝ programs × loop steps).
_FWD_BLOCK_MAX = 1024
_BWD_BLOCK = 1024


@triton.jit
def _load_fp64(ptr, offs, stride, mask, UPCAST_FP32: tl.constexpr):
    x = tl.load(ptr + offs.to(tl.int64) * stride, mask=mask, other=0.0)
    if UPCAST_FP32:
        # bf16/fp16: through fp32 first (the interpreter stores bf16 as raw uint16 and only knows
        # how to widen it to fp32).
        x = x.to(tl.float32)
    return x.to(tl.float64)


@triton.jit
def _tilted_risk_fwd_kernel(
    x_ptr,
    stride,
    n,
    t_ptr,
    stats_ptr,
    kappa_ptr,
    SERIES_EPS: tl.constexpr,
    UPCAST_FP32: tl.constexpr,
    BLOCK: tl.constexpr,
):
    t = tl.load(t_ptr).to(tl.float64)
    neg_inf = float("-inf")

    cnt = tl.full([], 0.0, tl.float64)
    nans = tl.full([], 0.0, tl.float64)
    run_max = tl.full([], neg_inf, tl.float64)
    sumexp = tl.full([], 0.0, tl.float64)
    sumexp2 = tl.full([], 0.0, tl.float64)
    mean = tl.full([], 0.0, tl.float64)
    m2 = tl.full([], 0.0, tl.float64)
    m3 = tl.full([], 0.0, tl.float64)
    lmax = tl.full([], neg_inf, tl.float64)
    lmin = tl.full([], float("inf"), tl.float64)

    for start in range(0, n, BLOCK):
        offs = start + tl.arange(0, BLOCK)
        mask = offs < n
        x = _load_fp64(x_ptr, offs, stride, mask, UPCAST_FP32)
        nans += tl.sum((x != x).to(tl.float64), axis=0)
        cnt_b = tl.sum(mask.to(tl.float64), axis=0)

        # Online log-sum-exp: rescale the running sums to the new shift. exp(-inf - finite) = 0
        # makes the first block need no special case.
        # t = 0 tilts nothing, even an infinite ℓ (0·inf would be NaN).
        tx = tl.where(mask, tl.where(t == 0.0, 0.0, t * x), neg_inf)
        new_max = tl.maximum(run_max, tl.max(tx, axis=0))
        # The shift is the running max while it is finite and 0 while it is ±inf: with every
        # entry -inf so far, exp(-inf - 0) = 0; with an entry at t·ℓ = +inf the sum becomes inf
        # and κ = ±inf, as log-sum-exp gives, where exp(inf - inf) would have made it NaN.
        old_shift = tl.where((run_max == float("inf")) | (run_max == neg_inf), 0.0, run_max)
        new_shift = tl.where((new_max == float("inf")) | (new_max == neg_inf), 0.0, new_max)
        # Nothing accumulated yet (run_max = -inf): the sums are 0, rescale them by 0, not by
        # exp(0 - new_shift), which may overflow to inf (and 0 · inf = NaN).
        rescale = tl.where(run_max == neg_inf, 0.0, tl.exp(old_shift - new_shift))
        e = tl.where(mask, tl.exp(tx - new_shift), 0.0)
        sumexp = sumexp * rescale + tl.sum(e, axis=0)
        sumexp2 = sumexp2 * rescale * rescale + tl.sum(e * e, axis=0)
        run_max = new_max

        # Central moments of the block, then the pairwise merge (Chan et al. for M2, Pébay for M3).
        # With d = mean_b − mean_a, n = n_a + n_b, every x of part a sits at (x − mean_a) − d·n_b/n
        # from the merged mean and every x of part b at (x − mean_b) + d·n_a/n. Expanding the
        # squares and cubes, the linear terms vanish (Σ(x − mean_a) = 0 over a), leaving
        #   M2 = M2_a + M2_b + d²·n_a·n_b/n
        #   M3 = M3_a + M3_b + d³·n_a·n_b·(n_a − n_b)/n² + 3·d·(n_a·M2_b − n_b·M2_a)/n.
        mean_b = tl.sum(tl.where(mask, x, 0.0), axis=0) / cnt_b
        dev = tl.where(mask, x - mean_b, 0.0)
        m2_b = tl.sum(dev * dev, axis=0)
        m3_b = tl.sum(dev * dev * dev, axis=0)
        tot = cnt + cnt_b
        d = mean_b - mean
        m3 = (
            m3
            + m3_b
            + d * d * d * cnt * cnt_b * (cnt - cnt_b) / (tot * tot)
            + 3.0 * d * (cnt * m2_b - cnt_b * m2) / tot
        )
        m2 = m2 + m2_b + d * d * cnt * cnt_b / tot
        mean = mean + d * cnt_b / tot
        cnt = tot

        lmax = tl.maximum(lmax, tl.max(tl.where(mask, x, neg_inf), axis=0))
        lmin = tl.minimum(lmin, tl.min(tl.where(mask, x, float("inf")), axis=0))

    tmax = tl.where((run_max == float("inf")) | (run_max == neg_inf), 0.0, run_max)  # the final shift

    # κ_t from the statistics; mirrors iris_kernels.losses.kappa_from_stats (tested to agree).
    use_series = (t == 0.0) | (tl.abs(t) * (lmax - lmin) <= SERIES_EPS)
    t_safe = tl.where(t == 0.0, 1.0, t)  # the exact branch is discarded at t = 0; avoid 0/0
    exact = (tmax + tl.log(sumexp) - tl.log(cnt)) / t_safe
    series = mean + t * (m2 / (2.0 * cnt) + t * m3 / (6.0 * cnt))
    kappa = tl.where(use_series, series, exact)
    kappa = tl.where(t == 0.0, mean, kappa)  # exact even when the moments overflow
    kappa = tl.where(nans > 0.0, float("nan"), kappa)

    tl.store(stats_ptr + 0, cnt)
    tl.store(stats_ptr + 1, tmax)
    tl.store(stats_ptr + 2, sumexp)
    tl.store(stats_ptr + 3, sumexp2)
    tl.store(stats_ptr + 4, mean)
    tl.store(stats_ptr + 5, m2)
    tl.store(stats_ptr + 6, m3)
    tl.store(stats_ptr + 7, lmax)
    tl.store(stats_ptr + 8, lmin)
    tl.store(stats_ptr + 9, nans)
    tl.store(kappa_ptr, kappa)


@triton.jit
def _tilted_risk_bwd_kernel(
    x_ptr,
    stride,
    n,
    t_ptr,
    stats_ptr,
    grad_ptr,
    grad_scale,
    dx_ptr,
    UPCAST_FP32: tl.constexpr,
    BLOCK: tl.constexpr,
):
    # ∂κ_t/∂ℓ_i: with Z = Σ_j exp(t·ℓ_j), κ_t = (log Z − log N)/t, so ∂κ_t/∂ℓ_i =
    # (1/t)·t·exp(t·ℓ_i)/Z = exp(t·ℓ_i − TMAX)/SUMEXP = softmax(t·ℓ)_i. At t = 0 this is
    # exp(0)/N = 1/N, the mean's gradient, so no special case. TMAX/SUMEXP may be the statistics
    # of a larger (global) batch: the weights are then that batch's softmax restricted to the
    # local samples, and grad_scale undoes the data-parallel gradient averaging.
    pid = tl.program_id(0)
    offs = pid.to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    x = _load_fp64(x_ptr, offs, stride, mask, UPCAST_FP32)
    t = tl.load(t_ptr).to(tl.float64)
    tmax = tl.load(stats_ptr + 1)
    sumexp = tl.load(stats_ptr + 2)
    nans = tl.load(stats_ptr + 9)
    g = tl.load(grad_ptr).to(tl.float64) * grad_scale
    # Lanes past n loaded 0.0; keep their exponent at 0 so they cannot overflow (never stored).
    tx = tl.where(t == 0.0, 0.0, t * x)  # at t = 0 every weight is 1/N, infinite ℓ included
    w = tl.exp(tl.where(mask, tx - tmax, 0.0)) / sumexp
    w = tl.where(nans > 0.0, float("nan"), w)
    tl.store(dx_ptr + offs, (w * g).to(dx_ptr.dtype.element_ty), mask=mask)


def _upcast_flag(x: torch.Tensor) -> bool:
    return x.dtype in (torch.float16, torch.bfloat16)


def tilted_risk_fwd(x: torch.Tensor, t: torch.Tensor, series_eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(κ_t as 0-dim fp64, statistics [NUM_STATS] fp64) for 1-D x (N ≥ 1) and 0-dim fp64 t.

    The series is used where |t|·(max x − min x) <= series_eps.
    """
    n = x.shape[0]
    stats = torch.empty(NUM_STATS, dtype=torch.float64, device=x.device)
    kappa = torch.empty((), dtype=torch.float64, device=x.device)
    block = min(_FWD_BLOCK_MAX, max(16, triton.next_power_of_2(n)))
    _tilted_risk_fwd_kernel[(1,)](
        x,
        x.stride(0),
        n,
        t,
        stats,
        kappa,
        SERIES_EPS=series_eps,
        UPCAST_FP32=_upcast_flag(x),
        BLOCK=block,
        num_warps=4,
    )
    return kappa, stats


def tilted_risk_bwd(
    x: torch.Tensor,
    t: torch.Tensor,
    stats: torch.Tensor,
    grad: torch.Tensor,
    grad_scale: float,
    out_dtype: torch.dtype,
) -> torch.Tensor:
    """grad_scale · grad · softmax(t·x) under the shift/normaliser held in ``stats``.

    ``out_dtype`` must be float32 or float64 (the caller casts to a half dtype if it needs one).
    """
    n = x.shape[0]
    dx = torch.empty(n, dtype=out_dtype, device=x.device)
    grid = (triton.cdiv(n, _BWD_BLOCK),)
    _tilted_risk_bwd_kernel[grid](
        x,
        x.stride(0),
        n,
        t,
        stats,
        grad,
        float(grad_scale),
        dx,
        UPCAST_FP32=_upcast_flag(x),
        BLOCK=_BWD_BLOCK,
        num_warps=4,
    )
    return dx
