"""Normalisation scopes: mergeable statistics, gradient accumulation with StepNormalizer, and two
gloo processes under DDP whose global-scope gradients equal the single-process gradients on the
concatenated batch (rank and micro scopes differ, as they should).
"""
import math
import os
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from hypothesis import given, strategies as st

from iris_kernels.distributed import (
    RATIO,
    TILTED,
    StepNormalizer,
    StepStats,
    merge_stats,
    merge_term_stats,
)
from iris_kernels.losses import (
    get_loss,
    iris_loss,
    kappa_from_stats,
    loss_term_stats,
)
from iris_kernels.tilted import _tilted_stats_torch


# --------------------------------------------------------------------------------------------
# Mergeable statistics
# --------------------------------------------------------------------------------------------
@given(
    n=st.integers(2, 60),
    parts=st.integers(2, 6),
    t=st.sampled_from([0.0, 1e-6, -0.3, 2.0]),
    offset=st.sampled_from([0.0, 50.0]),
    seed=st.integers(0, 2**16),
)
def test_merged_statistics_equal_the_whole_batch(n, parts, t, offset, seed):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(n, generator=gen, dtype=torch.float64) * 3 + offset
    cuts = sorted(torch.randperm(n - 1, generator=gen)[: min(parts, n) - 1].add(1).tolist())
    pieces = torch.tensor_split(x, cuts)
    tt = torch.tensor(t, dtype=torch.float64)
    merged = merge_stats(TILTED, torch.stack([_tilted_stats_torch(p, tt) for p in pieces]))
    whole = _tilted_stats_torch(x, tt)
    torch.testing.assert_close(merged, whole, rtol=1e-10, atol=1e-9)
    assert kappa_from_stats(merged, tt).item() == pytest.approx(kappa_from_stats(whole, tt).item(), rel=1e-12, abs=1e-12)


def test_kernel_statistics_merge_like_torch_statistics():
    from iris_kernels.ops.tilted_risk import tilted_risk_fwd
    from iris_kernels.losses import SERIES_EPS

    x = torch.randn(1500, dtype=torch.float64) * 2
    tt = torch.tensor(0.8, dtype=torch.float64)
    parts = [tilted_risk_fwd(p, tt, SERIES_EPS)[1] for p in torch.tensor_split(x, [1, 700, 701])]
    torch.testing.assert_close(merge_stats(TILTED, torch.stack(parts)), _tilted_stats_torch(x, tt), rtol=1e-10, atol=1e-9)


def test_ratio_statistics_merge_by_sum():
    a = torch.tensor([3.0, 4.0], dtype=torch.float64)
    b = torch.tensor([-1.0, 6.0], dtype=torch.float64)
    torch.testing.assert_close(merge_stats(RATIO, torch.stack([a, b])), torch.tensor([2.0, 10.0], dtype=torch.float64))
    with pytest.raises(ValueError, match="kind"):
        merge_stats("mean", torch.stack([a, b]))


# --------------------------------------------------------------------------------------------
# Gradient accumulation in one process
# --------------------------------------------------------------------------------------------
def _batch(n, m, seed):
    gen = torch.Generator().manual_seed(seed)
    pr = -torch.rand(n, generator=gen) * 300 - 10
    ps = -torch.rand(m, generator=gen) * 300 - 10
    rr = pr + torch.randn(n, generator=gen) * 2
    rs = ps + torch.randn(m, generator=gen) * 2
    tokens = torch.randint(5, 200, (n,), generator=gen)
    return pr, ps, rr, rs, tokens


LOSS_CASES = [
    ("iris", {"alpha": 0.0}),
    ("iris", {"alpha": 0.4, "beta": 0.5}),
    ("iris", {"alpha": 1.0}),
    ("iris", {"alpha": torch.tensor(2.5)}),
    ("spin", {}),
    ("dpo", {"variant": "hinge"}),
    ("space", {"mu": 2.0}),
    ("chi2", {}),
    ("sft", {}),
]


def _full_and_accumulated(name, hp, scope, divisor=1, backend="torch"):
    paired = name in ("spin", "dpo")
    n, m = (7, 7) if paired else (7, 10)
    pr, ps, rr, rs, tokens = _batch(n, m, seed=len(name))
    cut_r, cut_s = (3, 3) if paired else (3, 6)  # uneven micro-batches
    extra = (lambda sl: {"num_tokens_real": tokens[sl]}) if name == "sft" else (lambda sl: {})
    fn = get_loss(name)

    p_r, p_s = pr.clone().requires_grad_(True), ps.clone().requires_grad_(True)
    full, full_metrics = fn(p_r, p_s, rr, rs, **hp, **extra(slice(None)), return_metrics=True, backend=backend)
    full.backward()
    full_grads = (p_r.grad, p_s.grad if p_s.grad is not None else torch.zeros_like(ps))

    q_r, q_s = pr.clone().requires_grad_(True), ps.clone().requires_grad_(True)
    norm = StepNormalizer(name, scope=scope, accumulation_divisor=divisor, backend=backend, **hp)
    micro = [(slice(0, cut_r), slice(0, cut_s)), (slice(cut_r, None), slice(cut_s, None))]
    for sr, ss in micro:
        norm.observe(q_r[sr], q_s[ss], rr[sr], rs[ss], **extra(sr))
    values = []
    for sr, ss in micro:
        loss, metrics = norm(q_r[sr], q_s[ss], rr[sr], rs[ss], **extra(sr), return_metrics=True)
        (loss / divisor).backward()
        values.append((loss, metrics))
    acc_grads = (q_r.grad, q_s.grad if q_s.grad is not None else torch.zeros_like(ps))
    return (full, full_metrics, full_grads), values, acc_grads


@pytest.mark.parametrize("name,hp", LOSS_CASES, ids=[f"{n}-{i}" for i, (n, _) in enumerate(LOSS_CASES)])
@pytest.mark.parametrize("scope", ["rank", "global"])  # one process: global == rank
def test_accumulation_equals_full_batch(name, hp, scope):
    (full, full_metrics, full_grads), values, acc_grads = _full_and_accumulated(name, hp, scope)
    for g_acc, g_full in zip(acc_grads, full_grads):
        torch.testing.assert_close(g_acc, g_full, rtol=1e-6, atol=1e-9)
    for loss, metrics in values:  # each micro-batch reports the step's value
        assert loss.item() == pytest.approx(full.item(), rel=1e-6, abs=1e-7)
        if name == "iris":
            for k in ("real/ess", "syn/ess", "real/max_weight", "syn/mean_g", "real/kappa"):
                assert metrics[k].item() == pytest.approx(full_metrics[k].item(), rel=1e-6, abs=1e-7), k


def test_accumulation_with_triton_backend_and_divisor():
    hp = {"alpha": 0.7}
    (_, _, full_grads), _, acc_grads = _full_and_accumulated("iris", hp, "global", divisor=2, backend="triton")
    for g_acc, g_full in zip(acc_grads, full_grads):
        torch.testing.assert_close(g_acc, g_full, rtol=1e-6, atol=1e-9)


def test_micro_scope_is_a_different_estimator():
    (_, _, full_grads), _, acc_grads = _full_and_accumulated("iris", {"alpha": 0.5}, "micro")
    assert not torch.allclose(acc_grads[0], full_grads[0], rtol=1e-3, atol=1e-4)


def test_step_normalizer_validation():
    pr, ps, rr, rs, _ = _batch(4, 4, seed=0)
    with pytest.raises(ValueError, match="scope"):
        StepNormalizer("iris", alpha=0.5, scope="node")
    with pytest.raises(ValueError, match="unknown loss"):
        StepNormalizer("ipo")
    with pytest.raises(ValueError, match="accumulation_divisor"):
        StepNormalizer("iris", alpha=0.5, accumulation_divisor=0)
    with pytest.raises(ValueError, match="stats"):
        StepNormalizer("iris", alpha=0.5, stats=None)
    norm = StepNormalizer(iris_loss, alpha=0.5)
    with pytest.raises(ValueError, match="observe"):
        norm(pr, ps, rr, rs)
    with pytest.raises(ValueError, match="alpha"):  # hyper-parameters are validated on observe
        StepNormalizer("iris", alpha=-1.0).observe(pr, ps, rr, rs)
    norm.observe(pr, ps, rr, rs)
    stats = norm.finalize()
    assert isinstance(stats, StepStats) and stats.num_micro_batches == 1 and stats.grad_scale == 1.0
    with pytest.raises(RuntimeError, match="finalised"):
        norm.observe(pr, ps, rr, rs)
    with pytest.raises(ValueError, match="scope"):
        iris_loss(pr, ps, rr, rs, alpha=0.5, scope="rank", stats=stats)
    with pytest.raises(ValueError, match="'iris'"):
        get_loss("chi2")(pr, ps, rr, rs, scope="global", stats=stats)
    with pytest.raises(TypeError, match="StepStats"):
        iris_loss(pr, ps, rr, rs, alpha=0.5, scope="global", stats={"real": None})
    assert StepNormalizer("iris", alpha=0.5, scope="micro").finalize() is None


def test_merge_term_stats_rejects_mismatched_terms():
    pr, ps, rr, rs, _ = _batch(4, 4, seed=1)
    a = loss_term_stats("iris", pr, ps, rr, rs, alpha=0.5)
    b = loss_term_stats("chi2", pr, ps, rr, rs)
    assert merge_term_stats([a])["real"].kind == TILTED
    with pytest.raises(ValueError, match="terms"):
        merge_term_stats([a, {"pair": b["real"]}])


# --------------------------------------------------------------------------------------------
# Two gloo processes under DDP
# --------------------------------------------------------------------------------------------
D, V, T = 6, 11, 5
# Uneven per-rank batches (n differs per rank); SPIN/DPO need pairs, so its syn side reuses n.
REAL_SPLIT = [(0, 3), (3, 7)]
SYN_SPLIT = [(0, 5), (5, 7)]
ALPHA = 0.6


def _problem():
    gen = torch.Generator().manual_seed(1234)
    n, m = REAL_SPLIT[-1][1], SYN_SPLIT[-1][1]
    feats = torch.randn(n + m, T, D, generator=gen, dtype=torch.float64)
    targets = torch.randint(0, V, (n + m, T), generator=gen)
    lengths = torch.randint(2, T + 1, (n + m,), generator=gen)
    w0 = torch.randn(V, D, generator=gen, dtype=torch.float64) * 0.5
    w_ref = w0 + torch.randn(V, D, generator=gen, dtype=torch.float64) * 0.3
    return feats, targets, lengths, w0, w_ref, n


def _seq_logps(logits, targets, lengths):
    mask = torch.arange(T)[None, :] < lengths[:, None]
    tok = torch.log_softmax(logits, -1).gather(-1, targets[..., None]).squeeze(-1)
    return (tok * mask).sum(-1)


def _model(w0):
    model = torch.nn.Linear(D, V, bias=False, dtype=torch.float64)
    with torch.no_grad():
        model.weight.copy_(w0)
    return model


def _run_cases(model, fwd, rank_slices, sync_ctx):
    """Every case on one rank's data. fwd(rows) -> summed log-probs; returns {case: (grad, loss, metrics)}."""
    feats, targets, lengths, w0, w_ref, n = _problem()
    (r0, r1), (s0, s1) = rank_slices
    real_rows, syn_rows = torch.arange(r0, r1), n + torch.arange(s0, s1)
    pair_rows = n + torch.arange(r0, r1)  # paired synthetic rows for SPIN
    with torch.no_grad():
        ref = _seq_logps(feats @ w_ref.T, targets, lengths)
    out = {}

    def run(case, fn):
        model.zero_grad(set_to_none=True)
        loss, metrics = fn()
        out[case] = (model.weight.grad.detach().clone(), loss.detach().clone(), metrics)

    def single(scope, name="iris", syn=syn_rows, **hp):
        def go():
            lp_r, lp_s = fwd(real_rows), fwd(syn)
            loss, metrics = get_loss(name)(lp_r, lp_s, ref[real_rows], ref[syn], scope=scope, return_metrics=True, **hp)
            loss.backward()
            return loss, metrics
        return go

    def accumulated(scope, name="iris", **hp):
        def go():
            # two uneven micro-batches of this rank's rows
            halves_r = torch.tensor_split(real_rows, [1])
            halves_s = torch.tensor_split(syn_rows, [len(syn_rows) - 1])
            extra = (lambda rows: {"num_tokens_real": lengths[rows]}) if name == "sft" else (lambda rows: {})
            norm = StepNormalizer(name, scope=scope, **hp)
            with torch.no_grad():
                for hr, hs in zip(halves_r, halves_s):
                    norm.observe(fwd(hr), fwd(hs), ref[hr], ref[hs], **extra(hr))
            for i, (hr, hs) in enumerate(zip(halves_r, halves_s)):
                with sync_ctx(last=i == len(halves_r) - 1):
                    loss, metrics = norm(fwd(hr), fwd(hs), ref[hr], ref[hs], **extra(hr), return_metrics=True)
                    loss.backward()
            return loss, metrics
        return go

    run("iris-global", single("global", alpha=ALPHA))
    run("iris-global-tensor-alpha", single("global", alpha=torch.tensor(ALPHA)))
    run("iris-rank", single("rank", alpha=ALPHA))
    run("iris-accum-global", accumulated("global", alpha=ALPHA))
    run("iris-accum-micro", accumulated("micro", alpha=ALPHA))
    run("spin-global", single("global", name="spin", syn=pair_rows))
    run("sft-accum-global", accumulated("global", name="sft"))
    return out


class _NoSync:
    def __init__(self, ddp):
        self.ddp = ddp

    def __call__(self, last):
        import contextlib

        return contextlib.nullcontext() if last else self.ddp.no_sync()


def _worker(rank, world, port, outdir):
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        feats, targets, lengths, w0, _, _ = _problem()
        ddp = torch.nn.parallel.DistributedDataParallel(_model(w0))
        fwd = lambda rows: _seq_logps(ddp(feats[rows]), targets[rows], lengths[rows])  # noqa: E731
        out = _run_cases(ddp.module, fwd, (REAL_SPLIT[rank], SYN_SPLIT[rank]), _NoSync(ddp))
        torch.save(out, os.path.join(outdir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


def _single_process_reference():
    """The same losses on the concatenated batch in one process (one 'rank' holding everything)."""
    feats, targets, lengths, w0, _, n = _problem()
    model = _model(w0)
    fwd = lambda rows: _seq_logps(model(feats[rows]), targets[rows], lengths[rows])  # noqa: E731
    full = ((0, REAL_SPLIT[-1][1]), (0, SYN_SPLIT[-1][1]))
    import contextlib

    return _run_cases(model, fwd, full, lambda last: contextlib.nullcontext())


def _free_port():
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.distributed
@pytest.mark.timeout(240)
def test_two_gloo_ranks_match_single_process(tmp_path):
    mp.spawn(_worker, args=(2, _free_port(), str(tmp_path)), nprocs=2, join=True)
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=False) for r in range(2)]
    ref = _single_process_reference()

    for case in ("iris-global", "iris-global-tensor-alpha", "iris-accum-global", "spin-global", "sft-accum-global"):
        ref_grad, ref_loss, ref_metrics = ref[case]
        for r, out in enumerate(ranks):
            grad, loss, metrics = out[case]
            # DDP averaged the surrogate gradients: every rank holds the single-process gradient
            torch.testing.assert_close(grad, ref_grad, rtol=1e-9, atol=1e-12, msg=f"{case} rank {r}")
            assert loss.item() == pytest.approx(ref_loss.item(), rel=1e-6, abs=1e-7), case
        if case.startswith("iris"):
            for k, v in ref_metrics.items():
                if k in ("real/kappa", "syn/kappa", "real/ess", "syn/ess", "real/max_weight", "syn/max_weight", "real/mean_g", "syn/mean_g", "loss"):
                    assert ranks[0][case][2][k].item() == ranks[1][case][2][k].item(), (case, k)  # bit-identical
                    assert ranks[0][case][2][k].item() == pytest.approx(v.item(), rel=1e-6, abs=1e-7), (case, k)

    # per-rank and per-micro-batch normalisers are different (biased) estimators
    for case, ref_case in (("iris-rank", "iris-global"), ("iris-accum-micro", "iris-accum-global")):
        assert not torch.allclose(ranks[0][case][0], ref[ref_case][0], rtol=1e-3, atol=1e-6), case
    torch.testing.assert_close(ranks[0]["iris-rank"][0], ranks[1]["iris-rank"][0])  # still DDP-averaged
    assert math.isfinite(ranks[0]["iris-rank"][1].item())


def test_merge_keeps_a_part_whose_entries_are_all_minus_infinity_out_of_the_shift():
    # A part with every t·ℓ = -inf contributes nothing; it must not pull the common shift to 0 and
    # wash out a part whose log-sum-exp sits far below it.
    from iris_kernels.distributed import TILTED as _TILTED
    from iris_kernels.distributed import merge_stats
    from iris_kernels.losses import kappa_from_stats
    from iris_kernels.tilted import _tilted_stats_torch

    t = torch.tensor(1.0, dtype=torch.float64)
    low = torch.tensor([-1000.0, -1001.5, -999.0], dtype=torch.float64)
    dead = torch.tensor([-float("inf"), -float("inf")], dtype=torch.float64)
    merged = merge_stats(_TILTED, torch.stack([_tilted_stats_torch(dead, t), _tilted_stats_torch(low, t)]))
    whole = _tilted_stats_torch(torch.cat([dead, low]), t)
    assert kappa_from_stats(merged, t).item() == pytest.approx(kappa_from_stats(whole, t).item(), rel=1e-12)
    want = (torch.logsumexp(torch.cat([dead, low]), 0) - math.log(5)).item()
    assert kappa_from_stats(merged, t).item() == pytest.approx(want, rel=1e-12)


@pytest.mark.parametrize(
    "hparams, match",
    [(dict(alpha=-1.0), "alpha"), (dict(), "alpha"), (dict(alpha=0.5, gamma=1.0), "gamma"), (dict(alpha=0.5, beta=0.0), "beta")],
)
def test_step_normalizer_checks_hyper_parameters_at_construction(hparams, match):
    from iris_kernels.distributed import StepNormalizer as _StepNormalizer

    with pytest.raises(ValueError, match=match):
        _StepNormalizer("iris", scope="rank", **hparams)
