"""Autocast does not re-type the op's products (iris_kernels/amp.py, issue 19 item 1).

Inside ``torch.autocast`` every backend gives exactly its autocast-free values and gradients
(same code, same dtypes: the op fixes the dtype of each of its products itself), forward and
backward, and the output dtypes do not change. CPU autocast (bf16) here, for reference, torch and
triton (through the interpreter); CUDA autocast (bf16 and fp16) in the tests marked ``gpu``.
"""
import sys
from pathlib import Path

import pytest
import torch

import iris_kernels as ik

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

BACKENDS = ["reference", "torch", "triton"]
V, H = 37, 16


def _exact(a, b):
    assert a.dtype == b.dtype, (a.dtype, b.dtype)
    torch.testing.assert_close(a, b, rtol=0.0, atol=0.0, equal_nan=True)


@pytest.mark.parametrize("backend", BACKENDS)
def test_issue_minimal_case(backend):
    # The issue's case: 21.09375 - logsumexp(21.09375, 0); autocast used to give -21.125.
    h = torch.tensor([[3.0]], dtype=torch.bfloat16)
    w = torch.tensor([[7.03125], [0.0]], dtype=torch.bfloat16)
    t = torch.tensor([1])
    expected = -torch.logaddexp(torch.tensor(21.09375, dtype=torch.float64), torch.tensor(0.0, dtype=torch.float64))
    with torch.autocast("cpu", torch.bfloat16):
        out = ik.linear_logprobs(h, w, t, backend=backend)
    assert out.dtype == torch.float32
    assert abs(out.double().item() - expected.item()) < 1e-5


def _inputs(dtype, seed=0, n=11, bias=True):
    g = torch.Generator().manual_seed(seed)
    h = (torch.randn(n, H, generator=g) * 1.5).to(dtype).requires_grad_()
    w = (torch.randn(V, H, generator=g) * 0.7).to(dtype).requires_grad_()
    b = torch.randn(V, generator=g).to(dtype).requires_grad_() if bias else None
    t = torch.randint(0, V, (n,), generator=g)
    t[[1, 6]] = -100
    return h, w, b, t


def _run(fn, inputs, *, backward_inside: bool, autocast: bool):
    """Outputs and gradients of ``fn``, with the forward (and optionally the backward) in autocast."""
    leaves = [x for x in inputs if x is not None and x.requires_grad]
    ctx = torch.autocast("cpu", torch.bfloat16) if autocast else torch.autocast("cpu", enabled=False)
    with ctx:
        outs = fn(*inputs)
        coeffs = [torch.linspace(-1.0, 2.0, o.numel()).reshape(o.shape) for o in outs]
        value = sum((o.float() * c).sum() for o, c in zip(outs, coeffs))
        if backward_inside:
            grads = torch.autograd.grad(value, leaves)
    if not backward_inside:
        grads = torch.autograd.grad(value, leaves)
    return [o.detach() for o in outs], list(grads)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("backward_inside", [False, True])
@pytest.mark.parametrize("options", [{}, {"softcap": 5.0, "temperature": 0.8, "return_entropy": True, "return_lse": True}])
def test_linear_logprobs_inside_cpu_autocast_equal_autocast_free(backend, dtype, backward_inside, options):
    h, w, b, t = _inputs(dtype)

    def fn(h, w, b, t):
        out = ik.linear_logprobs(h, w, t, bias=b, backend=backend, **options)
        return [out] if isinstance(out, torch.Tensor) else [x for x in out if x is not None]

    plain = _run(fn, (h, w, b, t), backward_inside=backward_inside, autocast=False)
    inside = _run(fn, (h, w, b, t), backward_inside=backward_inside, autocast=True)
    for a, e in zip(inside[0] + inside[1], plain[0] + plain[1]):
        _exact(a, e)
    assert all(o.dtype == torch.float32 for o in inside[0])


@pytest.mark.parametrize("backend", BACKENDS)
def test_sequence_logprobs_and_selfplay_loss_inside_cpu_autocast(backend):
    g = torch.Generator().manual_seed(3)
    hidden = (torch.randn(4, 9, H, generator=g)).to(torch.bfloat16).requires_grad_()
    weight = (torch.randn(V, H, generator=g) * 0.6).to(torch.bfloat16).requires_grad_()
    labels = torch.randint(0, V, (4, 9), generator=g)
    labels[:, :3] = -100
    ref = -torch.rand(4, generator=g) * 10 - 20
    crit = ik.SelfPlayLoss("iris", alpha=0.7, beta=0.5, backend=backend)

    def fn(hidden, weight):
        s = ik.sequence_logprobs(hidden, weight, labels, backend=backend)
        loss, _ = crit(hidden, weight, labels, num_real=2, ref_logps=ref)
        return [s, loss]

    for backward_inside in (False, True):
        plain = _run(fn, (hidden, weight), backward_inside=backward_inside, autocast=False)
        inside = _run(fn, (hidden, weight), backward_inside=backward_inside, autocast=True)
        for a, e in zip(inside[0] + inside[1], plain[0] + plain[1]):
            _exact(a, e)


def test_harness_scoring_inside_cpu_autocast():
    # train/modeling.SequenceLogprobs (what train/scoring.py runs) under accelerate's bf16
    # autocast: the op adds nothing to the rounding of its (explicitly bf16-cast) inputs.
    # Before the fix the torch backend's products ran in bf16: sums off by ~0.1 to 0.3.
    from transformers import LlamaConfig, LlamaForCausalLM

    from train.modeling import SequenceLogprobs, body_hidden_states, output_projection

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=300, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    model = LlamaForCausalLM(cfg).eval()
    with torch.no_grad():
        model.lm_head.weight.mul_(40.0)  # logits of tens, where a bf16 rounding is ~0.1
    ids = torch.randint(0, 300, (3, 24))
    mask = torch.ones_like(ids)
    labels = ids.clone()
    labels[:, :6] = -100
    with torch.no_grad():
        with torch.autocast("cpu", torch.bfloat16):
            s = SequenceLogprobs(model)(ids, mask, labels)
            hidden = body_hidden_states(model, ids, mask)
            hidden, weight, bias, _ = output_projection(model, hidden)
        assert hidden.dtype == weight.dtype == torch.bfloat16
        oracle = ik.sequence_logprobs(hidden.double(), weight.double(), labels, backend="reference")
    assert s.dtype == torch.float32
    torch.testing.assert_close(s.double(), oracle, rtol=0, atol=2e-4)


# ------------------------------------------------------------------------------- CUDA autocast
@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["reference", "torch", "triton"])
@pytest.mark.parametrize("amp_dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cuda_autocast_equal_autocast_free(backend, amp_dtype, dtype):
    h, w, b, t = _inputs(dtype, n=300)
    h, w, b, t = (x.detach().cuda().requires_grad_(x.requires_grad) for x in (h, w, b, t))

    def run(autocast):
        with torch.autocast("cuda", amp_dtype, enabled=autocast):
            out = ik.linear_logprobs(h, w, t, bias=b, backend=backend, softcap=5.0, return_entropy=True)
            value = out.logprobs.sum() + 0.3 * out.entropy.sum()
            grads = torch.autograd.grad(value, (h, w, b))
        return [out.logprobs, out.entropy, *grads]

    for a, e in zip(run(True), run(False)):
        _exact(a, e)
