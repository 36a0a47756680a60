"""The frozen-head path (frozen_head.py, issue 16 item 6) against an fp64 oracle, in the interpreter.

A head whose weight (and bias) need no gradient and a call without entropy take
``FrozenHeadLinearLogprobs``: the forward computes d log p / d hidden per row (every temperature
and soft-cap chain factor), the backward only scales it. Checked here: the path is picked (and
only then), values and the hidden-state gradient under random upstream gradients of log p and
lse, odd shapes (N 37, V 163, H 48), several row chunks, ignored and out-of-order rows, bias,
soft-cap, temperature, every input dtype and compaction mode, weight.grad staying None, NaN in an
ignored row not leaking.
"""
import pytest
import torch

from iris_kernels import linear_logprobs
from iris_kernels import frozen_head
from iris_kernels.tuning import padded_vocab

N, H, V = 37, 48, 163
# 16-row chunks (the interpreter's row tile): 37 rows make chunks of 16, 16 and 5.
SMALL_WS = 16 * padded_vocab(V) * 4
GRAD_RTOL = {torch.float32: 2e-5, torch.bfloat16: 2e-2, torch.float16: 4e-3}
VAL_ATOL = {torch.float32: 2e-5, torch.bfloat16: 2e-4, torch.float16: 2e-4}


def _inputs(dtype, seed=0, with_bias=False):
    g = torch.Generator().manual_seed(seed)
    hidden = (torch.randn(N, H, generator=g) * 1.5).to(dtype)
    weight = (torch.randn(V, H, generator=g) / H ** 0.5 * 2.0).to(dtype)
    bias = (torch.randn(V, generator=g) * 0.5).to(dtype) if with_bias else None
    targets = torch.randint(0, V, (N,), generator=g)
    ignored = torch.rand(N, generator=g) < 0.3
    targets[ignored] = -100
    targets[0] = -100
    targets[1] = V - 1
    return hidden, weight, bias, targets


def _oracle(hidden, weight, bias, targets, up_lp, up_lse, temperature, softcap):
    """fp64 autograd through the plain formula: (logp, lse, d loss / d hidden)."""
    h = hidden.double().detach().requires_grad_()
    y = h @ weight.double().t()
    if bias is not None:
        y = y + bias.double()
    if softcap is not None:
        y = softcap * torch.tanh(y / softcap)
    z = y / temperature
    lse = torch.logsumexp(z, -1)
    scored = targets != -100
    logp = torch.where(scored, z.gather(1, targets.clamp(min=0)[:, None]).squeeze(1) - lse, 0.0)
    loss = (logp * up_lp).sum()
    if up_lse is not None:
        loss = loss + (lse * up_lse).sum()
    loss.backward()
    return logp.detach(), lse.detach(), h.grad


def _path(t):
    """The name of the first iris_kernels Function in t's graph (ViewBackward etc. skipped)."""
    todo = [t.grad_fn]
    while todo:
        node = todo.pop(0)
        if node is None:
            continue
        name = type(node).__name__
        if "LinearLogprobs" in name:
            return name
        todo.extend(fn for fn, _ in node.next_functions)
    return None


def _run(hidden, weight, bias, targets, *, up_lp, up_lse, compact, **opts):
    h = hidden.detach().clone().requires_grad_()
    w = weight.detach()  # frozen: no gradient
    num_valid = int((targets != -100).sum()) if compact == "host" else None
    out = linear_logprobs(h, w, targets, bias=bias, backend="triton", compact=bool(compact), num_valid=num_valid,
                          workspace_bytes=SMALL_WS, return_lse=up_lse is not None, **opts)
    logp = out if isinstance(out, torch.Tensor) else out.logprobs
    assert _path(logp).startswith("FrozenHeadLinearLogprobs"), _path(logp)
    loss = (logp * up_lp).sum()
    if up_lse is not None:
        loss = loss + (out.lse * up_lse).sum()
    loss.backward()
    assert w.grad is None
    return logp.detach(), None if up_lse is None else out.lse.detach(), h.grad


def _rel(a, b):
    return ((a.double() - b).abs().max() / b.abs().max()).item()


CASES = [
    dict(),
    dict(bias=True, softcap=4.0, temperature=0.7),
    dict(softcap=2.5),
    dict(temperature=1.9, bias=True),
]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("case", range(len(CASES)))
@pytest.mark.parametrize("mode", ["lse", False, "device", "host"])
def test_frozen_head_matches_fp64(dtype, case, mode):
    opts = dict(CASES[case])
    with_bias = opts.pop("bias", False)
    hidden, weight, bias, targets = _inputs(dtype, seed=case, with_bias=with_bias)
    g = torch.Generator().manual_seed(100 + case)
    up_lp = torch.randn(N, generator=g)
    up_lse = torch.randn(N, generator=g) if mode == "lse" else None
    compact = False if mode == "lse" else mode
    logp, lse, gh = _run(hidden, weight, bias, targets, up_lp=up_lp, up_lse=up_lse, compact=compact, **opts)
    ref_lp, ref_lse, ref_gh = _oracle(hidden, weight, bias, targets, up_lp, up_lse,
                                      opts.get("temperature", 1.0), opts.get("softcap"))
    assert gh.dtype == dtype
    assert (logp.double() - ref_lp).abs().max().item() < VAL_ATOL[dtype]
    if lse is not None:
        assert (lse.double() - ref_lse).abs().max().item() < VAL_ATOL[dtype]
    assert _rel(gh, ref_gh) < GRAD_RTOL[dtype], _rel(gh, ref_gh)
    if mode != "lse":  # only log p: ignored rows get exactly zero gradient
        assert (gh[targets == -100] == 0).all()


def test_lse_only_gradient_and_nan_in_an_ignored_row():
    hidden, weight, bias, targets = _inputs(torch.float32, seed=7, with_bias=True)
    g = torch.Generator().manual_seed(7)
    # lse alone (no log-p gradient): exercises the c_t W_t / T - G recovery on its own.
    up_lse = torch.randn(N, generator=g)
    _, lse, gh = _run(hidden, weight, bias, targets, up_lp=torch.zeros(N), up_lse=up_lse, compact=False,
                      softcap=3.0, temperature=0.8)
    _, _, ref_gh = _oracle(hidden, weight, bias, targets, torch.zeros(N), up_lse, 0.8, 3.0)
    assert _rel(gh, ref_gh) < 2e-5
    # NaN in an ignored row stays in that row's (constant) output: other rows' gradients finite.
    bad = hidden.clone()
    bad[0] = float("nan")  # targets[0] is ignored
    for compact in (False, "device", "host"):
        logp, _, gh = _run(bad, weight, bias, targets, up_lp=torch.randn(N, generator=g), up_lse=None,
                           compact=compact)
        assert torch.isfinite(logp).all() and torch.isfinite(gh).all()
        assert (gh[0] == 0).all()


def test_dispatch_conditions(monkeypatch):
    """Picked only when hidden alone needs a gradient and no entropy is returned."""
    hidden, weight, bias, targets = _inputs(torch.float32, with_bias=True)

    def fn(h, w, b, **kw):
        out = linear_logprobs(h, w, targets, bias=b, backend="triton", **kw)
        t = out if isinstance(out, torch.Tensor) else out.logprobs
        return _path(t) if t.grad_fn is not None else None

    h = hidden.clone().requires_grad_()
    assert fn(h, weight, bias).startswith("FrozenHead")
    assert not fn(h, weight.clone().requires_grad_(), bias).startswith("FrozenHead")
    assert not fn(h, weight, bias.clone().requires_grad_()).startswith("FrozenHead")
    assert not fn(h, weight, bias, return_entropy=True).startswith("FrozenHead")
    assert fn(hidden, weight.clone().requires_grad_(), bias) is not None  # weight grad: default path
    with torch.no_grad():
        assert fn(h, weight, bias) is None
    monkeypatch.setenv(frozen_head.ENV_SWITCH, "0")
    assert not fn(h, weight, bias).startswith("FrozenHead")


def test_the_chain_factor_is_checked(monkeypatch):
    """The parity test can fail: the soft-cap chain factor c_v dropped makes the gradient wrong."""
    hidden, weight, bias, targets = _inputs(torch.float32, seed=3)
    up_lp = torch.randn(N, generator=torch.Generator().manual_seed(3))
    monkeypatch.setattr(frozen_head, "softcap_chain", lambda th: torch.ones_like(th))
    _, _, gh = _run(hidden, weight, bias, targets, up_lp=up_lp, up_lse=None, compact=False, softcap=2.0)
    _, _, ref_gh = _oracle(hidden, weight, bias, targets, up_lp, None, 1.0, 2.0)
    assert _rel(gh, ref_gh) > 1e-2
