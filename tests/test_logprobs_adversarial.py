"""Adversarial checks of linear_logprobs / sequence_logprobs, written as an outside grader would.

Everything here is judged against an fp64 oracle written in this file from docs/math.md#token-level-op (it shares
no code with the library or with the other test files): values AND gradients of log p, lse and
entropy under random upstream gradients, on shapes that straddle the tile sizes, every target
dtype, odd memory layouts, extreme temperature/soft-cap, non-finite inputs and bad arguments.
Low-precision inputs are judged by the landscape.md oracle: error against fp64 no worse than
naive same-dtype PyTorch plus a tolerance (fp32 5e-4 absolute; fp16 1e-3 and bf16 1e-2 relative to
the reference's magnitude, since their gradients come back rounded to the input dtype).

The regressions at the end are bugs this review found; each was fixed and is kept as a test.
"""
import math

import pytest
import torch
from host_sync import forbid_host_sync

from iris_kernels import LinearLogprobsOutput, linear_logprobs, sequence_logprobs

BACKENDS = ["reference", "torch", "triton"]
TOL = {torch.float32: 5e-4, torch.float16: 1e-3, torch.bfloat16: 1e-2}


# --------------------------------------------------------------------------------------------
# Independent fp64 oracle
# --------------------------------------------------------------------------------------------
def fp64_oracle(hidden, weight, targets, bias=None, temperature=1.0, softcap=None, ignore_index=-100):
    """(logp, lse, entropy) in fp64, differentiable; NaN logp for out-of-range targets.

    Max-shifted log-sum-exp written out by hand; the entropy uses p * log p with 0 * log 0 := 0,
    so that -inf logits (a masked vocabulary entry) give the mathematically right finite value.
    """
    z = hidden.double() @ weight.double().t()
    if bias is not None:
        z = z + bias.double()
    if softcap is not None:
        z = softcap * torch.tanh(z / softcap)
    z = z / temperature
    m = z.max(-1, keepdim=True).values.detach()
    m = torch.where(torch.isfinite(m), m, torch.zeros_like(m))
    lse = m.squeeze(-1) + torch.log(torch.exp(z - m).sum(-1))
    log_p = z - lse[..., None]
    t = targets.long()
    ignored = t == ignore_index
    bad = ~ignored & ((t < 0) | (t >= weight.shape[0]))
    safe = torch.where(ignored | bad, torch.zeros_like(t), t)
    logp = log_p.gather(-1, safe[..., None]).squeeze(-1)
    logp = torch.where(bad, torch.full_like(logp, float("nan")), logp)
    logp = torch.where(ignored, torch.zeros_like(logp), logp)
    p = torch.softmax(z, -1)
    entropy = -(p * torch.where(p > 0, log_p, torch.zeros_like(log_p))).sum(-1)
    entropy = torch.where(ignored, torch.zeros_like(entropy), entropy)
    return logp, lse, entropy


def naive_same_dtype(hidden, weight, targets, bias=None, temperature=1.0, softcap=None, ignore_index=-100):
    """What a user writes without a fused kernel: logits and their transforms in the input dtype."""
    z = torch.nn.functional.linear(hidden, weight, bias)
    if softcap is not None:
        z = softcap * torch.tanh(z / softcap)
    z = (z / temperature).float()
    log_p = torch.log_softmax(z, -1)
    t = targets.long()
    ignored = t == ignore_index
    logp = log_p.gather(-1, torch.where(ignored, torch.zeros_like(t), t)[..., None]).squeeze(-1)
    logp = torch.where(ignored, torch.zeros_like(logp), logp)
    lse = torch.logsumexp(z, -1)
    entropy = torch.where(ignored, torch.zeros_like(lse), -(log_p.exp() * log_p).sum(-1))
    return logp, lse, entropy


def evaluate(fn, hidden, weight, bias, upstreams):
    """Run fn on fresh leaves, back-propagate sum(out_i * upstream_i); return outputs and grads."""
    leaves = [None if x is None else x.detach().clone().requires_grad_() for x in (hidden, weight, bias)]
    outs = fn(*leaves)
    loss = sum((o.reshape(-1).to(u.dtype) * u).sum() for o, u in zip(outs, upstreams) if u is not None)
    loss.backward()
    return [o.detach().reshape(-1) for o in outs], [None if x is None else x.grad for x in leaves]


def max_err(got, want):
    if want.numel() == 0:
        return 0.0
    both_nan = torch.isnan(got.double()) & torch.isnan(want)
    diff = (got.double() - want).abs()
    return torch.where(both_nan, torch.zeros_like(diff), diff).max().item()


def judge(got, want, yard, tol, what, relative=False):
    """landscape.md oracle: error vs fp64 <= naive same-dtype error + tol.

    The tolerance is absolute (a 1e-3 shift of every fp32 log-prob must fail); ``relative`` scales
    it by the reference's magnitude, for extreme temperatures where |z| reaches 1e4 and fp32 itself
    cannot do better than |z| * 6e-8.
    """
    assert torch.equal(torch.isnan(got), torch.isnan(want)), f"{what}: NaN pattern differs"
    err = max_err(got, want)
    base = 0.0 if yard is None else max_err(yard, want)
    scale = 1.0
    if relative and want.numel():
        scale = max(1.0, want[torch.isfinite(want)].abs().max().item())
    assert err <= base + tol * scale, f"{what}: error {err:.3g}, naive {base:.3g}, tol {tol} x {scale:.3g}"


def make_case(n, h, v, dtype, *, seed, bias=False, ignore_index=-100, ignore_frac=0.25, scale=1.0):
    g = torch.Generator().manual_seed(seed)
    hidden = (torch.randn(n, h, generator=g) * scale).to(dtype)
    weight = (torch.randn(v, h, generator=g) * (2.0 / math.sqrt(h))).to(dtype)
    b = (torch.randn(v, generator=g) * 0.5).to(dtype) if bias else None
    targets = torch.randint(0, v, (n,), generator=g)
    targets[torch.rand(n, generator=g) < ignore_frac] = ignore_index
    ups = [torch.randn(n, generator=g) for _ in range(3)]
    return hidden, weight, b, targets, ups


def full_check(n, h, v, dtype, backend, *, seed=0, bias=False, temperature=1.0, softcap=None,
               ignore_index=-100, scale=1.0, outputs=("logp", "lse", "entropy"), relative=False):
    hidden, weight, b, targets, ups = make_case(
        n, h, v, dtype, seed=seed, bias=bias, ignore_index=ignore_index, scale=scale
    )
    ups = [u if name in outputs else None for u, name in zip(ups, ("logp", "lse", "entropy"))]
    kw = dict(temperature=temperature, softcap=softcap, ignore_index=ignore_index)
    want, want_g = evaluate(
        lambda x, w, bb: fp64_oracle(x, w, targets, bb, **kw), hidden, weight, b,
        [None if u is None else u.double() for u in ups],
    )
    yard, yard_g = (None, None, None), (None, None, None)
    if dtype != torch.float32:
        yard, yard_g = evaluate(lambda x, w, bb: naive_same_dtype(x, w, targets, bb, **kw), hidden, weight, b, ups)

    def ours(x, w, bb):
        out = linear_logprobs(x, w, targets, bias=bb, backend=backend, return_lse=True, return_entropy=True, **kw)
        assert isinstance(out, LinearLogprobsOutput)
        for t in out:
            assert t.dtype == torch.float32 and t.shape == targets.shape
        return out

    got, got_g = evaluate(ours, hidden, weight, b, ups)
    tol = TOL[dtype]
    # bf16/fp16 gradients come back in the input dtype, whose rounding alone (half an ulp of the
    # largest entry) exceeds an absolute 1e-2: judge them relative to the magnitude.
    relative = relative or dtype != torch.float32
    assert torch.all(got[0][targets == ignore_index] == 0.0)
    for name, g_, w_, y_ in zip(("logp", "lse", "entropy"), got, want, yard):
        judge(g_, w_, y_, tol, name, relative)
    for name, g_, w_, y_ in zip(("d hidden", "d weight", "d bias"), got_g, want_g, yard_g):
        if w_ is None:
            continue
        assert g_.dtype == dtype and g_.shape == w_.shape
        judge(g_, w_, y_, tol, name, relative)


# --------------------------------------------------------------------------------------------
# Values and gradients, every backend, every dtype, shapes straddling the tiles
# --------------------------------------------------------------------------------------------
# (N, H, V): N = 1, H = 1, V = 1, V = 2, H not a multiple of 16, V and N around 128 / 32.
SHAPES = [(1, 1, 1), (1, 5, 2), (3, 17, 127), (33, 20, 129), (31, 16, 128), (32, 65, 3), (40, 24, 257)]
OPTIONS = [
    dict(),
    dict(bias=True, temperature=0.7),
    dict(softcap=3.0, ignore_index=0),
    dict(bias=True, softcap=5.0, temperature=1.3, ignore_index="last"),
]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_values_and_grads_of_all_outputs(backend, dtype, shape):
    n, h, v = shape
    for i, opt in enumerate(OPTIONS):
        opt = dict(opt)
        if opt.get("ignore_index") == "last":
            opt["ignore_index"] = v - 1
        full_check(n, h, v, dtype, backend, seed=i, **opt)


@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("only", ["logp", "lse", "entropy"])
def test_each_output_alone_carries_its_gradient(backend, only):
    # Upstream through a single output: the other two arrive in backward as None.
    full_check(19, 24, 140, torch.float32, backend, seed=7, bias=True, softcap=4.0, temperature=1.7,
               outputs=(only,))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("temperature, softcap", [(1e-3, None), (1e3, None), (1.0, 1e-3), (1e-3, 1e3), (1e3, 1e-3)])
def test_extreme_temperature_and_softcap(backend, temperature, softcap):
    full_check(9, 16, 140, torch.float32, backend, seed=3, bias=True, temperature=temperature, softcap=softcap,
               relative=temperature == 1e-3)


@pytest.mark.parametrize("backend", BACKENDS)
def test_planted_confident_predictions_low_precision(backend):
    # Rows of W equal to (scaled) hidden states: log p close to 0, where relative error is harsh.
    for dtype in (torch.bfloat16, torch.float16):
        g = torch.Generator().manual_seed(11)
        hidden = torch.randn(20, 32, generator=g)
        weight = torch.randn(300, 32, generator=g) * 0.3
        idx = torch.randperm(300, generator=g)[:20]
        weight[idx] = hidden * 0.8
        hidden, weight = hidden.to(dtype), weight.to(dtype)
        want = fp64_oracle(hidden, weight, idx)[0]
        yard = naive_same_dtype(hidden, weight, idx)[0]
        got = linear_logprobs(hidden, weight, idx, backend=backend)
        assert want.max() > -0.05  # confident indeed
        judge(got, want, yard, TOL[dtype], f"{dtype} planted")


@pytest.mark.parametrize("backend", BACKENDS)
def test_logits_of_1e4_stay_finite_and_accurate(backend):
    g = torch.Generator().manual_seed(5)
    hidden = torch.nn.functional.normalize(torch.randn(6, 16, generator=g), dim=-1)
    weight = torch.nn.functional.normalize(torch.randn(70, 16, generator=g), dim=-1) * 1e4
    targets = torch.randint(0, 70, (6,), generator=g)
    h, w = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
    out = linear_logprobs(h, w, targets, backend=backend, return_lse=True, return_entropy=True)
    (out.logprobs.sum() + out.lse.sum() + out.entropy.sum()).backward()
    want = fp64_oracle(hidden, weight, targets)
    for got_, want_ in zip(out, want):
        assert torch.isfinite(got_).all()
        judge(got_, want_, None, 5e-4, "1e4 logits", relative=True)
    assert torch.isfinite(h.grad).all() and torch.isfinite(w.grad).all()


# --------------------------------------------------------------------------------------------
# Layouts: leading dims, strides, which inputs require grad
# --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("needs", [(True, True), (True, False), (False, True)], ids=["both", "hidden", "weight"])
def test_four_d_permuted_hidden_transposed_weight(backend, dtype, needs):
    g = torch.Generator().manual_seed(1)
    H, V = 20, 150
    hidden = torch.randn(3, H, 2, 5, generator=g).permute(0, 2, 3, 1).to(dtype)  # [3, 2, 5, H], strided
    weight = (torch.randn(H, V, generator=g) / 4).to(dtype).t()  # [V, H] with unit stride on V
    targets = torch.randint(0, V, (3, 2, 5), generator=g)
    targets[0, 0, :2] = -100
    up = torch.randn(3, 2, 5, generator=g)
    h = hidden.detach().requires_grad_(needs[0])
    w = weight.detach().requires_grad_(needs[1])
    out = linear_logprobs(h, w, targets, backend=backend)
    assert out.shape == targets.shape and out.dtype == torch.float32
    (out * up).sum().backward()
    hd, wd = hidden.double().requires_grad_(), weight.double().requires_grad_()
    want = fp64_oracle(hd, wd, targets)[0]
    (want * up.double()).sum().backward()
    yard = naive_same_dtype(hidden, weight, targets)[0] if dtype != torch.float32 else None
    judge(out, want.detach(), yard, TOL[dtype], "4-D values")
    assert (h.grad is None) != needs[0] and (w.grad is None) != needs[1]
    if needs[0]:
        assert h.grad.shape == hidden.shape
        judge(h.grad, hd.grad, None, 2 * TOL[dtype], "4-D d hidden")
    if needs[1]:
        judge(w.grad, wd.grad, None, 2 * TOL[dtype], "4-D d weight")


@pytest.mark.parametrize("backend", BACKENDS)
def test_stride_zero_hidden_and_weight(backend):
    g = torch.Generator().manual_seed(2)
    H, V = 20, 150
    h_row = torch.randn(1, H, generator=g).requires_grad_()
    w_row = torch.randn(1, H, generator=g).requires_grad_()
    w_rest = torch.randn(V - 3, H, generator=g)
    targets = torch.randint(0, V, (7,), generator=g)
    up = torch.randn(7, generator=g)
    out = linear_logprobs(h_row.expand(7, H), torch.cat([w_row.expand(3, H), w_rest]), targets, backend=backend)
    (out * up).sum().backward()
    hd, wd = h_row.detach().double().requires_grad_(), w_row.detach().double().requires_grad_()
    want = fp64_oracle(hd.expand(7, H), torch.cat([wd.expand(3, H), w_rest.double()]), targets)[0]
    (want * up.double()).sum().backward()
    judge(out, want.detach(), None, 5e-4, "values")
    judge(h_row.grad, hd.grad, None, 5e-4, "d h_row")
    judge(w_row.grad, wd.grad, None, 5e-4, "d w_row")
    # A weight whose rows are all the same tensor (stride 0): every token is uniform.
    same = torch.randn(1, H, generator=g).expand(V, H)
    got = linear_logprobs(torch.randn(4, H, generator=g), same, targets[:4], backend=backend)
    torch.testing.assert_close(got, torch.full((4,), -math.log(V)), atol=1e-5, rtol=0)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("bias_grad", [True, False])
def test_bias_with_and_without_grad(backend, bias_grad):
    g = torch.Generator().manual_seed(3)
    hidden, weight = torch.randn(9, 20, generator=g), torch.randn(150, 20, generator=g) / 3
    bias, targets, up = torch.randn(150, generator=g), torch.randint(0, 150, (9,), generator=g), torch.randn(9, generator=g)
    h, b = hidden.clone().requires_grad_(), bias.clone().requires_grad_(bias_grad)
    (linear_logprobs(h, weight, targets, bias=b, backend=backend) * up).sum().backward()
    hd, bd = hidden.double().requires_grad_(), bias.double().requires_grad_()
    (fp64_oracle(hd, weight, targets, bd)[0] * up.double()).sum().backward()
    judge(h.grad, hd.grad, None, 5e-4, "d hidden")
    if bias_grad:
        judge(b.grad, bd.grad, None, 5e-4, "d bias")
    else:
        assert b.grad is None


# --------------------------------------------------------------------------------------------
# Targets: dtypes, ignore_index values, out-of-range values
# --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("tdtype", [torch.int64, torch.int32, torch.int16, torch.int8, torch.uint8], ids=str)
def test_every_integer_target_dtype(backend, tdtype):
    g = torch.Generator().manual_seed(4)
    hidden, weight = torch.randn(12, 16, generator=g), torch.randn(100, 16, generator=g)
    # Values below 100 are exact in every dtype; ignore_index 99 is a real, representable token.
    targets = torch.randint(0, 100, (12,), generator=g)
    targets[:3] = 99
    got = linear_logprobs(hidden, weight, targets.to(tdtype), ignore_index=99, backend=backend)
    judge(got, fp64_oracle(hidden, weight, targets, ignore_index=99)[0], None, 5e-4, str(tdtype))
    assert torch.all(got[:3] == 0.0)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("ignore_index", [-100, 0, "V-1", -(2**40), 2**40])
def test_ignore_index_values(backend, ignore_index):
    V = 130
    ignore_index = V - 1 if ignore_index == "V-1" else ignore_index
    g = torch.Generator().manual_seed(5)
    hidden, weight = torch.randn(10, 16, generator=g).requires_grad_(), torch.randn(V, 16, generator=g)
    targets = torch.randint(1, V - 1, (10,), generator=g)  # int64: no aliasing of large ignore_index
    targets[::3] = ignore_index
    up = torch.randn(10, generator=g)
    got = linear_logprobs(hidden, weight, targets, ignore_index=ignore_index, backend=backend)
    (got * up).sum().backward()
    hd = hidden.detach().double().requires_grad_()
    want = fp64_oracle(hd, weight, targets, ignore_index=ignore_index)[0]
    (want * up.double()).sum().backward()
    judge(got, want.detach(), None, 5e-4, "values")
    judge(hidden.grad, hd.grad, None, 5e-4, "d hidden")
    assert torch.all(got[::3] == 0.0) and torch.all(hidden.grad[::3] == 0.0)


@pytest.mark.parametrize("backend", BACKENDS)
def test_everything_ignored(backend):
    g = torch.Generator().manual_seed(6)
    h, w = torch.randn(2, 3, 16, generator=g).requires_grad_(), torch.randn(50, 16, generator=g).requires_grad_()
    out = linear_logprobs(h, w, torch.full((2, 3), 7), ignore_index=7, backend=backend, return_entropy=True)
    assert torch.all(out.logprobs == 0.0) and torch.all(out.entropy == 0.0)
    (out.logprobs * torch.randn(2, 3) + out.entropy).sum().backward()
    assert torch.all(h.grad == 0.0) and torch.all(w.grad == 0.0)


@pytest.mark.parametrize("backend", BACKENDS)
def test_out_of_range_targets_nan_no_crash_and_validate(backend):
    g = torch.Generator().manual_seed(7)
    V = 70
    h, w = torch.randn(6, 16, generator=g).requires_grad_(), torch.randn(V, 16, generator=g).requires_grad_()
    targets = torch.tensor([V, -1, 10**12, -101, 3, -100])
    out = linear_logprobs(h, w, targets, backend=backend)
    assert torch.isnan(out[:4]).all() and torch.isfinite(out[4]) and out[5] == 0.0
    # The NaN rows are constants: they must not poison the gradients of the valid row.
    torch.where(torch.isnan(out), torch.zeros_like(out), out).sum().backward()
    assert torch.isfinite(h.grad).all() and torch.isfinite(w.grad).all()
    assert torch.all(h.grad[:4] == 0.0) and h.grad[4].abs().sum() > 0
    with pytest.raises(ValueError, match="targets"):
        linear_logprobs(h, w, targets, backend=backend, validate=True)
    linear_logprobs(h, w, targets.clamp(0, V - 1), backend=backend, validate=True)  # good input passes


# --------------------------------------------------------------------------------------------
# Non-finite inputs: NaN in, NaN out (row-wise), never a silent number
# --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("backend", BACKENDS)
def test_nan_and_inf_propagate_where_they_should(backend):
    g = torch.Generator().manual_seed(8)
    hidden, weight = torch.randn(6, 16, generator=g), torch.randn(70, 16, generator=g)
    bias, targets = torch.randn(70, generator=g), torch.randint(0, 70, (6,), generator=g)
    h = hidden.clone()
    h[1, 3] = float("nan")
    h[2, 0] = float("inf")
    out = linear_logprobs(h, weight, targets, backend=backend)
    # An inf hidden state makes +inf logits: z - lse = inf - inf, NaN on every backend (issue 19).
    assert (~torch.isfinite(out)).tolist() == [False, True, True, False, False, False]
    assert torch.isnan(out[1]) and torch.isnan(out[2])
    w = weight.clone()
    w[5, 0] = float("nan")
    assert torch.isnan(linear_logprobs(hidden, w, targets, backend=backend)).all()
    b = bias.clone()
    b[9] = float("nan")
    assert torch.isnan(linear_logprobs(hidden, weight, targets, bias=b, backend=backend)).all()
    # The row's gradient is NaN too (not a silent zero).
    hh = h.clone().requires_grad_()
    linear_logprobs(hh, weight, targets, backend=backend).sum().backward()
    assert torch.isnan(hh.grad[1]).any() and torch.isfinite(hh.grad[[0, 3, 4, 5]]).all()


@pytest.mark.parametrize("softcap", [None, 5.0])
def test_inf_gives_the_same_result_on_every_backend(softcap):
    # An inf in a hidden state used to give -inf on reference and NaN on the fused backends.
    # Without a soft-cap its row's logits are +-inf: NaN log p, lse and entropy everywhere; with
    # one they are +-cap and the results finite (and equal).
    g = torch.Generator().manual_seed(12)
    h, w = torch.randn(6, 16, generator=g), torch.randn(70, 16, generator=g)
    t = torch.randint(0, 70, (6,), generator=g)
    h[1, 3], h[2, 5], h[4, 0] = float("inf"), float("-inf"), float("inf")
    t[4] = -100  # an ignored row stays exactly 0
    results = {}
    for backend in BACKENDS:
        out = linear_logprobs(h, w, t, backend=backend, softcap=softcap, return_lse=True, return_entropy=True)
        results[backend] = torch.stack([out.logprobs, out.lse, out.entropy])
    for backend in ("torch", "triton"):
        torch.testing.assert_close(results[backend], results["reference"], rtol=1e-5, atol=1e-5, equal_nan=True)
    logp, lse, ent = results["reference"]
    assert logp[4] == 0.0
    inf_rows = [1, 2]
    if softcap is None:
        assert torch.isnan(logp[inf_rows]).all() and torch.isnan(lse[inf_rows]).all() and torch.isnan(ent[inf_rows]).all()
    else:
        assert torch.isfinite(results["reference"]).all()
    assert torch.isfinite(logp[[0, 3, 5]]).all()


# --------------------------------------------------------------------------------------------
# Empty inputs
# --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("backend", BACKENDS)
def test_zero_tokens(backend):
    h = torch.randn(2, 0, 16, requires_grad=True)
    w = torch.randn(50, 16)
    out = linear_logprobs(h, w, torch.zeros(2, 0, dtype=torch.long), backend=backend,
                          return_lse=True, return_entropy=True)
    for t in out:
        assert t.shape == (2, 0) and t.dtype == torch.float32
    out.logprobs.sum().backward()
    assert h.grad.shape == h.shape and torch.all(h.grad == 0)


# --------------------------------------------------------------------------------------------
# Argument validation: the right exception, naming the argument
# --------------------------------------------------------------------------------------------
def _bad_calls():
    h, w, t = torch.randn(4, 8), torch.randn(10, 8), torch.randint(0, 10, (4,))
    return [
        ("hidden", TypeError, lambda: linear_logprobs(h.tolist(), w, t)),
        ("hidden", TypeError, lambda: linear_logprobs(h.long(), w, t)),
        ("hidden", ValueError, lambda: linear_logprobs(torch.tensor(1.0), w, t)),
        ("weight", ValueError, lambda: linear_logprobs(h, w[0], t)),
        ("weight", ValueError, lambda: linear_logprobs(h, w[:, :5], t)),
        ("weight", TypeError, lambda: linear_logprobs(h, w.half(), t)),
        ("weight", ValueError, lambda: linear_logprobs(h, w[:0], t)),
        ("targets", TypeError, lambda: linear_logprobs(h, w, t.float())),
        ("targets", TypeError, lambda: linear_logprobs(h, w, t.bool())),
        ("targets", ValueError, lambda: linear_logprobs(h, w, t[:3])),
        ("targets", TypeError, lambda: linear_logprobs(h, w, t.numpy())),
        ("bias", ValueError, lambda: linear_logprobs(h, w, t, bias=torch.randn(1, 10))),
        ("bias", ValueError, lambda: linear_logprobs(h, w, t, bias=torch.randn(9))),
        ("bias", TypeError, lambda: linear_logprobs(h, w, t, bias=torch.randn(10).double())),
        ("temperature", ValueError, lambda: linear_logprobs(h, w, t, temperature=0.0)),
        ("temperature", ValueError, lambda: linear_logprobs(h, w, t, temperature=-1)),
        ("temperature", ValueError, lambda: linear_logprobs(h, w, t, temperature=float("nan"))),
        ("temperature", ValueError, lambda: linear_logprobs(h, w, t, temperature=float("inf"))),
        ("temperature", TypeError, lambda: linear_logprobs(h, w, t, temperature="1")),
        ("softcap", ValueError, lambda: linear_logprobs(h, w, t, softcap=0.0)),
        ("softcap", ValueError, lambda: linear_logprobs(h, w, t, softcap=-3.0)),
        ("ignore_index", TypeError, lambda: linear_logprobs(h, w, t, ignore_index=-100.0)),
        ("backend", ValueError, lambda: linear_logprobs(h, w, t, backend="cuda")),
        ("backend", ValueError, lambda: linear_logprobs(h, w, t, backend=None)),
        ("triton", TypeError, lambda: linear_logprobs(h.double(), w.double(), t, backend="triton")),
        ("chunk_size", ValueError, lambda: linear_logprobs(h, w, t, chunk_size=0, backend="torch")),
        ("hidden", ValueError, lambda: sequence_logprobs(h, w, t)),
        ("labels", ValueError, lambda: sequence_logprobs(h[None], w, t[None, :3])),
        ("weight", ValueError, lambda: sequence_logprobs(h[None], w[:, :3], t[None])),
        ("cu_seqlens", ValueError, lambda: sequence_logprobs(h, w, t, cu_seqlens=torch.tensor([[0, 4]]))),
        ("cu_seqlens", ValueError, lambda: sequence_logprobs(h, w, t, cu_seqlens=torch.tensor([0]))),
        ("cu_seqlens", TypeError, lambda: sequence_logprobs(h, w, t, cu_seqlens=torch.tensor([0.0, 4.0]))),
        ("cu_seqlens", TypeError, lambda: sequence_logprobs(h, w, t, cu_seqlens=[0, 4])),
        ("packed", ValueError, lambda: sequence_logprobs(h[None].expand(2, 4, 8), w, t, cu_seqlens=torch.tensor([0, 4]))),
    ]


@pytest.mark.parametrize("case", range(len(_bad_calls())))
def test_bad_arguments_raise_naming_the_argument(case):
    name, exc, call = _bad_calls()[case]
    with pytest.raises(exc, match=name):
        call()


# --------------------------------------------------------------------------------------------
# No host synchronisation on the hot path (CPU proxy: the Python-level sync entry points raise)
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_no_host_sync_in_forward_and_backward(backend):
    g = torch.Generator().manual_seed(9)
    h = torch.randn(2, 5, 8, generator=g).requires_grad_()
    w = torch.randn(40, 8, generator=g).requires_grad_()
    b = torch.randn(40, generator=g).requires_grad_()
    labels = torch.randint(0, 40, (2, 5), generator=g)
    labels[0, :2] = -100
    labels[1, 4] = 99  # out of range: handled on device too
    cu = torch.tensor([0, 4, 10], dtype=torch.int32)
    with forbid_host_sync():
        out = linear_logprobs(h, w, labels, bias=b, backend=backend, return_lse=True, return_entropy=True,
                              softcap=5.0, temperature=0.8)
        (out.logprobs.nan_to_num() + out.lse + out.entropy).sum().backward()
        sequence_logprobs(h, w, labels.clamp(max=39), backend=backend, length_normalize=True).sum().backward()
        sequence_logprobs(h.reshape(10, 8), w, labels.clamp(max=39).reshape(10), cu_seqlens=cu,
                          backend=backend).sum().backward()


# --------------------------------------------------------------------------------------------
# sequence_logprobs
# --------------------------------------------------------------------------------------------
def seq_oracle(hidden, weight, labels, *, shift=True, normalize=False, ignore_index=-100):
    """Token by token in fp64: with shift, position t is scored on label t + 1."""
    sums = []
    B, T, _ = hidden.shape
    for b in range(B):
        total, count = hidden.new_zeros((), dtype=torch.float64), 0
        for t in range(T - 1 if shift else T):
            y = int(labels[b, t + 1 if shift else t])
            if y == ignore_index:
                continue
            total = total + fp64_oracle(hidden[b, t:t + 1], weight, torch.tensor([y]))[0][0]
            count += 1
        sums.append(total / max(count, 1) if normalize else total)
    return torch.stack(sums)


def seq_batch(seed=0, B=3, T=7, H=12, V=50):
    g = torch.Generator().manual_seed(seed)
    hidden, weight = torch.randn(B, T, H, generator=g), torch.randn(V, H, generator=g) / 2
    labels = torch.randint(0, V, (B, T), generator=g)
    labels[0, :3] = -100  # prompt
    labels[1, 5:] = -100  # right padding
    labels[2, :] = -100
    labels[2, 4] = 9  # a single scored label
    return hidden, weight, labels


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("normalize", [False, True])
@pytest.mark.parametrize("shift", [True, False])
def test_sequence_values_and_grads(backend, normalize, shift):
    hidden, weight, labels = seq_batch()
    up = torch.randn(3, generator=torch.Generator().manual_seed(1))
    h, w = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
    got = sequence_logprobs(h, w, labels, shift=shift, length_normalize=normalize, backend=backend)
    assert got.shape == (3,) and got.dtype == torch.float32
    (got * up).sum().backward()
    hd, wd = hidden.double().requires_grad_(), weight.double().requires_grad_()
    want = seq_oracle(hd, wd, labels, shift=shift, normalize=normalize)
    (want * up.double()).sum().backward()
    judge(got, want.detach(), None, 5e-4, "sums")
    judge(h.grad, hd.grad, None, 5e-4, "d hidden")
    judge(w.grad, wd.grad, None, 5e-4, "d weight")
    if shift:
        # The last position predicts nothing: its hidden state gets no gradient.
        assert torch.all(h.grad[:, -1] == 0)


@pytest.mark.parametrize("backend", BACKENDS)
def test_packed_equals_padded_values_and_grads(backend):
    hidden, weight, labels = seq_batch(seed=2)
    lens = [4, 7, 2]
    padded_labels = labels.clone()
    for i, n in enumerate(lens):
        padded_labels[i, n:] = -100
    up = torch.randn(3, generator=torch.Generator().manual_seed(3))
    hp = hidden.clone().requires_grad_()
    (sequence_logprobs(hp, weight, padded_labels, backend=backend) * up).sum().backward()
    pad_grad = torch.cat([hp.grad[i, :n] for i, n in enumerate(lens)])

    packed_h = torch.cat([hidden[i, :n] for i, n in enumerate(lens)])
    packed_l = torch.cat([labels[i, :n] for i, n in enumerate(lens)])
    # Three trailing positions past cu_seqlens[-1] (pack padding) with labels that must not count.
    packed_h = torch.cat([packed_h, torch.randn(3, 12)]).requires_grad_()
    packed_l = torch.cat([packed_l, torch.tensor([1, 2, 3])])
    for cu in (torch.tensor([0, 4, 11, 13], dtype=torch.int32), torch.tensor([0, 4, 11, 13])):
        packed_h.grad = None
        got = sequence_logprobs(packed_h[None], weight, packed_l[None], cu_seqlens=cu, backend=backend)
        (got * up).sum().backward()
        want = sequence_logprobs(hidden, weight, padded_labels, backend=backend)
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(packed_h.grad[:13], pad_grad, atol=1e-5, rtol=1e-5)
        assert torch.all(packed_h.grad[13:] == 0)


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_packed_sequences_do_not_leak_across_boundaries(backend):
    g = torch.Generator().manual_seed(4)
    hidden, weight = torch.randn(10, 8, generator=g), torch.randn(30, 8, generator=g)
    labels = torch.randint(0, 30, (10,), generator=g)
    cu = torch.tensor([0, 3, 3, 10], dtype=torch.int32)  # an empty sequence in the middle
    base = sequence_logprobs(hidden, weight, labels, cu_seqlens=cu, backend=backend)
    assert base[1] == 0.0
    # The first label of sequence 2 is never scored (nothing predicts it), so changing it is moot.
    changed = labels.clone()
    changed[3] = (changed[3] + 1) % 30
    torch.testing.assert_close(sequence_logprobs(hidden, weight, changed, cu_seqlens=cu, backend=backend), base)
    want = torch.stack([
        seq_oracle(hidden[None, :3], weight, labels[None, :3])[0],
        torch.zeros((), dtype=torch.float64),
        seq_oracle(hidden[None, 3:], weight, labels[None, 3:])[0],
    ])
    judge(base, want, None, 5e-4, "packed with empty middle sequence")


def test_sequence_length_one_and_empty_batch():
    hidden, weight, labels = seq_batch()
    assert torch.all(sequence_logprobs(hidden[:, :1], weight, labels[:, :1], backend="torch") == 0)
    assert sequence_logprobs(hidden[:0], weight, labels[:0], backend="torch").shape == (0,)


# --------------------------------------------------------------------------------------------
# Regressions: bugs found by adversarial review, fixed, kept as tests
# --------------------------------------------------------------------------------------------
def test_strided_bias_triton():
    g = torch.Generator().manual_seed(10)
    hidden, weight = torch.randn(5, 8, generator=g), torch.randn(20, 8, generator=g)
    targets = torch.randint(0, 20, (5,), generator=g)
    bias = torch.randn(40, generator=g)[::2]
    got = linear_logprobs(hidden, weight, targets, bias=bias, backend="triton")
    judge(got, fp64_oracle(hidden, weight, targets, bias)[0], None, 5e-4, "strided bias")


def test_expanded_bias_triton():
    g = torch.Generator().manual_seed(10)
    hidden, weight = torch.randn(5, 8, generator=g), torch.randn(20, 8, generator=g)
    targets = torch.randint(0, 20, (5,), generator=g)
    bias = torch.randn(20, generator=g)[:1].expand(20)  # storage holds 20 values: no OOB here
    got = linear_logprobs(hidden, weight, targets, bias=bias, backend="triton")
    judge(got, fp64_oracle(hidden, weight, targets, bias)[0], None, 5e-4, "expanded bias")


def test_masked_vocabulary_block_triton():
    g = torch.Generator().manual_seed(11)
    hidden, weight = torch.randn(5, 8, generator=g), torch.randn(200, 8, generator=g)
    bias = torch.zeros(200)
    bias[:128] = float("-inf")  # a whole leading vocabulary tile banned
    targets = torch.randint(128, 200, (5,), generator=g)
    got = linear_logprobs(hidden, weight, targets, bias=bias, backend="triton")
    judge(got, fp64_oracle(hidden, weight, targets, bias)[0], None, 5e-4, "-inf bias tile")


@pytest.mark.parametrize("backend", BACKENDS)
def test_entropy_with_masked_vocabulary(backend):
    g = torch.Generator().manual_seed(12)
    hidden, weight = torch.randn(5, 8, generator=g), torch.randn(30, 8, generator=g)
    bias = torch.zeros(30)
    bias[:4] = float("-inf")
    targets = torch.randint(4, 30, (5,), generator=g)
    out = linear_logprobs(hidden, weight, targets, bias=bias, backend=backend, return_entropy=True)
    judge(out.entropy, fp64_oracle(hidden, weight, targets, bias)[2], None, 5e-4, "entropy")


@pytest.mark.parametrize("backend", BACKENDS)
def test_uint8_targets_do_not_alias_ignore_index(backend):
    g = torch.Generator().manual_seed(13)
    hidden, weight = torch.randn(3, 8, generator=g), torch.randn(200, 8, generator=g)
    targets = torch.tensor([156, 5, 7])
    got = linear_logprobs(hidden, weight, targets.to(torch.uint8), backend=backend)
    judge(got, fp64_oracle(hidden, weight, targets)[0], None, 5e-4, "uint8 156")


def test_int32_targets_do_not_alias_huge_ignore_index():
    g = torch.Generator().manual_seed(13)
    hidden, weight = torch.randn(3, 8, generator=g), torch.randn(20, 8, generator=g)
    targets = torch.tensor([0, 5, 7])
    got = linear_logprobs(hidden, weight, targets.int(), ignore_index=2**32 + 5, backend="torch")
    judge(got, fp64_oracle(hidden, weight, targets, ignore_index=2**32 + 5)[0], None, 5e-4, "int32 alias")


def test_packed_leading_empty_sequence():
    g = torch.Generator().manual_seed(14)
    hidden, weight, labels = torch.randn(3, 8, generator=g), torch.randn(20, 8, generator=g), torch.randint(0, 20, (3,))
    one = sequence_logprobs(hidden, weight, labels, cu_seqlens=torch.tensor([0, 3]), backend="torch")
    two = sequence_logprobs(hidden, weight, labels, cu_seqlens=torch.tensor([0, 0, 3]), backend="torch")
    assert two[0] == 0.0
    torch.testing.assert_close(two[1], one[0])


def test_zero_hidden_size_is_a_clear_error_or_works():
    try:
        out = linear_logprobs(torch.randn(3, 0), torch.randn(5, 0), torch.tensor([0, 1, 4]), backend="torch")
    except ValueError as e:
        assert "hidden" in str(e)
    else:
        torch.testing.assert_close(out, torch.full((3,), -math.log(5)))


def test_cu_seqlens_beyond_total_is_a_value_error():
    h, w, t = torch.randn(13, 8), torch.randn(20, 8), torch.randint(0, 20, (13,))
    with pytest.raises(ValueError, match="cu_seqlens"):
        sequence_logprobs(h, w, t, cu_seqlens=torch.tensor([0, 5, 20]), backend="torch", validate=True)
    # Without validate it must not read out of bounds: positions past the end are dropped.
    out = sequence_logprobs(h, w, t, cu_seqlens=torch.tensor([0, 5, 20]), backend="torch")
    assert out.shape == (2,) and torch.isfinite(out).all()


def test_float_labels_error_names_labels():
    h, w = torch.randn(1, 4, 8), torch.randn(20, 8)
    with pytest.raises(TypeError, match="labels"):
        sequence_logprobs(h, w, torch.zeros(1, 4))


def test_large_softcap_absolute_accuracy_triton():
    g = torch.Generator().manual_seed(0)
    hidden, weight = torch.randn(16, 32, generator=g) * 3, torch.randn(150, 32, generator=g) / math.sqrt(32) * 2
    targets = torch.randint(0, 150, (16,), generator=g)
    want = fp64_oracle(hidden, weight, targets, softcap=1e4)[0]
    got = linear_logprobs(hidden, weight, targets, softcap=1e4, backend="triton")
    ref = linear_logprobs(hidden, weight, targets, softcap=1e4, backend="reference")
    assert max_err(got, want) <= max_err(ref, want) + 5e-4  # absolute, as the landscape oracle states it


def test_softcap_1e3_temperature_1e_3_triton():
    full_check(9, 16, 140, torch.float32, "triton", seed=3, bias=True, temperature=1e-3, softcap=1e3, relative=True)
