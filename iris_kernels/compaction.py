"""Device-side stable compaction of the scored rows (no host synchronisation).

Prompt and padding positions (target == ignore_index) are often half of a self-play batch; they
need no logits. ``compact_order`` returns a permutation that puts the scored rows first, in their
original order, followed by the ignored rows, and the count of scored rows as an int64 [1]
*device* tensor. The kernels read that count and skip (forward) or zero (backward) every row at or
past it. All of it is element-wise work, a cumulative sum and one scatter: nothing waits for the
device. Where the caller also knows the count on the host (``num_valid``), the chunk grids are
sized from it and the rows past it are never launched at all.

Which path synchronises: none of this. Only ``validate=True`` in the public functions reads the
device (to check that a given ``num_valid`` matches the labels).
"""
from __future__ import annotations

import torch


def compact_order(keep: torch.Tensor):
    """keep: bool [N] -> (perm int64 [N], count int64 [1]) with perm[:count] the kept rows in order.

    dest[i] = (number of kept rows before i)            if keep[i]
            = count + (number of dropped rows before i) otherwise
    is a bijection onto [0, N) that preserves order within each group; perm is its inverse.
    """
    n = keep.shape[0]
    keep64 = keep.to(torch.int64)
    kept_through = torch.cumsum(keep64, 0)  # inclusive
    count = kept_through[-1:].clone() if n else torch.zeros(1, dtype=torch.int64, device=keep.device)
    idx = torch.arange(n, device=keep.device)
    dest = torch.where(keep, kept_through - 1, count + (idx + 1 - kept_through) - 1)
    perm = torch.empty_like(idx).scatter_(0, dest, idx)
    return perm, count
