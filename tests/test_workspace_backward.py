"""backend="triton" backward variants and ignored-row compaction against the fp64 oracle (issue 8).

Runs the kernels through the Triton interpreter on CPU (tests/conftest.py), compiled on a GPU.
Covers ops/logits_grad.py (the workspace dZ kernel), the HAS_COUNT paths of the forward and the
atomic backward, compaction.py and the dispatch in autograd.py: values and the gradients of
hidden, weight and bias under random upstream gradients of the log-probs, lse and entropy, with
chunks smaller than N (C not dividing N, a chunk boundary inside a sequence), fully ignored
chunks, V not a multiple of any tile, every input dtype, soft-cap and temperature.
"""
import math

import pytest
import torch

from iris_kernels import linear_logprobs, sequence_logprobs
from iris_kernels.autograd import INTERPRETER_TILES, _accumulate_wgrad
from iris_kernels.tuning import padded_vocab
from test_logprobs import TOL, make_inputs, naive_same_dtype, oracle

N, H, V = 70, 40, 163  # V prime: not a multiple of any tile; N not a multiple of the chunk
# Workspace of 32 rows (the interpreter's BLOCK_N) whatever the dtype: chunks of 32, 32, 6 rows.
SMALL_WS = 32 * padded_vocab(V) * 2
GRAD_RTOL = {torch.float32: 1e-5, torch.bfloat16: 2e-2, torch.float16: 5e-3}
MODES = [("workspace", False), ("workspace", "device"), ("workspace", "host"),
         ("atomic", False), ("atomic", "device"), ("atomic", "host")]


def _run(hidden, weight, targets, bias, *, bwd, compact, up_lp, up_lse=None, up_ent=None, **opts):
    leaves = [None if t is None else t.detach().clone().requires_grad_() for t in (hidden, weight, bias)]
    num_valid = int((targets != -100).sum()) if compact == "host" else None
    out = linear_logprobs(
        leaves[0], leaves[1], targets, bias=leaves[2], backend="triton", bwd=bwd,
        compact=bool(compact), num_valid=num_valid, workspace_bytes=SMALL_WS,
        return_lse=up_lse is not None, return_entropy=up_ent is not None, **opts,
    )
    logp = out if isinstance(out, torch.Tensor) else out.logprobs
    loss = (logp * up_lp).sum()
    if up_lse is not None:
        loss = loss + (out.lse * up_lse).sum()
    if up_ent is not None:
        loss = loss + (out.entropy * up_ent).sum()
    loss.backward()
    return out, [None if t is None else t.grad for t in leaves]


def _oracle(hidden, weight, targets, bias, up_lp, up_lse=None, up_ent=None, **opts):
    ref = [None if t is None else t.detach().double().requires_grad_() for t in (hidden, weight, bias)]
    logp, lse, ent = oracle(ref[0], ref[1], targets, ref[2], **opts)
    loss = (logp * up_lp.double()).sum()
    if up_lse is not None:
        loss = loss + (lse * up_lse.double()).sum()
    if up_ent is not None:
        loss = loss + (ent * up_ent.double()).sum()
    loss.backward()
    return (logp, lse, ent), [None if t is None else t.grad for t in ref]


def _check_grads(got, want, dtype):
    for name, a, b in zip(("hidden", "weight", "bias"), got, want):
        if b is None:
            continue
        assert a is not None and torch.isfinite(a).all(), name
        rel = ((a.double() - b).norm() / b.norm().clamp(min=1e-30)).item()
        assert rel < GRAD_RTOL[dtype], (name, rel)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("bwd, compact", MODES)
def test_parity_all_features(dtype, bwd, compact):
    """Bias, soft-cap, temperature, entropy and random upstream gradients; lse when not compacted."""
    opts = dict(temperature=0.7, softcap=5.0)
    hidden, weight, targets, bias = make_inputs(N, H, V, dtype, seed=3, bias=True, ignore_frac=0.4)
    g = torch.Generator().manual_seed(4)
    up_lp, up_ent = torch.randn(N, generator=g), torch.randn(N, generator=g)
    up_lp[::5] = 0.0  # rows whose only gradient comes through the entropy (or lse) must still count
    up_lse = None if compact else torch.randn(N, generator=g)
    out, grads = _run(hidden, weight, targets, bias, bwd=bwd, compact=compact,
                      up_lp=up_lp, up_lse=up_lse, up_ent=up_ent, **opts)
    (logp, lse, ent), want = _oracle(hidden, weight, targets, bias, up_lp, up_lse, up_ent, **opts)
    yard = naive_same_dtype(hidden, weight, targets, bias, **opts)
    err = (out.logprobs.double() - logp).abs().max().item()
    assert err <= (yard.double() - logp).abs().max().item() + TOL[dtype] * max(1.0, logp.abs().max().item())
    assert torch.all(out.logprobs[targets == -100] == 0) and torch.all(out.entropy[targets == -100] == 0)
    assert (out.entropy.double() - ent).abs().max().item() < 1e-4 * max(1.0, ent.abs().max().item())
    if up_lse is not None:
        assert (out.lse.double() - lse).abs().max().item() < 1e-4 * max(1.0, lse.abs().max().item())
    _check_grads(grads, want, dtype)


@pytest.mark.parametrize("bwd, compact", MODES)
def test_fully_ignored_chunks_and_nan_hidden_at_ignored_rows(bwd, compact):
    """Rows 20..59 ignored (whole 32-row chunks without compaction) and NaN there: nothing leaks."""
    hidden, weight, targets, _ = make_inputs(N, H, V, torch.float32, seed=5, ignore_frac=0.0)
    targets[20:60] = -100
    hidden[20:60] = float("nan")
    up = torch.randn(N, generator=torch.Generator().manual_seed(6))
    out, grads = _run(hidden, weight, targets, None, bwd=bwd, compact=compact, up_lp=up)
    assert torch.all(out[20:60] == 0)
    assert torch.all(grads[0][20:60] == 0)
    keep = targets != -100
    (logp, _, _), want = _oracle(hidden[keep], weight, targets[keep], None, up[keep])
    assert (out[keep].double() - logp).abs().max().item() < 1e-5
    rel = (grads[0][keep].double() - want[0]).norm() / want[0].norm()
    assert rel < 1e-5
    assert ((grads[1].double() - want[1]).norm() / want[1].norm()) < 1e-5


@pytest.mark.parametrize("bwd", ["workspace", "atomic"])
@pytest.mark.parametrize("compact", ["device", "host"])
def test_every_row_ignored(bwd, compact):
    hidden, weight, targets, bias = make_inputs(N, H, V, torch.float32, seed=7, bias=True)
    targets[:] = -100
    out, grads = _run(hidden, weight, targets, bias, bwd=bwd, compact=compact, up_lp=torch.ones(N))
    assert torch.all(out == 0)
    for g in grads:
        assert torch.all(g == 0)


def test_chunk_boundary_inside_a_sequence_in_sequence_logprobs():
    """Packed sequences cut across 32-row workspace chunks; compaction with the host count."""
    B, T = 3, 30
    hidden, weight, _, bias = make_inputs(B * T, H, V, torch.bfloat16, seed=8, bias=True)
    hidden = hidden.view(B, T, H)
    labels = torch.randint(0, V, (B, T), generator=torch.Generator().manual_seed(9))
    labels[:, :7] = -100  # prompts
    res = {}
    for mode in ("workspace", "atomic", "reference"):
        h = hidden.detach().clone().requires_grad_()
        w = weight.detach().clone().requires_grad_()
        if mode == "reference":
            s = sequence_logprobs(h.double(), w.double(), labels, bias=bias.double(), backend="reference")
        else:
            s = sequence_logprobs(h, w, labels, bias=bias, backend="triton", bwd=mode, compact=True,
                                  workspace_bytes=SMALL_WS)
        s.sum().backward()
        res[mode] = (s.double(), h.grad.double(), w.grad.double())
    for mode in ("workspace", "atomic"):
        for a, b in zip(res[mode], res["reference"]):
            assert ((a - b).norm() / b.norm()).item() < 2e-2, mode


def test_compaction_gives_the_same_result_as_none():
    """Compaction changes which rows are launched, never a value (fp32: equal to rounding)."""
    hidden, weight, targets, _ = make_inputs(N, H, V, torch.float32, seed=10, ignore_frac=0.5)
    up = torch.randn(N, generator=torch.Generator().manual_seed(11))
    base, gb = _run(hidden, weight, targets, None, bwd="workspace", compact=False, up_lp=up)
    for compact in ("device", "host"):
        out, gc = _run(hidden, weight, targets, None, bwd="workspace", compact=compact, up_lp=up)
        # A few ulp: the interpreter's np.matmul rounds a row differently at another position in
        # its block (tests/test_batch_invariance.py); a GPU's MMA does not.
        torch.testing.assert_close(out, base, rtol=1e-6, atol=1e-6)
        for a, b in zip(gc[:2], gb[:2]):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_weight_gradient_accumulates_in_fp32_across_chunks():
    """Many chunks of bf16 partial products: the running sum stays fp32 (never a bf16 sum)."""
    g = torch.Generator().manual_seed(12)
    rows, v, h = 64, 24, 8
    acc = torch.zeros(v, h)
    want = torch.zeros(v, h, dtype=torch.float64)
    for _ in range(100):
        gz = (torch.randn(rows, v, generator=g) * 1e-3).to(torch.bfloat16)
        x = torch.randn(rows, h, generator=g).to(torch.bfloat16)
        _accumulate_wgrad(acc, gz, x, allow_upcast=False)  # the CUDA fallback's arithmetic
        want += gz.double().t() @ x.double()
    # Each chunk's product is rounded once (relative ~2^-9 of that chunk's partial; where
    # out_dtype addmm exists on CUDA, not even that); a bf16 running sum also rounds the total
    # at every step and loses the small late partials.
    rel = ((acc.double() - want).norm() / want.norm()).item()
    assert rel < 4e-3, rel
    running_bf16 = torch.zeros(v, h, dtype=torch.bfloat16)
    g = torch.Generator().manual_seed(12)
    for _ in range(100):
        gz = (torch.randn(rows, v, generator=g) * 1e-3).to(torch.bfloat16)
        x = torch.randn(rows, h, generator=g).to(torch.bfloat16)
        running_bf16 += gz.t() @ x
    assert rel < ((running_bf16.double() - want).norm() / want.norm()).item() / 2


@pytest.mark.parametrize(
    "kw, err, match",
    [
        (dict(bwd="fast"), ValueError, "bwd"),
        (dict(compact="yes"), TypeError, "compact"),
        (dict(workspace_bytes=0), ValueError, "workspace_bytes"),
        (dict(workspace_bytes=1.5), ValueError, "workspace_bytes"),
        (dict(num_valid=-1), ValueError, "num_valid"),
        (dict(num_valid=True), ValueError, "num_valid"),
        (dict(num_valid=N + 1), ValueError, "num_valid"),
        (dict(compact=True, return_lse=True), ValueError, "compact"),
        (dict(num_valid=3, validate=True), ValueError, "num_valid"),
    ],
)
def test_bad_options_name_the_argument(kw, err, match):
    hidden, weight, targets, _ = make_inputs(N, H, V, torch.float32, seed=13)
    with pytest.raises(err, match=match):
        linear_logprobs(hidden, weight, targets, backend="triton", **kw)


def test_interpreter_tiles_make_the_small_workspace_span_several_chunks():
    # The tests above rely on it: 32-row chunks, N = 70 rows -> 3 chunks, the last partial.
    assert INTERPRETER_TILES[0] == 32
    assert math.ceil(N / 32) == 3 and N % 32 != 0


def test_selfplay_loss_passes_the_backward_options_through(monkeypatch):
    import iris_kernels.module as M
    from iris_kernels import SelfPlayLoss

    with pytest.raises(ValueError, match="bwd"):
        SelfPlayLoss("sft", bwd="fastest")
    with pytest.raises(ValueError, match="workspace_bytes"):
        SelfPlayLoss("sft", workspace_bytes=-1)
    seen = []
    real = M.sequence_logprobs

    def spy(*args, **kw):
        seen.append({k: kw.get(k) for k in ("bwd", "compact", "workspace_bytes")})
        return real(*args, **kw)

    monkeypatch.setattr(M, "sequence_logprobs", spy)
    B, T = 2, 20
    hidden, weight, _, _ = make_inputs(B * T, H, V, torch.float32, seed=14)
    labels = torch.randint(0, V, (B, T), generator=torch.Generator().manual_seed(15))
    labels[:, :5] = -100
    results = []
    for bwd in ("workspace", "atomic"):
        h = hidden.view(B, T, H).clone().requires_grad_()
        crit = SelfPlayLoss("sft", backend="triton", bwd=bwd, compact=False, workspace_bytes=SMALL_WS)
        loss, _ = crit(h, weight, labels, num_real=B)
        loss.backward()
        results.append((loss.detach(), h.grad))
        assert seen[-1] == dict(bwd=bwd, compact=False, workspace_bytes=SMALL_WS)
    torch.testing.assert_close(results[0][0], results[1][0], rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(results[0][1], results[1][1], rtol=1e-4, atol=1e-7)


@pytest.mark.parametrize("bwd, compact", [m for m in MODES if m[1] != "host"])
def test_no_host_sync(bwd, compact):
    from host_sync import forbid_host_sync

    hidden, weight, targets, bias = make_inputs(N, H, V, torch.float32, seed=16, bias=True, ignore_frac=0.4)
    with forbid_host_sync():
        _run(hidden, weight, targets, bias, bwd=bwd, compact=compact, up_lp=torch.ones(N),
             up_ent=torch.ones(N), softcap=4.0)


@pytest.mark.parametrize("layout", ["rows", "vocab"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("compact", [False, "device", "host"])
def test_both_workspace_layouts_match_fp64(monkeypatch, layout, dtype, compact):
    """Issue 16, item 4: row chunks (fp32 [V, H] accumulator) and vocabulary slices (dW written
    once per slice in the weight dtype, fp32 [N, H] accumulator), each forced; odd N and V, ignored
    rows with NaN hidden states, bias, soft-cap, temperature, entropy and lse gradients."""
    import iris_kernels.autograd as A

    picked = []
    real = A.workspace_layout

    def force(*args, **kwargs):
        picked.append(real(*args, **kwargs))
        return layout

    monkeypatch.setattr(A, "workspace_layout", force)
    n = 37
    opts = dict(temperature=0.7, softcap=5.0)
    hidden, weight, targets, bias = make_inputs(n, 48, V, dtype, seed=13, bias=True, ignore_frac=0.3)
    hidden[targets == -100] = float("nan")
    g = torch.Generator().manual_seed(14)
    up_lp, up_ent = torch.randn(n, generator=g), torch.randn(n, generator=g)
    up_lse = None if compact else torch.randn(n, generator=g)
    if up_lse is not None:
        up_lse[targets == -100] = 0.0  # a NaN row with an lse gradient rightly gets a NaN gradient
    # m rows x 128 columns: two vocabulary slices (128 + 35), or row chunks of 32 (two at m = 37).
    m = int((targets != -100).sum()) if compact == "host" else n
    ws = m * 128 * hidden.element_size()
    leaves = [t.detach().clone().requires_grad_() for t in (hidden, weight, bias)]
    num_valid = int((targets != -100).sum()) if compact == "host" else None
    out = linear_logprobs(leaves[0], leaves[1], targets, bias=leaves[2], backend="triton", bwd="workspace",
                          compact=bool(compact), num_valid=num_valid, workspace_bytes=ws,
                          return_lse=up_lse is not None, return_entropy=True, **opts)
    loss = (out.logprobs * up_lp).sum() + (out.entropy * up_ent).sum()
    if up_lse is not None:
        loss = loss + (out.lse * up_lse).sum()
    loss.backward()
    keep = targets != -100
    assert picked, "the workspace layout was not consulted"
    from iris_kernels.tuning import vocab_slice_columns, workspace_rows
    assert vocab_slice_columns(m, V, hidden.element_size(), ws) == 128  # two slices
    assert workspace_rows(V, hidden.element_size(), ws, m, multiple=32) == 32  # chunks of 32 rows
    keep = targets != -100
    assert torch.all(leaves[0].grad[~keep] == 0)
    clean = hidden.clone()
    clean[~keep] = 0.0
    _, want = _oracle(clean, weight, targets, bias, up_lp, up_lse, up_ent, **opts)
    _check_grads([t.grad for t in leaves], want, dtype)
    assert leaves[1].grad.dtype == dtype


def test_layout_choice_is_the_byte_arithmetic():
    from iris_kernels.tuning import workspace_layout

    gib = 1 << 30
    assert workspace_layout(16384, 151936, 2048, 2, gib) == "vocab"  # Qwen2.5-3B
    assert workspace_layout(16384, 32000, 4096, 2, gib) == "vocab"  # Zephyr-7B: N < V
    assert workspace_layout(65536, 32000, 4096, 2, gib) == "rows"  # more rows than vocabulary
    assert workspace_layout(4096, 1000, 512, 4, gib) == "rows"
