"""torch.compile: the fused ops are custom ops (iris_kernels/custom_ops.py), so a training step that
calls linear_logprobs / sequence_logprobs / SelfPlayLoss compiles with fullgraph=True (no graph
break) and gives the eager values and gradients.

CPU only here: the torch backend, and the Triton backend through the interpreter (the custom-op
boundary is the same one a CUDA run uses). Mostly the aot_eager compiler (dynamo + AOTAutograd,
the parts that see the ops), plus one inductor step for the torch backend.
"""
import dataclasses

import pytest
import torch

import iris_kernels as ik
from iris_kernels.custom_ops import PARAM_FIELDS, linear_logprobs_fwd, linear_logprobs_op, tilted_risk_bwd_op, tilted_risk_fwd_op
from iris_kernels.types import LogprobsParams

V, H = 37, 16


@pytest.fixture(autouse=True)
def _fresh_dynamo():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def _setup(seed=0, bias=True):
    g = torch.Generator().manual_seed(seed)
    body = torch.nn.Linear(H, H)
    with torch.no_grad():
        body.weight.copy_(torch.randn(H, H, generator=g) * 0.4)
    weight = torch.nn.Parameter(torch.randn(V, H, generator=g) * 0.5)
    b = torch.nn.Parameter(torch.randn(V, generator=g)) if bias else None
    x = torch.randn(4, 7, H, generator=g)
    labels = torch.randint(0, V, (4, 7), generator=g)
    labels[:, :2] = -100
    ref = -torch.rand(4, generator=g) * 10 - 3
    return body, weight, b, x, labels, ref


def _params(body, weight, b):
    return [p for p in (body.weight, body.bias, weight, b) if p is not None]


def _check(step, args, params, *, compiler="aot_eager", tol=0.0, ops=("linear_logprobs_fwd",)):
    eager = step(*args)
    g_eager = torch.autograd.grad(eager, params)
    explained = torch._dynamo.explain(step)(*args)
    assert explained.graph_break_count == 0, [str(r.reason)[:300] for r in explained.break_reasons]
    assert explained.graph_count == 1
    # One node per fused op: not the torch backend's chunk loop unrolled into the graph. (The
    # losses' autograd.Functions are traced into subgraphs of the graph: search them all.)
    code = "".join(m.code for m in explained.graphs[0].modules() if isinstance(m, torch.fx.GraphModule))
    for op in ops:
        assert f"iris_kernels.{op}" in code, (op, code)
    assert code.count("iris_kernels.linear_logprobs_fwd") == 1
    torch._dynamo.reset()
    compiled = torch.compile(step, fullgraph=True, backend=compiler)
    out = compiled(*args)
    g_comp = torch.autograd.grad(out, params)
    torch.testing.assert_close(out, eager, rtol=tol, atol=tol)
    for a, e in zip(g_comp, g_eager):
        torch.testing.assert_close(a, e, rtol=tol, atol=tol)
    assert all(bool(torch.isfinite(g).all()) and bool(g.abs().sum() > 0) for g in g_comp)


@pytest.mark.parametrize("backend, options", [
    ("torch", {}),
    ("triton", {}),
    ("triton", {"bwd": "atomic", "compact": True}),
    ("triton", {"bwd": "workspace", "compact": True, "num_valid": 20}),
])
def test_compiled_token_logprobs_step(backend, options):
    body, weight, b, x, labels, _ = _setup()

    def step(x, labels):
        h = torch.tanh(body(x))
        with_lse = not options.get("compact")  # compaction gives ignored rows no lse
        out = ik.linear_logprobs(h, weight, labels, bias=b, backend=backend, return_lse=with_lse,
                                 return_entropy=True, softcap=4.0, temperature=0.8, **options)
        # every output carries an upstream gradient, with unequal weights
        value = -out.logprobs.sum() + 0.3 * out.entropy.sum()
        return value + 0.01 * out.lse.square().sum() if with_lse else value

    _check(step, (x, labels), _params(body, weight, b))


@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("loss", ["iris", "spin"])
def test_compiled_selfplay_step(backend, loss):
    body, weight, _, x, labels, ref = _setup(seed=1, bias=False)
    kw = {"alpha": 0.7, "beta": 0.5} if loss == "iris" else {"beta": 0.5}
    crit = ik.SelfPlayLoss(loss, backend=backend, **kw)

    def step(x, labels, ref):
        h = torch.tanh(body(x))
        value, metrics = crit(h, weight, labels, num_real=2, ref_logps=ref)
        return value

    ops = ("linear_logprobs_fwd",)
    if (backend, loss) == ("triton", "iris"):
        ops += ("tilted_risk_fwd", "tilted_risk_bwd")
    _check(step, (x, labels, ref), _params(body, weight, None), ops=ops)


def test_compiled_sequence_logprobs_step_with_inductor():
    body, weight, b, x, labels, _ = _setup(seed=2)

    def step(x, labels):
        s = ik.sequence_logprobs(torch.tanh(body(x)), weight, labels, bias=b, backend="torch")
        return -(s * torch.linspace(0.5, 1.5, s.shape[0])).sum()

    _check(step, (x, labels), _params(body, weight, b), compiler="inductor", tol=1e-5)


@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("entropy", [False, True])
@pytest.mark.parametrize("with_bias", [False, True])
def test_custom_ops_pass_opcheck(backend, entropy, with_bias):
    # Schema, fake (meta) implementation, autograd registration and dispatch, checked by torch.
    g = torch.Generator().manual_seed(3)
    h = torch.randn(9, H, generator=g, requires_grad=True)
    w = torch.randn(V, H, generator=g, requires_grad=True)
    b = torch.randn(V, generator=g, requires_grad=True) if with_bias else None
    t = torch.randint(0, V, (9,), generator=g)
    t[2] = -100
    params = LogprobsParams(softcap=3.0 if entropy else None, return_entropy=entropy)
    args = (h, w, t, b, backend, *(getattr(params, f) for f in PARAM_FIELDS))
    torch.library.opcheck(linear_logprobs_fwd, args)


def test_op_schema_lists_every_logprobs_param():
    # A new LogprobsParams field must also become an op argument, or compiled calls would drop it.
    assert PARAM_FIELDS == tuple(f.name for f in dataclasses.fields(LogprobsParams))


def test_double_backward_through_a_compiled_step_raises():
    body, weight, b, x, labels, _ = _setup(seed=5)

    def step(x, labels):
        return ik.linear_logprobs(torch.tanh(body(x)), weight, labels, bias=b, backend="torch").sum()

    out = torch.compile(step, fullgraph=True, backend="aot_eager")(x, labels)
    with pytest.raises(RuntimeError, match="double backward"):  # AOTAutograd's own refusal
        (g,) = torch.autograd.grad(out, weight, create_graph=True)
        g.square().sum().backward()
    # The op itself, outside a compiled region (torch.library dispatch, e.g. under export).
    h = torch.tanh(body(x)).reshape(-1, H)
    logp, _, _ = linear_logprobs_op("torch", h, weight, labels.reshape(-1), b, LogprobsParams())
    (g,) = torch.autograd.grad(logp.sum(), weight, create_graph=True)
    with pytest.raises(RuntimeError, match="double backward is not supported by the fused log-prob backends"):
        g.square().sum().backward()


def test_tilted_risk_custom_ops_pass_opcheck():
    x = torch.randn(11, dtype=torch.float64) * 3
    t = torch.tensor(0.7, dtype=torch.float64)
    torch.library.opcheck(tilted_risk_fwd_op, (x, t, 1e-3))
    _, stats = tilted_risk_fwd_op(x, t, 1e-3)
    torch.library.opcheck(tilted_risk_bwd_op, (x, t, stats, torch.tensor(0.5), 2.0, torch.float64))


def test_compiled_packed_batch_with_row_flags():
    # A packed (padding-free) batch with cu_seqlens and an interleaved is_real list (index gathers).
    body, weight, _, x, labels, ref = _setup(seed=4, bias=False)
    cu = torch.tensor([0, 5, 9, 20, 28])
    crit = ik.SelfPlayLoss("iris", alpha=0.7, beta=0.5, backend="torch")

    def step(x, labels, ref):
        h = torch.tanh(body(x.reshape(1, 28, H)))
        value, _ = crit(h, weight, labels.reshape(1, 28), [True, False, False, True], ref_logps=ref, cu_seqlens=cu)
        return value

    _check(step, (x, labels, ref), _params(body, weight, None))
