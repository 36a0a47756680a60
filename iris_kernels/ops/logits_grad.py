"""Workspace-backward kernel: recompute one chunk's logits and write d(loss)/d(raw logits) once.

Grid: (row block of the chunk, vocabulary tile) pairs on one dimension, in the grouped
(L2-aware) order of ops/launch_order.py. One program owns one [BLOCK_N, BLOCK_V] tile:
it recomputes z (the third of the four matrix products, tensor-core ``tl.dot`` with fp32
accumulation, bias / soft-cap / temperature as in the forward), forms the gradient with every
chain factor in fp32, and stores it once, in the input dtype, into the chunk's [C, V] workspace.
No atomics touch the workspace: each element has exactly one writer. The two remaining products
(dHidden = G W and dWeight += G^T h) are cuBLAS calls made by the caller on the workspace.

The gradient g (every chain factor in fp32, the target-class entry formed before the cast to the
workspace dtype) comes from ``logits_grad_tile`` (ops/logits_tile.py, where each formula is
derived). Rows whose upstream gradients are all exactly zero (ignored rows, padding) and rows at or
past the device-resident valid-row count write exact zeros: ``0 * NaN`` from a NaN hidden state
never reaches the workspace. Programs whose whole row block lies past the count store a zero tile
without recomputing anything.

The bias gradient is the column sum of g in fp32 (before the cast), added with relaxed atomics into
an fp32 [V] buffer: C / BLOCK_N partial sums per element, a few hundred kilobytes of traffic.
"""
import torch
import triton
import triton.language as tl

from ..tuning import Tile
from .launch_order import GROUP_ROWS, grouped_program
from .logits_tile import logits_grad_tile, logits_tile


@triton.jit
def logits_grad_kernel(
    hidden_ptr,  # [rows, H] this chunk's hidden states, unit last-dim stride
    weight_ptr,  # [V, H]
    bias_ptr,
    targets_ptr,  # int64 [rows]
    lse_ptr,  # fp32 [rows]
    lse_lo_ptr,  # fp32 [rows]: rounding error of the fp32 lse (read with HAS_LSE_LO)
    entropy_ptr,  # fp32 [rows] H_k (read only with HAS_GRAD_ENTROPY)
    grad_logp_ptr,  # fp32 [rows], already 0 at ignored / out-of-range rows
    grad_lse_ptr,
    grad_entropy_ptr,  # fp32 [rows], already 0 at ignored rows
    n_valid_ptr,  # int64 [1]: rows >= n_valid (in the compacted order) are dead
    ws_ptr,  # [rows, stride_ws] input dtype: the gradient workspace (written, never read)
    grad_bias_ptr,  # fp32 [V], accumulated across chunks
    row0,  # index of this chunk's first row in the (compacted) row order
    rows,
    V,
    H,
    stride_hn,
    stride_wv,
    stride_ws,
    inv_temperature,
    softcap,
    softcap_scale,  # tau / cap
    HAS_BIAS: tl.constexpr,
    HAS_SOFTCAP: tl.constexpr,
    HAS_LSE_LO: tl.constexpr,
    HAS_GRAD_LSE: tl.constexpr,
    HAS_GRAD_ENTROPY: tl.constexpr,
    HAS_COUNT: tl.constexpr,
    NEED_GRAD_BIAS: tl.constexpr,
    UPCAST: tl.constexpr,
    IEEE_DOT: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_V: tl.constexpr,
    BLOCK_H: tl.constexpr,
    GROUP: tl.constexpr,
):
    pid_n, pid_v = grouped_program(tl.program_id(0), tl.cdiv(rows, BLOCK_N), tl.cdiv(V, BLOCK_V), GROUP)
    # int64 offsets: row * stride exceeds 2^31 for C*V or V*H beyond 2 Gi elements.
    offs_n = pid_n.to(tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N).to(tl.int64)
    offs_v = pid_v.to(tl.int64) * BLOCK_V + tl.arange(0, BLOCK_V).to(tl.int64)
    n_mask = offs_n < rows
    v_mask = offs_v < V
    out_ty = ws_ptr.dtype.element_ty
    # The store addresses: one 64-bit tile base plus int32 offsets within the tile (BLOCK_N rows
    # of stride_ws < 2^31 / BLOCK_N elements), formed only at the store, so that no
    # [BLOCK_N, BLOCK_V] tensor of 64-bit addresses sits next to the fp32 tile in registers.
    ws_tile = ws_ptr + pid_n.to(tl.int64) * BLOCK_N * stride_ws + pid_v.to(tl.int64) * BLOCK_V

    block_live = True
    if HAS_COUNT:
        n_valid = tl.load(n_valid_ptr)
        block_live = row0 + pid_n.to(tl.int64) * BLOCK_N < n_valid
        n_mask = n_mask & (row0 + offs_n < n_valid)
    if block_live:
        z = logits_tile(
            hidden_ptr, weight_ptr, bias_ptr, offs_n, offs_v, n_mask, v_mask, H,
            stride_hn, stride_wv, inv_temperature, softcap,
            HAS_BIAS, HAS_SOFTCAP, UPCAST, IEEE_DOT, BLOCK_N, BLOCK_V, BLOCK_H,
        )
        g, live = logits_grad_tile(
            z, offs_n, n_mask, pid_v.to(tl.int64) * BLOCK_V, v_mask, targets_ptr, lse_ptr, lse_lo_ptr,
            entropy_ptr, grad_logp_ptr, grad_lse_ptr, grad_entropy_ptr, inv_temperature, softcap_scale,
            HAS_SOFTCAP, HAS_LSE_LO, HAS_GRAD_LSE, HAS_GRAD_ENTROPY, BLOCK_V,
        )
        if NEED_GRAD_BIAS:
            tl.atomic_add(grad_bias_ptr + offs_v, tl.sum(g, axis=0), mask=v_mask, sem="relaxed")
        g = g.to(out_ty)
    else:
        # Past the valid rows: the cuBLAS products still read these workspace rows.
        g = tl.zeros((BLOCK_N, BLOCK_V), dtype=out_ty)
    tile_n = tl.arange(0, BLOCK_N)
    tile_v = tl.arange(0, BLOCK_V)
    store_mask = (pid_n * BLOCK_N + tile_n < rows)[:, None] & (pid_v * BLOCK_V + tile_v < V)[None, :]
    tl.store(ws_tile + (tile_n[:, None] * stride_ws + tile_v[None, :]), g, mask=store_mask)


def logits_grad(hidden, weight, targets, bias, lse, lse_lo, entropy, grad_logp, grad_lse, grad_entropy,
                workspace, grad_bias, *, row0, n_valid, inv_temperature, softcap, temperature,
                upcast, tiles):
    """Fill ``workspace[:rows, :V]`` with d(loss)/d(raw logits) for one chunk.

    hidden [rows, H] (unit last-dim stride), weight [V, H], per-row fp32 vectors of length rows,
    ``workspace`` [rows, >= V] in the input dtype (unit last-dim stride), ``grad_bias`` fp32 [V]
    or None, ``n_valid`` an int64 [1] device tensor or None (every row counts), ``lse_lo`` the
    rounding error of ``lse`` (ops/logprobs_fwd.py ``with_lse_lo``) or None.
    """
    rows, H = hidden.shape
    V = weight.shape[0]
    tiles = Tile(*tiles)
    block_n, block_v, block_h = tiles.block_n, tiles.block_v, tiles.block_h
    dummy = lse
    # 1-D grid in the grouped (L2-aware) order of ops/launch_order.py.
    grid = (triton.cdiv(rows, block_n) * triton.cdiv(V, block_v),)
    logits_grad_kernel[grid](
        hidden, weight, bias if bias is not None else hidden, targets, lse,
        lse_lo if lse_lo is not None else dummy,
        entropy if entropy is not None else dummy,
        grad_logp,
        grad_lse if grad_lse is not None else dummy,
        grad_entropy if grad_entropy is not None else dummy,
        n_valid if n_valid is not None else targets,
        workspace,
        grad_bias if grad_bias is not None else dummy,
        row0, rows, V, H, hidden.stride(0), weight.stride(0), workspace.stride(0),
        inv_temperature,
        softcap if softcap is not None else 1.0,
        temperature / softcap if softcap is not None else 1.0,
        HAS_BIAS=bias is not None,
        HAS_SOFTCAP=softcap is not None,
        HAS_LSE_LO=lse_lo is not None,
        HAS_GRAD_LSE=grad_lse is not None,
        HAS_GRAD_ENTROPY=grad_entropy is not None,
        HAS_COUNT=n_valid is not None,
        NEED_GRAD_BIAS=grad_bias is not None,
        UPCAST=upcast,
        IEEE_DOT=hidden.dtype == torch.float32,
        BLOCK_N=block_n, BLOCK_V=block_v, BLOCK_H=block_h, GROUP=GROUP_ROWS,
        num_warps=tiles.num_warps, num_stages=tiles.num_stages,
    )
