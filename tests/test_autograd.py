"""autograd.py dispatch: which kernel paths a backward switches on (issue 16, item 8).

An output nobody differentiates must not turn on its kernel path: with ``set_materialize_grads``
left on, autograd hands the backward a zeros tensor for an unused lse or entropy, and the
kernels then ran with HAS_GRAD_LSE / HAS_GRAD_ENTROPY (an extra [N] load per tile and the
entropy term) for nothing. The launch wrappers are spied on; gradients are still checked.
"""
import pytest
import torch

import iris_kernels.autograd as A
from iris_kernels import linear_logprobs

N, H, V = 37, 48, 163


def _inputs(seed=0):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(N, H, generator=g)
    weight = torch.randn(V, H, generator=g) / H ** 0.5
    targets = torch.randint(0, V, (N,), generator=g)
    targets[::5] = -100
    return hidden, weight, targets


@pytest.mark.parametrize("bwd", ["workspace", "atomic"])
@pytest.mark.parametrize("use", ["logp", "logp+lse", "logp+entropy", "lse"])
def test_unused_outputs_do_not_switch_on_their_kernel_paths(monkeypatch, bwd, use):
    seen = []
    name = "logits_grad" if bwd == "workspace" else "logprobs_bwd"
    real = getattr(A, name)

    def spy(*args, **kwargs):
        # Both wrappers take (..., grad_logp, grad_lse, grad_entropy, ...) at positions 7..9 (dZ)
        # or 6..8 (atomic); record which upstream vectors were given.
        lse_at = 8 if bwd == "workspace" else 7
        seen.append((args[lse_at] is not None, args[lse_at + 1] is not None))
        return real(*args, **kwargs)

    monkeypatch.setattr(A, name, spy)
    hidden, weight, targets = _inputs()
    h = hidden.clone().requires_grad_()
    w = weight.clone().requires_grad_()
    out = linear_logprobs(h, w, targets, backend="triton", bwd=bwd, return_lse=True, return_entropy=True)
    up = torch.randn(N, generator=torch.Generator().manual_seed(1))
    loss = 0.0
    if "logp" in use:
        loss = loss + (out.logprobs * up).sum()
    if "lse" in use:
        loss = loss + (out.lse * up).sum()
    if "entropy" in use:
        loss = loss + (out.entropy * up).sum()
    loss.backward()
    assert seen, "the backward kernel was not launched"
    assert all(has_lse == ("lse" in use) for has_lse, _ in seen), seen
    assert all(has_ent == ("entropy" in use) for _, has_ent in seen), seen

    # The gradients still match fp64 autograd through the plain formula.
    hd, wd = hidden.double().requires_grad_(), weight.double().requires_grad_()
    z = hd @ wd.T
    lse = torch.logsumexp(z, -1)
    logp = z.gather(1, targets.clamp(min=0)[:, None])[:, 0] - lse
    ok = targets != -100
    p = torch.softmax(z, -1)
    ent = -(p * torch.log_softmax(z, -1)).sum(-1)
    ref = 0.0
    if "logp" in use:
        ref = ref + torch.where(ok, logp * up.double(), 0.0).sum()
    if "lse" in use:
        ref = ref + (lse * up.double()).sum()
    if "entropy" in use:
        ref = ref + torch.where(ok, ent * up.double(), 0.0).sum()
    ref.backward()
    torch.testing.assert_close(h.grad.double(), hd.grad, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(w.grad.double(), wd.grad, rtol=1e-4, atol=1e-5)


def test_custom_op_path_passes_none_for_unused_outputs(monkeypatch):
    """The torch.library op (what torch.compile traces) keeps the same promise: its backward op
    receives None for the lse and entropy gradients nobody asked for."""
    import iris_kernels.custom_ops as C
    from iris_kernels.types import LogprobsParams

    seen = []
    real = C._backward_op

    def spy(hidden, weight, targets, bias, lse, extras, grad_logp, grad_lse, grad_entropy, *rest):
        seen.append((grad_lse is None, grad_entropy is None))
        return real(hidden, weight, targets, bias, lse, extras, grad_logp, grad_lse, grad_entropy, *rest)

    monkeypatch.setattr(C, "_backward_op", spy)
    hidden, weight, targets = _inputs()
    h = hidden.clone().requires_grad_()
    params = LogprobsParams(return_entropy=True)
    logp, lse, ent = C.linear_logprobs_op("triton", h, weight, targets, None, params)
    logp.sum().backward()
    assert seen == [(True, True)]
