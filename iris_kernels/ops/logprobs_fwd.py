"""Forward kernel: vocabulary-tiled online log-sum-exp plus the target logit, per token.

Grid: one dimension of (token block, vocabulary split) pairs in the grouped order of
ops/launch_order.py (a wave shares few token blocks: their hidden rows stay in L2). Each program
walks its share of the vocabulary in BLOCK_V tiles, keeping a running max m and sum
s = sum exp(z - m) per row (the online log-sum-exp), the target's logit when the target falls in its share, and, for the entropy,
t = sum exp(z - m) * (z - m), a sum over logits shifted by the same running max. The splits'
partial statistics (a few floats per token) are merged by ``merge_partials`` into lse and the
entropy H = log S - T / S (S, T merged at a common shift), which never subtracts two numbers of
the size of a common logit offset (lse - E_p[z] would: 4e-3 nat lost at an offset of 2e4).
The [N, V] logits exist only one tile at a time, in registers.

Online update of t when the running max moves from m to m' (m' >= m): every earlier term
e^(z-m) (z-m) becomes e^(z-m') (z-m') = e^(m-m') [e^(z-m) (z-m) + e^(z-m) (m-m')], so
t' = e^(m-m') (t + (m-m') s) + sum_tile e^(z-m') (z-m').
"""
import functools

import torch
import triton
import triton.language as tl

from ..reference import entropy_from_shifted_sums, split_lse
from ..tuning import Tile, vocab_splits
from .launch_order import GROUP_ROWS, grouped_program
from .logits_tile import logits_tile


@triton.jit
def online_lse_update(z, offs_v, tgt, run_max, run_sum, run_tsum, target_z, WITH_ENTROPY: tl.constexpr):
    """Fold one [BLOCK_N, BLOCK_V] tile of logits z (masked columns already -inf) into the running
    statistics (m, s, t, target logit) of its rows; the update derived in the module docstring.
    Shared by the fused forward and the split forward's row kernel (ops/logprobs_split.py)."""
    new_max = tl.maximum(run_max, tl.max(z, axis=1))
    # Shift by a finite stand-in while every logit seen so far is -inf (masked columns, or a
    # -inf bias): exp(-inf - -inf) would be NaN, exp(-inf - 0) is the correct 0. A NaN logit
    # still makes the sum NaN, which flows into lse and the log-prob (NaN in, NaN out).
    shift = tl.where(new_max == float("-inf"), 0.0, new_max)
    rescale = tl.exp(run_max - shift)
    zs = z - shift[:, None]
    p = tl.exp(zs)
    if WITH_ENTROPY:
        # Before any finite logit, s = t = 0 and m - m' is -inf or NaN: the move adds 0.
        moved = tl.where(run_sum > 0.0, (run_max - shift) * run_sum, 0.0)
        # p * (z - m') with p = 0 and z = -inf is NaN; such terms contribute exactly 0.
        run_tsum = (run_tsum + moved) * rescale + tl.sum(tl.where(p > 0.0, p * zs, 0.0), axis=1)
    run_sum = run_sum * rescale + tl.sum(p, axis=1)
    hit = offs_v[None, :] == tgt[:, None]
    target_z += tl.sum(tl.where(hit, z, 0.0), axis=1)
    return new_max, run_sum, run_tsum, target_z


@triton.jit
def logprobs_fwd_kernel(
    hidden_ptr,
    weight_ptr,
    bias_ptr,
    targets_ptr,
    part_max_ptr,  # [SPLITS, N] fp32
    part_sum_ptr,
    part_target_ptr,
    part_tsum_ptr,  # sum exp(z - m) (z - m), with the entropy
    n_valid_ptr,  # int64 [1]: rows >= n_valid (compacted order) are skipped (HAS_COUNT)
    N,
    V,
    H,
    stride_hn,
    stride_wv,
    v_per_split,
    inv_temperature,
    softcap,
    HAS_BIAS: tl.constexpr,
    HAS_SOFTCAP: tl.constexpr,
    WITH_ENTROPY: tl.constexpr,
    HAS_COUNT: tl.constexpr,
    UPCAST: tl.constexpr,
    IEEE_DOT: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_V: tl.constexpr,
    BLOCK_H: tl.constexpr,
    GROUP: tl.constexpr,
):
    pid_n, pid_s = grouped_program(tl.program_id(0), tl.cdiv(N, BLOCK_N), tl.cdiv(V, v_per_split), GROUP)
    # int64 offsets: row * stride exceeds 2^31 for N*H or V*H beyond 2 Gi elements.
    offs_n = pid_n.to(tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N).to(tl.int64)
    n_mask = offs_n < N
    # Out-of-range targets simply never match a column: no read depends on their value.
    tgt = tl.load(targets_ptr + offs_n, mask=n_mask, other=-1).to(tl.int64)

    run_max = tl.full((BLOCK_N,), float("-inf"), dtype=tl.float32)
    run_sum = tl.zeros((BLOCK_N,), dtype=tl.float32)
    run_tsum = tl.zeros((BLOCK_N,), dtype=tl.float32)
    target_z = tl.zeros((BLOCK_N,), dtype=tl.float32)

    v_begin = pid_s.to(tl.int64) * v_per_split
    v_end = tl.minimum(v_begin + v_per_split, V)
    if HAS_COUNT:
        # Ignored rows compacted past the device-resident count: an empty loop, no logits.
        # Their statistics are written but never used (the caller keeps only scored rows).
        live = pid_n.to(tl.int64) * BLOCK_N < tl.load(n_valid_ptr)
        v_end = tl.where(live, v_end, v_begin)
    for v0 in range(v_begin, v_end, BLOCK_V):
        offs_v = v0 + tl.arange(0, BLOCK_V).to(tl.int64)
        v_mask = offs_v < v_end
        z = logits_tile(
            hidden_ptr, weight_ptr, bias_ptr, offs_n, offs_v, n_mask, v_mask, H,
            stride_hn, stride_wv, inv_temperature, softcap,
            HAS_BIAS, HAS_SOFTCAP, UPCAST, IEEE_DOT, BLOCK_N, BLOCK_V, BLOCK_H,
        )
        z = tl.where(v_mask[None, :], z, float("-inf"))
        run_max, run_sum, run_tsum, target_z = online_lse_update(
            z, offs_v, tgt, run_max, run_sum, run_tsum, target_z, WITH_ENTROPY)

    out = pid_s.to(tl.int64) * N + offs_n
    tl.store(part_max_ptr + out, run_max, mask=n_mask)
    tl.store(part_sum_ptr + out, run_sum, mask=n_mask)
    tl.store(part_target_ptr + out, target_z, mask=n_mask)
    if WITH_ENTROPY:
        tl.store(part_tsum_ptr + out, run_tsum, mask=n_mask)


def merge_partials(part_max, part_sum, part_target, part_tsum, *, with_lse_lo=False):
    """Combine the vocabulary splits at the common shift M = max_s m_s.

    lse = M + log S with S = sum_s s_s e^(m_s - M); T = sum_s e^(m_s - M) (t_s + (m_s - M) s_s)
    (the online update above, applied once per split); entropy H = log S - T / S.
    Returns (lse, target_z, H | None), plus lse_lo (``split_lse``) when ``with_lse_lo``.
    """
    top = part_max.max(dim=0).values  # a max is exact in any order
    # A row whose logits are all -inf has top = -inf; shift by 0 there (lse = log 0 = -inf).
    top = torch.where(torch.isneginf(top), torch.zeros_like(top), top)
    delta = part_max - top
    scale = torch.exp(delta)
    total = ordered_sum(part_sum * scale)
    lse, lse_lo = split_lse(top, torch.log(total))
    target_z = ordered_sum(part_target)
    entropy = None
    if part_tsum is not None:
        # A split that saw only -inf logits has s = t = 0 and delta = -inf: it adds 0, not NaN.
        moved = torch.where(part_sum > 0, delta * part_sum, torch.zeros_like(part_sum))
        tsum = ordered_sum((part_tsum + moved) * scale)
        entropy = entropy_from_shifted_sums(total, tsum)
    return (lse, target_z, entropy, lse_lo) if with_lse_lo else (lse, target_z, entropy)


def ordered_sum(parts: torch.Tensor) -> torch.Tensor:
    """Sum over dim 0 ([S, N] -> [N]) as s = 0, 1, ..., S-1, one element-wise add per split.

    A reduction kernel may pick its summation tree from the shape (on CUDA, how many rows share a
    block depends on N), so ``.sum(0)`` could make a row's lse depend on the batch size. S is a
    handful (``vocab_splits``), so S - 1 element-wise adds cost nothing next to the logits.
    """
    total = parts[0]
    for s in range(1, parts.shape[0]):
        total = total + parts[s]
    return total


def logprobs_fwd(hidden, weight, targets, bias, *, inv_temperature, softcap, with_entropy,
                 upcast, tiles, num_splits=None, with_lse_lo=False, n_valid=None, sm_count=None):
    """hidden [N, H] and weight [V, H] row-contiguous; returns fp32 [N] (lse, target_z, H | None).

    H is the per-row entropy of softmax(z) (unmasked: ignored rows are not zeroed here). With
    ``with_lse_lo`` also returns lse_lo, the rounding error of the fp32 lse (``split_lse``).
    ``n_valid``: optional int64 [1] device tensor; row blocks starting at or past it are skipped
    and their statistics are unspecified. ``num_splits``: vocabulary splits (default
    ``tuning.vocab_splits``: from V, the tile and the device's SM count, never from N, so that a
    row's results do not depend on the batch; ``sm_count`` overrides the device's).
    """
    N, H = hidden.shape
    V = weight.shape[0]
    tiles = Tile(*tiles)
    block_n, block_v, block_h = tiles.block_n, tiles.block_v, tiles.block_h
    n_blocks = triton.cdiv(N, block_n)
    v_tiles = triton.cdiv(V, block_v)
    if num_splits is None:
        if sm_count is None and hidden.device.type == "cuda":
            sm_count = _sm_count(hidden.device.index if hidden.device.index is not None
                                 else torch.cuda.current_device())
        num_splits = vocab_splits(v_tiles, sm_count)
    num_splits = max(1, min(num_splits, v_tiles))
    v_per_split = triton.cdiv(v_tiles, num_splits) * block_v
    num_splits = triton.cdiv(V, v_per_split)
    f32 = dict(dtype=torch.float32, device=hidden.device)
    part_max = torch.empty((num_splits, N), **f32)
    part_sum = torch.empty((num_splits, N), **f32)
    part_target = torch.empty((num_splits, N), **f32)
    part_tsum = torch.empty((num_splits, N), **f32) if with_entropy else part_sum
    logprobs_fwd_kernel[(n_blocks * num_splits,)](
        hidden, weight, bias if bias is not None else hidden, targets,
        part_max, part_sum, part_target, part_tsum,
        n_valid if n_valid is not None else targets,
        N, V, H, hidden.stride(0), weight.stride(0), v_per_split,
        inv_temperature, softcap if softcap is not None else 1.0,
        HAS_BIAS=bias is not None,
        HAS_SOFTCAP=softcap is not None,
        WITH_ENTROPY=with_entropy,
        HAS_COUNT=n_valid is not None,
        UPCAST=upcast,
        IEEE_DOT=hidden.dtype == torch.float32,
        BLOCK_N=block_n, BLOCK_V=block_v, BLOCK_H=block_h, GROUP=GROUP_ROWS,
        num_warps=tiles.num_warps, num_stages=tiles.num_stages,
    )
    return merge_partials(part_max, part_sum, part_target, part_tsum if with_entropy else None,
                          with_lse_lo=with_lse_lo)


@functools.lru_cache(maxsize=None)
def _sm_count(device_index):
    return torch.cuda.get_device_properties(device_index).multi_processor_count

