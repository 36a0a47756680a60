"""Sequence-level losses against independent fp64 references (values and gradients), the limits
and identities of docs/math.md#objective, the baselines of docs/math.md#baselines, metrics, validation and the registry.
"""
import inspect
import math

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, strategies as st

from iris_kernels.losses import (
    LOSSES,
    chi2_loss,
    chi2_logratio_loss,
    dpo_loss,
    get_loss,
    iris_loss,
    sft_loss,
    space_loss,
    spin_loss,
)

ALPHAS = [0.0, 1e-7, 0.5, 1 - 1e-7, 1.0, 2.0, 10.0]
BACKENDS = ["torch", "triton"]


# --------------------------------------------------------------------------------------------
# fp64 references, straight from docs/math.md#objective and #baselines (no code shared with the library)
# --------------------------------------------------------------------------------------------
def _log_mean_exp(v):
    return torch.logsumexp(v, 0) - math.log(v.numel())


def ref_iris(pr, ps, rr, rs, alpha, beta):
    g_r = beta * (pr.double() - rr.double())
    g_s = beta * (ps.double() - rs.double())
    if alpha == 0.0:  # reverse-KL limit
        return _log_mean_exp(-g_r) + g_s.mean()
    if alpha == 1.0:  # Donsker–Varadhan limit
        return -g_r.mean() + _log_mean_exp(g_s)
    return _log_mean_exp(-(1 - alpha) * g_r) / (1 - alpha) + _log_mean_exp(alpha * g_s) / alpha


def ref_spin(pr, ps, rr, rs, beta, hinge=False):
    z = beta * ((pr.double() - rr.double()) - (ps.double() - rs.double()))
    return torch.relu(1 - z).mean() if hinge else F.softplus(-z).mean()


def ref_space(pr, ps, rr, rs, mu, beta):
    r_r = beta * (pr.double() - rr.double())
    r_s = beta * (ps.double() - rs.double())
    return -F.logsigmoid(r_r - math.log(mu)).mean() - mu * F.logsigmoid(math.log(mu) - r_s).mean()


def ref_chi2_logratio(pr, ps, rr, rs, beta):
    h_r = beta * (pr.double() - rr.double())
    h_s = beta * (ps.double() - rs.double())
    return -h_r.mean() + (h_s + h_s**2 / 4).mean()


def ref_chi2(pr, ps, rr, rs, beta):
    g_r = beta * (pr.double() - rr.double())
    g_s = beta * (ps.double() - rs.double())
    return -2 * g_r.exp().mean() + (2 * g_s).exp().mean() + 1


def ref_sft(pr, tokens):
    return -pr.double().sum() / tokens.double().sum()


def _grads(fn, pr, ps, *rest, **kw):
    pr = pr.detach().clone().requires_grad_(True)
    ps = ps.detach().clone().requires_grad_(True)
    out = fn(pr, ps, *rest, **kw)
    loss = out[0] if isinstance(out, tuple) else out
    gr, gs = torch.autograd.grad(loss, (pr, ps), allow_unused=True)
    return out, gr, gs


def make_batch(n, m, g_scale, beta, seed, dtype=torch.float32):
    """Summed log-probs in the hundreds (as real ones are) with log-ratios g of scale g_scale."""
    gen = torch.Generator().manual_seed(seed)
    pr = -torch.rand(n, generator=gen, dtype=torch.float64) * 600 - 5
    ps = -torch.rand(m, generator=gen, dtype=torch.float64) * 600 - 5
    rr = pr - torch.randn(n, generator=gen, dtype=torch.float64) * g_scale / beta
    rs = ps - torch.randn(m, generator=gen, dtype=torch.float64) * g_scale / beta
    return [x.to(dtype) for x in (pr, ps, rr, rs)]


# --------------------------------------------------------------------------------------------
# IRIS: values and gradients
# --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("backend", BACKENDS)
@given(
    n=st.integers(1, 24),
    m=st.integers(1, 24),
    alpha=st.sampled_from(ALPHAS),
    beta=st.sampled_from([0.1, 1.0]),
    g_scale=st.sampled_from([1e-3, 0.3, 3.0, 30.0]),
    seed=st.integers(0, 2**16),
)
def test_iris_matches_fp64_reference(backend, n, m, alpha, beta, g_scale, seed):
    pr, ps, rr, rs = make_batch(n, m, g_scale, beta, seed)
    loss, gr, gs = _grads(iris_loss, pr, ps, rr, rs, alpha=alpha, beta=beta, backend=backend)
    assert loss.dtype == torch.float32 and loss.shape == ()
    assert gr.dtype == torch.float32 and gs.dtype == torch.float32
    _, rgr, rgs = _grads(ref_iris, pr.double(), ps.double(), rr, rs, alpha=alpha, beta=beta)
    ref = ref_iris(pr, ps, rr, rs, alpha, beta)
    g_max = max((beta * (pr.double() - rr.double())).abs().max().item(), (beta * (ps.double() - rs.double())).abs().max().item())
    assert abs(loss.item() - ref.item()) <= 1e-6 * (1 + g_max), (loss.item(), ref.item())
    torch.testing.assert_close(gr.double(), rgr, rtol=1e-5, atol=1e-7 * beta)
    torch.testing.assert_close(gs.double(), rgs, rtol=1e-5, atol=1e-7 * beta)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("alpha", ALPHAS)
def test_iris_weights_are_the_tilted_softmaxes(backend, alpha):
    """∂L/∂s_θ = −β·softmax((α−1)·g_R) on real, +β·softmax(α·g_S) on synthetic (docs/math.md#gradient)."""
    beta = 0.7
    pr, ps, rr, rs = make_batch(9, 14, 2.0, beta, seed=4)
    _, gr, gs = _grads(iris_loss, pr, ps, rr, rs, alpha=alpha, beta=beta, backend=backend)
    g_r = beta * (pr.double() - rr.double())
    g_s = beta * (ps.double() - rs.double())
    torch.testing.assert_close(gr.double(), -beta * torch.softmax((alpha - 1) * g_r, 0), rtol=1e-5, atol=1e-9)
    torch.testing.assert_close(gs.double(), beta * torch.softmax(alpha * g_s, 0), rtol=1e-5, atol=1e-9)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("alpha", ALPHAS)
def test_iris_zero_and_uniform_at_the_reference(backend, alpha):
    beta = 0.3
    pr, ps, _, _ = make_batch(5, 8, 1.0, beta, seed=1)
    (loss, metrics), gr, gs = _grads(iris_loss, pr, ps, pr.clone(), ps.clone(), alpha=alpha, beta=beta,
                                     backend=backend, return_metrics=True)
    assert loss.item() == 0.0
    torch.testing.assert_close(gr, torch.full_like(gr, -beta / 5), rtol=1e-6, atol=0)
    torch.testing.assert_close(gs, torch.full_like(gs, beta / 8), rtol=1e-6, atol=0)
    assert metrics["real/ess"].item() == pytest.approx(5) and metrics["syn/ess"].item() == pytest.approx(8)
    assert metrics["real/max_weight"].item() == pytest.approx(1 / 5)


def test_closed_forms():
    """α = 0, ½, 1 (Donsker–Varadhan) and 2 (χ²) against the closed forms of the docs/math.md#limits table."""
    beta = 1.0
    pr, ps, rr, rs = make_batch(11, 6, 1.5, beta, seed=9)
    g_r = (pr.double() - rr.double()) * beta
    g_s = (ps.double() - rs.double()) * beta
    E = torch.mean
    closed = {
        0.0: torch.log(E(torch.exp(-g_r))) + E(g_s),
        0.5: 2 * torch.log(E(torch.exp(-g_r / 2))) + 2 * torch.log(E(torch.exp(g_s / 2))),
        1.0: -E(g_r) + torch.log(E(torch.exp(g_s))),
        2.0: -torch.log(E(torch.exp(g_r))) + 0.5 * torch.log(E(torch.exp(2 * g_s))),
    }
    for alpha, value in closed.items():
        for backend in BACKENDS:
            got = iris_loss(pr, ps, rr, rs, alpha=alpha, beta=beta, backend=backend)
            assert got.item() == pytest.approx(value.item(), rel=1e-6, abs=1e-6), (alpha, backend)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("alpha0", [0.0, 1.0])
def test_iris_continuous_through_0_and_1(backend, alpha0):
    beta = 1.0
    pr, ps, rr, rs = make_batch(10, 12, 2.0, beta, seed=3)
    at = iris_loss(pr, ps, rr, rs, alpha=alpha0, beta=beta, backend=backend).double().item()
    assert at == pytest.approx(ref_iris(pr, ps, rr, rs, alpha0, beta).item(), abs=1e-6)
    # slope of L in α near α0, from the fp64 reference at a step where it is accurate
    slope = abs(ref_iris(pr, ps, rr, rs, alpha0 + 1e-3, beta).item() - at) / 1e-3
    sides = (1.0,) if alpha0 == 0.0 else (1.0, -1.0)
    for side in sides:
        for k in range(2, 15):
            d = side * 10.0**-k
            v = iris_loss(pr, ps, rr, rs, alpha=alpha0 + d, beta=beta, backend=backend).double().item()
            assert abs(v - at) <= 2 * slope * abs(d) + 5e-7 * (1 + abs(at)), (d, v, at)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("alpha", ALPHAS)
def test_iris_invariant_to_a_constant_shift_of_g(backend, alpha):
    """κ_{1−α}(−(g + c)) = κ_{1−α}(−g) − c and κ_α(g + c) = κ_α(g) + c: the c cancels in L."""
    beta = 0.5
    pr, ps, rr, rs = make_batch(7, 9, 1.0, beta, seed=5)
    c = 3.0 / beta  # shifts every g by 3.0
    (l0, g0r, g0s), (l1, g1r, g1s) = (
        _grads(iris_loss, pr, ps, rr, rs, alpha=alpha, beta=beta, backend=backend),
        _grads(iris_loss, pr + c, ps + c, rr, rs, alpha=alpha, beta=beta, backend=backend),
    )
    assert l1.item() == pytest.approx(l0.item(), abs=2e-5)
    torch.testing.assert_close(g1r, g0r, rtol=1e-4, atol=1e-7)
    torch.testing.assert_close(g1s, g0s, rtol=1e-4, atol=1e-7)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("alpha", ALPHAS)
def test_iris_large_log_ratios_stay_finite(backend, alpha):
    pr, ps, rr, rs = make_batch(16, 16, 1.0, 1.0, seed=6)
    rr = pr - torch.linspace(-1e3, 1e3, 16)
    rs = ps - torch.linspace(1e3, -1e3, 16)
    loss, gr, gs = _grads(iris_loss, pr, ps, rr, rs, alpha=alpha, backend=backend)
    assert torch.isfinite(loss) and torch.isfinite(gr).all() and torch.isfinite(gs).all()
    ref = ref_iris(pr, ps, rr, rs, alpha, 1.0)
    assert loss.item() == pytest.approx(ref.item(), rel=1e-6, abs=1e-3)


@pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")  # the NaN α case, interpreted
@pytest.mark.parametrize("backend", BACKENDS)
def test_iris_tensor_alpha(backend):
    pr, ps, rr, rs = make_batch(6, 4, 1.0, 1.0, seed=8)
    for alpha in ALPHAS:
        for a in (torch.tensor(alpha, dtype=torch.float64), torch.tensor(alpha, dtype=torch.float32)):
            (lt, gtr, gts), (lf, gfr, gfs) = (
                _grads(iris_loss, pr, ps, rr, rs, alpha=a, backend=backend),
                _grads(iris_loss, pr, ps, rr, rs, alpha=float(a), backend=backend),
            )
            assert lt.item() == lf.item()
            torch.testing.assert_close(gtr, gfr, rtol=0, atol=0)
            torch.testing.assert_close(gts, gfs, rtol=0, atol=0)
    # a negative tensor α cannot be rejected without a sync: it must poison everything instead
    loss, gr, gs = _grads(iris_loss, pr, ps, rr, rs, alpha=torch.tensor(-0.5), backend=backend)
    assert torch.isnan(loss) and torch.isnan(gr).all() and torch.isnan(gs).all()


@pytest.mark.parametrize("backend", BACKENDS)
def test_iris_metrics(backend):
    alpha, beta = 0.3, 0.8
    pr, ps, rr, rs = make_batch(12, 7, 2.0, beta, seed=2)
    ps.requires_grad_(True)
    loss, m = iris_loss(pr, ps, rr, rs, alpha=alpha, beta=beta, return_metrics=True, backend=backend)
    expected = {"loss", "estimate", "alpha"} | {f"{t}/{k}" for t in ("real", "syn") for k in ("kappa", "ess", "max_weight", "mean_g")}
    assert set(m) == expected
    for k, v in m.items():
        assert isinstance(v, torch.Tensor) and v.shape == () and v.dtype == torch.float32 and not v.requires_grad, k
    g_r = beta * (pr.double() - rr.double())
    g_s = beta * (ps.detach().double() - rs.double())
    w_r, w_s = torch.softmax((alpha - 1) * g_r, 0), torch.softmax(alpha * g_s, 0)
    assert m["real/ess"].item() == pytest.approx(1 / (w_r**2).sum().item(), rel=1e-6)
    assert m["syn/ess"].item() == pytest.approx(1 / (w_s**2).sum().item(), rel=1e-6)
    assert m["real/max_weight"].item() == pytest.approx(w_r.max().item(), rel=1e-6)
    assert m["syn/max_weight"].item() == pytest.approx(w_s.max().item(), rel=1e-6)
    assert m["real/mean_g"].item() == pytest.approx(g_r.mean().item(), rel=1e-6)
    assert m["syn/mean_g"].item() == pytest.approx(g_s.mean().item(), rel=1e-6)
    assert m["estimate"].item() == -loss.item() and m["loss"].item() == loss.item()
    assert m["alpha"].item() == pytest.approx(alpha)
    assert (m["real/kappa"] + m["syn/kappa"]).item() == pytest.approx(loss.item(), abs=1e-6)


# --------------------------------------------------------------------------------------------
# Baselines
# --------------------------------------------------------------------------------------------
@given(
    n=st.integers(1, 20),
    beta=st.sampled_from([0.1, 0.5, 2.0]),
    g_scale=st.sampled_from([1e-2, 1.0, 10.0]),
    hinge=st.booleans(),
    seed=st.integers(0, 2**16),
)
def test_spin_and_dpo_match_reference(n, beta, g_scale, hinge, seed):
    pr, ps, rr, rs = make_batch(n, n, g_scale, beta, seed)
    variant = "hinge" if hinge else "sigmoid"
    _, rgr, rgs = _grads(ref_spin, pr.double(), ps.double(), rr, rs, beta=beta, hinge=hinge)
    ref = ref_spin(pr, ps, rr, rs, beta, hinge)
    for fn in (spin_loss, dpo_loss):
        loss, gr, gs = _grads(fn, pr, ps, rr, rs, beta=beta, variant=variant)
        assert loss.item() == pytest.approx(ref.item(), rel=1e-6, abs=1e-7)
        torch.testing.assert_close(gr.double(), rgr, rtol=1e-5, atol=1e-9)
        torch.testing.assert_close(gs.double(), rgs, rtol=1e-5, atol=1e-9)


@given(
    n=st.integers(1, 20),
    m=st.integers(1, 20),
    mu=st.sampled_from([1.0, 3.5]),
    beta=st.sampled_from([0.5, 1.0]),
    g_scale=st.sampled_from([1e-2, 1.0, 10.0]),
    seed=st.integers(0, 2**16),
)
def test_space_and_chi2_match_reference(n, m, mu, beta, g_scale, seed):
    pr, ps, rr, rs = make_batch(n, m, g_scale, beta, seed)
    for fn, ref_fn, kw in (
        (space_loss, ref_space, {"mu": mu, "beta": beta}),
        (chi2_loss, ref_chi2, {"beta": beta}),
        (chi2_logratio_loss, ref_chi2_logratio, {"beta": beta}),
    ):
        loss, gr, gs = _grads(fn, pr, ps, rr, rs, **kw)
        _, rgr, rgs = _grads(ref_fn, pr.double(), ps.double(), rr, rs, **kw)
        ref = ref_fn(pr, ps, rr, rs, **kw)
        assert loss.item() == pytest.approx(ref.item(), rel=1e-6, abs=1e-7), fn.__name__
        torch.testing.assert_close(gr.double(), rgr, rtol=1e-5, atol=1e-9)
        torch.testing.assert_close(gs.double(), rgs, rtol=1e-5, atol=1e-9)


@given(n=st.integers(1, 20), seed=st.integers(0, 2**16))
def test_sft_matches_reference(n, seed):
    pr, _, _, _ = make_batch(n, 1, 1.0, 1.0, seed)
    tokens = torch.randint(1, 400, (n,), generator=torch.Generator().manual_seed(seed))
    p = pr.clone().requires_grad_(True)
    loss = sft_loss(p, None, None, None, num_tokens_real=tokens)
    loss.backward()
    assert loss.item() == pytest.approx(ref_sft(pr, tokens).item(), rel=1e-6)
    torch.testing.assert_close(p.grad.double(), torch.full((n,), -1 / tokens.sum().item(), dtype=torch.float64), rtol=1e-6, atol=0)


def test_baselines_at_the_reference():
    pr, ps, _, _ = make_batch(6, 6, 1.0, 1.0, seed=0)
    same = (pr, ps, pr.clone(), ps.clone())
    assert spin_loss(*same).item() == pytest.approx(math.log(2), rel=1e-7)
    assert dpo_loss(*same).item() == pytest.approx(math.log(2), rel=1e-7)
    assert spin_loss(*same, variant="hinge").item() == 1.0
    assert space_loss(*same).item() == pytest.approx(2 * math.log(2), rel=1e-7)
    assert chi2_loss(*same).item() == 0.0
    assert chi2_logratio_loss(*same).item() == 0.0


def test_baseline_metrics():
    pr, ps, rr, rs = make_batch(8, 8, 1.0, 0.1, seed=12)
    _, m = spin_loss(pr, ps, rr, rs, return_metrics=True)
    z = 0.1 * ((pr.double() - rr.double()) - (ps.double() - rs.double()))
    assert set(m) == {"loss", "real/mean_g", "syn/mean_g", "margin", "accuracy"}  # −L estimates no divergence
    assert m["margin"].item() == pytest.approx(z.mean().item(), rel=1e-6)
    assert m["accuracy"].item() == pytest.approx((z > 0).double().mean().item())
    for fn, bound in ((space_loss, "js_bound"), (chi2_loss, "chi2_bound"), (chi2_logratio_loss, "chi2_bound")):
        _, m = fn(pr, ps, rr, rs, return_metrics=True)
        assert set(m) >= {"loss", bound, "real/mean_g", "syn/mean_g"} and "estimate" not in m
        assert m[bound] == -m["loss"]
        assert m["real/mean_g"].item() == pytest.approx((pr.double() - rr.double()).mean().item(), rel=1e-6)
    _, m = sft_loss(pr, num_tokens_real=torch.full((8,), 3), return_metrics=True)
    assert set(m) == {"loss", "real/mean_s"}
    for v in m.values():
        assert v.shape == () and not v.requires_grad


# --------------------------------------------------------------------------------------------
# NaN, validation, registry
# --------------------------------------------------------------------------------------------
def _call(name, pr, ps, rr, rs, **kw):
    if name == "sft":
        return get_loss(name)(pr, ps, rr, rs, num_tokens_real=torch.full(pr.shape, 5), **kw)
    if name == "iris":
        kw.setdefault("alpha", 0.5)
    return get_loss(name)(pr, ps, rr, rs, **kw)


@pytest.mark.parametrize("name", sorted(LOSSES))
@pytest.mark.parametrize("where", range(4))
def test_nan_in_nan_out(name, where):
    if name == "sft" and where != 0:
        pytest.skip("sft reads only policy_real")
    inputs = make_batch(5, 5, 1.0, 1.0, seed=where)
    inputs[where][2] = float("nan")
    for backend in BACKENDS:
        assert torch.isnan(_call(name, *inputs, backend=backend)), backend


@pytest.mark.parametrize("backend", BACKENDS)
def test_iris_nan_gradients(backend):
    pr, ps, rr, rs = make_batch(5, 6, 1.0, 1.0, seed=1)
    ps[3] = float("nan")
    _, gr, gs = _grads(iris_loss, pr, ps, rr, rs, alpha=0.5, backend=backend)
    assert torch.isnan(gs).all()  # every weight of the poisoned term
    assert torch.isfinite(gr).all()  # the other term is independent


def test_validation_errors():
    pr, ps, rr, rs = make_batch(4, 6, 1.0, 1.0, seed=0)
    for alpha in (-0.1, float("nan"), float("inf")):
        with pytest.raises(ValueError, match="alpha"):
            iris_loss(pr, ps, rr, rs, alpha=alpha)
    with pytest.raises(TypeError, match="alpha"):
        iris_loss(pr, ps, rr, rs, alpha="0.5")
    with pytest.raises(ValueError, match="alpha"):
        iris_loss(pr, ps, rr, rs, alpha=torch.tensor([0.5]))
    with pytest.raises(ValueError, match="alpha"):
        iris_loss(pr, ps, rr, rs, alpha=torch.tensor(0.5, requires_grad=True))
    for name in ("iris", "spin", "dpo", "space", "chi2"):
        for beta in (0.0, -1.0, float("nan")):
            with pytest.raises(ValueError, match="beta"):
                _call(name, pr, ps[:4], rr, rs[:4], beta=beta)
    with pytest.raises(ValueError, match="mu"):
        space_loss(pr, ps, rr, rs, mu=0.0)
    for i, name in enumerate(("policy_real", "policy_syn", "ref_real", "ref_syn")):
        args = [pr, ps, rr, rs]
        args[i] = args[i][:0]
        with pytest.raises(ValueError, match=name):
            iris_loss(*args, alpha=0.5)
    with pytest.raises(ValueError, match="ref_real"):
        iris_loss(pr, ps, rr[:3], rs, alpha=0.5)
    with pytest.raises(ValueError, match="ref_syn"):
        chi2_loss(pr, ps, rr, rs[:2])
    with pytest.raises(ValueError, match="policy_real"):
        iris_loss(pr[:, None], ps, rr[:, None], rs, alpha=0.5)
    with pytest.raises(TypeError, match="policy_syn"):
        iris_loss(pr, ps.tolist(), rr, rs, alpha=0.5)
    with pytest.raises(TypeError, match="ref_real"):
        iris_loss(pr, ps, rr.long(), rs, alpha=0.5)
    with pytest.raises(ValueError, match="ref_syn"):
        iris_loss(pr, ps, rr, torch.empty(6, device="meta"), alpha=0.5)
    for fn in (spin_loss, dpo_loss):
        with pytest.raises(ValueError, match="paired"):
            fn(pr, ps, rr, rs)  # 4 real vs 6 synthetic
    with pytest.raises(ValueError, match="variant"):
        spin_loss(pr, ps[:4], rr, rs[:4], variant="ipo")
    with pytest.raises(TypeError, match="num_tokens_real"):
        sft_loss(pr, num_tokens_real=40)
    with pytest.raises(ValueError, match="num_tokens_real"):
        sft_loss(pr, num_tokens_real=torch.ones(3))
    with pytest.raises(ValueError, match="scope"):
        iris_loss(pr, ps, rr, rs, alpha=0.5, scope="node")
    with pytest.raises(ValueError, match="backend"):
        iris_loss(pr, ps, rr, rs, alpha=0.5, backend="cuda")


def test_registry():
    assert set(LOSSES) == {"iris", "spin", "dpo", "space", "chi2", "chi2_logratio", "sft"}
    for name, fn in LOSSES.items():
        assert get_loss(name) is fn
        params = inspect.signature(fn).parameters
        assert list(params)[:4] == ["policy_real", "policy_syn", "ref_real", "ref_syn"], name
        for kw in ("return_metrics", "scope", "group", "stats", "backend"):
            assert params[kw].kind is inspect.Parameter.KEYWORD_ONLY, (name, kw)
    with pytest.raises(ValueError, match="chi2, chi2_logratio, dpo, iris, sft, space, spin"):
        get_loss("ipo")
    assert inspect.signature(spin_loss).parameters["beta"].default == 0.1
    assert inspect.signature(iris_loss).parameters["beta"].default == 1.0


@pytest.mark.gpu
def test_no_host_sync_on_cuda():
    pr, ps, rr, rs = [x.cuda() for x in make_batch(64, 64, 1.0, 1.0, seed=0)]
    pr.requires_grad_(True)
    ps.requires_grad_(True)
    alpha = torch.tensor(0.5, device="cuda")
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        for a in (0.5, alpha):
            loss, metrics = iris_loss(pr, ps, rr, rs, alpha=a, return_metrics=True)
            loss.backward()
        for name in ("spin", "space", "chi2"):
            _call(name, pr, ps, rr, rs).backward()
    finally:
        torch.cuda.set_sync_debug_mode("default")


def test_sft_takes_the_common_four_argument_call():
    g = torch.Generator().manual_seed(0)
    pr = -torch.rand(5, generator=g, dtype=torch.float64) * 20
    loss = get_loss("sft")(pr, pr.flip(0), pr, pr)
    assert loss.item() == pytest.approx(-pr.mean().item(), rel=1e-6)


# ----------------------------------------------------------------------------- χ²: the one-step optimum
def _free_categorical_step(loss_name, p_data, q, iters=300):
    """argmin over a free categorical p_θ = softmax(z) of the loss's EXACT expectation (β = 1),
    mean_R → E_{p_data}, mean_S → E_q, computed through the loss itself: a category k enters
    both terms once, with its probability folded into the tilted terms' exponent
    (E_p e^{g} = mean_k e^{g_k + log(K p_k)}, E_q e^{2g} = mean_k e^{2(g_k + ½ log(K q_k))})."""
    K = p_data.shape[0]
    z = q.log().clone().requires_grad_(True)  # start at θ = θ_t
    opt = torch.optim.LBFGS([z], lr=1.0, max_iter=iters, tolerance_grad=1e-12, tolerance_change=1e-15,
                            line_search_fn="strong_wolfe")
    ref = q.log()

    def closure():
        opt.zero_grad()
        logp = torch.log_softmax(z, 0)
        loss = chi2_loss(logp + (K * p_data).log(), logp + 0.5 * (K * q).log(), ref, ref, backend="torch")
        loss.backward()
        return loss

    for _ in range(20):  # restarts: the loss is flat along the small-q directions
        opt.step(closure)
    return torch.softmax(z.detach(), 0)


def test_chi2_one_exact_step_reaches_p_data():
    g = torch.Generator().manual_seed(0)
    K = 12
    p_data = torch.softmax(torch.randn(K, generator=g, dtype=torch.float64) * 1.5, 0)
    q = torch.softmax(torch.randn(K, generator=g, dtype=torch.float64) * 1.5, 0)
    kl0 = float((p_data * (p_data / q).log()).sum())
    assert kl0 > 0.3  # far from the data to start with

    def exact_loss(z):
        logp = torch.log_softmax(z, 0)
        return chi2_loss(logp + (K * p_data).log(), logp + 0.5 * (K * q).log(), q.log(), q.log(), backend="torch")

    # Stationary at p_data (the expectation is convex in the ratio r = p_θ/q, so this is the minimum) ...
    z = p_data.log().clone().requires_grad_(True)
    loss = exact_loss(z)
    (grad,) = torch.autograd.grad(loss, z)
    assert grad.abs().max().item() < 1e-12
    # ... where −L is χ²(p_data ‖ q) = Σ p²/q − 1 ...
    assert -float(loss) == pytest.approx(float((p_data**2 / q).sum() - 1), rel=1e-6)
    # ... below every perturbation of it ...
    for k in range(50):
        dz = torch.randn(K, generator=g, dtype=torch.float64) * (0.3 if k % 2 else 0.02)
        assert float(exact_loss(p_data.log() + dz)) > float(loss)
    # ... and an optimiser started at θ = θ_t gets there (limited by the fp32 loss value it sees).
    p1 = _free_categorical_step("chi2", p_data, q)
    assert float((p_data * (p_data / p1).log()).sum()) < 1e-3 * kl0


def test_chi2_logratio_one_step_optimum_is_not_p_data():
    """The old form's exact per-iteration minimiser: pointwise −p·h + q·(h + h²/4) with h = log r
    and Σ q·r = 1, solved directly; it stops short of p_data (docs/math.md#baselines)."""
    g = torch.Generator().manual_seed(0)
    K = 12
    p_data = torch.softmax(torch.randn(K, generator=g, dtype=torch.float64) * 1.5, 0)
    q = torch.softmax(torch.randn(K, generator=g, dtype=torch.float64) * 1.5, 0)
    z = q.log().clone().requires_grad_(True)
    opt = torch.optim.LBFGS([z], lr=1.0, max_iter=500, tolerance_grad=1e-12, tolerance_change=1e-15,
                            line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        h = torch.log_softmax(z, 0) - q.log()
        loss = (-p_data * h).sum() + (q * (h + h * h / 4)).sum()
        loss.backward()
        return loss

    opt.step(closure)
    p1 = torch.softmax(z.detach(), 0)
    kl1 = float((p_data * (p_data / p1).log()).sum())
    assert kl1 > 1e-3  # not p_data
    assert kl1 < float((p_data * (p_data / q).log()).sum())  # but closer than θ_t


@pytest.mark.parametrize("g_scale", [5.0, 10.0])  # 2g up to ~60: e^{2g} within fp32, the returned loss dtype
def test_chi2_is_finite_for_large_log_ratios(g_scale):
    pr, ps, rr, rs = make_batch(7, 5, g_scale, 1.0, seed=3)
    loss, gr, gs = _grads(chi2_loss, pr, ps, rr, rs)
    _, rgr, rgs = _grads(ref_chi2, pr.double(), ps.double(), rr, rs, beta=1.0)
    assert math.isfinite(loss.item())
    assert loss.item() == pytest.approx(ref_chi2(pr, ps, rr, rs, 1.0).item(), rel=1e-6)
    torch.testing.assert_close(gs.double(), rgs, rtol=1e-5, atol=0)
