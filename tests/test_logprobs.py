"""linear_logprobs: every backend against an independent fp64 oracle, values and gradients.

The oracle below is written from the formula (docs/math.md#token-level-op), not from iris_kernels.reference.
Low-precision inputs are judged as landscape.md says: the backend's error against fp64 must be
no worse than naive same-dtype PyTorch's error plus a tolerance.
"""
import math

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from iris_kernels import LinearLogprobsOutput, linear_logprobs
from iris_kernels.chunked import ChunkedLinearLogprobs
from iris_kernels.types import LogprobsParams

BACKENDS = ["reference", "torch", "triton"]
TOL = {torch.float32: 5e-4, torch.float16: 1e-3, torch.bfloat16: 1e-2}


def oracle(hidden, weight, targets, bias=None, temperature=1.0, softcap=None, ignore_index=-100):
    """fp64 (logp, lse, entropy) with the same conventions, differentiable through autograd."""
    h, w = hidden.double(), weight.double()
    z = h @ w.t()
    if bias is not None:
        z = z + bias.double()
    if softcap is not None:
        z = softcap * torch.tanh(z / softcap)
    z = z / temperature
    lse = torch.logsumexp(z, -1)
    logp_all = z - lse[..., None]
    ignored = targets == ignore_index
    idx = torch.where(ignored, torch.zeros_like(targets), targets).long()
    logp = logp_all.gather(-1, idx[..., None]).squeeze(-1)
    logp = torch.where(ignored, torch.zeros_like(logp), logp)
    entropy = -(logp_all.exp() * logp_all).sum(-1)
    entropy = torch.where(ignored, torch.zeros_like(entropy), entropy)
    return logp, lse, entropy


def naive_same_dtype(hidden, weight, targets, bias=None, temperature=1.0, softcap=None, ignore_index=-100):
    """What a user would write in the input dtype (no upcast): the precision yardstick."""
    z = torch.nn.functional.linear(hidden, weight, bias)
    if softcap is not None:
        z = softcap * torch.tanh(z / softcap)
    z = z / temperature
    logp_all = torch.log_softmax(z, -1)
    ignored = targets == ignore_index
    idx = torch.where(ignored, torch.zeros_like(targets), targets).long()
    logp = logp_all.gather(-1, idx[..., None]).squeeze(-1).float()
    return torch.where(ignored, torch.zeros_like(logp), logp)


def make_inputs(n, h, v, dtype, *, seed=0, bias=False, ignore_frac=0.2, scale=1.0, ignore_index=-100):
    g = torch.Generator().manual_seed(seed)
    hidden = (torch.randn(n, h, generator=g) * scale).to(dtype)
    weight = (torch.randn(v, h, generator=g) / math.sqrt(h) * 2.0).to(dtype)
    targets = torch.randint(0, v, (n,), generator=g)
    drop = torch.rand(n, generator=g) < ignore_frac
    targets[drop] = ignore_index
    b = (torch.randn(v, generator=g) * 0.5).to(dtype) if bias else None
    return hidden, weight, targets, b


def run_with_grads(fn, hidden, weight, bias, upstream):
    leaves = [t.detach().clone().requires_grad_() if t is not None else None for t in (hidden, weight, bias)]
    out = fn(*leaves)
    (out * upstream).sum().backward()
    grads = [None if t is None else t.grad for t in leaves]
    return out.detach(), grads


def assert_close_to_oracle(got, want, yardstick, tol, what):
    err = (got.double() - want).abs().max().item()
    base = (yardstick.double() - want).abs().max().item() if yardstick is not None else 0.0
    assert err <= base + tol * max(1.0, want.abs().max().item()), (
        f"{what}: max error {err:.3g} vs naive same-dtype {base:.3g} (tol {tol})"
    )


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize(
    "options",
    [dict(), dict(bias=True), dict(temperature=0.7), dict(softcap=4.0, bias=True, temperature=1.3)],
    ids=["plain", "bias", "temperature", "softcap+bias+temperature"],
)
def test_matches_fp64_oracle(backend, dtype, options):
    options = dict(options)
    use_bias = options.pop("bias", False)
    n, h, v = 45, 40, 163  # none is a multiple of any block size
    hidden, weight, targets, bias = make_inputs(n, h, v, dtype, seed=1, bias=use_bias)
    upstream = torch.randn(n, generator=torch.Generator().manual_seed(2))

    got, got_grads = run_with_grads(
        lambda x, w, b: linear_logprobs(x, w, targets, bias=b, backend=backend, **options),
        hidden, weight, bias, upstream,
    )
    want, want_grads = run_with_grads(
        lambda x, w, b: oracle(x, w, targets, b, **options)[0], hidden, weight, bias, upstream.double()
    )
    yard, yard_grads = run_with_grads(
        lambda x, w, b: naive_same_dtype(x, w, targets, b, **options), hidden, weight, bias, upstream
    )
    assert got.dtype == torch.float32 and got.shape == targets.shape
    assert torch.all(got[targets == -100] == 0.0)
    tol = TOL[dtype]
    assert_close_to_oracle(got, want, yard, tol, "logprobs")
    for name, g, w_, y in zip(("hidden", "weight", "bias"), got_grads, want_grads, yard_grads):
        if w_ is None:
            continue
        assert g.dtype == dtype
        assert_close_to_oracle(g, w_, y, tol, f"grad {name}")


@pytest.mark.parametrize("backend", BACKENDS)
def test_lse_and_entropy_values_and_gradients(backend):
    n, h, v = 29, 24, 91
    hidden, weight, targets, bias = make_inputs(n, h, v, torch.float32, seed=3, bias=True)
    g = torch.Generator().manual_seed(4)
    c_lp, c_lse, c_ent = torch.randn(n, generator=g), torch.randn(n, generator=g), torch.randn(n, generator=g)

    def total(out_lp, out_lse, out_ent, cs):
        return (out_lp * cs[0]).sum() + (out_lse * cs[1]).sum() + (out_ent * cs[2]).sum()

    leaves = [t.clone().requires_grad_() for t in (hidden, weight, bias)]
    out = linear_logprobs(*leaves[:2], targets, bias=leaves[2], softcap=3.0, temperature=0.9,
                          return_lse=True, return_entropy=True, backend=backend)
    assert isinstance(out, LinearLogprobsOutput)
    total(*out, (c_lp, c_lse, c_ent)).backward()

    ref_leaves = [t.clone().double().requires_grad_() for t in (hidden, weight, bias)]
    want = oracle(*ref_leaves[:2], targets, ref_leaves[2], softcap=3.0, temperature=0.9)
    total(*want, (c_lp.double(), c_lse.double(), c_ent.double())).backward()
    for got_t, want_t in zip(out, want):
        torch.testing.assert_close(got_t.double(), want_t.detach(), atol=2e-5, rtol=2e-5)
    for a, b in zip(leaves, ref_leaves):
        torch.testing.assert_close(a.grad.double(), b.grad, atol=5e-5, rtol=5e-5)
    assert torch.all(out.entropy[targets == -100] == 0.0)


def test_only_requested_fields_are_returned():
    hidden, weight, targets, _ = make_inputs(5, 8, 11, torch.float32)
    out = linear_logprobs(hidden, weight, targets, return_lse=True)
    assert out.lse is not None and out.entropy is None
    out = linear_logprobs(hidden, weight, targets, return_entropy=True)
    assert out.lse is None and out.entropy is not None
    assert isinstance(linear_logprobs(hidden, weight, targets), torch.Tensor)


@given(
    n=st.integers(1, 70),
    h=st.integers(1, 70),
    v=st.integers(2, 300),
    ignore_frac=st.floats(0.0, 1.0),
    seed=st.integers(0, 2**16),
    backend=st.sampled_from(["torch", "triton"]),
)
def test_random_shapes_fp32(n, h, v, ignore_frac, seed, backend):
    hidden, weight, targets, _ = make_inputs(n, h, v, torch.float32, seed=seed, ignore_frac=ignore_frac)
    upstream = torch.randn(n, generator=torch.Generator().manual_seed(seed + 1))
    got, (gh, gw, _) = run_with_grads(
        lambda x, w, b: linear_logprobs(x, w, targets, backend=backend, chunk_size=7), hidden, weight, None, upstream
    )
    want, (wh, ww, _) = run_with_grads(lambda x, w, b: oracle(x, w, targets)[0], hidden, weight, None, upstream.double())
    torch.testing.assert_close(got.double(), want, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(gh.double(), wh.double(), atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(gw.double(), ww.double(), atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("backend", BACKENDS)
def test_single_token_and_tiny_odd_vocab(backend):
    hidden, weight, targets, _ = make_inputs(1, 5, 3, torch.float32, seed=5, ignore_frac=0.0)
    got = linear_logprobs(hidden, weight, targets, backend=backend)
    torch.testing.assert_close(got.double(), oracle(hidden, weight, targets)[0], atol=1e-6, rtol=1e-6)
    assert got.shape == (1,)


@pytest.mark.parametrize("backend", BACKENDS)
def test_three_d_hidden_and_non_contiguous_inputs(backend):
    g = torch.Generator().manual_seed(6)
    base = torch.randn(3, 17, 2 * 20, generator=g)
    hidden = base[..., ::2]  # [3, 17, 20], last-dim stride 2
    weight_t = torch.randn(20, 53, generator=g) * 0.4
    weight = weight_t.t()  # [53, 20], transposed strides
    targets = torch.randint(0, 53, (3, 17), generator=g)
    targets[1, 4:9] = -100
    assert not hidden.is_contiguous() and not weight.is_contiguous()
    upstream = torch.randn(3, 17, generator=g)
    got, (gh, gw, _) = run_with_grads(
        lambda x, w, b: linear_logprobs(x, w, targets, backend=backend), hidden, weight, None, upstream
    )
    want, (wh, ww, _) = run_with_grads(lambda x, w, b: oracle(x, w, targets)[0], hidden, weight, None, upstream.double())
    assert got.shape == (3, 17)
    torch.testing.assert_close(got.double(), want, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(gh.double(), wh.double(), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(gw.double(), ww.double(), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("backend", BACKENDS)
def test_custom_ignore_index_that_is_a_real_token(backend):
    # ignore_index = 7 is also a valid vocabulary id: it must be ignored, not scored.
    hidden, weight, targets, _ = make_inputs(40, 16, 30, torch.float32, seed=7, ignore_frac=0.0)
    targets[::3] = 7
    upstream = torch.randn(40, generator=torch.Generator().manual_seed(8))
    got, (gh, gw, _) = run_with_grads(
        lambda x, w, b: linear_logprobs(x, w, targets, ignore_index=7, backend=backend), hidden, weight, None, upstream
    )
    want, (wh, ww, _) = run_with_grads(
        lambda x, w, b: oracle(x, w, targets, ignore_index=7)[0], hidden, weight, None, upstream.double()
    )
    assert torch.all(got[targets == 7] == 0.0)
    torch.testing.assert_close(got.double(), want, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(gh.double(), wh.double(), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(gw.double(), ww.double(), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("backend", BACKENDS)
def test_fully_ignored_input_gives_zeros_and_zero_gradients(backend):
    hidden, weight, targets, bias = make_inputs(12, 16, 21, torch.float32, seed=9, bias=True, ignore_frac=1.0)
    assert torch.all(targets == -100)
    upstream = torch.randn(12, generator=torch.Generator().manual_seed(10))
    got, grads = run_with_grads(
        lambda x, w, b: linear_logprobs(x, w, targets, bias=b, backend=backend), hidden, weight, bias, upstream
    )
    assert torch.all(got == 0.0)
    for g in grads:
        assert g is not None and torch.all(g == 0.0)


@pytest.mark.parametrize("backend", BACKENDS)
def test_huge_logits_stay_finite(backend):
    # Logits of order +-1e3: a naive exp overflows; the tiled LSE must not.
    hidden, weight, targets, _ = make_inputs(20, 16, 70, torch.float32, seed=11, scale=1.0, ignore_frac=0.0)
    hidden = hidden / hidden.norm(dim=-1, keepdim=True) * 300.0
    upstream = torch.randn(20, generator=torch.Generator().manual_seed(12))
    got, (gh, gw, _) = run_with_grads(
        lambda x, w, b: linear_logprobs(x, w, targets, backend=backend), hidden, weight, None, upstream
    )
    want, (wh, ww, _) = run_with_grads(lambda x, w, b: oracle(x, w, targets)[0], hidden, weight, None, upstream.double())
    logits = hidden.double() @ weight.double().t()
    assert logits.abs().max() > 500.0
    assert torch.isfinite(got).all() and torch.isfinite(gh).all() and torch.isfinite(gw).all()
    scale = want.abs().max().item()
    torch.testing.assert_close(got.double(), want, atol=1e-5 * scale, rtol=1e-4)
    torch.testing.assert_close(gw.double(), ww.double(), atol=1e-4 * ww.abs().max().item(), rtol=1e-4)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_planted_confident_predictions(backend, dtype):
    # Rows of W equal to scaled hidden states: the model is nearly certain of those targets.
    g = torch.Generator().manual_seed(13)
    n, h, v = 24, 32, 97
    hidden = torch.nn.functional.normalize(torch.randn(n, h, generator=g), dim=-1)
    weight = torch.randn(v, h, generator=g) * 0.05
    targets = torch.randperm(v, generator=g)[:n]
    weight[targets] = hidden * 40.0
    hidden, weight = hidden.to(dtype), weight.to(dtype)
    got = linear_logprobs(hidden, weight, targets, backend=backend)
    want = oracle(hidden, weight, targets)[0]
    assert torch.all(want > -1e-3)  # confident: log p close to 0
    yard = naive_same_dtype(hidden, weight, targets)
    assert_close_to_oracle(got, want, yard, TOL[dtype], "confident logprobs")


@pytest.mark.parametrize("backend", BACKENDS)
def test_nan_in_gives_nan_out(backend):
    hidden, weight, targets, _ = make_inputs(10, 16, 33, torch.float32, seed=14, ignore_frac=0.0)
    hidden[4, 3] = float("nan")
    targets[7] = -100
    hidden[7, 0] = float("nan")
    got = linear_logprobs(hidden, weight, targets, backend=backend)
    assert torch.isnan(got[4])
    assert got[7] == 0.0  # ignored positions are exactly 0, whatever their hidden state
    others = [i for i in range(10) if i not in (4, 7)]
    assert torch.isfinite(got[others]).all()


@pytest.mark.parametrize("backend", BACKENDS)
def test_out_of_range_targets_give_nan_and_never_crash(backend):
    hidden, weight, targets, _ = make_inputs(9, 16, 19, torch.float32, seed=15, ignore_frac=0.0)
    targets[2] = 19
    targets[5] = -3
    targets[6] = 10**9
    got = linear_logprobs(hidden, weight, targets, backend=backend)
    assert torch.isnan(got[[2, 5, 6]]).all()
    good = [0, 1, 3, 4, 7, 8]
    want = oracle(hidden, weight, targets.clamp(0, 18))[0]
    torch.testing.assert_close(got[good].double(), want[good], atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="targets"):
        linear_logprobs(hidden, weight, targets, backend=backend, validate=True)


def test_validate_accepts_good_targets():
    hidden, weight, targets, _ = make_inputs(9, 16, 19, torch.float32, seed=16)
    linear_logprobs(hidden, weight, targets, validate=True)


def test_torch_backend_gradcheck_fp64():
    g = torch.Generator().manual_seed(17)
    n, h, v = 7, 5, 11
    hidden = torch.randn(n, h, dtype=torch.float64, generator=g, requires_grad=True)
    weight = torch.randn(v, h, dtype=torch.float64, generator=g, requires_grad=True)
    bias = torch.randn(v, dtype=torch.float64, generator=g, requires_grad=True)
    targets = torch.randint(0, v, (n,), generator=g)
    targets[2] = -100

    def fn(x, w, b):
        out = linear_logprobs(x, w, targets, bias=b, softcap=2.5, temperature=0.8, return_lse=True,
                              return_entropy=True, backend="torch", chunk_size=3)
        return out.logprobs, out.lse, out.entropy

    # fp64 inputs are computed in fp64 end to end, so the default (tight) tolerances apply.
    assert torch.autograd.gradcheck(fn, (hidden, weight, bias))


def test_empty_input():
    hidden = torch.randn(0, 8, requires_grad=True)
    weight = torch.randn(5, 8, requires_grad=True)
    out = linear_logprobs(hidden, weight, torch.zeros(0, dtype=torch.long))
    assert out.shape == (0,)
    out.sum().backward()


@pytest.mark.parametrize(
    "mutate, exc, match",
    [
        (lambda a: a.update(hidden=a["hidden"].numpy()), TypeError, "hidden"),
        (lambda a: a.update(weight=a["weight"][:, :-1]), ValueError, "weight"),
        (lambda a: a.update(weight=a["weight"].double()), TypeError, "weight"),
        (lambda a: a.update(hidden=a["hidden"].long(), weight=a["weight"].long()), TypeError, "hidden"),
        (lambda a: a.update(targets=a["targets"].float()), TypeError, "targets"),
        (lambda a: a.update(targets=a["targets"][:-1]), ValueError, "targets"),
        (lambda a: a.update(weight=a["weight"][None]), ValueError, "weight"),
        (lambda a: a.update(bias=torch.zeros(3)), ValueError, "bias"),
        (lambda a: a.update(bias=torch.zeros(11, dtype=torch.float16)), TypeError, "bias"),
        (lambda a: a.update(temperature=0.0), ValueError, "temperature"),
        (lambda a: a.update(temperature=-1.0), ValueError, "temperature"),
        (lambda a: a.update(temperature=torch.tensor(1.0)), TypeError, "temperature"),
        (lambda a: a.update(softcap=0.0), ValueError, "softcap"),
        (lambda a: a.update(backend="cuda-magic"), ValueError, "backend"),
        (lambda a: a.update(chunk_size=0), ValueError, "chunk_size"),
        (lambda a: a.update(ignore_index=1.5), TypeError, "ignore_index"),
    ],
)
def test_bad_input_names_the_argument(mutate, exc, match):
    args = dict(hidden=torch.randn(6, 4), weight=torch.randn(11, 4), targets=torch.randint(0, 11, (6,)))
    mutate(args)
    hidden, weight, targets = args.pop("hidden"), args.pop("weight"), args.pop("targets")
    with pytest.raises(exc, match=match):
        linear_logprobs(hidden, weight, targets, **args)


def test_device_mismatch_is_reported():
    meta_weight = torch.empty(11, 4, device="meta")
    with pytest.raises(ValueError, match="weight"):
        linear_logprobs(torch.randn(6, 4), meta_weight, torch.randint(0, 11, (6,)))


def test_no_logits_sized_buffer_is_saved_by_the_torch_backend():
    # The chunked backend saves only inputs and O(N) statistics for backward.
    hidden, weight, targets, _ = make_inputs(64, 8, 500, torch.float32, seed=18)
    hidden.requires_grad_()
    logp, _, _ = ChunkedLinearLogprobs.apply(hidden, weight, targets, None, LogprobsParams(chunk_size=16))
    saved = [t for t in logp.grad_fn.saved_tensors if t is not None]
    assert max(t.numel() for t in saved) < 64 * 500


@pytest.mark.parametrize("backend", BACKENDS)
def test_nan_hidden_state_at_an_ignored_position_does_not_poison_gradients(backend):
    # A fully masked attention row can produce a NaN hidden state at a padding position; it has no
    # influence on any output, so it must not turn the whole lm_head gradient into NaN.
    hidden, weight, targets, bias = make_inputs(16, 12, 40, torch.float32, seed=19, bias=True, ignore_frac=0.0)
    targets[5] = -100
    hidden[5] = float("nan")
    upstream = torch.randn(16, generator=torch.Generator().manual_seed(20))
    got, (gh, gw, gb) = run_with_grads(
        lambda x, w, b: linear_logprobs(x, w, targets, bias=b, backend=backend), hidden, weight, bias, upstream
    )
    clean = hidden.clone()
    clean[5] = 0.0
    want, (wh, ww, wb) = run_with_grads(
        lambda x, w, b: oracle(x, w, targets, b)[0], clean, weight, bias, upstream.double()
    )
    assert got[5] == 0.0
    torch.testing.assert_close(gw.double(), ww.double(), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(gb.double(), wb.double(), atol=1e-5, rtol=1e-5)
    assert torch.all(gh[5] == 0)
