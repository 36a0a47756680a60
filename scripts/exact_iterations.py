"""Exact self-play iterations on a free categorical model: the table of docs/math.md#beta-step-size.

    python scripts/exact_iterations.py            # prints the markdown table

A free model can represent any distribution, so each iteration's argmin is known in closed form
(or, for the log-ratio χ², by a convex solve): with p_t the opponent and g = β·log(p_θ/p_t),

* IRIS (any α), SPACE-free: the bound is tight at g = log(p_data/p_t) + c, so
  p_{t+1} ∝ p_t^{1−1/β} · p_data^{1/β}: log(p_{t+1}/p_data) = (1 − 1/β)·log(p_t/p_data) + const;
* χ² with the ratio witness (β = 1): the pointwise optimum is e^{g} = p_data/p_t, i.e. p_{t+1} = p_data;
* χ² with the log-ratio witness (β = 1, ``chi2_logratio``): minimise Σ_k −p_k h_k + q_k (h_k + h_k²/4)
  over h = log(p_θ/q), Σ_k q_k e^{h_k} = 1 (damped Newton on the softmax logits, fp64); the ratio
  form's argmin is solved for too (a quadratic program in p_θ), not assumed.

Rows: KL(p_data ‖ p_t) after t = 0 … 6 exact iterations, K = 12 categories, seeded. Run by
tests/test_exact_iterations.py, which checks that docs/math.md shows this very table.
"""
from __future__ import annotations

import math

import torch

K, ITERATIONS, SEED = 12, 6, 0


def distributions():
    g = torch.Generator().manual_seed(SEED)
    p_data = torch.softmax(torch.randn(K, generator=g, dtype=torch.float64) * 1.5, 0)
    p_0 = torch.softmax(torch.randn(K, generator=g, dtype=torch.float64) * 1.5, 0)
    return p_data, p_0


def kl(p, logq):
    return float((p * (p.log() - logq)).sum())


def iris_step(logp_t, logp_data, beta):
    z = (1 - 1 / beta) * logp_t + (1 / beta) * logp_data
    return z - torch.logsumexp(z, 0)


def _newton_argmin(objective, z0, iters=100):
    """argmin over softmax logits z of a smooth objective, by damped Newton in fp64; the softmax's
    flat direction (adding a constant to z) is removed by the penalty (mean z)²."""
    z = z0.clone()

    def f(v):
        return objective(torch.log_softmax(v, 0)) + v.mean() ** 2

    for _ in range(iters):
        grad = torch.autograd.functional.jacobian(f, z)
        hess = torch.autograd.functional.hessian(f, z)
        evals, evecs = torch.linalg.eigh(hess)  # |eigenvalues|: a descent direction even where f is not convex in z
        step = evecs @ ((evecs.T @ grad) / evals.abs().clamp(min=1e-12))
        t, fz = 1.0, float(f(z))
        while float(f(z - t * step)) > fz and t > 1e-10:
            t *= 0.5
        z = z - t * step
        if float(grad.abs().max()) < 1e-13:
            break
    return torch.log_softmax(z, 0)


def chi2_ratio_step(logp_t, p_data):
    # −2·E_p e^{g} + E_q e^{2g} + 1 with e^{g} = p_θ/q, q = p_t: in x = p_θ a quadratic,
    # Σ x²/q − 2·Σ p·x/q + 1, minimised under Σ x = 1 by its KKT linear system (solved, not assumed).
    q = logp_t.exp()
    kkt = torch.zeros(K + 1, K + 1, dtype=q.dtype)
    kkt[:K, :K] = torch.diag(2 / q)
    kkt[:K, K] = 1
    kkt[K, :K] = 1
    rhs = torch.cat([2 * p_data / q, torch.ones(1, dtype=q.dtype)])
    x = torch.linalg.solve(kkt, rhs)[:K]
    assert bool((x > 0).all())  # the equality-constrained optimum is inside the simplex
    return x.log()


def chi2_logratio_step(logp_t, p_data):
    # −E_p h + E_q (h + h²/4) with h = log(p_θ/q).
    q = logp_t.exp()
    return _newton_argmin(lambda logp: (-p_data * (logp - logp_t)).sum()
                          + (q * ((logp - logp_t) + (logp - logp_t) ** 2 / 4)).sum(), logp_t)


def trajectories():
    p_data, p_0 = distributions()
    rows = {}
    for beta in (0.1, 0.3, 0.5, 0.6, 1.0, 2.0):
        logp, kls = p_0.log(), []
        for _ in range(ITERATIONS + 1):
            kls.append(kl(p_data, logp))
            logp = iris_step(logp, p_data.log(), beta)
        rows[f"IRIS (any α), β = {beta:g}, factor 1 − 1/β = {1 - 1 / beta:+.3g}"] = kls
    for name, step in (("χ² ratio witness (`chi2`), β = 1", chi2_ratio_step),
                       ("χ² log-ratio witness (`chi2_logratio`), β = 1", chi2_logratio_step)):
        logp, kls = p_0.log(), []
        for _ in range(ITERATIONS + 1):
            kls.append(kl(p_data, logp))
            logp = step(logp, p_data)
        rows[name] = kls
    return rows


def fmt(x: float) -> str:
    if not math.isfinite(x):
        return "inf"
    if abs(x) < 1e-12:  # rounding of an exact 0
        return "0"
    return f"{x:.3g}" if x >= 1e-3 else f"{x:.1e}"


def table() -> str:
    rows = trajectories()
    head = "| exact iteration t → | " + " | ".join(str(t) for t in range(ITERATIONS + 1)) + " |"
    sep = "|---|" + "---|" * (ITERATIONS + 1)
    body = ["| " + name + " | " + " | ".join(fmt(v) for v in kls) + " |" for name, kls in rows.items()]
    return "\n".join([head, sep] + body)


if __name__ == "__main__":
    print(table())
