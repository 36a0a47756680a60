"""Compiled-Triton parity on a CUDA device (skipped without one; run by benchmarks/gpu_check.sh).

Small odd shapes against the fp64 oracle for every feature, then the real model shapes in bf16
(N = 16384; H = 2048, V = 151936 — where N x V > 2^31, so 32-bit offsets would overflow — and
H = 4096, V = 32000) against an fp32 computation on the upcast inputs.
"""
import pytest
import torch

from iris_kernels import linear_logprobs
from test_logprobs import TOL, make_inputs, naive_same_dtype, oracle

pytestmark = pytest.mark.gpu
DEV = "cuda"


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("n, h, v", [(1, 64, 3), (45, 40, 163), (333, 257, 5003)])
@pytest.mark.parametrize("features", ["plain", "all"])
def test_compiled_small_shapes_against_fp64(dtype, n, h, v, features):
    opts = dict(temperature=0.8, softcap=6.0) if features == "all" else {}
    hidden, weight, targets, bias = make_inputs(n, h, v, dtype, seed=n + v, bias=features == "all")
    hidden, weight, targets = hidden.to(DEV), weight.to(DEV), targets.to(DEV)
    bias = None if bias is None else bias.to(DEV)
    leaves = [t.clone().requires_grad_() if t is not None else None for t in (hidden, weight, bias)]
    up = torch.randn(n, device=DEV)
    got = linear_logprobs(leaves[0], leaves[1], targets, bias=leaves[2], backend="triton", **opts)
    (got * up).sum().backward()
    ref = [t.detach().clone().double().requires_grad_() if t is not None else None for t in (hidden, weight, bias)]
    want = oracle(ref[0], ref[1], targets, ref[2], **opts)[0]
    (want * up.double()).sum().backward()
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


@pytest.mark.parametrize("h, v", [(2048, 151936), (4096, 32000)], ids=["qwen2.5-3b", "zephyr-7b"])
def test_compiled_real_shapes_bf16(h, v):
    n = 16384
    torch.manual_seed(0)
    hidden = torch.randn(n, h, device=DEV, dtype=torch.bfloat16)
    weight = (torch.randn(v, h, device=DEV) / h**0.5 * 2).to(torch.bfloat16)
    targets = torch.randint(0, v, (n,), device=DEV)
    targets[::7] = -100
    up = torch.randn(n, device=DEV)

    hw = [hidden.clone().requires_grad_(), weight.clone().requires_grad_()]
    got = linear_logprobs(hw[0], hw[1], targets, backend="triton")
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
