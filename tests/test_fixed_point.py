"""The IRIS fixed-point theorem, numerically (docs/math.md#fixed-point).

A free categorical model: logits θ over K outcomes, p_θ = softmax(θ), data distribution p_data.
One self-play iteration is θ_{t+1} = argmin_θ L(θ; θ_t), L the POPULATION IRIS objective with
exact expectations (no sampling):

    L(θ; θ_t) = 1/(1−α)·log E_{p_data}[e^{−(1−α)g}] + 1/α·log E_{p_θt}[e^{αg}],
    g = β·(log p_θ − log p_θt).

Theory: the minimum over g is at g = log(p_data/p_θt) + c, where L = −R_α(p_data‖p_θt) with
R_α = log Σ p_data^α p_θt^{1−α} / (α(α−1)) (KL at α = 1). A free model reaches any g up to a
constant, so p_{t+1} ∝ p_t^{1−1/β}·p_data^{1/β}: with β = 1 one iteration lands on p_data; with
β = 2 the log-distance to p_data halves every iteration. p_data is a fixed point for every α.

The objective is evaluated by the library's ``iris_loss``, which averages over samples
(κ_t = (1/t)·log((1/N)·Σ e^{tℓ_i})). Exact expectations are expressed through that API:
- E_{p_data}: p_data is rational (counts / N), so outcome k appears counts[k] times: the uniform
  average over those N rows IS the expectation under p_data.
- E_{p_θt}: one row per outcome, with the reference shifted by −log(K·q_k)/(αβ). Then
  g'_k = g_k + log(K·q_k)/α and (1/α)·log((1/K)·Σ e^{α g'_k}) = (1/α)·log Σ q_k e^{α g_k}.
  The shift is constant in θ, so the gradient is unchanged. (Needs α > 0.)
``test_library_objective_is_the_population_objective`` checks this against the formula.

Minimisation: L-BFGS without line search. It reads only gradients, which the library returns at
fp64 precision for fp64 inputs (its loss value is fp32, too coarse for a line search near the
optimum).
"""
import math

import pytest
import torch

from iris_kernels.losses import iris_loss

K = 6
COUNTS = torch.tensor([5, 3, 1, 1, 1, 1])
P_DATA = COUNTS.double() / COUNTS.sum()
REAL_ROWS = torch.repeat_interleave(torch.arange(K), COUNTS)


def library_objective(theta, log_q, alpha, beta):
    log_p = torch.log_softmax(theta, 0)
    ref_syn = log_q - (math.log(K) + log_q) / (alpha * beta)
    return iris_loss(log_p[REAL_ROWS], log_p, log_q[REAL_ROWS], ref_syn, alpha=alpha, beta=beta, backend="torch")


def formula_objective(theta, log_q, alpha, beta):
    """Straight from the definition, fp64, with the α = 1 limit of the first term."""
    g = beta * (torch.log_softmax(theta, 0) - log_q)
    log_pd = P_DATA.log()
    if alpha == 1.0:
        real = -(P_DATA * g).sum()
    else:
        real = torch.logsumexp(-(1.0 - alpha) * g + log_pd, 0) / (1.0 - alpha)
    syn = torch.logsumexp(alpha * g + log_q, 0) / alpha
    return real + syn


def renyi(log_q, alpha):
    """R_α(p_data‖q) = log Σ p_data^α q^{1−α} / (α(α−1)); KL(p_data‖q) at α = 1."""
    log_pd = P_DATA.log()
    if alpha == 1.0:
        return float((P_DATA * (log_pd - log_q)).sum())
    return float(torch.logsumexp(alpha * log_pd + (1 - alpha) * log_q, 0)) / (alpha * (alpha - 1))


def grad_at(theta, log_q, alpha, beta):
    th = theta.clone().requires_grad_()
    (g,) = torch.autograd.grad(library_objective(th, log_q, alpha, beta), th)
    return g


def argmin(log_q, alpha, beta, start):
    th = start.clone().requires_grad_()
    opt = torch.optim.LBFGS(
        [th], lr=1.0, max_iter=300, history_size=20, tolerance_grad=1e-12, tolerance_change=0.0, line_search_fn=None
    )

    def closure():
        opt.zero_grad()
        loss = library_objective(th, log_q, alpha, beta)
        loss.backward()
        return loss

    opt.step(closure)
    return th.detach()


def random_logits(seed):
    return torch.randn(K, generator=torch.Generator().manual_seed(seed), dtype=torch.float64) * 1.5


@pytest.mark.parametrize("alpha", [0.5, 1.0, 2.0])
@pytest.mark.parametrize("beta", [1.0, 2.0])
def test_library_objective_is_the_population_objective(alpha, beta):
    for seed in range(3):
        theta, log_q = random_logits(seed), torch.log_softmax(random_logits(seed + 10), 0)
        th1, th2 = theta.clone().requires_grad_(), theta.clone().requires_grad_()
        lib, ref = library_objective(th1, log_q, alpha, beta), formula_objective(th2, log_q, alpha, beta)
        lib.backward()
        ref.backward()
        assert float(lib.detach()) == pytest.approx(float(ref.detach()), rel=1e-6, abs=1e-6)  # fp32 value
        torch.testing.assert_close(th1.grad, th2.grad, rtol=1e-10, atol=1e-12)  # fp64 gradient
        assert th2.grad.abs().max() > 1e-2


@pytest.mark.parametrize("alpha", [0.5, 1.0, 2.0])
def test_one_iteration_reaches_p_data_at_beta_one(alpha):
    theta = random_logits(1)
    assert (torch.softmax(theta, 0) - P_DATA).abs().max() > 0.1  # the start is far from the data
    for _ in range(3):
        log_q = torch.log_softmax(theta, 0)
        theta = argmin(log_q, alpha, 1.0, start=theta)
        torch.testing.assert_close(torch.softmax(theta, 0), P_DATA, rtol=0, atol=1e-9)


@pytest.mark.parametrize("alpha", [0.5, 1.0, 2.0])
def test_iterates_converge_to_p_data_at_beta_two(alpha):
    """β = 2: p_{t+1} ∝ sqrt(p_t·p_data), a geometric approach to p_data."""
    beta = 2.0
    theta = random_logits(2)
    log_pd = P_DATA.log()
    errors = []
    for _ in range(8):
        log_q = torch.log_softmax(theta, 0)
        theta = argmin(log_q, alpha, beta, start=theta)
        predicted = torch.softmax(log_pd / beta + (1 - 1 / beta) * log_q, 0)
        p = torch.softmax(theta, 0)
        torch.testing.assert_close(p, predicted, rtol=0, atol=1e-9)
        errors.append(float((p - P_DATA).abs().sum()))
    assert all(b < 0.6 * a for a, b in zip(errors, errors[1:]))
    assert errors[-1] < 1e-2 * errors[0] and errors[-1] < 5e-3


@pytest.mark.parametrize("alpha", [0.5, 1.0, 2.0])
def test_p_data_is_a_fixed_point(alpha):
    log_pd = P_DATA.log()
    for beta in (1.0, 0.5, 2.0):
        # At θ = θ_t = log p_data: L = 0 and the gradient vanishes ...
        th = log_pd.clone().requires_grad_()
        loss = library_objective(th, log_pd, alpha, beta)
        loss.backward()
        assert abs(float(loss.detach())) < 1e-6
        assert th.grad.abs().max() < 1e-12
        # ... and minimising from a perturbed start comes back to p_data. (Not from anywhere: in
        # logits the α = 2 objective flattens towards the simplex's corners, where a gradient
        # method from a far start can stall; the warm start θ_t of a real iteration avoids that.)
        back = argmin(log_pd, alpha, beta, start=log_pd + 0.5 * random_logits(3))
        torch.testing.assert_close(torch.softmax(back, 0), P_DATA, rtol=0, atol=1e-9)
    # Away from the data the same stationarity check fails: the test has teeth.
    log_q = torch.log_softmax(random_logits(4), 0)
    assert grad_at(log_q, log_q, alpha, 1.0).abs().max() > 1e-2


@pytest.mark.parametrize("alpha", [0.5, 1.0, 2.0])
def test_minimum_is_minus_renyi_and_a_lower_bound(alpha):
    """L ≥ −R_α(p_data‖q) for every θ, with equality at the minimiser (the variational bound)."""
    log_q = torch.log_softmax(random_logits(5), 0)
    bound = -renyi(log_q, alpha)
    assert bound < -1e-2  # q is far from the data: a non-trivial bound
    theta = argmin(log_q, alpha, 1.0, start=log_q.clone())
    assert float(library_objective(theta, log_q, alpha, 1.0)) == pytest.approx(bound, rel=1e-6, abs=1e-6)
    for seed in range(6, 11):
        assert float(library_objective(random_logits(seed), log_q, alpha, 1.0)) >= bound - 1e-6
    # The stationary point of the LIBRARY's gradient is p_data whatever the opponent (β = 1).
    assert grad_at(P_DATA.log(), log_q, alpha, 1.0).abs().max() < 1e-12
