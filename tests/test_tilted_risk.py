"""tilted_risk: values and gradients against an independent fp64 reference, the Triton kernel
(through the interpreter on CPU) against the PyTorch path, continuity through t = 0, NaN, validation.
"""
import math
import shutil

import pytest
import torch
from hypothesis import given, strategies as st

from iris_kernels.distributed import NUM_TILTED_STATS
from iris_kernels.losses import SERIES_EPS, tilted_risk

TS = [0.0, 1e-12, -1e-9, 1e-7, -1e-5, 3e-4, 0.5, -0.5, 1.0, -1.0, 3.0, 10.0, -10.0]


def ref_kappa(x: torch.Tensor, t: float) -> torch.Tensor:
    """κ_t in fp64 straight from the definition, written to be accurate for every t.

    Around the mean μ: κ_t = μ + log((1/N)·Σ exp(t·(x − μ)))/t = μ + log1p(mean(expm1(t·(x − μ))))/t,
    where expm1/log1p keep the small-t cancellation exact; the plain max-shifted log-mean-exp
    where t·(x − μ) could overflow exp.
    """
    x = x.double()
    mu = x.mean()
    if t == 0.0:
        return mu
    d = x - mu
    if abs(t) * d.abs().max() < 50.0:
        return mu + torch.log1p(torch.expm1(t * d).mean()) / t
    return (torch.logsumexp(t * x, 0) - math.log(x.numel())) / t


def ref_weights(x: torch.Tensor, t: float) -> torch.Tensor:
    return torch.softmax(t * x.double(), 0)


def _value_and_grad(x, t, backend):
    x = x.detach().clone().requires_grad_(True)
    k = tilted_risk(x, t, backend=backend)
    (dx,) = torch.autograd.grad(k, x)
    return k, dx


def _random_batch(n, scale, seed, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, generator=g, dtype=torch.float64) * scale
    # heavy right tail and a shifted centre: the cases where the weights concentrate
    x = x + torch.rand(n, generator=g, dtype=torch.float64).pow(8) * 3 * scale - 0.3 * scale
    return x.to(dtype)


@given(
    n=st.integers(1, 80),
    scale=st.sampled_from([1e-3, 0.1, 1.0, 7.0, 100.0]),
    t=st.sampled_from(TS),
    seed=st.integers(0, 2**16),
)
def test_matches_fp64_reference(n, scale, t, seed):
    x = _random_batch(n, scale, seed)
    k, dx = _value_and_grad(x, t, "torch")
    assert k.dtype == torch.float32 and k.shape == ()
    assert dx.dtype == torch.float32
    ref = ref_kappa(x, t)
    # fp32 output rounding relative to the batch's magnitude; the fp64 internals add nothing visible
    tol = 4e-7 * (1.0 + x.double().abs().max().item())
    assert abs(k.double().item() - ref.item()) <= tol, (k.item(), ref.item())
    torch.testing.assert_close(dx.double(), ref_weights(x, t), rtol=2e-6, atol=1e-9)


@pytest.mark.parametrize("n", [1, 7, 1000, 4097])
@pytest.mark.parametrize("t", [0.0, 1e-9, -3e-4, 0.7, -2.0, 10.0])
@pytest.mark.parametrize("scale", [1.0, 1e3])
def test_triton_kernel_matches_torch(n, t, scale):
    x = _random_batch(n, scale, seed=n)
    kt, dt = _value_and_grad(x, t, "triton")
    kp, dp = _value_and_grad(x, t, "torch")
    ref = ref_kappa(x, t).item()
    tol = 4e-7 * (1.0 + x.double().abs().max().item())
    assert abs(kt.item() - ref) <= tol and abs(kp.item() - ref) <= tol, (kt.item(), kp.item(), ref)
    torch.testing.assert_close(kt, kp, rtol=1e-6, atol=tol)
    torch.testing.assert_close(dt, dp, rtol=1e-5, atol=1e-12)
    torch.testing.assert_close(dt.double(), ref_weights(x, t), rtol=2e-5, atol=1e-12)


def test_kernel_statistics_match_torch_statistics():
    """The one-pass (online max, pairwise-merged moments) statistics equal the two-pass ones."""
    from iris_kernels.tilted import _tilted_stats_torch
    from iris_kernels.ops.tilted_risk import NUM_STATS, tilted_risk_fwd

    assert NUM_STATS == NUM_TILTED_STATS
    x = _random_batch(3001, 5.0, seed=3) + 40.0  # offset mean: moments must be centred properly
    t = torch.tensor(-0.37, dtype=torch.float64)
    kappa, stats = tilted_risk_fwd(x, t, SERIES_EPS)
    ref = _tilted_stats_torch(x, t)
    torch.testing.assert_close(stats, ref, rtol=1e-9, atol=1e-6)


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_fp64_internals_are_accurate_on_both_sides_of_the_series_switch(backend):
    """Before the fp32 cast, κ is good to ~1e-11 of the spread on both sides of the switch, in
    the kernel and in the PyTorch path: tighter than any fp32 check, so it pins the series' terms."""
    from iris_kernels.tilted import _local_tilted_stats

    x = _random_batch(301, 2.0, seed=17).double()
    spread = (x.max() - x.min()).item()
    for f in (0.02, 0.3, 0.97, 1.03, 3.0, 30.0):
        for sign in (1.0, -1.0):
            t = sign * f * SERIES_EPS / spread
            kappa, _ = _local_tilted_stats(x, torch.tensor(t, dtype=torch.float64), backend)
            assert abs(kappa.item() - ref_kappa(x, t).item()) <= 1e-11 * spread, (t, kappa.item())


@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float64])
def test_dtypes(backend, dtype):
    x = _random_batch(37, 2.0, seed=5, dtype=dtype)
    for t in (0.0, 1e-6, 1.3):
        k, dx = _value_and_grad(x, t, backend)
        assert k.dtype == torch.float32 and dx.dtype == dtype
        ref = ref_kappa(x, t).item()  # reference on the same (rounded) inputs
        assert abs(k.item() - ref) <= 1e-6 * (1 + abs(ref))
        torch.testing.assert_close(dx.double(), ref_weights(x, t), rtol=1e-2 if dtype != torch.float64 else 1e-9, atol=1e-12)


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_exact_at_zero_and_uniform_gradient(backend):
    x = _random_batch(13, 3.0, seed=11)
    k, dx = _value_and_grad(x, 0.0, backend)
    assert k.item() == pytest.approx(x.double().mean().item(), abs=1e-7)
    torch.testing.assert_close(dx, torch.full_like(dx, 1 / 13), rtol=0, atol=0)


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_constant_batch(backend):
    """All-equal losses: κ_t = that constant for every t, weights uniform."""
    x = torch.full((9,), -3.25)
    for t in (0.0, 1e-5, 2.0, -7.0):
        k, dx = _value_and_grad(x, t, backend)
        assert k.item() == -3.25
        torch.testing.assert_close(dx, torch.full_like(dx, 1 / 9), rtol=1e-7, atol=0)


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_continuous_and_monotone_through_zero(backend):
    """κ_t is non-decreasing in t (dκ/dt = Var_w(ℓ)·... ≥ 0) and continuous, including across the
    switch between the series and the exact formula at |t|·spread = SERIES_EPS."""
    x = _random_batch(29, 4.0, seed=7)
    spread = (x.max() - x.min()).item()
    switch = SERIES_EPS / spread
    ts = sorted(
        {0.0}
        | {s * switch * f for s in (1, -1) for f in (0.5, 0.9, 0.999, 1.0, 1.001, 1.1, 2.0)}
        | {s * 10.0**e for s in (1, -1) for e in range(-12, 0, 2)}
    )
    vals = [tilted_risk(x, t, backend=backend).double().item() for t in ts]
    for t, v in zip(ts, vals):
        assert abs(v - ref_kappa(x, t).item()) <= 5e-7 * (1 + x.abs().max().item()), t
    # monotone up to fp32 output rounding
    ulp = 2e-7 * (1 + abs(vals[0]))
    assert all(b >= a - ulp for a, b in zip(vals, vals[1:]))


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_tensor_t_equals_float_t(backend):
    x = _random_batch(21, 2.0, seed=2)
    for t in (0.0, 1e-8, -0.4, 5.0):
        for tt in (torch.tensor(t), torch.tensor(t, dtype=torch.float64)):
            a = tilted_risk(x, tt, backend=backend)
            b = tilted_risk(x, t, backend=backend)
            torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("t", [0.0, 1e-9, 0.5, -4.0])
def test_nan_in_nan_out(backend, t):
    x = _random_batch(11, 1.0, seed=1)
    x[4] = float("nan")
    k, dx = _value_and_grad(x, t, backend)
    assert torch.isnan(k)
    assert torch.isnan(dx).all()


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_extreme_values_stay_finite(backend):
    x = torch.tensor([1e3, -1e3, 999.5, 0.0, -998.0, 1e3])
    for t in (10.0, -10.0, 1.0, 1e-7, 0.0):
        k, dx = _value_and_grad(x, t, backend)
        assert torch.isfinite(k) and torch.isfinite(dx).all()
        assert abs(k.item() - ref_kappa(x, t).item()) <= 1e-3
        torch.testing.assert_close(dx.double(), ref_weights(x, t), rtol=1e-5, atol=1e-12)


def test_validation():
    x = torch.randn(5)
    with pytest.raises(TypeError, match="losses"):
        tilted_risk([1.0, 2.0], 0.5)
    with pytest.raises(TypeError, match="losses"):
        tilted_risk(torch.arange(5), 0.5)
    with pytest.raises(ValueError, match="losses"):
        tilted_risk(torch.randn(2, 3), 0.5)
    with pytest.raises(ValueError, match="losses"):
        tilted_risk(torch.randn(0), 0.5)
    with pytest.raises(ValueError, match="t must be finite"):
        tilted_risk(x, float("nan"))
    with pytest.raises(ValueError, match="t must be finite"):
        tilted_risk(x, float("inf"))
    with pytest.raises(TypeError, match="t must be"):
        tilted_risk(x, "0.5")
    with pytest.raises(ValueError, match="0-dim"):
        tilted_risk(x, torch.tensor([0.5]))
    with pytest.raises(ValueError, match="require grad"):
        tilted_risk(x, torch.tensor(0.5, requires_grad=True))
    with pytest.raises(ValueError, match="backend"):
        tilted_risk(x, 0.5, backend="cuda")


_COMPILE_SCRIPT = r"""
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from triton.compiler.compiler import compile as triton_compile
from iris_kernels.losses import SERIES_EPS
from iris_kernels.ops import tilted_risk as ops

common = {"stride": "i32", "n": "i32", "t_ptr": "*fp64", "stats_ptr": "*fp64", "UPCAST_FP32": "constexpr", "BLOCK": "constexpr"}
fwd = dict(common, x_ptr="*bf16", kappa_ptr="*fp64", SERIES_EPS="constexpr")
bwd = dict(common, x_ptr="*fp64", grad_ptr="*fp32", grad_scale="fp32", dx_ptr="*fp64")
for fn, sig, consts in (
    (ops._tilted_risk_fwd_kernel, fwd, {"SERIES_EPS": SERIES_EPS, "UPCAST_FP32": True, "BLOCK": 1024}),
    (ops._tilted_risk_bwd_kernel, bwd, {"UPCAST_FP32": False, "BLOCK": 1024}),
):
    compiled = triton_compile(ASTSource(fn=fn, signature=sig, constexprs=consts), target=GPUTarget("cuda", 90, 32))
    assert "ld.global" in compiled.asm["ptx"]
print("ok")
"""


def test_kernels_compile_for_hopper():
    """The compiled (not interpreted) path type-checks and lowers to sm_90 PTX and cubin without a
    GPU: catches what the interpreter forgives (loop-carried dtypes, non-constexpr globals)."""
    import os
    import subprocess
    import sys

    if shutil.which("ptxas") is None:
        pytest.skip("ptxas not installed")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    out = subprocess.run([sys.executable, "-c", _COMPILE_SCRIPT], env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0 and out.stdout.strip().endswith("ok"), out.stderr[-3000:]


@pytest.mark.gpu
@pytest.mark.parametrize("n", [1, 7, 1000, 4097, 100_003])
def test_cuda_kernel_matches_torch(n):
    x = _random_batch(n, 3.0, seed=n).cuda()
    for t in (0.0, 1e-9, 0.5, -3.0):
        kt, dt = _value_and_grad(x, t, "triton")
        kp, dp = _value_and_grad(x, t, "torch")
        torch.testing.assert_close(kt, kp, rtol=1e-6, atol=1e-6)
        torch.testing.assert_close(dt, dp, rtol=1e-5, atol=1e-12)
