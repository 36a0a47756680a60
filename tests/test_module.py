"""SelfPlayLoss: the end-to-end module against (a) the composition of the public pieces,
linear_logprobs + per-row sums + the registry loss, on every backend, and (b) an fp64 oracle
written here from the formulas (materialised log-softmax, docs/math.md#objective closed form)."""
import math

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from iris_kernels import linear_logprobs, sequence_logprobs
from iris_kernels.losses import get_loss, iris_loss, spin_loss
from iris_kernels.module import SelfPlayLoss, split_rows, token_counts
from iris_kernels.schedules import CosineAlpha, GapAdaptiveAlpha, LinearAlpha, TemperatureScoreAlpha

BACKENDS = ["reference", "torch", "triton"]
B, T, H, V = 4, 9, 32, 67


def make_batch(b=B, t=T, h=H, v=V, *, seed=0, dtype=torch.float32, bias=False):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(b, t, h, generator=g).to(dtype).requires_grad_()
    # Scaled so the logits spread over several nats: log-probs far from uniform.
    weight = (torch.randn(v, h, generator=g) * 2.0 / math.sqrt(h)).to(dtype).requires_grad_()
    labels = torch.randint(0, v, (b, t), generator=g)
    for i in range(b):  # prompts of different lengths, and right padding on some rows
        labels[i, : 1 + i % 3] = -100
        if i % 2:
            labels[i, t - 1 - i // 2 :] = -100
    bvec = (torch.randn(v, generator=g) * 0.3).to(dtype).requires_grad_() if bias else None
    return hidden, weight, labels, bvec


def shifted(labels, ignore_index=-100):
    out = torch.full_like(labels, ignore_index)
    out[:, :-1] = labels[:, 1:]
    return out


def composed_seq(hidden, weight, labels, *, backend, bias=None, temperature=1.0, length_normalize=False):
    """Per-row sums built from the per-token op by hand."""
    targets = shifted(labels)
    tok = linear_logprobs(hidden, weight, targets, bias=bias, temperature=temperature, backend=backend)
    sums = tok.double().sum(-1)  # sequence_logprobs sums in fp64 and rounds once
    if length_normalize:
        sums = sums / (targets != -100).sum(-1).clamp(min=1)
    return sums.to(tok.dtype)


def grads(loss, *tensors):
    return torch.autograd.grad(loss, [x for x in tensors if x is not None])


def ref_from(hidden, weight, labels, seed=1, scale=3.0):
    """Reference log-probs that differ from the policy's (so g ≠ 0 and the weights are not uniform)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        s = sequence_logprobs(hidden, weight, labels, backend="torch")
    return s + scale * torch.randn(s.shape, generator=g)


def assert_close(a, b, tol):
    torch.testing.assert_close(a.double(), b.double(), atol=tol, rtol=tol)


# ----------------------------------------------------------------------------- the fp64 oracle


def iris_oracle(pr, ps, rr, rs, alpha, beta=1.0):
    """L = 1/(1−α)·log mean e^{−(1−α)g_R} + 1/α·log mean e^{αg_S}; the docs/math.md#limits values at α ∈ {0, 1}."""
    gr, gs = beta * (pr - rr), beta * (ps - rs)

    def kappa(ell, t):
        if t == 0:
            return ell.mean()
        return (torch.logsumexp(t * ell, 0) - math.log(ell.numel())) / t

    return kappa(-gr, 1.0 - alpha) + kappa(gs, alpha)


def naive_seq64(hidden, weight, labels, bias=None):
    z = hidden.double() @ weight.double().t()
    if bias is not None:
        z = z + bias.double()
    logp = torch.log_softmax(z, -1)
    tgt = shifted(labels)
    keep = tgt != -100
    tok = logp.gather(-1, tgt.clamp(min=0)[..., None]).squeeze(-1)
    return torch.where(keep, tok, torch.zeros_like(tok)).sum(-1)


@pytest.mark.parametrize("alpha", [0.0, 0.5, 1.0, 2.0])
def test_iris_matches_fp64_oracle(alpha):
    hidden, weight, labels, bias = make_batch(seed=3, dtype=torch.float64, bias=True)
    ref = ref_from(hidden, weight, labels, seed=4).double()
    is_real = [False, True, True, False]
    crit = SelfPlayLoss("iris", alpha=alpha, beta=0.7, backend="torch")
    loss, _ = crit(hidden, weight, labels, is_real, ref_logps=ref, bias=bias)
    got = grads(loss, hidden, weight, bias)

    s = naive_seq64(hidden, weight, labels, bias)
    want_loss = iris_oracle(s[[1, 2]], s[[0, 3]], ref[[1, 2]], ref[[0, 3]], alpha, beta=0.7)
    want = grads(want_loss, hidden, weight, bias)
    assert_close(loss, want_loss, 1e-6)  # the loss value is returned in fp32
    for a, b in zip(got, want):
        # The log-prob backends form fp32 logits whatever the input dtype: fp32-level agreement.
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-4)
    assert max(x.abs().max() for x in want) > 1e-2  # the gradients are not trivially zero


# ----------------------------------------------------------------------------- composition


LOSS_CASES = [
    ("iris", dict(alpha=0.5), [True, False, False, True]),
    ("iris", dict(alpha=2.0, beta=0.3), [False, True, True, True]),
    ("spin", dict(beta=0.1), [True, True, False, False]),
    ("dpo", dict(beta=0.2, variant="hinge"), [False, True, True, False]),
    ("space", dict(mu=2.0), [True, False, True, True]),
    ("chi2", dict(beta=0.5), [False, False, True, True]),
]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("loss_type, hp, is_real", LOSS_CASES)
def test_matches_composition(backend, loss_type, hp, is_real):
    hidden, weight, labels, _ = make_batch(seed=5)
    ref = ref_from(hidden, weight, labels, seed=6)
    crit = SelfPlayLoss(loss_type, backend=backend, **hp)
    loss, metrics = crit(hidden, weight, labels, is_real, ref_logps=ref)
    got = grads(loss, hidden, weight)

    s = composed_seq(hidden, weight, labels, backend=backend)
    r = [i for i, f in enumerate(is_real) if f]
    y = [i for i, f in enumerate(is_real) if not f]
    loss_backend = "triton" if backend == "triton" else "torch"
    want_loss = get_loss(loss_type)(s[r], s[y], ref[r], ref[y], backend=loss_backend, **hp)
    want = grads(want_loss, hidden, weight)
    assert_close(loss, want_loss, 1e-6)
    for a, b in zip(got, want):
        assert_close(a, b, 1e-5)
    assert all(float(x.abs().max()) > 1e-4 for x in want)
    assert loss.dtype == torch.float32 and loss.dim() == 0
    assert all(isinstance(v, torch.Tensor) and not v.requires_grad and v.dim() == 0 for v in metrics.values())
    assert_close(metrics["ref/syn_logps"], ref[y].mean(), 1e-6)


@pytest.mark.parametrize("backend", BACKENDS)
def test_bias_temperature_length_normalize_pass_through(backend):
    hidden, weight, labels, bias = make_batch(seed=7, bias=True)
    ref = ref_from(hidden, weight, labels, seed=8, scale=0.3) / 5.0
    crit = SelfPlayLoss("iris", alpha=0.7, temperature=1.7, length_normalize=True, backend=backend)
    loss, _ = crit(hidden, weight, labels, num_real=2, ref_logps=ref, bias=bias)
    got = grads(loss, hidden, weight, bias)
    s = composed_seq(hidden, weight, labels, backend=backend, bias=bias, temperature=1.7, length_normalize=True)
    want_loss = iris_loss(s[:2], s[2:], ref[:2], ref[2:], alpha=0.7, backend="torch")
    for a, b in zip(got, grads(want_loss, hidden, weight, bias)):
        assert_close(a, b, 1e-5)
    assert_close(loss, want_loss, 1e-6)


def test_bf16_triton_matches_composition():
    hidden, weight, labels, _ = make_batch(seed=9, dtype=torch.bfloat16)
    ref = ref_from(hidden, weight, labels, seed=10)
    loss, _ = SelfPlayLoss("iris", alpha=0.5, backend="triton")(hidden, weight, labels, num_real=2, ref_logps=ref)
    s = composed_seq(hidden, weight, labels, backend="triton")
    want_loss = iris_loss(s[:2], s[2:], ref[:2], ref[2:], alpha=0.5, backend="triton")
    assert_close(loss, want_loss, 1e-6)
    for a, b in zip(grads(loss, hidden, weight), grads(want_loss, hidden, weight)):
        assert a.dtype == torch.bfloat16
        assert_close(a, b, 1e-2)


# ----------------------------------------------------------------------------- reference modes


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_live_reference_equals_precomputed(backend):
    hidden, weight, labels, _ = make_batch(seed=11)
    g = torch.Generator().manual_seed(12)
    ref_hidden = torch.randn(B, T, 24, generator=g).requires_grad_()  # a reference with another width
    ref_weight = (torch.randn(V, 24, generator=g) * 0.4).requires_grad_()
    crit = SelfPlayLoss("iris", alpha=1.5, backend=backend)
    live, m_live = crit(hidden, weight, labels, [True, False, True, False], ref_hidden=ref_hidden, ref_weight=ref_weight)
    ref = sequence_logprobs(ref_hidden.detach(), ref_weight.detach(), labels, backend=backend)
    pre, m_pre = crit(hidden, weight, labels, [True, False, True, False], ref_logps=ref)
    assert_close(live, pre, 1e-6)
    for a, b in zip(grads(live, hidden, weight), grads(pre, hidden, weight)):
        assert_close(a, b, 1e-6)
    assert_close(m_live["ref/real_logps"], m_pre["ref/real_logps"], 1e-6)
    # The reference is a constant: no graph reaches it.
    live2, _ = crit(hidden, weight, labels, num_real=2, ref_hidden=ref_hidden, ref_weight=ref_weight)
    live2.backward()
    assert ref_hidden.grad is None and ref_weight.grad is None
    assert hidden.grad is not None


def test_precomputed_reference_is_detached():
    hidden, weight, labels, _ = make_batch(seed=13)
    ref = ref_from(hidden, weight, labels).requires_grad_()
    loss, _ = SelfPlayLoss("iris", alpha=0.5, backend="torch")(hidden, weight, labels, num_real=2, ref_logps=ref)
    loss.backward()
    assert ref.grad is None


@pytest.mark.parametrize("backend", BACKENDS)
def test_policy_equals_reference(backend):
    """IRIS: L = 0 with uniform weights; SPIN: L = log 2 (docs/math.md#objective, #baselines)."""
    hidden, weight, labels, _ = make_batch(seed=14)
    ref_h, ref_w = hidden.detach().clone(), weight.detach().clone()
    for alpha in (0.0, 0.5, 1.0, 2.0):
        loss, m = SelfPlayLoss("iris", alpha=alpha, backend=backend)(
            hidden, weight, labels, [True, True, True, False], ref_hidden=ref_h, ref_weight=ref_w
        )
        assert abs(float(loss.detach())) < 1e-6
        assert_close(m["real/max_weight"], torch.tensor(1 / 3), 1e-6)
        assert_close(m["real/ess"], torch.tensor(3.0), 1e-5)
        assert_close(m["syn/ess"], torch.tensor(1.0), 1e-6)
    loss, _ = SelfPlayLoss("spin", backend=backend)(hidden, weight, labels, num_real=2, ref_hidden=ref_h, ref_weight=ref_w)
    assert_close(loss, torch.tensor(math.log(2.0)), 1e-6)


# ----------------------------------------------------------------------------- row layouts


@given(perm=st.permutations(range(6)), n=st.integers(1, 5))
def test_row_layouts_agree(perm, n):
    """Any layout of the same rows gives the same loss and (row-permuted) gradient."""
    hidden, weight, labels, _ = make_batch(b=6, t=5, h=8, v=11, seed=15)
    ref = ref_from(hidden, weight, labels, seed=16)
    crit = SelfPlayLoss("iris", alpha=0.6, backend="torch")
    base, _ = crit(hidden, weight, labels, num_real=n, ref_logps=ref)
    (g_base,) = grads(base, hidden)
    idx = list(perm)
    flags = [i < n for i in idx]  # row j of the permuted batch is original row idx[j]
    h2 = hidden.detach()[idx].requires_grad_()
    for is_real in (flags, torch.tensor(flags), torch.tensor([int(f) for f in flags])):
        loss, _ = crit(h2, weight, labels[idx], is_real, ref_logps=ref[idx])
        (g,) = grads(loss, h2)
        assert_close(loss, base, 1e-6)
        assert_close(g, g_base[idx], 1e-6)


def test_split_rows_fast_path_and_indices():
    real, syn, n, m = split_rows(5, torch.device("cpu"), num_real=2)
    assert (real, syn, n, m) == (slice(0, 2), slice(2, 5), 2, 3)
    real, syn, n, m = split_rows(4, torch.device("cpu"), is_real=[1, 1, 0, 0])
    assert (real, syn) == (slice(0, 2), slice(2, 4))  # a prefix layout is sliced, not gathered
    real, syn, n, m = split_rows(4, torch.device("cpu"), is_real=[False, True, False, True])
    assert real.tolist() == [1, 3] and syn.tolist() == [0, 2] and (n, m) == (2, 2)


def test_spin_pairs_ith_real_with_ith_synthetic():
    hidden, weight, labels, _ = make_batch(b=6, seed=17)
    ref = ref_from(hidden, weight, labels, seed=18)
    is_real = [False, True, True, False, True, False]  # real rows 1,2,4 pair with synthetic 0,3,5
    loss, _ = SelfPlayLoss("spin", beta=0.1, backend="torch")(hidden, weight, labels, is_real, ref_logps=ref)
    s = composed_seq(hidden, weight, labels, backend="torch")
    want = spin_loss(s[[1, 2, 4]], s[[0, 3, 5]], ref[[1, 2, 4]], ref[[0, 3, 5]], beta=0.1)
    other = spin_loss(s[[1, 2, 4]], s[[3, 0, 5]], ref[[1, 2, 4]], ref[[3, 0, 5]], beta=0.1)
    assert_close(loss, want, 1e-6)
    assert abs(float((want - other).detach())) > 1e-4  # the pairing matters, so the check can fail


# ----------------------------------------------------------------------------- other losses + options


def test_sft_is_token_mean_nll():
    hidden, weight, labels, _ = make_batch(seed=19)
    loss, m = SelfPlayLoss("sft", backend="torch")(hidden, weight, labels, [True, False, True, True])
    tgt = shifted(labels)
    tok = linear_logprobs(hidden, weight, tgt, backend="torch")
    keep = [0, 2, 3]
    want = -tok[keep].sum() / (tgt[keep] != -100).sum()
    assert_close(loss, want, 1e-6)
    for a, b in zip(grads(loss, hidden, weight), grads(want, hidden, weight)):
        assert_close(a, b, 1e-6)
    # SFT needs no synthetic row and no reference
    only_real, _ = SelfPlayLoss("sft", backend="torch")(hidden[keep], weight, labels[keep], num_real=3)
    assert_close(only_real, want, 1e-6)


def test_packed_batch_equals_padded():
    hidden, weight, labels, _ = make_batch(seed=20)
    lengths = [9, 6, 8, 4]
    for i, L in enumerate(lengths):
        labels[i, L:] = -100
    ref = ref_from(hidden, weight, labels, seed=21)
    crit = SelfPlayLoss("iris", alpha=0.5, backend="torch")
    padded, _ = crit(hidden, weight, labels, num_real=2, ref_logps=ref)
    packed_h = torch.cat([hidden[i, :L] for i, L in enumerate(lengths)]).detach().requires_grad_()
    packed_l = torch.cat([labels[i, :L] for i, L in enumerate(lengths)])
    cu = torch.tensor([0, 9, 15, 23, 27], dtype=torch.int32)
    packed, _ = crit(packed_h, weight, packed_l, num_real=2, ref_logps=ref, cu_seqlens=cu)
    assert_close(packed, padded, 1e-6)
    counts = token_counts(packed_l, shift=True, ignore_index=-100, cu_seqlens=cu)
    assert counts.tolist() == (shifted(labels) != -100).sum(-1).float().tolist()


@pytest.mark.parametrize("schedule", [LinearAlpha(2.0, 0.5, 10), CosineAlpha(0.0, 3.0, 7)])
def test_schedule_drives_alpha(schedule):
    hidden, weight, labels, _ = make_batch(seed=22)
    ref = ref_from(hidden, weight, labels, seed=23)
    crit = SelfPlayLoss("iris", alpha=schedule, backend="torch")
    for step in (0, 3, 20):
        loss, m = crit(hidden, weight, labels, num_real=2, ref_logps=ref, step=step)
        a = schedule.alpha(step)
        assert float(m["alpha"]) == pytest.approx(a)
        fixed, _ = SelfPlayLoss("iris", alpha=a, backend="torch")(hidden, weight, labels, num_real=2, ref_logps=ref)
        assert float(loss.detach()) == float(fixed.detach())
    with pytest.raises(ValueError, match="step"):
        crit(hidden, weight, labels, num_real=2, ref_logps=ref)


def test_schedule_state_travels_with_module_state_dict():
    a = SelfPlayLoss("iris", alpha=TemperatureScoreAlpha())
    a.schedule.update_gap(torch.tensor([-1.0]), torch.tensor([-3.0]))
    a.schedule.update_gap(torch.tensor([-1.0]), torch.tensor([-1.5]))
    b = SelfPlayLoss("iris", alpha="temperature_score")
    b.load_state_dict(a.state_dict())
    assert b.alpha() == a.alpha() == pytest.approx(0.5 + 1.5 * 0.25)
    with pytest.raises(ValueError, match="schedule"):
        SelfPlayLoss("spin").load_state_dict(a.state_dict())


@pytest.mark.parametrize("loss_type, hp", [("iris", dict(alpha=0.5)), ("sft", {})])
def test_gradient_accumulation_with_step_normalizer(loss_type, hp):
    """Two micro-batches under scope="rank" give the full batch's loss and gradient."""
    hidden, weight, labels, _ = make_batch(b=8, seed=24)
    ref = ref_from(hidden, weight, labels, seed=25)
    flags = [True, False, True, True, False, True, False, False]
    full, _ = SelfPlayLoss(loss_type, backend="torch", **hp)(hidden, weight, labels, flags, ref_logps=ref)
    want = grads(full, hidden, weight)

    crit = SelfPlayLoss(loss_type, backend="torch", scope="rank", **hp)
    norm = crit.make_step_normalizer(step=0)
    micro = [slice(0, 3), slice(3, 8)]  # uneven micro-batches, uneven real/synthetic splits
    for sl in micro:
        crit.observe(norm, hidden[sl], weight, labels[sl], flags[sl], ref_logps=ref[sl])
    total = [torch.zeros_like(hidden), torch.zeros_like(weight)]
    for sl in micro:
        loss, _ = crit(hidden[sl], weight, labels[sl], flags[sl], ref_logps=ref[sl], stats=norm.stats)
        assert_close(loss, full, 1e-6)  # the step's loss on every micro-batch
        for acc, g in zip(total, grads(loss, hidden, weight)):
            acc += g
    for a, b in zip(total, want):
        assert_close(a, b, 1e-5)
    # The plain per-micro-batch estimator differs: the test can tell the scopes apart.
    micro_loss, _ = SelfPlayLoss(loss_type, backend="torch", scope="micro", **hp)(
        hidden[micro[0]], weight, labels[micro[0]], flags[micro[0]], ref_logps=ref[micro[0]]
    )
    assert abs(float((micro_loss - full).detach())) > 1e-4
    with pytest.raises(TypeError, match="normalizer"):
        crit.observe(None, hidden, weight, labels, flags, ref_logps=ref)


def test_nan_in_nan_out():
    hidden, weight, labels, _ = make_batch(seed=26)
    ref = ref_from(hidden, weight, labels, seed=27)
    h = hidden.detach().clone()
    h[3, 4, 0] = float("nan")  # a scored position of a synthetic row
    loss, _ = SelfPlayLoss("iris", alpha=0.5, backend="torch")(h, weight, labels, num_real=2, ref_logps=ref)
    assert torch.isnan(loss)
    nan_ref = ref.clone()
    nan_ref[0] = float("nan")
    loss, _ = SelfPlayLoss("spin", backend="torch")(hidden, weight, labels, num_real=2, ref_logps=nan_ref)
    assert torch.isnan(loss)


# ----------------------------------------------------------------------------- validation


@pytest.mark.parametrize(
    "kwargs, exc, name",
    [
        (dict(loss_type="kl"), ValueError, "iris"),
        (dict(loss_type="iris"), ValueError, "alpha"),
        (dict(loss_type="iris", alpha=-0.5), ValueError, "alpha"),
        (dict(loss_type="iris", alpha="exp"), ValueError, "alpha: unknown schedule"),
        (dict(loss_type="iris", alpha=torch.tensor(0.5)), TypeError, "alpha"),
        (dict(loss_type="iris", alpha={"type": "linear", "alpha_start": -1, "alpha_end": 1, "num_steps": 3}), ValueError, "alpha_start"),
        (dict(loss_type="spin", alpha=0.5), ValueError, "alpha"),
        (dict(loss_type="iris", alpha=0.5, beta=0.0), ValueError, "beta"),
        (dict(loss_type="iris", alpha=0.5, beta="1"), TypeError, "beta"),
        (dict(loss_type="sft", beta=0.1), ValueError, "beta"),
        (dict(loss_type="spin", mu=2.0), ValueError, "mu"),
        (dict(loss_type="iris", alpha=0.5, stats=None), ValueError, "stats"),
        (dict(loss_type="iris", alpha=0.5, temperature=0.0), ValueError, "temperature"),
        (dict(loss_type="iris", alpha=0.5, softcap=-1.0), ValueError, "softcap"),
        (dict(loss_type="iris", alpha=0.5, ignore_index=1.5), TypeError, "ignore_index"),
        (dict(loss_type="iris", alpha=0.5, backend="cuda"), ValueError, "backend"),
        (dict(loss_type="iris", alpha=0.5, scope="world"), ValueError, "scope"),
        (dict(loss_type="sft", length_normalize=True), ValueError, "length_normalize"),
        (dict(loss_type="iris", alpha=0.5, shift=1), TypeError, "shift"),
    ],
)
def test_constructor_validation(kwargs, exc, name):
    with pytest.raises(exc, match=name):
        SelfPlayLoss(**kwargs)


def test_forward_validation():
    hidden, weight, labels, _ = make_batch(seed=28)
    ref = ref_from(hidden, weight, labels)
    iris = SelfPlayLoss("iris", alpha=0.5, backend="torch")
    cases = [
        (lambda: iris(hidden, weight, labels, ref_logps=ref), ValueError, "is_real"),
        (lambda: iris(hidden, weight, labels, [True] * 4, num_real=2, ref_logps=ref), ValueError, "is_real"),
        (lambda: iris(hidden, weight, labels, [True, False, True], ref_logps=ref), ValueError, "is_real"),
        (lambda: iris(hidden, weight, labels, [True, False, 2, True], ref_logps=ref), ValueError, "is_real"),
        (lambda: iris(hidden, weight, labels, torch.ones(4, device="meta", dtype=torch.bool), ref_logps=ref), ValueError, "host"),
        (lambda: iris(hidden, weight, labels, torch.ones(4), ref_logps=ref), TypeError, "is_real"),
        (lambda: iris(hidden, weight, labels, "1100", ref_logps=ref), TypeError, "is_real"),
        (lambda: iris(hidden, weight, labels, num_real=5, ref_logps=ref), ValueError, "num_real"),
        (lambda: iris(hidden, weight, labels, num_real=2.0, ref_logps=ref), TypeError, "num_real"),
        (lambda: iris(hidden, weight, labels, num_real=4, ref_logps=ref), ValueError, "synthetic"),
        (lambda: iris(hidden, weight, labels, num_real=0, ref_logps=ref), ValueError, "annotated"),
        (lambda: iris(hidden, weight, labels, num_real=2), ValueError, "ref_logps"),
        (lambda: iris(hidden, weight, labels, num_real=2, ref_logps=ref[:3]), ValueError, "ref_logps"),
        (lambda: iris(hidden, weight, labels, num_real=2, ref_logps=ref.long()), TypeError, "ref_logps"),
        (lambda: iris(hidden, weight, labels, num_real=2, ref_logps=ref, ref_hidden=hidden, ref_weight=weight), ValueError, "not both"),
        (lambda: iris(hidden, weight, labels, num_real=2, ref_hidden=hidden), ValueError, "ref_weight"),
        (lambda: iris(hidden, weight, labels, num_real=2, ref_hidden=hidden[:, :5], ref_weight=weight), ValueError, "ref_hidden"),
        (lambda: iris(hidden, weight, labels, num_real=2, ref_hidden=hidden, ref_weight=weight[:5]), ValueError, "ref_weight"),
        (lambda: iris(hidden, weight, labels, num_real=2, ref_logps=ref, ref_bias=torch.zeros(V)), ValueError, "ref_bias"),
        (lambda: iris(hidden[0], weight, labels, num_real=2, ref_logps=ref), ValueError, "hidden"),
        (lambda: iris(hidden, weight, labels.float(), num_real=2, ref_logps=ref), TypeError, "labels"),
        (lambda: iris(hidden, weight[:, :5], labels, num_real=2, ref_logps=ref), ValueError, "weight"),
        (lambda: SelfPlayLoss("spin")(hidden, weight, labels, [True, True, True, False], ref_logps=ref), ValueError, "pairs"),
    ]
    for call, exc, name in cases:
        with pytest.raises(exc, match=name):
            call()


# ----------------------------------------------------------------------------- GPU


@pytest.mark.gpu
@pytest.mark.parametrize("loss_type, hp", [("iris", dict(alpha=0.5)), ("spin", {})])
def test_cuda_fused_path_matches_torch_and_never_syncs(loss_type, hp):
    hidden, weight, labels, _ = make_batch(b=8, t=64, h=128, v=1000, seed=29)
    ref = ref_from(hidden, weight, labels, seed=30).cuda()
    h = hidden.detach().cuda().requires_grad_()
    w = weight.detach().cuda().requires_grad_()
    lab = labels.cuda()
    is_real = [True, False, False, True, True, False, True, False]  # index (non-prefix) path
    crit = SelfPlayLoss(loss_type, backend="auto", **hp)
    crit(h, w, lab, is_real, ref_logps=ref)[0].backward()  # warm-up: compile the kernels first
    h.grad = w.grad = None
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        loss, metrics = crit(h, w, lab, is_real, ref_logps=ref)
        loss.backward()
    finally:
        torch.cuda.set_sync_debug_mode("default")
    want, _ = SelfPlayLoss(loss_type, backend="torch", **hp)(hidden, weight, labels, is_real, ref_logps=ref.cpu())
    gh, gw = grads(want, hidden, weight)
    assert_close(loss.cpu(), want, 1e-5)
    assert_close(h.grad.cpu(), gh, 1e-4)
    assert_close(w.grad.cpu(), gw, 1e-4)


@pytest.mark.parametrize(
    "kwargs, exc, match",
    [
        (dict(loss_type="space", mu=0.0), ValueError, "mu"),
        (dict(loss_type="spin", variant="ipo"), ValueError, "variant"),
        (dict(loss_type="chi2", tau=2.0), ValueError, "tau"),
    ],
)
def test_loss_hyper_parameters_are_checked_at_construction(kwargs, exc, match):
    with pytest.raises(exc, match=match):
        SelfPlayLoss(**kwargs)


def test_unfed_gap_adaptive_schedule_raises_in_a_training_step():
    """make_schedule("gap_adaptive") in one's own trainer: a loss call before update_gap is an
    error naming what to do, not a silent α = α_max (issue 21 item 4)."""
    hidden, weight, labels, _ = make_batch(seed=26)
    ref = ref_from(hidden, weight, labels, seed=27)
    crit = SelfPlayLoss("iris", alpha=GapAdaptiveAlpha(), backend="torch")
    with pytest.raises(RuntimeError, match="not been fed.*update_gap"):
        crit(hidden, weight, labels, num_real=2, ref_logps=ref, step=0)


# ----------------------------------------------------------- host labels -> num_valid (issue 16, item 5)
def test_labels_for_op_counts_host_labels_only_for_an_op_off_the_host(monkeypatch):
    import iris_kernels.module as module

    _, _, labels = make_batch(seed=5)[:3]
    labels = labels.clone()
    labels[0, :3] = -100
    expected = int((shifted(labels) != -100).sum())
    # On this CPU-only machine the op's device is the CPU: no count, labels untouched.
    out, count = module.labels_for_op(labels, torch.device("cpu"), shift=True, ignore_index=-100)
    assert out is labels and count is None
    # Device labels (meta stands in for a GPU): never counted (that would read the device back).
    meta = torch.empty(labels.shape, dtype=torch.long, device="meta")
    assert module.labels_for_op(meta, torch.device("cpu"), shift=True, ignore_index=-100)[1] is None
    # The decision for an op on another device, exercised with the CPU playing that device.
    monkeypatch.setattr(module, "_op_on_other_device", lambda device: True)
    assert module.labels_for_op(labels, torch.device("cpu"), shift=True, ignore_index=-100)[1] == expected
    assert module.labels_for_op(labels, torch.device("cpu"), shift=False, ignore_index=-100)[1] == \
        int((labels != -100).sum())
    # Packed: the shift is per sequence (cu_seqlens on the host), as token_counts does it.
    packed = labels.reshape(1, -1)
    cu = torch.arange(0, labels.numel() + 1, labels.shape[1])
    got = module.labels_for_op(packed, torch.device("cpu"), shift=True, ignore_index=-100, cu_seqlens=cu)[1]
    assert got == int(token_counts(packed, shift=True, ignore_index=-100, cu_seqlens=cu).sum())
    assert module.labels_for_op(packed, torch.device("cpu"), shift=True, ignore_index=-100,
                                cu_seqlens=cu.to("meta"))[1] is None


@pytest.mark.parametrize("loss_type", ["iris", "sft"])
def test_selfplay_loss_passes_the_host_count_to_the_op(monkeypatch, loss_type):
    """With host labels and an op off the host, every sequence_logprobs call gets num_valid."""
    import iris_kernels.module as module

    hidden, weight, labels = make_batch(seed=6)[:3]
    labels = labels.clone()
    labels[1, :4] = -100
    expected = int((shifted(labels) != -100).sum())
    crit = SelfPlayLoss(loss_type, **({} if loss_type == "sft" else {"alpha": 0.5}), backend="torch")
    kw = dict(num_real=hidden.shape[0] // 2)
    if loss_type != "sft":
        kw.update(ref_hidden=hidden + 0.1, ref_weight=weight)
    base, _ = crit(hidden, weight, labels, **kw)

    seen = []
    real = module.sequence_logprobs

    def spy(*args, num_valid=None, **kwargs):
        seen.append(num_valid)
        return real(*args, num_valid=num_valid, **kwargs)

    monkeypatch.setattr(module, "sequence_logprobs", spy)
    monkeypatch.setattr(module, "_op_on_other_device", lambda device: True)
    loss, _ = crit(hidden, weight, labels, **kw)
    assert seen == [expected] * (1 if loss_type == "sft" else 2)
    torch.testing.assert_close(loss, base, rtol=0, atol=0)
    # Device labels (the op's own device, unpatched decision): no host count.
    monkeypatch.setattr(module, "_op_on_other_device", lambda device: False)
    seen.clear()
    crit(hidden, weight, labels, **kw)
    assert seen and all(n is None for n in seen)
