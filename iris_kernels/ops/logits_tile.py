"""One [BLOCK_N, BLOCK_V] tile of transformed logits, shared by the forward and backward kernels.

z = softcap(h W^T + b) / tau for the rows offs_n and vocabulary columns offs_v, accumulated in fp32
over the hidden dimension in BLOCK_H steps. The caller masks columns beyond V.
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
