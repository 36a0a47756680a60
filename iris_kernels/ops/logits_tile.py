"""One [BLOCK_N, BLOCK_V] tile of transformed logits, shared by the forward and backward kernels.

z = softcap(h W^T + b) / tau for the rows offs_n and vocabulary columns offs_v, accumulated in fp32
over the hidden dimension in BLOCK_H steps. The caller masks columns beyond V.
``logits_grad_tile`` turns such a tile into d(loss)/d(raw logits), for both backward kernels.
"""
import triton
import triton.language as tl


@triton.jit
def tanh_f32(x):
    # tanh(x) = 1 - 2 / (exp(2x) + 1): exp overflows to inf for large x, giving exactly 1, and
    # underflows to 0 for very negative x, giving exactly -1, so the form is safe at the extremes.
    # Near 0 it cancels (absolute error ~6e-8, i.e. cap * 6e-8 in the logit), so small |x| use the
    # odd series x - x^3/3 + 2x^5/15, whose next term (17/315 x^7) is below 1e-10 for |x| < 0.05.
    x2 = x * x
    series = x * (1.0 - x2 * (1.0 / 3.0) + x2 * x2 * (2.0 / 15.0))
    return tl.where(tl.abs(x) < 0.05, series, 1.0 - 2.0 / (tl.exp(2.0 * x) + 1.0))


@triton.jit
def logits_tile(
    hidden_ptr,
    weight_ptr,
    bias_ptr,
    offs_n,  # int64 [BLOCK_N]
    offs_v,  # int64 [BLOCK_V]
    n_mask,
    v_mask,
    H,
    stride_hn,
    stride_wv,
    inv_temperature,
    softcap,
    HAS_BIAS: tl.constexpr,
    HAS_SOFTCAP: tl.constexpr,
    UPCAST: tl.constexpr,  # interpreter: bf16 arrives as raw uint16, so dot in fp32
    IEEE_DOT: tl.constexpr,  # fp32 inputs: exact fp32 products, not tf32
    BLOCK_N: tl.constexpr,
    BLOCK_V: tl.constexpr,
    BLOCK_H: tl.constexpr,
):
    acc = tl.zeros((BLOCK_N, BLOCK_V), dtype=tl.float32)
    for h0 in range(0, H, BLOCK_H):
        offs_h = h0 + tl.arange(0, BLOCK_H)
        h_mask = offs_h < H
        x = tl.load(
            hidden_ptr + offs_n[:, None] * stride_hn + offs_h[None, :],
            mask=n_mask[:, None] & h_mask[None, :],
            other=0.0,
        )
        w = tl.load(
            weight_ptr + offs_v[:, None] * stride_wv + offs_h[None, :],
            mask=v_mask[:, None] & h_mask[None, :],
            other=0.0,
        )
        if UPCAST:
            x = x.to(tl.float32)
            w = w.to(tl.float32)
        if IEEE_DOT:
            acc = tl.dot(x, tl.trans(w), acc, input_precision="ieee")
        else:
            acc = tl.dot(x, tl.trans(w), acc)
    if HAS_BIAS:
        b = tl.load(bias_ptr + offs_v, mask=v_mask, other=0.0).to(tl.float32)
        acc = acc + b[None, :]
    if HAS_SOFTCAP:
        acc = softcap * tanh_f32(acc / softcap)
    return acc * inv_temperature


@triton.jit
def logits_grad_tile(
    z,  # fp32 [BLOCK_N, BLOCK_V]: the tile from logits_tile
    offs_n,  # int64 [BLOCK_N]
    n_mask,  # rows in range (and below the valid-row count, where there is one)
    v_start,  # int64: the tile's first vocabulary column
    v_mask,
    targets_ptr,
    lse_ptr,
    lse_lo_ptr,
    entropy_ptr,
    grad_logp_ptr,
    grad_lse_ptr,
    grad_entropy_ptr,
    inv_temperature,
    softcap_scale,  # tau / cap
    HAS_SOFTCAP: tl.constexpr,
    HAS_LSE_LO: tl.constexpr,
    HAS_GRAD_LSE: tl.constexpr,
    HAS_GRAD_ENTROPY: tl.constexpr,
    BLOCK_V: tl.constexpr,
):
    """d(loss)/d(raw logits r = h W^T + b) for one tile, in fp32, and the rows that carry any gradient.

    Shared by the atomic backward (ops/logprobs_bwd.py) and the workspace dZ writer
    (ops/logits_grad.py). Per row k with upstream gradients c_lp (log p of the target), c_lse and
    c_ent (the entropy H_k), log p = (z - lse) - lse_lo and p = exp(log p) from the saved lse, its
    rounding error lse_lo (exact log p at a large common logit offset, see reference.split_lse)
    and the saved entropy H_k:
        d log p(y) / dz = onehot(y) - p
        d lse / dz      = p
        d H_k / dz      = -p (log p + H_k)
            [H_k = -sum_j p_j log p_j; dH/dz_i = -sum_j (dp_j/dz_i)(log p_j + 1)
             = -p_i (log p_i + 1) + p_i sum_j p_j (log p_j + 1) = -p_i (log p_i + H_k).
             This equals -p (z - E_p[z]) exactly, but log p = z - lse and H are both O(1) where z
             and E_p[z] share a large common offset, so nothing cancels.]
        g_z = c_lp (onehot - p) + c_lse p - c_ent p (log p + H_k)
        dz/dr = (1 - tanh^2(r / cap)) / tau, and tanh(r / cap) = z tau / cap (no tanh recomputed).
    The target-class entry (c_lp (1 - p) + ...) is formed in fp32. Ignored and out-of-range rows
    arrive with c_lp = 0 (the caller zeroes them). Returns (g, live): g is exactly 0 at rows whose
    upstream gradients are all exactly zero (ignored rows, padding), at rows outside n_mask and at
    columns outside v_mask, so ``0 * NaN`` from a NaN hidden state (a fully masked attention row)
    never reaches a gradient; ``live`` [BLOCK_N] marks the other rows.
    """
    lse = tl.load(lse_ptr + offs_n, mask=n_mask, other=0.0)
    log_p = z - lse[:, None]
    if HAS_LSE_LO:
        # Two steps: lse + lse_lo would round back to lse (log p exact at a large offset).
        log_p = log_p - tl.load(lse_lo_ptr + offs_n, mask=n_mask, other=0.0)[:, None]
    p = tl.exp(log_p)
    c_lp = tl.load(grad_logp_ptr + offs_n, mask=n_mask, other=0.0)
    tgt = tl.load(targets_ptr + offs_n, mask=n_mask, other=-1).to(tl.int64)
    # The target's column within this tile as int32 (-1 when elsewhere): a 32-bit compare, and no
    # [BLOCK_N, BLOCK_V] tensor of 64-bit column indices in registers.
    in_tile = (tgt >= v_start) & (tgt < v_start + BLOCK_V)
    tgt_col = tl.where(in_tile, tgt - v_start, -1).to(tl.int32)
    hit = tl.arange(0, BLOCK_V)[None, :] == tgt_col[:, None]
    g = tl.where(hit, c_lp[:, None], 0.0) - c_lp[:, None] * p
    live = n_mask & (c_lp != 0.0)
    if HAS_GRAD_LSE:
        c_lse = tl.load(grad_lse_ptr + offs_n, mask=n_mask, other=0.0)
        g += c_lse[:, None] * p
        live = live | (n_mask & (c_lse != 0.0))
    if HAS_GRAD_ENTROPY:
        c_ent = tl.load(grad_entropy_ptr + offs_n, mask=n_mask, other=0.0)
        live = live | (n_mask & (c_ent != 0.0))
        ent = tl.load(entropy_ptr + offs_n, mask=n_mask, other=0.0)
        # p = 0 where z = -inf: that term is 0, not 0 * -inf = NaN.
        g -= c_ent[:, None] * tl.where(p > 0.0, p * (log_p + ent[:, None]), 0.0)
    if HAS_SOFTCAP:
        t = z * softcap_scale
        g = g * (1.0 - t * t)
    g = g * inv_temperature
    # Dead rows and padding rows/columns of the tile (p of a zero row is garbage) add exactly nothing.
    g = tl.where(live[:, None] & v_mask[None, :], g, 0.0)
    return g, live
