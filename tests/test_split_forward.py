"""The split forward (fwd="split", ops/logprobs_split.py) against the fp64 oracle and the fused forward (issue 17).

Runs through the Triton interpreter on CPU. Covers: values, lse, entropy and the gradients of
hidden, weight and bias after either backward, every input dtype, bias, soft-cap, temperature,
ignored rows, compaction by the device count and by the host count, chunks smaller than N (a
16-row fp32 logits buffer: 70 rows = 4 full chunks + 6), NaN in -> NaN out, a large common logit
offset (lse_lo), and the up-front validation of ``fwd``.
"""
import pytest
import torch

from iris_kernels import SelfPlayLoss, linear_logprobs, sequence_logprobs
from iris_kernels.ops.logprobs_split import INTERPRETER_ROW_TILES
from test_logprobs import TOL, make_inputs, naive_same_dtype
from test_workspace_backward import N, H, V, SMALL_WS, _check_grads, _oracle

# fp32 logits budget of exactly one row tile: chunks of 16 rows (the fp32 buffer, not the dZ workspace).
SPLIT_CHUNK = INTERPRETER_ROW_TILES[0] * -(-V // 8) * 8 * 4


def _run(hidden, weight, targets, bias, *, fwd, bwd, compact, up_lp, up_lse=None, up_ent=None, ws=SPLIT_CHUNK,
         **opts):
    leaves = [None if t is None else t.detach().clone().requires_grad_() for t in (hidden, weight, bias)]
    num_valid = int((targets != -100).sum()) if compact == "host" else None
    out = linear_logprobs(
        leaves[0], leaves[1], targets, bias=leaves[2], backend="triton", fwd=fwd, bwd=bwd,
        compact=bool(compact), num_valid=num_valid, workspace_bytes=ws,
        return_lse=up_lse is not None, return_entropy=True, **opts,
    )
    loss = (out.logprobs * up_lp).sum()
    if up_lse is not None:
        loss = loss + (out.lse * up_lse).sum()
    if up_ent is not None:
        loss = loss + (out.entropy * up_ent).sum()
    loss.backward()
    return out, [None if t is None else t.grad for t in leaves]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("bwd, compact", [("workspace", False), ("workspace", "device"), ("atomic", "host")])
def test_split_forward_parity_all_features(dtype, bwd, compact):
    opts = dict(temperature=0.7, softcap=5.0)
    hidden, weight, targets, bias = make_inputs(N, H, V, dtype, seed=11, bias=True, ignore_frac=0.4)
    g = torch.Generator().manual_seed(12)
    up_lp, up_ent = torch.randn(N, generator=g), torch.randn(N, generator=g)
    up_lse = None if compact else torch.randn(N, generator=g)
    out, grads = _run(hidden, weight, targets, bias, fwd="split", bwd=bwd, compact=compact,
                      up_lp=up_lp, up_lse=up_lse, up_ent=up_ent, **opts)
    (logp, lse, ent), want = _oracle(hidden, weight, targets, bias, up_lp, up_lse, up_ent, **opts)
    yard = naive_same_dtype(hidden, weight, targets, bias, **opts)
    err = (out.logprobs.double() - logp).abs().max().item()
    assert err <= (yard.double() - logp).abs().max().item() + TOL[dtype] * max(1.0, logp.abs().max().item())
    # The logits are fp32 from fp32 accumulation: as accurate as the fused forward, whatever the dtype.
    assert err < 1e-4 * max(1.0, logp.abs().max().item())
    ignored = targets == -100
    assert torch.all(out.logprobs[ignored] == 0) and torch.all(out.entropy[ignored] == 0)
    assert (out.entropy.double() - ent).abs().max().item() < 1e-4 * max(1.0, ent.abs().max().item())
    if up_lse is not None:
        assert (out.lse.double() - lse).abs().max().item() < 1e-4 * max(1.0, lse.abs().max().item())
    _check_grads(grads, want, dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_split_matches_fused_statistics(dtype):
    """Same outputs as the fused forward (up to fp32 summation order), and the same gradients from
    the same backward: the statistics each saves for the backward agree."""
    hidden, weight, targets, bias = make_inputs(N, H, V, dtype, seed=13, bias=True, ignore_frac=0.3)
    up = torch.randn(N, generator=torch.Generator().manual_seed(14))
    res = {}
    for fwd in ("fused", "split"):
        res[fwd] = _run(hidden, weight, targets, bias, fwd=fwd, bwd="workspace", compact=False,
                        up_lp=up, up_lse=up.flip(0), up_ent=up.roll(3), ws=SMALL_WS)
    (a, ga), (b, gb) = res["fused"], res["split"]
    for x, y in zip(a, b):
        torch.testing.assert_close(x, y, rtol=2e-6, atol=2e-6)
    for x, y in zip(ga, gb):
        torch.testing.assert_close(x.float(), y.float(), rtol=2e-2 if dtype != torch.float32 else 1e-5,
                                   atol=1e-2 if dtype != torch.float32 else 1e-6)


@pytest.mark.parametrize("fwd", ["split", "fused"])
def test_split_large_offset_keeps_log_p_exact(fwd):
    """A common logit offset of 3e4 (via the bias), with integer logits that fp32 holds exactly:
    log p to fp32 accuracy of its own size (an fp32 lse alone would be off by up to ulp(3e4)/2 = 1e-3)."""
    g = torch.Generator().manual_seed(15)
    hidden = torch.randint(-3, 4, (N, H), generator=g).float()
    weight = torch.randint(-1, 2, (V, H), generator=g).float()
    targets = torch.randint(0, V, (N,), generator=g)
    bias = 3.0e4 + torch.randint(-5, 6, (V,), generator=g).float()
    out = linear_logprobs(hidden, weight, targets, bias=bias, backend="triton", fwd=fwd, compact=False,
                          workspace_bytes=SPLIT_CHUNK)
    ref = torch.log_softmax(hidden.double() @ weight.double().t() + bias.double(), -1)
    want = ref.gather(1, targets[:, None]).squeeze(1)
    assert ((out.double() - want).abs() / want.abs().clamp(min=1.0)).max().item() < 1e-5


def test_split_nan_in_nan_out_and_every_row_ignored():
    hidden, weight, targets, _ = make_inputs(N, H, V, torch.float32, seed=17, ignore_frac=0.0)
    hidden[3, 5] = float("nan")
    out = linear_logprobs(hidden, weight, targets, backend="triton", fwd="split", compact=False,
                          workspace_bytes=SPLIT_CHUNK)
    assert torch.isnan(out[3]) and torch.isfinite(out[torch.arange(N) != 3]).all()
    targets[:] = -100
    for compact, nv in ((True, None), (True, 0), (False, None)):
        out = linear_logprobs(hidden, weight, targets, backend="triton", fwd="split", compact=compact, num_valid=nv)
        assert torch.all(out == 0)


def test_sequence_logprobs_and_selfplay_loss_pass_fwd_through():
    B, T = 2, 35
    hidden, weight, _, bias = make_inputs(B * T, H, V, torch.float32, seed=18, bias=True)
    hidden = hidden.view(B, T, H)
    labels = torch.randint(0, V, (B, T), generator=torch.Generator().manual_seed(19))
    labels[:, :9] = -100
    ref = sequence_logprobs(hidden.double(), weight.double(), labels, bias=bias.double(), backend="reference")
    got = sequence_logprobs(hidden, weight, labels, bias=bias, backend="triton", fwd="split",
                            workspace_bytes=SPLIT_CHUNK)
    assert (got.double() - ref).abs().max().item() < 1e-4
    crit = SelfPlayLoss("sft", backend="triton", fwd="split")
    assert crit.cuda_options["fwd"] == "split"


@pytest.mark.parametrize("fn", ["linear", "sequence", "module"])
def test_fwd_is_validated_up_front(fn):
    hidden, weight, targets, _ = make_inputs(8, 4, 10, torch.float32)
    with pytest.raises(ValueError, match="fwd must be"):
        if fn == "linear":
            linear_logprobs(hidden, weight, targets, backend="torch", fwd="splitt")
        elif fn == "sequence":
            sequence_logprobs(hidden.view(2, 4, 4), weight, targets.view(2, 4), backend="torch", fwd=None)
        else:
            SelfPlayLoss("sft", fwd="chunked")


_COMPILE = r"""
import os, re, subprocess, tempfile
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from triton.compiler.compiler import compile as triton_compile
from iris_kernels.ops.logprobs_split import GPU_ROW_TILES, logprobs_rows_kernel

bn, bv, nw = GPU_ROW_TILES
tmp = tempfile.mkdtemp()
for bias_dt in ("bf16", "fp16", "fp32"):
    for on in (False, True):
        sig = {"logits_ptr": "*fp32", "bias_ptr": "*" + bias_dt, "targets_ptr": "*i64", "out_max_ptr": "*fp32",
               "out_sum_ptr": "*fp32", "out_target_ptr": "*fp32", "out_tsum_ptr": "*fp32", "n_valid_ptr": "*i64",
               "rows": "i32", "V": "i32", "row0": "i64", "stride_ln": "i32", "inv_temperature": "fp32",
               "softcap": "fp32"}
        c = dict(HAS_BIAS=on, HAS_SOFTCAP=on, WITH_ENTROPY=on, HAS_COUNT=on, BLOCK_N=bn, BLOCK_V=bv)
        sig.update({k: "constexpr" for k in c})
        k = triton_compile(ASTSource(fn=logprobs_rows_kernel, signature=sig, constexprs=c),
                           target=GPUTarget("cuda", 90, 32), options={"num_warps": nw})
        ptx = os.path.join(tmp, "k.ptx")
        open(ptx, "w").write(k.asm["ptx"])
        r = subprocess.run(["ptxas", "-v", "-arch=sm_90a", ptx, "-o", ptx + ".cubin"], capture_output=True, text=True)
        assert r.returncode == 0, r.stderr
        spills = [int(m) for m in re.findall(r"(\d+) bytes spill stores", r.stderr)]
        assert spills and max(spills) == 0, (bias_dt, on, r.stderr)
        print(bias_dt, on, re.findall(r"Used (\d+) registers", r.stderr))
print("ok")
"""


@pytest.mark.slow
def test_row_kernel_compiles_for_hopper_without_spills():
    """The split forward's row kernel at GPU_ROW_TILES lowers to sm_90 and assembles without spills (no GPU needed)."""
    import os
    import shutil
    import subprocess
    import sys

    if shutil.which("ptxas") is None:
        pytest.skip("ptxas not installed")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    out = subprocess.run([sys.executable, "-c", _COMPILE], env=env, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0 and out.stdout.strip().endswith("ok"), out.stdout[-2000:] + out.stderr[-3000:]
