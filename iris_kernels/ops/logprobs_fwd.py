"""Forward kernel: vocabulary-tiled online log-sum-exp plus the target logit, per token.

Grid = (token blocks, vocabulary splits). Each program walks its share of the vocabulary in
BLOCK_V tiles, keeping a running max m and sum s = sum exp(z - m) per row (the online
log-sum-exp), the target's logit when the target falls in its share, and, for the entropy,
t = sum exp(z - m) * z. The splits' partial statistics (a few floats per token) are merged by
``merge_partials``; the [N, V] logits exist only one tile at a time, in registers.
"""
import functools

import torch
import triton
import triton.language as tl

from .logits_tile import logits_tile


@triton.jit
def logprobs_fwd_kernel(
    hidden_ptr,
    weight_ptr,
    bias_ptr,
    targets_ptr,
    part_max_ptr,  # [SPLITS, N] fp32
    part_sum_ptr,
    part_target_ptr,
    part_zsum_ptr,
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
):
    pid_n = tl.program_id(0)
    pid_s = tl.program_id(1)
    # int64 offsets: row * stride exceeds 2^31 for N*H or V*H beyond 2 Gi elements.
    offs_n = pid_n.to(tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N).to(tl.int64)
    n_mask = offs_n < N
    # Out-of-range targets simply never match a column: no read depends on their value.
    tgt = tl.load(targets_ptr + offs_n, mask=n_mask, other=-1).to(tl.int64)

    run_max = tl.full((BLOCK_N,), float("-inf"), dtype=tl.float32)
    run_sum = tl.zeros((BLOCK_N,), dtype=tl.float32)
    run_zsum = tl.zeros((BLOCK_N,), dtype=tl.float32)
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
        new_max = tl.maximum(run_max, tl.max(z, axis=1))
        # Shift by a finite stand-in while every logit seen so far is -inf (masked columns, or a
        # -inf bias): exp(-inf - -inf) would be NaN, exp(-inf - 0) is the correct 0. A NaN logit
        # still makes the sum NaN, which flows into lse and the log-prob (NaN in, NaN out).
        shift = tl.where(new_max == float("-inf"), 0.0, new_max)
        rescale = tl.exp(run_max - shift)
        p = tl.exp(z - shift[:, None])
        run_sum = run_sum * rescale + tl.sum(p, axis=1)
        if WITH_ENTROPY:
            # p * z with p = 0 and z = -inf is NaN; such terms contribute exactly 0 to E_p[z].
            run_zsum = run_zsum * rescale + tl.sum(tl.where(p > 0.0, p * z, 0.0), axis=1)
        run_max = new_max
        hit = offs_v[None, :] == tgt[:, None]
        target_z += tl.sum(tl.where(hit, z, 0.0), axis=1)

    out = pid_s.to(tl.int64) * N + offs_n
    tl.store(part_max_ptr + out, run_max, mask=n_mask)
    tl.store(part_sum_ptr + out, run_sum, mask=n_mask)
    tl.store(part_target_ptr + out, target_z, mask=n_mask)
    if WITH_ENTROPY:
        tl.store(part_zsum_ptr + out, run_zsum, mask=n_mask)


def merge_partials(part_max, part_sum, part_target, part_zsum):
    """Combine the vocabulary splits: lse = M + log sum_s s_s e^(m_s - M); E_p[z] likewise."""
    top = part_max.max(dim=0).values
    # A row whose logits are all -inf has top = -inf; shift by 0 there (lse = log 0 = -inf).
    top = torch.where(torch.isneginf(top), torch.zeros_like(top), top)
    scale = torch.exp(part_max - top)
    total = (part_sum * scale).sum(0)
    lse = top + torch.log(total)
    target_z = part_target.sum(0)
    mean_z = None if part_zsum is None else (part_zsum * scale).sum(0) / total
    return lse, target_z, mean_z


def logprobs_fwd(hidden, weight, targets, bias, *, inv_temperature, softcap, with_entropy,
                 upcast, tiles, num_splits=None, n_valid=None):
    """hidden [N, H] and weight [V, H] row-contiguous; returns (lse, target_z, mean_z | None).

    ``n_valid``: optional int64 [1] device tensor; row blocks starting at or past it are skipped
    and their statistics are unspecified.
    """
    N, H = hidden.shape
    V = weight.shape[0]
    block_n, block_v, block_h, num_warps = tiles
    n_blocks = triton.cdiv(N, block_n)
    v_tiles = triton.cdiv(V, block_v)
    if num_splits is None:
        num_splits = default_splits(n_blocks, v_tiles, hidden.device)
    num_splits = max(1, min(num_splits, v_tiles))
    v_per_split = triton.cdiv(v_tiles, num_splits) * block_v
    num_splits = triton.cdiv(V, v_per_split)
    f32 = dict(dtype=torch.float32, device=hidden.device)
    part_max = torch.empty((num_splits, N), **f32)
    part_sum = torch.empty((num_splits, N), **f32)
    part_target = torch.empty((num_splits, N), **f32)
    part_zsum = torch.empty((num_splits, N), **f32) if with_entropy else part_sum
    logprobs_fwd_kernel[(n_blocks, num_splits)](
        hidden, weight, bias if bias is not None else hidden, targets,
        part_max, part_sum, part_target, part_zsum,
        n_valid if n_valid is not None else targets,
        N, V, H, hidden.stride(0), weight.stride(0), v_per_split,
        inv_temperature, softcap if softcap is not None else 1.0,
        HAS_BIAS=bias is not None,
        HAS_SOFTCAP=softcap is not None,
        WITH_ENTROPY=with_entropy,
        HAS_COUNT=n_valid is not None,
        UPCAST=upcast,
        IEEE_DOT=hidden.dtype == torch.float32,
        BLOCK_N=block_n, BLOCK_V=block_v, BLOCK_H=block_h,
        num_warps=num_warps,
    )
    return merge_partials(part_max, part_sum, part_target, part_zsum if with_entropy else None)


@functools.lru_cache(maxsize=None)
def _sm_count(device_index):
    return torch.cuda.get_device_properties(device_index).multi_processor_count


def default_splits(n_blocks, v_tiles, device):
    """Split the vocabulary until the grid has a few programs per SM; one split on the CPU."""
    if device.type != "cuda":
        return 1
    sms = _sm_count(device.index if device.index is not None else torch.cuda.current_device())
    return max(1, min(v_tiles, triton.cdiv(4 * sms, n_blocks)))
