"""Compiled-Triton parity on a CUDA device (skipped without one; run by benchmarks/gpu_check.sh).

Small odd shapes against the fp64 oracle for every feature (bias, soft-cap, temperature, entropy,
ignored rows) and every backward variant (workspace / atomic, with / without compaction, the
host count), then the real model shapes in bf16 (N = 16384; H = 2048, V = 151936 — where
N x V > 2^31, so 32-bit offsets would overflow — and H = 4096, V = 32000) against an fp32
computation on the upcast inputs.
"""
import pytest
import torch

from iris_kernels import linear_logprobs
from test_logprobs import TOL, make_inputs, naive_same_dtype, oracle

pytestmark = pytest.mark.gpu
DEV = "cuda"


VARIANTS = {
    "ws-compact": dict(bwd="workspace", compact=True),
    "ws-hostcount": dict(bwd="workspace", compact=True, host_count=True),
    "ws-nocompact": dict(bwd="workspace", compact=False),
    "atomic-compact": dict(bwd="atomic", compact=True),
    "atomic-nocompact": dict(bwd="atomic", compact=False),
}


def variant_kw(variant, targets):
    kw = dict(VARIANTS[variant])
    if kw.pop("host_count", False):
        kw["num_valid"] = int((targets != -100).sum())
    return kw


# First in the file: the real shapes matter most if gpu_check.sh's time limit cuts the run short.
@pytest.mark.parametrize("variant", ["ws-compact", "atomic-nocompact"])
@pytest.mark.parametrize("h, v", [(2048, 151936), (4096, 32000)], ids=["qwen2.5-3b", "zephyr-7b"])
def test_compiled_real_shapes_bf16(h, v, variant):
    n = 16384
    torch.manual_seed(0)
    hidden = torch.randn(n, h, device=DEV, dtype=torch.bfloat16)
    weight = (torch.randn(v, h, device=DEV) / h**0.5 * 2).to(torch.bfloat16)
    targets = torch.randint(0, v, (n,), device=DEV)
    targets[::7] = -100
    up = torch.randn(n, device=DEV)

    hw = [hidden.clone().requires_grad_(), weight.clone().requires_grad_()]
    got = linear_logprobs(hw[0], hw[1], targets, backend="triton", **variant_kw(variant, targets))
    (got * up).sum().backward()

    ref = [hidden.float().requires_grad_(), weight.float().requires_grad_()]
    want = linear_logprobs(ref[0], ref[1], targets, backend="torch", chunk_size=2048)
    (want * up).sum().backward()

    assert torch.isfinite(got).all()
    assert torch.all(got[targets == -100] == 0)
    err = (got - want).abs().max().item()
    assert err < 1e-2 * want.abs().max().item(), err
    for a, b, name in zip(hw, ref, ("hidden", "weight")):
        rel = ((a.grad.float() - b.grad).norm() / b.grad.norm()).item()
        assert rel < 2e-2, (name, rel)


# The default variant at every shape, the others at the largest small shape: each shape and flag
# set is a fresh Triton compile, and gpu_check.sh gives these tests about two minutes.
SMALL_CASES = [(n, h, v, "ws-compact") for n, h, v in [(1, 64, 3), (45, 40, 163), (333, 257, 5003)]]
SMALL_CASES += [(333, 257, 5003, name) for name in VARIANTS if name != "ws-compact"]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("n, h, v, variant", SMALL_CASES)
@pytest.mark.parametrize("features", ["plain", "all"])
def test_compiled_small_shapes_against_fp64(dtype, n, h, v, features, variant):
    opts = dict(temperature=0.8, softcap=6.0) if features == "all" else {}
    hidden, weight, targets, bias = make_inputs(n, h, v, dtype, seed=n + v, bias=features == "all")
    hidden, weight, targets = hidden.to(DEV), weight.to(DEV), targets.to(DEV)
    bias = None if bias is None else bias.to(DEV)
    leaves = [t.clone().requires_grad_() if t is not None else None for t in (hidden, weight, bias)]
    up = torch.randn(n, device=DEV)
    up_ent = torch.randn(n, device=DEV) if features == "all" else None
    out = linear_logprobs(leaves[0], leaves[1], targets, bias=leaves[2], backend="triton",
                          return_entropy=up_ent is not None, **variant_kw(variant, targets), **opts)
    got = out if up_ent is None else out.logprobs
    loss = (got * up).sum() + (0 if up_ent is None else (out.entropy * up_ent).sum())
    loss.backward()
    ref = [t.detach().clone().double().requires_grad_() if t is not None else None for t in (hidden, weight, bias)]
    want, _, want_ent = oracle(ref[0], ref[1], targets, ref[2], **opts)
    ref_loss = (want * up.double()).sum() + (0 if up_ent is None else (want_ent * up_ent.double()).sum())
    ref_loss.backward()
    if up_ent is not None:
        assert (out.entropy.double() - want_ent).abs().max().item() < 1e-3 * max(1.0, want_ent.abs().max().item())
    yard = naive_same_dtype(hidden, weight, targets, bias, **opts)
    tol = TOL[dtype]
    err = (got.double() - want).abs().max().item()
    base = (yard.double() - want).abs().max().item()
    assert err <= base + tol * max(1.0, want.abs().max().item())
    for a, b in zip(leaves, ref):
        if a is None:
            continue
        rel = (a.grad.double() - b.grad).norm() / b.grad.norm().clamp(min=1e-30)
        assert rel < (1e-4 if dtype == torch.float32 else 2e-2), rel
