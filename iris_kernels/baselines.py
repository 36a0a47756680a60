"""The baseline losses IRIS is compared with (docs/math.md#baselines): SPIN, DPO, SPACE, χ² (density-
ratio witness), χ² with the log-ratio witness, and SFT.

Same calling convention as ``iris_loss`` (see ``iris_kernels.losses``, which re-exports every
one of them and holds the registry ``LOSSES``); each builds its terms (``_*_terms``, also used by
``loss_term_stats``) and reduces them with ``iris_kernels.loss_terms._reduce_terms``.
"""
from __future__ import annotations

import math
from typing import Any, Mapping, Optional

import torch

from .distributed import MEAN, NANS, RATIO, SUMEXP, SUMEXP2, TILTED, StepStats
from .loss_terms import (
    _Term,
    _check_inputs,
    _check_logps,
    _check_options,
    _check_positive,
    _detached,
    _log_ratio,
    _reduce_terms,
    _term_mean,
)
from .tilted import _acc_dtype

__all__ = ["spin_loss", "dpo_loss", "space_loss", "chi2_loss", "chi2_logratio_loss", "sft_loss"]


# =============================================================================================
# Baselines (docs/math.md#baselines)
# =============================================================================================
_PAIR_VARIANTS = ("sigmoid", "hinge")


def _pair_terms(policy_real, policy_syn, ref_real, ref_syn, *, beta: float = 0.1, variant: str = "sigmoid"):
    _check_inputs(policy_real, policy_syn, ref_real, ref_syn, paired=True)
    beta = _check_positive("beta", beta)
    if variant not in _PAIR_VARIANTS:
        raise ValueError(f"variant must be one of {_PAIR_VARIANTS}, got {variant!r}")
    # z_i = β·[(s_θ(y_i) − s_ref(y_i)) − (s_θ(y'_i) − s_ref(y'_i))], the implicit reward margin.
    z = _log_ratio(policy_real, ref_real, beta) - _log_ratio(policy_syn, ref_syn, beta)
    # sigmoid: softplus(−z) = −log σ(z), ∂/∂z = −σ(−z).  hinge: relu(1 − z), ∂/∂z = −[z < 1].
    ell = torch.nn.functional.softplus(-z) if variant == "sigmoid" else torch.relu(1.0 - z)
    g_real = _log_ratio(policy_real, ref_real, beta).detach()
    g_syn = _log_ratio(policy_syn, ref_syn, beta).detach()
    return {"pair": _term_mean(ell)}, {"margin": z.detach(), "g_real": g_real, "g_syn": g_syn}


def _pair_metrics(loss, values, stats, extras):
    z = extras["margin"]
    return _detached(
        {
            "loss": loss,  # no "estimate": SPIN's/DPO's −L estimates no divergence (docs/math.md#divergence-estimates)
            "real/mean_g": extras["g_real"].mean(),
            "syn/mean_g": extras["g_syn"].mean(),
            "margin": z.mean(),
            "accuracy": (z > 0).to(z.dtype).mean(),
        }
    )


def _pair_loss(name, policy_real, policy_syn, ref_real, ref_syn, *, beta, variant, return_metrics, scope, group, stats, backend):
    _check_options(scope, backend)
    terms, extras = _pair_terms(policy_real, policy_syn, ref_real, ref_syn, beta=beta, variant=variant)
    values, used = _reduce_terms(name, terms, scope=scope, group=group, stats=stats, backend=backend,
                                 hparams={"beta": beta, "variant": variant})
    loss = values["pair"].float()
    if return_metrics:
        return loss, _pair_metrics(loss, values, used, extras)
    return loss


def spin_loss(
    policy_real: torch.Tensor,
    policy_syn: torch.Tensor,
    ref_real: torch.Tensor,
    ref_syn: torch.Tensor,
    *,
    beta: float = 0.1,
    variant: str = "sigmoid",
    return_metrics: bool = False,
    scope: str = "rank",
    group: Any = None,
    stats: Optional[StepStats] = None,
    backend: str = "auto",
):
    """SPIN (Chen et al., ICML 2024): mean_i softplus(−β·[(s_θ − s_ref)(y_i) − (s_θ − s_ref)(y'_i)]).

    The real and synthetic tensors are PAIRED (row i of each is the same prompt), so n = m is
    required. The reference is the opponent θ_t; at θ = θ_t the loss is log 2. ``variant="hinge"``
    uses relu(1 − β·Δ). Metrics: ``loss``, ``real/mean_g``, ``syn/mean_g`` (g = β·log-ratio),
    ``margin`` (mean β·Δ) and ``accuracy`` (fraction of pairs with Δ > 0), computed over the local
    tensors. Other arguments as :func:`iris_loss`.
    """
    return _pair_loss(
        "spin", policy_real, policy_syn, ref_real, ref_syn, beta=beta, variant=variant,
        return_metrics=return_metrics, scope=scope, group=group, stats=stats, backend=backend,
    )


def dpo_loss(
    policy_real: torch.Tensor,
    policy_syn: torch.Tensor,
    ref_real: torch.Tensor,
    ref_syn: torch.Tensor,
    *,
    beta: float = 0.1,
    variant: str = "sigmoid",
    return_metrics: bool = False,
    scope: str = "rank",
    group: Any = None,
    stats: Optional[StepStats] = None,
    backend: str = "auto",
):
    """DPO (Rafailov et al., 2023): SPIN's formula with the real responses as "chosen", the
    synthetic ones as "rejected" and a FIXED reference model (SPIN's reference moves each
    iteration). Paired, n = m. Arguments and metrics as :func:`spin_loss`.
    """
    return _pair_loss(
        "dpo", policy_real, policy_syn, ref_real, ref_syn, beta=beta, variant=variant,
        return_metrics=return_metrics, scope=scope, group=group, stats=stats, backend=backend,
    )


def _space_terms(policy_real, policy_syn, ref_real, ref_syn, *, mu: float = 1.0, beta: float = 1.0):
    _check_inputs(policy_real, policy_syn, ref_real, ref_syn)
    mu = _check_positive("mu", mu)
    beta = _check_positive("beta", beta)
    log_mu = math.log(mu)
    r_real = _log_ratio(policy_real, ref_real, beta)
    r_syn = _log_ratio(policy_syn, ref_syn, beta)
    # NCE: −log σ(r − log μ) = softplus(−(r − log μ)) on data; −μ·log σ(log μ − r) = μ·softplus(r − log μ)
    # on noise. Gradients by autograd: ∂/∂r = −σ(log μ − r) and μ·σ(r − log μ).
    terms = {
        "real": _term_mean(torch.nn.functional.softplus(log_mu - r_real)),
        "syn": _term_mean(mu * torch.nn.functional.softplus(r_syn - log_mu)),
    }
    return terms, {"g_real": r_real.detach(), "g_syn": r_syn.detach()}


def _mean_g_metrics(loss, values, stats, extras, bound: str):
    # −L is a lower bound on a divergence whose name the key carries (docs/math.md#divergence-estimates).
    return _detached(
        {"loss": loss, bound: -loss, "real/mean_g": extras["g_real"].mean(), "syn/mean_g": extras["g_syn"].mean()}
    )


def space_loss(
    policy_real: torch.Tensor,
    policy_syn: torch.Tensor,
    ref_real: torch.Tensor,
    ref_syn: torch.Tensor,
    *,
    mu: float = 1.0,
    beta: float = 1.0,
    return_metrics: bool = False,
    scope: str = "rank",
    group: Any = None,
    stats: Optional[StepStats] = None,
    backend: str = "auto",
):
    """SPACE-style noise-contrastive loss with μ noise samples per data sample (docs/math.md#baselines):

        L = −mean_R log σ(r − log μ) − μ·mean_S log σ(log μ − r),   r = β·(s_θ − s_ref).

    β defaults to 1 (the plain log-ratio of the standard NCE form). n ≠ m allowed. At θ = θ_t
    and μ = 1 the loss is 2·log 2. Metrics: ``loss``, ``js_bound`` (−L: at μ = 1 a lower bound on
    2·JS(p_data, p_θt) − log 4, reached at the optimum), ``real/mean_g``, ``syn/mean_g`` (mean r),
    local. Other arguments as :func:`iris_loss`.
    """
    _check_options(scope, backend)
    terms, extras = _space_terms(policy_real, policy_syn, ref_real, ref_syn, mu=mu, beta=beta)
    values, used = _reduce_terms("space", terms, scope=scope, group=group, stats=stats, backend=backend,
                                 hparams={"mu": mu, "beta": beta})
    loss = (values["real"] + values["syn"]).float()  # one rounding, after the terms are summed in fp64
    if return_metrics:
        return loss, _mean_g_metrics(loss, values, used, extras, "js_bound")
    return loss


def _chi2_terms(policy_real, policy_syn, ref_real, ref_syn, *, beta: float = 1.0):
    _check_inputs(policy_real, policy_syn, ref_real, ref_syn)
    beta = _check_positive("beta", beta)
    g_real = _log_ratio(policy_real, ref_real, beta)
    g_syn = _log_ratio(policy_syn, ref_syn, beta)
    # The means of e^{g} and e^{2g} in the log domain: κ_1(g_R) = log mean e^{g_R} and
    # κ_2(g_S) = ½·log mean e^{2g_S}, each by the tilted-risk reduction (log-sum-exp shifted by
    # the batch max), so no e^{g} is formed before the one exponentiation of the loss below.
    # ∂κ_1/∂g_i = softmax(g_R)_i and ∂κ_2/∂g_j = softmax(2g_S)_j; the loss's chain rule then gives
    # ∂L/∂g_i = −2·e^{κ_1}·softmax(g_R)_i = −2·e^{g_i}/n and ∂L/∂g_j = 2·e^{2κ_2}·softmax(2g_S)_j = 2·e^{2g_j}/m.
    one = torch.ones((), dtype=g_real.dtype, device=g_real.device)
    terms = {"real": _Term(TILTED, g_real, t=one), "syn": _Term(TILTED, g_syn, t=2.0 * one)}
    return terms, {"g_real": g_real.detach(), "g_syn": g_syn.detach()}


def _chi2_combine(values: Mapping[str, torch.Tensor]) -> torch.Tensor:
    # −2·mean_R e^{g} + mean_S e^{2g} + 1 from the two κ; exp in the accumulation dtype (fp64),
    # which overflows only when the loss itself is beyond fp64's range (g ≳ 354): then inf, and
    # the trainer's non-finite guard skips the step.
    return -2.0 * torch.exp(values["real"]) + torch.exp(2.0 * values["syn"]) + 1.0


def chi2_loss(
    policy_real: torch.Tensor,
    policy_syn: torch.Tensor,
    ref_real: torch.Tensor,
    ref_syn: torch.Tensor,
    *,
    beta: float = 1.0,
    return_metrics: bool = False,
    scope: str = "rank",
    group: Any = None,
    stats: Optional[StepStats] = None,
    backend: str = "auto",
):
    """χ² loss with the density-ratio witness (docs/math.md#baselines):

        L = −2·mean_R e^{g} + mean_S e^{2g} + 1,   g = β·(s_θ − s_ref).

    It is −(the Pearson-χ² variational bound) with the witness h = 2(e^{g} − 1), whose pointwise
    optimum h* = 2(p/q − 1) a ratio e^{g} = p_θ/p_θt CAN reach: at β = 1 the exact per-iteration
    minimiser over a free model is p_data (one step), and at it −L = χ²(p_data ‖ p_θt).
    0 at θ = θ_t. Computed stably in the log domain (each mean as a tilted risk, log-sum-exp with
    the batch max; one exponentiation of each κ at the end, in fp64). n ≠ m allowed.
    Metrics: ``loss``, ``chi2_bound`` (−L, a lower bound on χ²(p_data ‖ p_θt)), ``real/mean_g``, ``syn/mean_g``,
    ``real/ess``, ``syn/ess`` (of the weights e^{g_i}, e^{2g_j}). Other arguments as :func:`iris_loss`.
    """
    _check_options(scope, backend)
    terms, extras = _chi2_terms(policy_real, policy_syn, ref_real, ref_syn, beta=beta)
    values, used = _reduce_terms("chi2", terms, scope=scope, group=group, stats=stats, backend=backend,
                                 hparams={"beta": beta})
    loss = _chi2_combine(values).float()
    if return_metrics:
        m = {"loss": loss, "chi2_bound": -loss}
        for name in ("real", "syn"):
            st = used[name]
            nan = st[NANS] > 0
            m[f"{name}/mean_g"] = st[MEAN]
            m[f"{name}/ess"] = torch.where(nan, torch.full_like(st[SUMEXP], float("nan")), st[SUMEXP] ** 2 / st[SUMEXP2])
        return loss, _detached(m)
    return loss


def _chi2_logratio_terms(policy_real, policy_syn, ref_real, ref_syn, *, beta: float = 1.0):
    _check_inputs(policy_real, policy_syn, ref_real, ref_syn)
    beta = _check_positive("beta", beta)
    h_real = _log_ratio(policy_real, ref_real, beta)
    h_syn = _log_ratio(policy_syn, ref_syn, beta)
    # Pearson-χ² variational form with h = g: ∂/∂h is −1 on data and 1 + h/2 on synthetic samples.
    terms = {"real": _term_mean(-h_real), "syn": _term_mean(h_syn + 0.25 * h_syn * h_syn)}
    return terms, {"g_real": h_real.detach(), "g_syn": h_syn.detach()}


def chi2_logratio_loss(
    policy_real: torch.Tensor,
    policy_syn: torch.Tensor,
    ref_real: torch.Tensor,
    ref_syn: torch.Tensor,
    *,
    beta: float = 1.0,
    return_metrics: bool = False,
    scope: str = "rank",
    group: Any = None,
    stats: Optional[StepStats] = None,
    backend: str = "auto",
):
    """The first "χ²" loss, kept under its honest name: the Pearson-χ² variational form with the
    LOG-ratio as witness (docs/math.md#baselines):

        L = −mean_R h + mean_S (h + h²/4),   h = β·(s_θ − s_ref).

    A valid bound for any h, but its pointwise optimum h* = 2(p/q − 1) is a density-ratio witness
    a log-ratio cannot reach, so its per-iteration optimum is NOT p_data (from KL 0.41 one exact
    iteration reaches 0.043). Its first gradient at θ = θ_t equals IRIS's. n ≠ m allowed; 0 at
    θ = θ_t. Metrics: ``loss``, ``chi2_bound`` (−L, a looser lower bound on χ²(p_data ‖ p_θt)),
    ``real/mean_g``, ``syn/mean_g``, local. Other
    arguments as :func:`iris_loss`.
    """
    _check_options(scope, backend)
    terms, extras = _chi2_logratio_terms(policy_real, policy_syn, ref_real, ref_syn, beta=beta)
    values, used = _reduce_terms("chi2_logratio", terms, scope=scope, group=group, stats=stats, backend=backend,
                                 hparams={"beta": beta})
    loss = (values["real"] + values["syn"]).float()  # one rounding, after the terms are summed in fp64
    if return_metrics:
        return loss, _mean_g_metrics(loss, values, used, extras, "chi2_bound")
    return loss


def _sft_terms(policy_real, policy_syn=None, ref_real=None, ref_syn=None, *, num_tokens_real=None):
    _check_logps("policy_real", policy_real)
    if num_tokens_real is not None:
        if not isinstance(num_tokens_real, torch.Tensor):
            raise TypeError(
                "num_tokens_real must be a tensor [n] of per-sequence response-token counts, got "
                f"{type(num_tokens_real).__name__}"
            )
        if num_tokens_real.dtype == torch.bool or num_tokens_real.dtype.is_complex:
            raise TypeError(f"num_tokens_real must be an integer or float tensor, got {num_tokens_real.dtype}")
        if num_tokens_real.shape != policy_real.shape:
            raise ValueError(
                f"num_tokens_real shape {tuple(num_tokens_real.shape)} must equal policy_real shape "
                f"{tuple(policy_real.shape)}"
            )
        if num_tokens_real.device != policy_real.device:
            raise ValueError(
                f"num_tokens_real is on {num_tokens_real.device} but policy_real is on {policy_real.device}"
            )
    acc = _acc_dtype(policy_real.device)
    s = policy_real.to(acc)
    # Token-level mean over the batch, −Σ_i s_i / Σ_i T_i (what a causal-LM cross-entropy over the
    # response tokens gives): ∂/∂s_i = −1/Σ T. Under the "global" scope Σ T is the step's total.
    # Without token counts, the sequence-level mean −Σ_i s_i / n.
    if num_tokens_real is None:
        denominator = torch.full((), float(s.shape[0]), dtype=acc, device=s.device)
    else:
        denominator = num_tokens_real.detach().to(acc).sum()
    term = _Term(RATIO, -s, denominator=denominator)
    return {"real": term}, {"s_real": s.detach()}


def sft_loss(
    policy_real: torch.Tensor,
    policy_syn: Optional[torch.Tensor] = None,
    ref_real: Optional[torch.Tensor] = None,
    ref_syn: Optional[torch.Tensor] = None,
    *,
    num_tokens_real: Optional[torch.Tensor] = None,
    return_metrics: bool = False,
    scope: str = "rank",
    group: Any = None,
    stats: Optional[StepStats] = None,
    backend: str = "auto",
):
    """Supervised fine-tuning on the annotated responses: the token-level negative log-likelihood

        L = −Σ_i s_θ(y_i) / Σ_i T_i

    where ``num_tokens_real`` [n] holds T_i, the number of response tokens summed into
    ``policy_real[i]`` (counts must be positive; not checked, which would sync). Without it
    (``None``, so that the common four-argument call works) the loss is the sequence-level mean
    −Σ_i s_θ(y_i) / n. The synthetic and
    reference arguments are accepted for the common signature and ignored (pass None). Under the
    "global" scope or with ``stats`` the token total is the whole step's. Metrics: ``loss``,
    ``real/mean_s`` (mean summed log-prob, local).
    """
    _check_options(scope, backend)
    terms, extras = _sft_terms(policy_real, policy_syn, ref_real, ref_syn, num_tokens_real=num_tokens_real)
    values, used = _reduce_terms("sft", terms, scope=scope, group=group, stats=stats, backend=backend)
    loss = values["real"].float()
    if return_metrics:
        return loss, _detached({"loss": loss, "real/mean_s": extras["s_real"].mean()})
    return loss
