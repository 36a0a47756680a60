"""A frozen lm_head in two vocabulary products: the hidden-state gradient is computed in the forward.

When the head's weight (and bias) need no gradient — LoRA and other PEFT, or a frozen head — and
no entropy gradient can be asked for (``return_entropy`` False), the only gradient due is
d(loss)/d(hidden). The default triton path pays three vocabulary-sized products for it (the
forward's logits, the backward's recomputed logits, dZ W). This path pays two: per chunk of rows
of the split forward (ops/logprobs_split.py; cuBLAS fp32 logits, the row kernel's lse), the
chunk's fp32 logits are turned into the row's gradient factor and multiplied by W at once; the
backward only scales the saved rows by the upstream gradients. issue 16, item 6 (TRL's chunked
op does the same for a frozen head).

Gradient (z_v = softcap(y_v) / T with y_v = h . W_v + b_v, p = softmax(z), t the target):
    dz_v / dh = c_v W_v / T,   c_v = 1 - tanh^2(y_v / softcap)  (c_v = 1 without a soft-cap)
    d log p_t / dh = (1/T) (c_t W_t - sum_v p_v c_v W_v) = (1/T) sum_v (1[v = t] - p_v) c_v W_v
    d lse / dh     = (1/T) sum_v p_v c_v W_v            = c_t W_t / T - d log p_t / dh
The forward computes G = d log p_t / dh in one product, from d_v = (1[v = t] - p_v) c_v: with
the one-hot folded in before the product, G is accurate relative to its own size even where
p_t -> 1 (c_t W_t - E would cancel there). The lse gradient is recovered from G and one gathered
row W_t (no second product). Rows whose target is ignored or out of range have no one-hot
(their log p is a constant) and G = -E / T, which is still what the lse gradient needs.

Precision: p = exp((z - lse) - lse_lo) in fp32 from fp32 logits (never rounded to bf16); d is
rounded once to the weight's dtype for the cuBLAS product (fp32 accumulation and output), the
same rounding the workspace backward's dZ gets; G is stored in fp32.

Memory: G is fp32 [rows, H], N x H x 4 bytes (128 MiB at N 16384, H 2048), saved in addition to
the hidden states the default path also keeps (they stay referenced so that a second
differentiation raises instead of returning 0): less than one [C, V] fp32 logits chunk of the
default 1 GiB budget, and the backward allocates no workspace at all. Storing G in bf16 would
halve it but round the gradient a second time before the caller's own cast. Per chunk, besides the split
forward's [C, V] fp32 logits, one more [C, V] fp32 buffer for c (soft-cap only) and the [C, V]
cast of d in the weight's dtype.

Compaction as in the triton backend (``params.compact``): with a host ``num_valid`` only the
scored rows are multiplied; with the device count the products cover all rows and the rows past
the count get zero gradient.
"""
from __future__ import annotations

import os

import torch

from .amp import no_autocast
from .autograd import _compaction, forward_statistics, interpreting
from .chunked import valid_rows
from .double_backward import no_double_backward
from .reference import _MM_OUT_DTYPE
from .types import LogprobsParams

# IRIS_KERNELS_FROZEN_HEAD=0 turns the automatic choice off (the default path then runs, with a
# recomputing backward and no dWeight).
ENV_SWITCH = "IRIS_KERNELS_FROZEN_HEAD"

# How G = d W was computed on each device type ("out_dtype" | "upcast"), for diagnostics.
FROZEN_PRODUCT = {}


def frozen_head_applies(hidden, weight, bias, params: LogprobsParams) -> bool:
    """True when the two-product path is the right one for a triton call: only the hidden state
    needs a gradient (grad mode on, hidden requires grad, weight and bias do not) and no entropy
    gradient can be requested. Not under torch.compile (the custom op saves the default path's
    tensors)."""
    if os.environ.get(ENV_SWITCH, "1") == "0":
        return False
    if params.return_entropy or not torch.is_grad_enabled() or torch.compiler.is_compiling():
        return False
    if not hidden.requires_grad or weight.requires_grad:
        return False
    return bias is None or not bias.requires_grad


def _product(d: torch.Tensor, weight: torch.Tensor, w_up) -> torch.Tensor:
    """fp32 [rows, H] = d [rows, V] (fp32) @ weight [V, H], d rounded once to the weight's dtype."""
    if weight.dtype == torch.float32:
        return torch.mm(d, weight)
    d_w = d.to(weight.dtype)  # RTNE, as the workspace backward's dZ
    if weight.device.type == "cuda" and _MM_OUT_DTYPE and FROZEN_PRODUCT.get("cuda") != "upcast":
        try:
            out = torch.mm(d_w, weight, out_dtype=torch.float32)
            FROZEN_PRODUCT["cuda"] = "out_dtype"
            return out
        except (TypeError, RuntimeError, NotImplementedError):
            FROZEN_PRODUCT["cuda"] = "upcast"  # no mixed-dtype product in this build
    FROZEN_PRODUCT.setdefault(weight.device.type, "upcast")
    return torch.mm(d_w.float(), w_up())


def softcap_chain(tanh_y: torch.Tensor) -> torch.Tensor:
    """c_v = d softcap(y_v) / d y_v = 1 - tanh^2(y_v / softcap), from tanh(y / softcap); one buffer."""
    return torch.mul(tanh_y, tanh_y).neg_().add_(1.0)


class FrozenHeadLinearLogprobs(torch.autograd.Function):
    """hidden [N, H] (requires grad), weight [V, H] and bias [V] | None (no grad), targets [N]
    -> fp32 [N] (logp, lse, entropy [0]); the same contract as ``TritonLinearLogprobs``."""

    @staticmethod
    @no_autocast
    def forward(ctx, hidden, weight, targets, bias, params: LogprobsParams):
        N, H = hidden.shape
        V = weight.shape[0]
        rows, n_valid = _compaction(targets, params)
        t_run = targets if rows is None else targets.index_select(0, rows)
        M = t_run.shape[0]
        dev = hidden.device
        grad_rows = torch.zeros((M, H), dtype=torch.float32, device=dev)  # G, fp32 (module docstring)
        c_t = torch.zeros(M, dtype=torch.float32, device=dev)
        scored = valid_rows(t_run, V, params.ignore_index)
        t_safe = torch.where(scored, t_run, 0)
        inv_t = 1.0 / params.temperature
        cap = params.softcap
        w_up_cache = []
        bias32 = None if bias is None else bias.float()  # once per call, not per chunk

        def w_up():  # fp32 weight, made once per call, only where no fp32-output product exists
            if not w_up_cache:
                w_up_cache.append(weight.float())
            return w_up_cache[0]

        def on_chunk(start, stop, y, lse, lse_lo):
            # y: fp32 [c, V] raw logits h W^T of rows start:stop, overwritten in place below.
            if bias32 is not None:
                y += bias32
            c = None
            if cap is not None:
                y.div_(cap).tanh_()  # tanh(y / cap)
                c = softcap_chain(y)
                y.mul_(cap * inv_t)  # z
            else:
                y.mul_(inv_t)
            # p = exp((z - lse) - lse_lo), two steps as in finalize (exact at a large offset)
            y.sub_(lse[:, None]).sub_(lse_lo[:, None]).exp_()
            if c is not None:
                y.mul_(c)
            y.neg_()  # d = -p c
            sl = slice(start, stop)
            ct = torch.ones(stop - start, dtype=torch.float32, device=dev) if c is None else \
                c.gather(1, t_safe[sl, None]).squeeze(1)
            ct = torch.where(scored[sl], ct, 0.0)
            y.scatter_add_(1, t_safe[sl, None], ct[:, None])  # d = (1[v = t] - p) c
            del c
            grad_rows[sl] = _product(y, weight, w_up).mul_(inv_t)
            c_t[sl] = ct

        logp, lse, entropy, _, _ = forward_statistics(hidden, weight, targets, bias, params, on_chunk=on_chunk)
        if n_valid is not None:
            # Rows past the device count have unspecified statistics: no gradient there.
            computed = torch.arange(M, device=dev) < n_valid
            grad_rows = torch.where(computed[:, None], grad_rows, 0.0)
            c_t = torch.where(computed, c_t, 0.0)
        ctx.params = params
        ctx.shape = (N, H)
        ctx.hidden_dtype = hidden.dtype
        ctx.set_materialize_grads(False)
        # hidden is saved only so that no_double_backward sees the gradient's dependence on it (a
        # second differentiation must raise, not return a silent 0); no copy, it is the input.
        ctx.save_for_backward(hidden, weight, targets, rows, t_safe, scored, c_t, grad_rows)
        return logp, lse, entropy

    @staticmethod
    @no_double_backward("triton", supported_by="reference")
    @no_autocast
    def backward(ctx, grad_logp, grad_lse, grad_entropy):
        # Only scaling: dh = c_lp G + c_lse (c_t W_t / T - G) per row (module docstring).
        _, weight, targets, rows, t_safe, scored, c_t, grad_rows = ctx.saved_tensors
        params: LogprobsParams = ctx.params
        N, H = ctx.shape
        if not ctx.needs_input_grad[0] or (grad_logp is None and grad_lse is None):
            return None, None, None, None, None
        dev = grad_rows.device
        zeros = torch.zeros((), dtype=torch.float32, device=dev)
        gh = torch.zeros_like(grad_rows)
        if grad_logp is not None:
            c_lp = grad_logp.float() if rows is None else grad_logp.float().index_select(0, rows)
            # torch.where, not a product: an ignored row's G may be NaN (NaN hidden state).
            gh = torch.where(scored[:, None], c_lp[:, None] * grad_rows, zeros)
        if grad_lse is not None:
            c_lse = grad_lse.float() if rows is None else grad_lse.float().index_select(0, rows)
            w_t = weight.index_select(0, t_safe).float() * (c_t / params.temperature)[:, None]
            gh = gh + c_lse[:, None] * (w_t - grad_rows)
        if rows is not None:
            gh = torch.zeros((N, H), dtype=torch.float32, device=dev).index_copy_(0, rows, gh)
        return gh.to(ctx.hidden_dtype), None, None, None, None
