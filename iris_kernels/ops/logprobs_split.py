"""Split forward: a cuBLAS product writes fp32 logits per chunk of rows, a Triton row kernel folds them.

The fused forward (ops/logprobs_fwd.py) computes each logits tile in registers and never stores
it; its speed depends on Triton's tensor-core code generation for the product, which moves with
the device and the Triton version. This variant leaves the product to cuBLAS: per chunk of C rows,
raw = h W^T is written once, accumulated *and stored* in fp32 ([C, V] fp32, never bf16 logits:
a logit of 21.09 rounded to bf16 is off by 0.03, above the per-token budget), then
``logprobs_rows_kernel`` reads it once and produces exactly the statistics the fused kernel
produces for one vocabulary split: the running max m, s = sum exp(z - m), t = sum exp(z - m)
(z - m) (entropy) and the target logit, with z = softcap(raw + b) / tau as in ``logits_tile``.
``merge_partials`` (shared with the fused forward) then gives lse, its rounding error lse_lo and
the entropy H = log S - T / S, so either backward runs after it unchanged.

Memory: C x V x 4 bytes for the chunk (C from the workspace budget, as the workspace backward's
chunk), plus an fp32 copy of the weight only on a torch without ``mm(out_dtype=float32)``.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ..reference import _MM_OUT_DTYPE
from ..tuning import workspace_rows
from .logits_tile import tanh_f32
from .logprobs_fwd import merge_partials, online_lse_update


@triton.jit
def logprobs_rows_kernel(
    logits_ptr,  # fp32 [rows, V], row stride stride_ln: raw h W^T of this chunk
    bias_ptr,
    targets_ptr,  # int64 [rows]
    out_max_ptr,  # fp32 [rows]
    out_sum_ptr,
    out_target_ptr,
    out_tsum_ptr,
    n_valid_ptr,  # int64 [1]: rows with row0 + row >= n_valid are skipped (HAS_COUNT)
    rows,
    V,
    row0,
    stride_ln,
    inv_temperature,
    softcap,
    HAS_BIAS: tl.constexpr,
    HAS_SOFTCAP: tl.constexpr,
    WITH_ENTROPY: tl.constexpr,
    HAS_COUNT: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_V: tl.constexpr,
):
    # The online log-sum-exp and entropy update of ops/logprobs_fwd.py, over stored logits:
    # t' = e^(m-m') (t + (m-m') s) + sum_tile e^(z-m') (z-m') when the running max moves m -> m'.
    pid = tl.program_id(0)
    offs_n = pid.to(tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N).to(tl.int64)
    n_mask = offs_n < rows
    # Row base addresses in 64 bits (rows * V exceeds 2^31), columns as int32 offsets from them:
    # a [BLOCK_N, BLOCK_V] tile of 64-bit addresses would take registers the tile itself needs.
    row_ptr = logits_ptr + offs_n * stride_ln
    cols = tl.arange(0, BLOCK_V)
    tgt = tl.load(targets_ptr + offs_n, mask=n_mask, other=-1)
    # Out-of-range targets (any int64) become -1: they never match a column and cannot alias one
    # after the 32-bit narrowing.
    tgt = tl.where((tgt >= 0) & (tgt < V), tgt, -1).to(tl.int32)

    run_max = tl.full((BLOCK_N,), float("-inf"), dtype=tl.float32)
    run_sum = tl.zeros((BLOCK_N,), dtype=tl.float32)
    run_tsum = tl.zeros((BLOCK_N,), dtype=tl.float32)
    target_z = tl.zeros((BLOCK_N,), dtype=tl.float32)

    v_end = V
    if HAS_COUNT:
        # Compacted rows past the device-resident count: no pass over their logits.
        live = row0 + pid.to(tl.int64) * BLOCK_N < tl.load(n_valid_ptr)
        v_end = tl.where(live, V, 0)
    for v0 in range(0, v_end, BLOCK_V):
        offs_v = v0 + cols
        v_mask = offs_v < V
        z = tl.load(row_ptr[:, None] + offs_v[None, :], mask=n_mask[:, None] & v_mask[None, :], other=0.0)
        if HAS_BIAS:
            z = z + tl.load(bias_ptr + offs_v, mask=v_mask, other=0.0).to(tl.float32)[None, :]
        if HAS_SOFTCAP:
            z = softcap * tanh_f32(z / softcap)
        z = z * inv_temperature
        z = tl.where(v_mask[None, :], z, float("-inf"))
        run_max, run_sum, run_tsum, target_z = online_lse_update(
            z, offs_v, tgt, run_max, run_sum, run_tsum, target_z, WITH_ENTROPY)

    tl.store(out_max_ptr + offs_n, run_max, mask=n_mask)
    tl.store(out_sum_ptr + offs_n, run_sum, mask=n_mask)
    tl.store(out_target_ptr + offs_n, target_z, mask=n_mask)
    if WITH_ENTROPY:
        tl.store(out_tsum_ptr + offs_n, run_tsum, mask=n_mask)


# (BLOCK_N rows, BLOCK_V columns, num_warps) of the row kernel: a memory-bound pass, 4 rows x
# 1024 fp32 columns = 32 values per thread at 4 warps. Not yet timed on hardware (2026-12-03).
GPU_ROW_TILES = (4, 1024, 4)
# The interpreter's cost grows with programs x loop steps: few, wide tiles.
INTERPRETER_ROW_TILES = (16, 512, 4)

# How this torch writes fp32 logits from bf16/fp16 operands on CUDA: "out_dtype" (one cuBLAS
# product with fp32 output) or "upcast" (an fp32 copy of the weight); recorded at first use for
# selfcheck.
SPLIT_PRODUCT = {}


def _fp32_logits(h: torch.Tensor, w_t: torch.Tensor, out: torch.Tensor) -> None:
    """out (fp32 [rows, V]) = h @ w_t, accumulated and stored in fp32, operands in their dtype."""
    if h.dtype == torch.float32 or w_t.dtype == torch.float32:
        torch.mm(h.float() if h.dtype != torch.float32 else h, w_t, out=out)
        return
    torch.mm(h, w_t, out_dtype=torch.float32, out=out)


def logprobs_split_fwd(hidden, weight, targets, bias, *, inv_temperature, softcap, with_entropy,
                       chunk_bytes, tiles, n_valid=None, on_chunk=None):
    """The split forward. hidden [M, H], weight [V, H] (row-contiguous), targets int64 [M].

    Returns fp32 [M] (lse, target_z, H | None, lse_lo), the same statistics as ``logprobs_fwd``
    with ``with_lse_lo=True``. ``chunk_bytes``: budget of the fp32 [C, V] logits buffer (C at least
    one tile of rows). ``n_valid``: optional int64 [1] device count; rows at or past it are
    skipped by the row kernel (the product still covers them) and their statistics unspecified.
    ``tiles``: (BLOCK_N, BLOCK_V, num_warps) of the row kernel.
    ``on_chunk``: optional ``on_chunk(start, stop, logits, lse, lse_lo)`` called after each chunk's
    statistics, with the chunk's raw fp32 logits [stop - start, V] (it may overwrite them: the
    buffer is refilled by the next chunk) and that chunk's fp32 lse / lse_lo [stop - start] (the
    frozen-head path, frozen_head.py, folds its gradient product into this pass).
    """
    M = hidden.shape[0]
    V = weight.shape[0]
    block_n, block_v, num_warps = tiles
    dev = hidden.device
    f32 = dict(dtype=torch.float32, device=dev)
    C = workspace_rows(V, 4, chunk_bytes, M, multiple=block_n)
    C = min(C, M)
    buf = torch.empty((C, V), **f32)
    w_t = weight.t()
    use_out_dtype = dev.type == "cuda" and _MM_OUT_DTYPE and hidden.dtype != torch.float32
    if use_out_dtype and SPLIT_PRODUCT.get("cuda") == "upcast":
        use_out_dtype = False
    if hidden.dtype != torch.float32 and not use_out_dtype:
        # No fp32-output product here (CPU, the interpreter, torch < 2.8): upcast the weight once
        # per call; each chunk's hidden rows are upcast in _fp32_logits.
        w_t = weight.float().t()
    part_max = torch.empty((1, M), **f32)
    part_sum = torch.empty((1, M), **f32)
    part_target = torch.empty((1, M), **f32)
    part_tsum = torch.empty((1, M), **f32) if with_entropy else part_sum
    for start in range(0, M, C):
        stop = min(start + C, M)
        out = buf[: stop - start]
        h = hidden[start:stop]
        if use_out_dtype:
            try:
                _fp32_logits(h, w_t, out)
                SPLIT_PRODUCT["cuda"] = "out_dtype"
            except (TypeError, RuntimeError, NotImplementedError):
                # This build lacks the mixed-dtype cuBLAS product: upcast from now on.
                SPLIT_PRODUCT["cuda"] = "upcast"
                use_out_dtype = False
                w_t = weight.float().t()
                _fp32_logits(h, w_t, out)
        else:
            if dev.type == "cuda" and hidden.dtype != torch.float32:
                SPLIT_PRODUCT["cuda"] = "upcast"
            _fp32_logits(h, w_t, out)
        logprobs_rows_kernel[(triton.cdiv(stop - start, block_n),)](
            out, bias if bias is not None else out, targets[start:stop],
            part_max[0, start:stop], part_sum[0, start:stop], part_target[0, start:stop],
            part_tsum[0, start:stop],
            n_valid if n_valid is not None else targets,
            stop - start, V, start, out.stride(0),
            inv_temperature, softcap if softcap is not None else 1.0,
            HAS_BIAS=bias is not None,
            HAS_SOFTCAP=softcap is not None,
            WITH_ENTROPY=with_entropy,
            HAS_COUNT=n_valid is not None,
            BLOCK_N=block_n, BLOCK_V=block_v,
            num_warps=num_warps,
        )
        if on_chunk is not None:
            # The chunk's own merge (one split): element-wise, so equal to the final merge's rows.
            lse_c, _, _, lse_lo_c = merge_partials(part_max[:, start:stop], part_sum[:, start:stop],
                                                   part_target[:, start:stop], None, with_lse_lo=True)
            on_chunk(start, stop, out, lse_c, lse_lo_c)
    del buf
    return merge_partials(part_max, part_sum, part_target, part_tsum if with_entropy else None,
                          with_lse_lo=True)
