"""train/optim.py: a skipped non-finite step under an fp16 loss scaler (issue 19 item 5)."""
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from train.optim import step_or_skip  # noqa: E402


def _prepared(init_scale=2.0 ** 16):
    """accelerate's fp16 set-up, on the CPU: a real torch GradScaler, given to the Accelerator
    before prepare() as accelerate builds it on CUDA (torch.amp.GradScaler("cuda"); on the CPU
    accelerate builds none, so the test puts a CPU one in its place)."""
    from accelerate import Accelerator

    acc = Accelerator(cpu=True, mixed_precision="fp16")
    acc.scaler = torch.amp.GradScaler("cpu", init_scale=init_scale, growth_interval=1000)
    acc.native_amp = True
    torch.manual_seed(0)
    model = torch.nn.Linear(4, 3)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    model, opt = acc.prepare(model, opt)
    return acc, model, opt


@pytest.fixture(autouse=True)
def _fresh_accelerator_state():
    from accelerate.state import AcceleratorState

    AcceleratorState._reset_state(True)
    yield
    AcceleratorState._reset_state(True)


def _backward(acc, model, overflow: bool):
    x = torch.randn(5, 4)
    loss = model(x).square().mean()
    if overflow:
        loss = loss * 1e36  # times the scale 65536: inf in the scaled gradients, as an fp16 overflow
    acc.backward(loss)
    grad_norm = acc.clip_grad_norm_(model.parameters(), 1.0)
    return loss, grad_norm


def test_the_failure_without_the_scalers_update():
    # What the harness did before: skip without scaler.step()/update(); the next step dies.
    acc, model, opt = _prepared()
    _backward(acc, model, overflow=True)
    opt.zero_grad(set_to_none=True)
    with pytest.raises(RuntimeError, match="unscale_\\(\\) has already been called"):
        _backward(acc, model, overflow=False)


def test_a_skipped_overflow_backs_the_scale_off_and_the_run_continues():
    acc, model, opt = _prepared()
    scale0 = acc.scaler.get_scale()
    before = [p.detach().clone() for p in model.parameters()]
    loss, grad_norm = _backward(acc, model, overflow=True)
    assert not bool(torch.isfinite(grad_norm))
    assert step_or_skip(acc, opt, loss, grad_norm) is True
    opt.zero_grad(set_to_none=True)
    assert acc.scaler.get_scale() == scale0 * 0.5  # backed off
    assert all(torch.equal(p, b) for p, b in zip(model.parameters(), before))  # no update applied
    for _ in range(2):  # the next steps run and update the weights
        loss, grad_norm = _backward(acc, model, overflow=False)
        assert step_or_skip(acc, opt, loss, grad_norm) is False
        opt.zero_grad(set_to_none=True)
    assert acc.scaler.get_scale() == scale0 * 0.5
    assert any(not torch.equal(p, b) for p, b in zip(model.parameters(), before))


def test_a_non_finite_loss_with_finite_gradients_is_skipped_too():
    acc, model, opt = _prepared()
    loss, grad_norm = _backward(acc, model, overflow=False)
    assert step_or_skip(acc, opt, loss * float("nan"), grad_norm) is True
    opt.zero_grad(set_to_none=True)
    loss, grad_norm = _backward(acc, model, overflow=False)
    assert step_or_skip(acc, opt, loss, grad_norm) is False


def test_without_a_scaler():
    from accelerate import Accelerator

    acc = Accelerator(cpu=True)
    model = torch.nn.Linear(4, 3)
    opt = acc.prepare(torch.optim.SGD(model.parameters(), lr=0.1))
    loss = model(torch.randn(2, 4)).sum()
    loss.backward()
    assert step_or_skip(acc, opt, loss, torch.tensor(float("inf"))) is True
    assert step_or_skip(acc, opt, loss, torch.tensor(1.0)) is False
