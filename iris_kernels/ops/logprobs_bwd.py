"""Backward kernel: recompute each logits tile, form its gradient from the saved lse, and
accumulate the hidden, weight and bias gradients.

Grid: (token block, vocabulary tile) pairs on one dimension, in the grouped (L2-aware)
order of ops/launch_order.py; one program owns one [BLOCK_N, BLOCK_V] tile of the
logits. It recomputes z (the third of the four matrix products), turns it into the gradient of
the loss w.r.t. the raw logits r = h W^T + b, then walks the hidden dimension doing
    dh[n, :] += g @ W[v, :]      (fourth product, atomically summed over vocabulary tiles)
    dW[v, :] += g^T @ h[n, :]    (second product, atomically summed over token blocks)
into fp32 buffers, so that the weight gradient is accumulated in fp32 whatever the input dtype.
The adds are "relaxed": nothing reads the buffers until the kernel ends, so no ordering is
needed, and the compiler can emit fire-and-forget reductions (red) instead of acquire-release
atomics that wait for their result. Summation order varies, so results are not bit-reproducible.

The gradient g of each tile (upstream gradients c_lp, c_lse, c_ent of log p(y), lse and the
entropy; soft-cap and temperature chain factors) comes from ``logits_grad_tile`` in
ops/logits_tile.py, where each formula is derived. Ignored and out-of-range rows arrive with
c_lp = 0 (the caller zeroes them).
"""
import torch
import triton
import triton.language as tl

from ..tuning import Tile
from .launch_order import GROUP_ROWS, grouped_program
from .logits_tile import logits_grad_tile, logits_tile


@triton.jit
def logprobs_bwd_kernel(
    hidden_ptr,
    weight_ptr,
    bias_ptr,
    targets_ptr,
    lse_ptr,
    lse_lo_ptr,  # fp32 [N]: rounding error of the fp32 lse (read with HAS_LSE_LO)
    entropy_ptr,  # fp32 [N]: the per-row entropy H saved by the forward
    grad_logp_ptr,
    grad_lse_ptr,
    grad_entropy_ptr,
    grad_hidden_ptr,  # fp32 [N, H], zero-initialised
    grad_weight_ptr,  # fp32 [V, H], zero-initialised
    grad_bias_ptr,  # fp32 [V], zero-initialised
    n_valid_ptr,  # int64 [1]: rows >= n_valid (compacted order) add nothing (HAS_COUNT)
    N,
    V,
    H,
    stride_hn,
    stride_wv,
    inv_temperature,
    softcap,
    softcap_scale,  # tau / cap
    HAS_BIAS: tl.constexpr,
    HAS_SOFTCAP: tl.constexpr,
    HAS_LSE_LO: tl.constexpr,
    HAS_GRAD_LSE: tl.constexpr,
    HAS_GRAD_ENTROPY: tl.constexpr,
    NEED_GRAD_HIDDEN: tl.constexpr,
    NEED_GRAD_WEIGHT: tl.constexpr,
    NEED_GRAD_BIAS: tl.constexpr,
    HAS_COUNT: tl.constexpr,
    UPCAST: tl.constexpr,
    IEEE_DOT: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_V: tl.constexpr,
    BLOCK_H: tl.constexpr,
    GROUP: tl.constexpr,
):
    pid_n, pid_v = grouped_program(tl.program_id(0), tl.cdiv(N, BLOCK_N), tl.cdiv(V, BLOCK_V), GROUP)
    # int64 offsets: row * stride exceeds 2^31 for N*H or V*H beyond 2 Gi elements.
    offs_n = pid_n.to(tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N).to(tl.int64)
    offs_v = pid_v.to(tl.int64) * BLOCK_V + tl.arange(0, BLOCK_V).to(tl.int64)
    n_mask = offs_n < N
    v_mask = offs_v < V
    H_run = H
    if HAS_COUNT:
        # Row blocks past the device-resident count of compacted rows: empty loops, nothing added.
        n_valid = tl.load(n_valid_ptr)
        n_mask = n_mask & (offs_n < n_valid)
        H_run = tl.where(pid_n.to(tl.int64) * BLOCK_N < n_valid, H, 0)

    z = logits_tile(
        hidden_ptr, weight_ptr, bias_ptr, offs_n, offs_v, n_mask, v_mask, H_run,
        stride_hn, stride_wv, inv_temperature, softcap,
        HAS_BIAS, HAS_SOFTCAP, UPCAST, IEEE_DOT, BLOCK_N, BLOCK_V, BLOCK_H,
    )
    # Rows with no upstream gradient (ignored targets, padding) must add exactly nothing, even if
    # their hidden state is NaN (a fully masked attention row): they are masked out of g and, by
    # live, out of the hidden-state loads below, so 0 * NaN never reaches dW.
    g, live = logits_grad_tile(
        z, offs_n, n_mask, pid_v.to(tl.int64) * BLOCK_V, v_mask, targets_ptr, lse_ptr, lse_lo_ptr,
        entropy_ptr, grad_logp_ptr, grad_lse_ptr, grad_entropy_ptr, inv_temperature, softcap_scale,
        HAS_SOFTCAP, HAS_LSE_LO, HAS_GRAD_LSE, HAS_GRAD_ENTROPY, BLOCK_V,
    )

    if NEED_GRAD_BIAS:
        tl.atomic_add(grad_bias_ptr + offs_v, tl.sum(g, axis=0), mask=v_mask, sem="relaxed")

    if UPCAST:
        g_dot = g
    else:
        # Tensor-core products in the input dtype (fp32 accumulation), as in the forward.
        g_dot = g.to(hidden_ptr.dtype.element_ty)
    for h0 in range(0, H_run, BLOCK_H):
        offs_h = h0 + tl.arange(0, BLOCK_H)
        h_mask = offs_h < H
        if NEED_GRAD_HIDDEN:
            w = tl.load(
                weight_ptr + offs_v[:, None] * stride_wv + offs_h[None, :],
                mask=v_mask[:, None] & h_mask[None, :],
                other=0.0,
            )
            if UPCAST:
                w = w.to(tl.float32)
            if IEEE_DOT:
                dh = tl.dot(g_dot, w, input_precision="ieee")
            else:
                dh = tl.dot(g_dot, w)
            tl.atomic_add(
                grad_hidden_ptr + offs_n[:, None] * H + offs_h[None, :],
                dh,
                mask=n_mask[:, None] & h_mask[None, :],
                sem="relaxed",
            )
        if NEED_GRAD_WEIGHT:
            x = tl.load(
                hidden_ptr + offs_n[:, None] * stride_hn + offs_h[None, :],
                mask=live[:, None] & h_mask[None, :],
                other=0.0,
            )
            if UPCAST:
                x = x.to(tl.float32)
            if IEEE_DOT:
                dw = tl.dot(tl.trans(g_dot), x, input_precision="ieee")
            else:
                dw = tl.dot(tl.trans(g_dot), x)
            tl.atomic_add(
                grad_weight_ptr + offs_v[:, None] * H + offs_h[None, :],
                dw,
                mask=v_mask[:, None] & h_mask[None, :],
                sem="relaxed",
            )


def logprobs_bwd(hidden, weight, targets, bias, lse, entropy, grad_logp, grad_lse, grad_entropy,
                 *, need_hidden, need_weight, need_bias, inv_temperature, softcap, temperature,
                 upcast, tiles, lse_lo=None, n_valid=None):
    """Returns fp32 (grad_hidden | None, grad_weight | None, grad_bias | None).

    ``entropy`` is the fp32 [N] per-row entropy H from ``logprobs_fwd`` (None without an entropy
    gradient); ``lse_lo`` the optional rounding error of ``lse`` (``with_lse_lo`` there).
    ``n_valid``: optional int64 [1] device tensor; rows at or past it add nothing.
    """
    N, H = hidden.shape
    V = weight.shape[0]
    tiles = Tile(*tiles)
    block_n, block_v, block_h = tiles.block_n, tiles.block_v, tiles.block_h
    f32 = dict(dtype=torch.float32, device=hidden.device)
    grad_hidden = torch.zeros((N, H), **f32) if need_hidden else None
    grad_weight = torch.zeros((V, H), **f32) if need_weight else None
    grad_bias = torch.zeros((V,), **f32) if need_bias else None
    dummy = lse
    # 1-D grid in the grouped (L2-aware) order of ops/launch_order.py.
    grid = (triton.cdiv(N, block_n) * triton.cdiv(V, block_v),)
    logprobs_bwd_kernel[grid](
        hidden, weight, bias if bias is not None else hidden, targets, lse,
        lse_lo if lse_lo is not None else dummy,
        entropy if entropy is not None else dummy,
        grad_logp,
        grad_lse if grad_lse is not None else dummy,
        grad_entropy if grad_entropy is not None else dummy,
        grad_hidden if need_hidden else dummy,
        grad_weight if need_weight else dummy,
        grad_bias if need_bias else dummy,
        n_valid if n_valid is not None else targets,
        N, V, H, hidden.stride(0), weight.stride(0),
        inv_temperature,
        softcap if softcap is not None else 1.0,
        temperature / softcap if softcap is not None else 1.0,
        HAS_BIAS=bias is not None,
        HAS_SOFTCAP=softcap is not None,
        HAS_LSE_LO=lse_lo is not None,
        HAS_GRAD_LSE=grad_lse is not None,
        HAS_GRAD_ENTROPY=grad_entropy is not None,
        NEED_GRAD_HIDDEN=need_hidden,
        NEED_GRAD_WEIGHT=need_weight,
        NEED_GRAD_BIAS=need_bias,
        HAS_COUNT=n_valid is not None,
        UPCAST=upcast,
        IEEE_DOT=hidden.dtype == torch.float32,
        BLOCK_N=block_n, BLOCK_V=block_v, BLOCK_H=block_h, GROUP=GROUP_ROWS,
        num_warps=tiles.num_warps, num_stages=tiles.num_stages,
    )
    return grad_hidden, grad_weight, grad_bias
