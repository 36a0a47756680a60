"""autograd.Function glue between the Triton kernels and PyTorch.

Forward, two variants (``LogprobsParams.fwd``): "fused", one launch of the log-sum-exp kernel (the
logits never leave registers) and a merge of the per-split statistics; "split", per chunk of rows a
cuBLAS product into fp32 logits and a Triton row kernel (ops/logprobs_split.py). Either one saves
only hidden, weight, bias, targets and the fp32 lse (N floats),
plus lse_lo (N floats: the rounding error of the fp32 lse, so that log p stays exact at a large
common logit offset) and the per-row entropy H (N floats) when the entropy is asked for.

Backward, two variants (``LogprobsParams.bwd``):
  "workspace" (CUDA default, see tuning.py): per chunk of C rows, one Triton kernel
      (ops/logits_grad.py) recomputes the logits and writes d(loss)/d(raw logits) once, in the
      input dtype, into a [C, V] workspace allocated once per backward; then two cuBLAS products,
      dHidden[chunk] = G W and dWeight += G^T h[chunk], the latter accumulated across chunks in
      fp32 (see ``_accumulate_wgrad`` for how), and dBias as fp32 column sums in the kernel.
      Where it moves fewer bytes (``tuning.workspace_layout``: mostly N < V), the workspace is
      cut by vocabulary slices instead (``_vocab_sliced_backward``): dW[slice] is written once
      in the weight's dtype and dH is accumulated in fp32 [N, H] (issue 16, item 4).
  "atomic": one launch of the recompute-and-accumulate kernel (ops/logprobs_bwd.py) that adds
      partial products into fp32 dHidden / dWeight with relaxed atomics.

Compaction (``LogprobsParams.compact``): the scored rows (target != ignore_index) are moved to
the front by a device-side stable permutation (compaction.py) with a device-resident count; the
kernels skip or zero the rows past it. With ``num_valid`` (a host count given by the caller) only
that many rows are gathered and launched. Neither path synchronises with the device.
"""
from __future__ import annotations

import os

import torch

from .amp import no_autocast
from .chunked import valid_rows
from .compaction import compact_order
from .ops.logits_grad import logits_grad
from .ops.logprobs_bwd import logprobs_bwd
from .ops.logprobs_fwd import logprobs_fwd
from .ops.logprobs_split import GPU_ROW_TILES, INTERPRETER_ROW_TILES, logprobs_split_fwd
from .double_backward import no_double_backward
from .reference import finalize_logprobs, masked_entropy
from .tuning import (INTERPRETER_TILE, kernel_tiles, padded_vocab, vocab_slice_columns, workspace_layout,
                     workspace_rows)
from .types import LogprobsParams


def interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


# Tiles per kernel, dtype and flag set: tuning.TILE_TABLE (with where each came from); the
# compile evidence for every dispatched case is benchmarks/results/compile/, regenerated and
# checked by tests/test_kernels_compile.py.
INTERPRETER_TILES = INTERPRETER_TILE


def tile_config(hidden: torch.Tensor, forward: bool, workspace: bool = False, flags=None):
    """The tile of one launch: ``kernel_tiles`` for the forward, the workspace dZ kernel or the
    atomic backward, at ``hidden``'s dtype and the launch's feature ``flags``."""
    kernel = "fwd" if forward else ("dz" if workspace else "atomic")
    return kernel_tiles(kernel, hidden.dtype, flags, device_type=hidden.device.type, interpreting=interpreting())


# How dWeight += G^T h is accumulated in fp32 on each device type, decided at the first call:
# "out_dtype" = one cuBLAS addmm with bf16/fp16 operands writing into the fp32 accumulator
# (torch's addmm(..., out_dtype=torch.float32), CUDA only); "partial" = the chunk's product in the
# input dtype (fp32 accumulation inside cuBLAS), cast and added to the fp32 accumulator: bf16
# rounding once per chunk, never a bf16 running sum across chunks (CUDA without out_dtype);
# "upcast" = operands copied to fp32 and one fp32 addmm (the CPU / interpreter path, where
# memory is no concern: no rounding beyond the workspace's own).
WGRAD_PATH = {}


def _accumulate_wgrad(grad_w: torch.Tensor, g: torch.Tensor, h: torch.Tensor, *, allow_upcast: bool = True) -> None:
    """grad_w (fp32 [V, H]) += g^T @ h with g [rows, V] and h [rows, H] in the input dtype."""
    if g.dtype == torch.float32:
        grad_w.addmm_(g.t(), h)
        return
    key = grad_w.device.type
    if key != "cuda" and allow_upcast:
        WGRAD_PATH[key] = "upcast"
        grad_w.addmm_(g.t().float(), h.float())
        return
    if key == "cuda" and WGRAD_PATH.get(key, "out_dtype") == "out_dtype":
        try:
            torch.addmm(grad_w, g.t(), h, out_dtype=torch.float32, out=grad_w)
            WGRAD_PATH[key] = "out_dtype"
            return
        except (RuntimeError, TypeError, NotImplementedError):
            pass  # this torch has no mixed-dtype addmm: fall back, once and for all
    WGRAD_PATH[key] = "partial"
    grad_w += torch.mm(g.t(), h)


def _row_vectors(grad_logp, grad_lse, grad_entropy, targets, V, params, n):
    """Upstream gradients as fp32 [N] with the rows that have no gradient zeroed."""
    zeros = torch.zeros(n, dtype=torch.float32, device=targets.device)
    # A constant output (0.0 at ignored rows, NaN at out-of-range targets) has no gradient.
    row_ok = valid_rows(targets, V, params.ignore_index)
    c_lp = zeros if grad_logp is None else torch.where(row_ok, grad_logp.float(), zeros)
    c_lse = None if grad_lse is None else grad_lse.float().contiguous()
    if params.return_entropy and grad_entropy is not None:
        c_ent = torch.where(targets == params.ignore_index, zeros, grad_entropy.float())
    else:
        c_ent = None
    return c_lp.contiguous(), c_lse, c_ent


def _compaction(targets, params: LogprobsParams):
    """(rows, n_valid) for ``params.compact``, else (None, None).

    rows: the scored rows first (``compact_order``), cut to ``params.num_valid`` when the caller
    gives that count (then n_valid is None); otherwise all N rows with n_valid the device-resident
    int64 count of scored rows. Forward and backward call it with the same targets, so they see the
    same permutation.
    """
    if not params.compact:
        return None, None
    perm, count = compact_order(targets != params.ignore_index)
    if params.num_valid is not None:
        return perm[: params.num_valid], None
    return perm, count


def forward_statistics(hidden, weight, targets, bias, params: LogprobsParams, on_chunk=None):
    """The triton backend's forward: (logp, lse, entropy, lse_lo, H | None), fp32 [N] each, in the
    caller's row order (``entropy`` is [0] without ``return_entropy``).

    ``on_chunk``: forces the split forward and is passed to it (``logprobs_split_fwd``); it sees
    the rows in processing order (compacted when ``params.compact``; ``_compaction`` gives them).
    """
    N = hidden.shape[0]
    V = weight.shape[0]
    upcast = interpreting()
    rows, n_valid = _compaction(targets, params)
    h_run, t_run = hidden, targets
    if rows is not None:
        h_run, t_run = hidden.index_select(0, rows), targets.index_select(0, rows)
    if h_run.shape[0] == 0:  # num_valid = 0: nothing to launch
        empty = torch.zeros(0, dtype=torch.float32, device=hidden.device)
        lse, target_z, lse_lo = empty, empty, empty
        entropy_rows = empty if params.return_entropy else None
    elif params.fwd == "split" or on_chunk is not None:  # cuBLAS fp32 logits + a row kernel: same statistics
        lse, target_z, entropy_rows, lse_lo = _split_forward(h_run, weight, t_run, bias, params, n_valid, upcast,
                                                              on_chunk)
    else:
        lse, target_z, entropy_rows, lse_lo = logprobs_fwd(
            h_run, weight, t_run, bias,
            inv_temperature=1.0 / params.temperature,
            softcap=params.softcap,
            with_entropy=params.return_entropy,
            upcast=upcast,
            tiles=tile_config(hidden, forward=True, flags=dict(
                bias=bias is not None, softcap=params.softcap is not None,
                entropy=params.return_entropy, count=n_valid is not None)),
            n_valid=n_valid,
            with_lse_lo=True,
        )
    del h_run
    if rows is not None:
        # Back to the caller's order; rows never computed (ignored) hold 0 and are masked below.
        def scatter(x):
            return None if x is None else torch.zeros(N, dtype=x.dtype, device=x.device).index_copy_(0, rows, x)
        if n_valid is not None:
            # Rows past the count carry unspecified statistics: zero them before the scatter.
            computed = torch.arange(N, device=hidden.device) < n_valid
            lse, target_z = torch.where(computed, lse, 0.0), torch.where(computed, target_z, 0.0)
            lse_lo = torch.where(computed, lse_lo, 0.0)
            entropy_rows = None if entropy_rows is None else torch.where(computed, entropy_rows, 0.0)
        lse, target_z, lse_lo, entropy_rows = scatter(lse), scatter(target_z), scatter(lse_lo), scatter(entropy_rows)
    # Two steps: lse + lse_lo would round back to lse (exact at a large logit offset).
    logp = finalize_logprobs((target_z - lse) - lse_lo, targets, V, params.ignore_index)
    if params.return_entropy:
        entropy = masked_entropy(entropy_rows, targets, params.ignore_index)
    else:
        entropy = torch.empty(0, dtype=torch.float32, device=hidden.device)
    return logp, lse, entropy, lse_lo, entropy_rows


class TritonLinearLogprobs(torch.autograd.Function):
    """hidden [N, H], weight [V, H] (row-contiguous), targets [N], bias [V] | None -> fp32 [N] x 3."""

    @staticmethod
    @no_autocast  # the products fix their own dtypes (amp.py)
    def forward(ctx, hidden, weight, targets, bias, params: LogprobsParams):
        logp, lse, entropy, lse_lo, entropy_rows = forward_statistics(hidden, weight, targets, bias, params)
        ctx.params = params
        # Outputs nobody differentiates arrive in backward as None, not as materialised zeros, so
        # that an unused lse or entropy never switches on its kernel path (HAS_GRAD_LSE, ...).
        ctx.set_materialize_grads(False)
        ctx.save_for_backward(hidden, weight, targets, bias, lse, lse_lo, entropy_rows)
        return logp, lse, entropy

    @staticmethod
    @no_double_backward("triton", supported_by="reference")
    @no_autocast
    def backward(ctx, grad_logp, grad_lse, grad_entropy):
        hidden, weight, targets, bias, lse, lse_lo, entropy_rows = ctx.saved_tensors
        params: LogprobsParams = ctx.params
        need_h, need_w, _, need_b, _ = ctx.needs_input_grad
        need_b = need_b and bias is not None
        N, H = hidden.shape
        V = weight.shape[0]
        c_lp, c_lse, c_ent = _row_vectors(grad_logp, grad_lse, grad_entropy, targets, V, params, N)
        # The same permutation as the forward (recomputed: N int64, cheaper than saving it).
        rows, n_valid = _compaction(targets, params)
        if params.bwd == "atomic":
            grads = _atomic_backward(hidden, weight, targets, bias, lse, lse_lo, entropy_rows, c_lp, c_lse, c_ent,
                                     rows, n_valid, need_h, need_w, need_b, params)
        else:
            grads = _workspace_backward(hidden, weight, targets, bias, lse, lse_lo, entropy_rows, c_lp, c_lse, c_ent,
                                        rows, n_valid, need_h, need_w, need_b, params)
        grad_h, grad_w, grad_b = grads
        return (
            None if grad_h is None else grad_h.to(hidden.dtype),
            None if grad_w is None else grad_w.to(weight.dtype),
            None,
            None if grad_b is None else grad_b.to(bias.dtype),
            None,
        )


def _split_forward(h_run, weight, t_run, bias, params, n_valid, upcast, on_chunk=None):
    """(lse, target_z, H | None, lse_lo) by the split forward (ops/logprobs_split.py): the same
    statistics as the fused forward, so either backward follows it."""
    tiles = INTERPRETER_ROW_TILES if (upcast or h_run.device.type != "cuda") else GPU_ROW_TILES
    return logprobs_split_fwd(h_run, weight, t_run, bias, inv_temperature=1.0 / params.temperature,
                              softcap=params.softcap, with_entropy=params.return_entropy,
                              chunk_bytes=params.workspace_bytes, tiles=tiles, n_valid=n_valid,
                              on_chunk=on_chunk)


def _bwd_flags(bias, params, c_lse, c_ent, n_valid):
    """The backward kernels' feature flags, named as in tuning.TILE_TABLE."""
    return dict(bias=bias is not None, softcap=params.softcap is not None, grad_lse=c_lse is not None,
                grad_entropy=c_ent is not None, count=n_valid is not None)


def _gather(x, rows):
    return x if (x is None or rows is None) else x.index_select(0, rows)


def _atomic_backward(hidden, weight, targets, bias, lse, lse_lo, entropy_rows, c_lp, c_lse, c_ent,
                     rows, n_valid, need_h, need_w, need_b, params):
    if rows is not None and rows.shape[0] == 0:  # num_valid = 0: every gradient is zero
        f32 = dict(dtype=torch.float32, device=hidden.device)
        return (torch.zeros(hidden.shape, **f32) if need_h else None,
                torch.zeros(weight.shape, **f32) if need_w else None,
                torch.zeros(weight.shape[0], **f32) if need_b else None)
    grad_h, grad_w, grad_b = logprobs_bwd(
        _gather(hidden, rows), weight, _gather(targets, rows), bias, _gather(lse, rows),
        _gather(entropy_rows, rows), _gather(c_lp, rows), _gather(c_lse, rows), _gather(c_ent, rows),
        need_hidden=need_h, need_weight=need_w, need_bias=need_b,
        inv_temperature=1.0 / params.temperature,
        softcap=params.softcap,
        temperature=params.temperature,
        upcast=interpreting(),
        tiles=tile_config(hidden, forward=False, flags=_bwd_flags(bias, params, c_lse, c_ent, n_valid)),
        n_valid=n_valid,
        lse_lo=_gather(lse_lo, rows),
    )
    if grad_h is not None and rows is not None:
        grad_h = torch.zeros(hidden.shape, dtype=grad_h.dtype, device=hidden.device).index_copy_(0, rows, grad_h)
    return grad_h, grad_w, grad_b


def _workspace_backward(hidden, weight, targets, bias, lse, lse_lo, entropy_rows, c_lp, c_lse, c_ent,
                        rows, n_valid, need_h, need_w, need_b, params):
    """Chunked dZ workspace + cuBLAS products; see the module docstring and ops/logits_grad.py."""
    N, H = hidden.shape
    V = weight.shape[0]
    M = N if rows is None else rows.shape[0]  # rows processed, in processing order
    # Per-row vectors in processing order (O(N) floats each).
    t_run, lse_run, lse_lo_run = _gather(targets, rows), _gather(lse, rows), _gather(lse_lo, rows)
    c_lp, c_lse, c_ent = _gather(c_lp, rows), _gather(c_lse, rows), _gather(c_ent, rows)
    # The kernel takes the saved entropy H itself so that the entropy term -c_ent p (log p + H)
    # does not cancel at large common offsets.
    ent = None if c_ent is None else _gather(entropy_rows, rows)
    live = c_lp != 0
    if c_lse is not None:
        live |= c_lse != 0
    if c_ent is not None:
        live |= c_ent != 0
    if n_valid is not None:
        live &= torch.arange(M, device=hidden.device) < n_valid

    tiles = tile_config(hidden, forward=False, workspace=True, flags=_bwd_flags(bias, params, c_lse, c_ent, n_valid))
    if M > 0 and workspace_layout(M, V, H, hidden.element_size(), params.workspace_bytes, tiles.block_n) == "vocab":
        return _vocab_sliced_backward(hidden, weight, bias, rows, n_valid, M, t_run, lse_run, lse_lo_run, ent,
                                      c_lp, c_lse, c_ent, live, need_h, need_w, need_b, params, tiles)
    C = workspace_rows(V, hidden.element_size(), params.workspace_bytes, M, multiple=tiles[0])
    # Allocated once per backward, rows padded to 16 bytes for the tensor-core GEMMs.
    workspace = torch.empty((C, padded_vocab(V)), dtype=hidden.dtype, device=hidden.device)[:, :V]
    # The interpreter's fp32 -> bf16 store does not round to nearest (it is biased, and a biased
    # gradient sums coherently into dW): there the kernel writes fp32 and torch casts (RTNE), the
    # rounding a GPU's cvt.rn does in the kernel.
    staging = None
    if interpreting() and hidden.dtype != torch.float32:
        staging = torch.empty((C, V), dtype=torch.float32, device=hidden.device)
    f32 = dict(dtype=torch.float32, device=hidden.device)
    grad_h = torch.zeros((N, H), dtype=hidden.dtype, device=hidden.device) if need_h else None
    grad_w = torch.zeros((V, H), **f32) if need_w else None
    grad_b = torch.zeros((V,), **f32) if need_b else None
    for start in range(0, M, C):
        stop = min(start + C, M)
        sl = slice(start, stop)
        idx = None if rows is None else rows[sl]
        h = hidden[sl] if idx is None else hidden.index_select(0, idx)
        g = workspace[: stop - start]
        logits_grad(
            h, weight, t_run[sl], bias, lse_run[sl], lse_lo_run[sl], None if ent is None else ent[sl],
            c_lp[sl], None if c_lse is None else c_lse[sl], None if c_ent is None else c_ent[sl],
            g if staging is None else staging[: stop - start], grad_b,
            row0=start, n_valid=n_valid,
            inv_temperature=1.0 / params.temperature,
            softcap=params.softcap,
            temperature=params.temperature,
            upcast=interpreting(),
            tiles=tiles,
        )
        if staging is not None:
            g.copy_(staging[: stop - start])
        if grad_h is not None:
            if idx is None:
                torch.mm(g, weight, out=grad_h[sl])
            else:
                grad_h.index_copy_(0, idx, torch.mm(g, weight))
        if grad_w is not None:
            # Dead rows add nothing even with a NaN hidden state (0 * NaN is NaN in a GEMM).
            _accumulate_wgrad(grad_w, g, torch.where(live[sl, None], h, 0.0))
        del h
    return grad_h, grad_w, grad_b


def _vocab_sliced_backward(hidden, weight, bias, rows, n_valid, M, t_run, lse_run, lse_lo_run, ent,
                           c_lp, c_lse, c_ent, live, need_h, need_w, need_b, params, tiles):
    """The workspace backward by vocabulary slices (verl's split; issue 16 item 4).

    Per slice s of Vc columns: dZ[:, s] for all M processed rows (the same dZ kernel, given
    W[s], b[s] and the targets shifted by the slice's start: d(loss)/dz needs only the row's full
    lse, so a slice is as good as the whole row), then
        dW[s] = dZ[:, s]^T h      one product with K = M rows, fp32 accumulation inside the GEMM,
                                  written once in the weight's dtype (no fp32 [V, H] buffer, no
                                  zero-fill, no final cast);
        dH   += dZ[:, s] W[s]     into an fp32 [M, H] accumulator.
    ``tuning.workspace_layout`` picks this layout where its fp32 accumulator traffic is smaller.
    """
    N, H = hidden.shape
    V = weight.shape[0]
    upcast = interpreting()
    h_run = hidden if rows is None else hidden.index_select(0, rows)
    # Dead rows add nothing to dW even with a NaN hidden state (0 * NaN is NaN in a GEMM).
    h_live = torch.where(live[:, None], h_run, 0.0) if need_w else None
    Vc = vocab_slice_columns(M, V, hidden.element_size(), params.workspace_bytes, multiple=tiles.block_v)
    workspace = torch.empty((M, Vc), dtype=hidden.dtype, device=hidden.device)
    # As in _workspace_backward: the interpreter's fp32 -> bf16 store truncates, so it writes fp32
    # and torch rounds (RTNE), as the GPU's cvt.rn does in the kernel.
    staging = None
    if upcast and hidden.dtype != torch.float32:
        staging = torch.empty((M, Vc), dtype=torch.float32, device=hidden.device)
    f32 = dict(dtype=torch.float32, device=hidden.device)
    dh_acc = torch.zeros((M, H), **f32) if need_h else None
    grad_w = torch.empty_like(weight) if need_w else None
    grad_b = torch.zeros((V,), **f32) if need_b else None
    for v0 in range(0, V, Vc):
        v1 = min(v0 + Vc, V)
        w_s = weight[v0:v1]
        g = workspace[:, : v1 - v0]
        logits_grad(
            h_run, w_s, t_run - v0, None if bias is None else bias[v0:v1], lse_run, lse_lo_run, ent,
            c_lp, c_lse, c_ent, g if staging is None else staging[:, : v1 - v0],
            None if grad_b is None else grad_b[v0:v1],
            row0=0, n_valid=n_valid,
            inv_temperature=1.0 / params.temperature,
            softcap=params.softcap,
            temperature=params.temperature,
            upcast=upcast,
            tiles=tiles,
        )
        if staging is not None:
            g.copy_(staging[:, : v1 - v0])
        if grad_w is not None:
            if upcast or hidden.device.type != "cuda":
                grad_w[v0:v1] = torch.mm(g.t().float(), h_live.float())  # fp32 sum, one rounding
            else:
                torch.mm(g.t(), h_live, out=grad_w[v0:v1])  # cuBLAS: fp32 accumulation, one rounding
        if dh_acc is not None:
            _accumulate_wgrad(dh_acc, g.t(), w_s)  # dH += g W[s]: (g^T)^T W[s], fp32 accumulator
    grad_h = None
    if dh_acc is not None:
        grad_h = dh_acc if rows is None else torch.zeros((N, H), **f32).index_copy_(0, rows, dh_acc)
    return grad_h, grad_w, grad_b
