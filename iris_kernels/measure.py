"""The one timing and error core shared by ``python -m iris_kernels.selfcheck``, ``benchmarks/`` and the GPU run.

* ``time_fwd_bwd``: one forward + backward call timed in milliseconds, by CUDA events on a GPU
  (recorded on the current stream: the device's time, not the host's launch time) and by
  ``time.perf_counter`` elsewhere.
* ``summarize``: median and the 20th / 80th percentiles of repeated times.
* ``max_abs_err`` / ``rel_err``: the error of a result against an fp64 reference, on the
  reference's device, NaN-propagating (a NaN result shows as a NaN error, never as 0); a missing
  result (None where one is due) is an infinite error.
* ``sample_rows``: a fixed, seeded subset of row indices, for checking a gradient too large to
  hold twice in fp64 (the 311 M-element weight gradient of a 151936 x 2048 head) on a slice.
"""
from __future__ import annotations

import math
import statistics
import time
from typing import Callable, Optional, Sequence, Tuple

import torch

__all__ = ["time_fwd_bwd", "time_call", "summarize", "max_abs_err", "rel_err", "sample_rows"]


def time_fwd_bwd(forward: Callable[[], object], backward: Callable[[object], None],
                 device: torch.device) -> Tuple[float, float, object]:
    """(forward ms, backward ms, forward's output) of one call: ``out = forward(); backward(out)``."""
    if device.type == "cuda":
        start, mid, end = (torch.cuda.Event(enable_timing=True) for _ in range(3))
        start.record()
        out = forward()
        mid.record()
        backward(out)
        end.record()
        end.synchronize()
        return start.elapsed_time(mid), mid.elapsed_time(end), out
    t0 = time.perf_counter()
    out = forward()
    t1 = time.perf_counter()
    backward(out)
    t2 = time.perf_counter()
    return (t1 - t0) * 1e3, (t2 - t1) * 1e3, out


def time_call(fn: Callable[[], object], device: torch.device) -> float:
    """Milliseconds of one call of ``fn`` (CUDA events on a GPU)."""
    return time_fwd_bwd(fn, lambda _: None, device)[0]


def summarize(xs: Sequence[float]) -> Tuple[float, float, float]:
    """(median, p20, p80); a single sample is all three."""
    xs = list(xs)
    if len(xs) == 1:
        return xs[0], xs[0], xs[0]
    qs = statistics.quantiles(xs, n=10, method="inclusive")
    return statistics.median(xs), qs[1], qs[7]


def max_abs_err(got: Optional[torch.Tensor], want: torch.Tensor) -> float:
    """max |got - want| computed in fp64 on want's device; inf if got is None, NaN if either has one."""
    if got is None:
        return math.inf
    if want.numel() == 0:
        return 0.0
    got = got.detach().to(device=want.device).reshape(want.shape).double()
    return float((got - want.double()).abs().max())


def rel_err(got: Optional[torch.Tensor], want: torch.Tensor) -> float:
    """||got - want|| / ||want|| (Frobenius, fp64, on want's device); inf if got is None."""
    if got is None:
        return math.inf
    got = got.detach().to(device=want.device).reshape(want.shape).double()
    want = want.double()
    return float((got - want).norm() / want.norm().clamp(min=1e-300))


def sample_rows(n: int, k: Optional[int], seed: int, device=None) -> torch.Tensor:
    """k distinct row indices of range(n), sorted, from a seeded permutation; all n rows when k is None or >= n."""
    if k is None or k >= n:
        return torch.arange(n, device=device)
    g = torch.Generator().manual_seed(seed)
    return torch.randperm(n, generator=g)[:k].sort().values.to(device)

