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


# --------------------------------------------------------------- floats that change between calls (issue 19)
# A Python float that changes between calls reaches the code as a symbolic float (dynamic=True at
# once; dynamic=None from the first recompilation on), where math.isfinite was a graph break, an
# error under fullgraph=True. Compiler "aot_eager": the breaks come from dynamo, before any
# compiler backend, and AOTAutograd is what traces the backward; inductor adds only code
# generation (~20 s per compile here). α and β (tensor arithmetic) stay symbolic: the third and
# later calls must not recompile. temperature and softcap are scalar arguments of the fused
# custom op, which dynamo specialises: a new value recompiles (no graph break, no error).
def _over_changing_floats(step, calls, params, dynamic, *, no_recompile=True):
    compiled = torch.compile(step, fullgraph=True, backend="aot_eager", dynamic=dynamic)
    for i, args in enumerate(calls):
        if no_recompile and i >= 2 and hasattr(torch.compiler, "set_stance"):
            with torch.compiler.set_stance("fail_on_recompile"):
                out = compiled(*args)
        else:
            out = compiled(*args)
        g_comp = torch.autograd.grad(out, params)
        eager = step(*args)
        g_eager = torch.autograd.grad(eager, params)
        torch.testing.assert_close(out, eager, rtol=0, atol=0)
        for a, e in zip(g_comp, g_eager):
            torch.testing.assert_close(a, e, rtol=0, atol=0)
        assert all(bool(g.abs().sum() > 0) for g in g_comp)


_FLOATS = [(1.0, 30.0), (0.7, 20.0), (1.3, 25.0), (0.9, 12.5)]  # (temperature, softcap) per call


@pytest.mark.parametrize("dynamic", [None, True])
@pytest.mark.parametrize("backend", ["torch", "triton", "reference"])
def test_linear_logprobs_with_changing_temperature_and_softcap(dynamic, backend):
    body, weight, b, x, labels, _ = _setup(seed=6)

    def step(x, labels, temperature, softcap):
        out = ik.linear_logprobs(torch.tanh(body(x)), weight, labels, bias=b, backend=backend,
                                 temperature=temperature, softcap=softcap, return_entropy=True)
        return -out.logprobs.sum() + 0.3 * out.entropy.sum()

    _over_changing_floats(step, [(x, labels, t, c) for t, c in _FLOATS], _params(body, weight, b), dynamic,
                          no_recompile=False)


@pytest.mark.parametrize("dynamic", [None, True])
def test_sequence_logprobs_with_changing_temperature_and_softcap(dynamic):
    body, weight, b, x, labels, _ = _setup(seed=7)

    def step(x, labels, temperature, softcap):
        s = ik.sequence_logprobs(torch.tanh(body(x)), weight, labels, bias=b, backend="torch",
                                 temperature=temperature, softcap=softcap)
        return -(s * torch.linspace(0.5, 1.5, s.shape[0])).sum()

    _over_changing_floats(step, [(x, labels, t, c) for t, c in _FLOATS], _params(body, weight, b), dynamic,
                          no_recompile=False)


@pytest.mark.parametrize("dynamic", [None, True])
@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_selfplay_loss_on_a_linear_alpha_schedule(dynamic, backend):
    # The case: compiled at step 0, "Unsupported: torch.* op returned non-Tensor" at step 1.
    body, weight, _, x, labels, ref = _setup(seed=8, bias=False)
    schedule = ik.make_schedule("linear", alpha_start=2.0, alpha_end=0.5, num_steps=10)
    crit = ik.SelfPlayLoss("iris", alpha=schedule, beta=0.5, backend=backend)

    def step(x, labels, ref, k):
        value, _ = crit(torch.tanh(body(x)), weight, labels, num_real=2, ref_logps=ref, step=k)
        return value

    _over_changing_floats(step, [(x, labels, ref, k) for k in range(4)], _params(body, weight, None), dynamic)


@pytest.mark.parametrize("dynamic", [None, True])
@pytest.mark.parametrize("loss", ["iris", "dpo"])
def test_losses_with_changing_alpha_and_beta(dynamic, loss):
    g = torch.Generator().manual_seed(9)
    policy = (torch.randn(6, generator=g, dtype=torch.float64) * 3 - 40).requires_grad_()
    ref = torch.randn(6, generator=g, dtype=torch.float64) * 3 - 40
    fn = ik.LOSSES[loss]

    def step(policy, alpha, beta):
        kw = {"alpha": alpha} if loss == "iris" else {}
        return fn(policy[:3], policy[3:], ref[:3], ref[3:], beta=beta, backend="torch", **kw)

    calls = [(policy, a, b) for a, b in [(0.5, 1.0), (0.7, 0.5), (1.5, 0.25), (2.0, 2.0)]]
    _over_changing_floats(step, calls, [policy], dynamic)


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_bad_temperature_under_compile_still_raises(backend):
    # Skipped while tracing, the check runs in the fused op's body on the concrete value.
    body, weight, b, x, labels, _ = _setup(seed=10)

    def step(x, labels, temperature):
        return ik.linear_logprobs(torch.tanh(body(x)), weight, labels, bias=b, backend=backend,
                                  temperature=temperature).sum()

    compiled = torch.compile(step, fullgraph=True, backend="aot_eager", dynamic=True)
    compiled(x, labels, 0.8)
    for bad in (-1.0, 0.0, float("inf"), float("nan")):
        with pytest.raises(ValueError, match="temperature must be a finite number > 0"):
            compiled(x, labels, bad)


def test_bad_alpha_under_compile_gives_nan():
    # α's value check is skipped while tracing; a negative or infinite α makes the loss NaN.
    g = torch.Generator().manual_seed(11)
    policy = (torch.randn(6, generator=g, dtype=torch.float64) - 40).requires_grad_()
    ref = torch.randn(6, generator=g, dtype=torch.float64) - 40

    def step(policy, alpha):
        return ik.iris_loss(policy[:3], policy[3:], ref[:3], ref[3:], alpha=alpha, backend="torch")

    compiled = torch.compile(step, fullgraph=True, backend="aot_eager", dynamic=True)
    assert bool(torch.isfinite(compiled(policy, 0.5)))
    for bad in (-0.5, float("inf")):
        out = compiled(policy, bad)
        assert bool(torch.isnan(out))
        (grad,) = torch.autograd.grad(out, policy)
        assert bool(torch.isnan(grad).all())
    with pytest.raises(ValueError, match="alpha must be a finite number >= 0"):
        step(policy, -0.5)  # eager: refused up front
