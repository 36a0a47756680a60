"""Batch invariance (issue 16, item 7).

backend="triton": a row's log-prob, lse and entropy are bitwise identical whatever the batch
size, the row's position in the batch, the other rows, and compaction (device count or host
``num_valid``): the forward's vocabulary split count comes from V and the device only
(``tuning.vocab_splits``), the tile from the dtype and flags only, and the partial results
combine in a fixed order (``ordered_sum``). Checked bitwise through the Triton interpreter, with
two vocabulary splits (V 163 = two tiles of 128), so the combine is exercised.

One substitution: the interpreter computes ``tl.dot`` with ``np.matmul`` (OpenBLAS), whose result
for a row depends on the row's position inside the block (its micro-kernels; a shift by 8 rows
changes fp32 results by ~1e-5). A GPU's MMA computes every element of a fixed tile in the same
k-order whatever its row, so the test gives the interpreter a position-invariant dot (an einsum
without BLAS, exact same inputs and fp32 accumulation) and checks everything else — the split
count, the split boundaries, the combine order, masking, compaction — bitwise.

backend="torch" guarantees less: the same inputs with the same shapes and chunk size give bitwise
identical results run to run (no atomics, no data-dependent order), but the matrix product's
kernel (cuBLAS / MKL) is chosen by the chunk's shape, so a different batch or chunk size changes
results at the rounding level of the fp32 logits. Both statements are tested below.
"""
import numpy as np
import pytest
import torch
from triton.runtime import interpreter

from iris_kernels import linear_logprobs
from iris_kernels.tuning import vocab_splits
from test_logprobs import make_inputs

H, V = 48, 163


@pytest.fixture
def row_invariant_dot(monkeypatch):
    def create_dot(self, a, b, d, input_precision, max_num_imprecise_acc):
        acc = d.data.dtype
        out = np.einsum("ik,kj->ij", a.data.astype(acc), b.data.astype(acc), optimize=False)
        return interpreter.TensorHandle(out + d.data, d.dtype.scalar)

    monkeypatch.setattr(interpreter.InterpreterBuilder, "create_dot", create_dot)


def _run(hidden, weight, targets, bias=None, **kw):
    # Compaction gives ignored rows no lse, so it cannot return one (logprobs.py).
    out = linear_logprobs(hidden, weight, targets, bias=bias, return_lse=not kw.get("compact"),
                          return_entropy=True, **kw)
    return out.logprobs, out.lse, out.entropy


def _same_rows(full, part, idx, scored):
    """Bitwise: each output of ``part`` equals ``full`` at rows ``idx`` (lse only where scored)."""
    for name, a, b in zip(("logp", "lse", "entropy"), full, part):
        if b is None:
            continue
        want, got = a[idx], b
        if name == "lse":
            want, got = want[scored], got[scored]
        assert torch.equal(want, got), (name, (want - got).abs().max())


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("features", ["plain", "bias+softcap+temperature"])
def test_triton_rows_do_not_depend_on_the_batch(dtype, features, row_invariant_dot):
    assert vocab_splits(-(-V // 128), None) == 2  # the combine is exercised
    hidden, weight, targets, bias = make_inputs(45, H, V, dtype, seed=3, bias=features != "plain", ignore_frac=0.3)
    kw = dict(backend="triton", compact=False)
    if features != "plain":
        kw.update(softcap=12.0, temperature=0.7)
    full = _run(hidden, weight, targets, bias, **kw)
    ok = targets != -100

    # A smaller batch (5 rows: one partial row block), a permuted batch, rows mixed with other rows.
    g = torch.Generator().manual_seed(7)
    perm = torch.randperm(45, generator=g)
    other_h, _, other_t, _ = make_inputs(20, H, V, dtype, seed=11, ignore_frac=0.0)
    cases = {
        "first 5": torch.arange(5),
        "last 33": torch.arange(12, 45),
        "permuted": perm,
    }
    for name, idx in cases.items():
        part = _run(hidden[idx], weight, targets[idx], bias, **kw)
        _same_rows(full, part, idx, ok[idx])
    # Interleaved with 20 unrelated rows: row i of the batch lands at a new position.
    mixed_h = torch.cat([other_h[:9], hidden, other_h[9:]])
    mixed_t = torch.cat([other_t[:9], targets, other_t[9:]])
    part = _run(mixed_h, weight, mixed_t, bias, **kw)
    _same_rows(full, tuple(x[9:54] for x in part), torch.arange(45), ok)

    # Compaction, with the device-resident count and with the host count.
    for compact, num_valid in (("device", None), ("host", int(ok.sum()))):
        part = _run(hidden, weight, targets, bias, backend="triton", compact=True, num_valid=num_valid,
                    **{k: v for k, v in kw.items() if k not in ("backend", "compact")})
        _same_rows(full, part, torch.arange(45), ok)


def test_torch_backend_is_deterministic_but_not_promised_batch_invariant():
    hidden, weight, targets, _ = make_inputs(45, H, V, torch.float32, seed=5)
    a = _run(hidden, weight, targets, backend="torch", chunk_size=16)
    b = _run(hidden, weight, targets, backend="torch", chunk_size=16)
    for x, y in zip(a, b):
        assert torch.equal(x, y)  # run to run, same shapes: bitwise
    # Another chunk size / a sub-batch: equal at fp32 rounding, not promised bitwise.
    c = _run(hidden, weight, targets, backend="torch", chunk_size=7)
    d = _run(hidden[:9], weight, targets[:9], backend="torch", chunk_size=16)
    for x, y, z in zip(a, c, d):
        torch.testing.assert_close(x, y, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(x[:9], z, rtol=1e-5, atol=1e-5)


class _Capture:
    def __init__(self):
        self.launches = []

    def __getitem__(self, grid):
        def launch(*args, **kwargs):
            self.launches.append((grid, args, kwargs))
        return launch


@pytest.mark.parametrize("V_", [32000, 151936, 163, 1000])
def test_cuda_split_count_depends_on_v_and_device_only(monkeypatch, V_):
    """On an H200 (132 SMs) the forward's splits, hence each row's combine, are the same for every
    N; at N = 16384 the grid is >= 8 waves of 132 (the launch is intercepted: meta tensors)."""
    import iris_kernels.ops.logprobs_fwd as F
    from iris_kernels.tuning import Tile

    cap = _Capture()
    monkeypatch.setattr(F, "logprobs_fwd_kernel", cap)
    tile = Tile(128, 128, 64, 8)
    for n in (1, 100, 4096, 16384, 65536):
        h = torch.empty((n, 64), dtype=torch.bfloat16, device="meta")
        w = torch.empty((V_, 64), dtype=torch.bfloat16, device="meta")
        t = torch.empty((n,), dtype=torch.int64, device="meta")
        F.logprobs_fwd(h, w, t, None, inv_temperature=1.0, softcap=None, with_entropy=False, upcast=False,
                       tiles=tile, sm_count=132)
    v_per_split = {args[14] for _, args, _ in cap.launches}
    assert len(v_per_split) == 1, v_per_split
    splits = -(-V_ // v_per_split.pop())
    grid_16k = cap.launches[3][0][0]
    assert grid_16k == 128 * splits
    if V_ >= 32000:
        assert grid_16k >= 8 * 132


def test_forward_tile_does_not_depend_on_compaction():
    """Compaction (the device count) must not pick another forward tile: the split boundaries and
    each split's tile order would change a row's lse."""
    import itertools

    from iris_kernels.tuning import kernel_tiles

    for dtype in (torch.bfloat16, torch.float16, torch.float32):
        for bias, softcap, entropy in itertools.product((False, True), repeat=3):
            flags = dict(bias=bias, softcap=softcap, entropy=entropy)
            assert kernel_tiles("fwd", dtype, {**flags, "count": True}) == kernel_tiles("fwd", dtype, flags)
