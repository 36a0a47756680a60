"""Sequence-level self-play losses on per-sequence summed log-probs (docs/math.md: #tilted-risk, #objective, #baselines, #normalisation-scopes).

Every loss takes the same four tensors — the policy's and the frozen reference's summed log-probs
of the annotated ("real", [n]) and synthetic ([m]) responses — and returns a 0-dim fp32 loss:

    loss = iris_loss(policy_real, policy_syn, ref_real, ref_syn, alpha=0.5, beta=1.0)
    loss, metrics = spin_loss(..., return_metrics=True)
    loss_fn = get_loss("chi2")

Shared keywords: ``return_metrics`` (also return a dict of detached 0-dim fp32 tensors; building
it never synchronises with the host), ``scope``/``group``/``stats`` (normalisation scope, see
``iris_kernels.distributed``), ``backend`` ("auto" | "triton" | "torch", for the tilted-risk
terms). Loss-specific hyper-parameters are keyword-only.

Numerics. The batch-level arithmetic (log-ratios, per-sample losses, normalisers) runs in fp64:
it touches n + m scalars, so it costs nothing next to the per-token work, and it keeps
g = β·(s_θ − s_ref) exact for summed log-probs in the hundreds, where an fp32 difference would
lose four digits. Reference log-probs are treated as constants (detached). Inputs may be any
float dtype on any device; no function here calls ``.item()`` or otherwise syncs with the host.

Layout. This module holds IRIS (docs/math.md#objective) and the registry (``LOSSES``,
``get_loss``, ``check_loss_hparams``, ``loss_name``, ``loss_term_stats``) and re-exports the rest
of the family, so ``iris_kernels.losses`` is the one import for every loss:
``iris_kernels.tilted`` (the tilted risk κ_t, docs/math.md#tilted-risk), ``iris_kernels.loss_terms``
(terms, their reduction under a scope, docs/math.md#normalisation-scopes; input checks) and
``iris_kernels.baselines`` (SPIN, DPO, SPACE, χ², SFT, docs/math.md#baselines).
"""
from __future__ import annotations

import inspect
import math
from typing import Any, Callable, Dict, Mapping, Optional, Union

import torch

from .baselines import (
    _PAIR_VARIANTS,
    _chi2_logratio_terms,
    _chi2_terms,
    _pair_terms,
    _sft_terms,
    _space_terms,
    chi2_logratio_loss,
    chi2_loss,
    dpo_loss,
    sft_loss,
    space_loss,
    spin_loss,
)
from .distributed import MEAN, NANS, SUMEXP, SUMEXP2, TILTED, StepStats, TermStats
from .loss_terms import (
    _Term,
    _check_inputs,
    _check_options,
    _check_positive,
    _detached,
    _log_ratio,
    _reduce_terms,
    _term_local_stats,
    _value_checks,
)
from .tilted import SERIES_EPS, kappa_from_stats  # noqa: F401  (re-exported: iris_kernels.losses keeps its names)
from .tilted import _as_t, _resolve_backend, tilted_risk

__all__ = [
    "tilted_risk",
    "iris_loss",
    "spin_loss",
    "dpo_loss",
    "space_loss",
    "chi2_loss",
    "chi2_logratio_loss",
    "sft_loss",
    "LOSSES",
    "get_loss",
    "loss_term_stats",
]


# =============================================================================================
# IRIS (docs/math.md#objective)
# =============================================================================================
def _iris_terms(policy_real, policy_syn, ref_real, ref_syn, *, alpha, beta: float = 1.0):
    _check_inputs(policy_real, policy_syn, ref_real, ref_syn)
    beta = _check_positive("beta", beta)
    if isinstance(alpha, torch.Tensor) or not _value_checks():
        if not isinstance(alpha, torch.Tensor) and (isinstance(alpha, bool) or not isinstance(alpha, (int, float))):
            raise TypeError(f"alpha must be a Python float or a 0-dim tensor, got {type(alpha).__name__}")
        alpha_t = _as_t("alpha", alpha, policy_real.device)
        # A tensor α cannot be sign-checked without a host sync; a negative one poisons the tilt
        # with NaN instead, so the loss and every gradient come out NaN (never silently wrong).
        alpha_t = torch.where((alpha_t < 0) | ~torch.isfinite(alpha_t), torch.full_like(alpha_t, float("nan")), alpha_t)
    else:
        if isinstance(alpha, bool) or not isinstance(alpha, (int, float)):
            raise TypeError(f"alpha must be a Python float or a 0-dim tensor, got {type(alpha).__name__}")
        if not (math.isfinite(alpha) and alpha >= 0):
            raise ValueError(f"alpha must be a finite number >= 0 (alpha < 0 swaps the roles of the terms), got {alpha}")
        alpha_t = _as_t("alpha", alpha, policy_real.device)
    g_real = _log_ratio(policy_real, ref_real, beta)
    g_syn = _log_ratio(policy_syn, ref_syn, beta)
    # L = κ_{1−α}(−g_R) + κ_α(g_S). Gradient: ∂L/∂g_R = −softmax((1−α)·(−g_R)) = −softmax((α−1)·g_R)
    # and ∂L/∂g_S = softmax(α·g_S), the weights of docs/math.md#gradient, via the κ backward. At α = 0 and
    # α = 1 one tilt is exactly 0 and κ_0 is the mean: the docs/math.md#limits table, with no branch.
    terms = {
        "real": _Term(TILTED, -g_real, t=1.0 - alpha_t),
        "syn": _Term(TILTED, g_syn, t=alpha_t),
    }
    return terms, {"alpha": alpha_t}


def _iris_metrics(loss, values, stats, extras):
    m = {"loss": loss, "estimate": -loss, "alpha": extras["alpha"]}
    for name, sign in (("real", -1.0), ("syn", 1.0)):
        st = stats[name]
        nan = st[NANS] > 0
        ess = torch.where(nan, torch.full_like(st[SUMEXP], float("nan")), st[SUMEXP] ** 2 / st[SUMEXP2])
        m[f"{name}/kappa"] = values[name]
        m[f"{name}/ess"] = ess
        m[f"{name}/max_weight"] = torch.where(nan, torch.full_like(ess, float("nan")), 1.0 / st[SUMEXP])
        m[f"{name}/mean_g"] = sign * st[MEAN]
    return _detached(m)


def iris_loss(
    policy_real: torch.Tensor,
    policy_syn: torch.Tensor,
    ref_real: torch.Tensor,
    ref_syn: torch.Tensor,
    *,
    alpha: Union[float, torch.Tensor],
    beta: float = 1.0,
    return_metrics: bool = False,
    scope: str = "rank",
    group: Any = None,
    stats: Optional[StepStats] = None,
    backend: str = "auto",
):
    """IRIS loss L = κ_{1−α}(−g over real) + κ_α(g over synthetic), g = β·(s_θ − s_ref).

    Equals −J_α, the negated Rényi variational bound of docs/math.md#objective:
        L = 1/(1−α)·log E_R[e^{−(1−α)g}] + 1/α·log E_S[e^{αg}],
    with the exact limits at α = 0 (log E_R e^{−g} + E_S g) and α = 1 (−E_R g + log E_S e^{g},
    Donsker–Varadhan), continuous in α through both. Its gradient is
        ∇L = −Σ_R softmax((α−1)·g_R)_i ∇g_i + Σ_S softmax(α·g_S)_j ∇g_j.

    Args:
        policy_real, ref_real: [n] summed log-probs of the annotated responses (n ≥ 1).
        policy_syn, ref_syn: [m] summed log-probs of the synthetic responses (m ≥ 1, m ≠ n allowed).
        alpha: α ≥ 0, a Python float or a 0-dim tensor (e.g. from a schedule; read on the device,
            never synced). A tensor's sign cannot be checked without a sync: a negative tensor α
            makes the loss and its gradients NaN; a negative float raises ValueError.
        beta: β > 0 (default 1.0, the theory's value).
        return_metrics: also return metrics (below).
        scope, group, stats: normalisation scope (``iris_kernels.distributed``). Default "rank":
            the normalisers run over these tensors; "global" all-gathers statistics over
            ``group`` so every rank gets the single-process value and gradient; ``stats`` are
            precomputed step statistics from a ``StepNormalizer`` (gradient accumulation).
        backend: tilted-risk backend, "auto" | "triton" | "torch".

    Returns the 0-dim fp32 loss, or (loss, metrics) with detached 0-dim fp32 tensors:
    ``loss``, ``estimate`` (J = −L), ``alpha``, and per term ("real", "syn") ``kappa`` (the term's
    κ), ``ess`` (1/Σw², in samples), ``max_weight`` and ``mean_g``. Under the "global" scope (or
    with ``stats``) the term metrics are those of the whole step's batch.
    """
    _check_options(scope, backend)
    terms, extras = _iris_terms(policy_real, policy_syn, ref_real, ref_syn, alpha=alpha, beta=beta)
    values, used = _reduce_terms("iris", terms, scope=scope, group=group, stats=stats, backend=backend,
                                 hparams={"alpha": alpha, "beta": beta})
    loss = (values["real"] + values["syn"]).float()  # one rounding, after the terms are summed in fp64
    if return_metrics:
        return loss, _iris_metrics(loss, values, used, extras)
    return loss


# =============================================================================================
# Registry
# =============================================================================================
LOSSES: Dict[str, Callable] = {
    "iris": iris_loss,
    "spin": spin_loss,
    "dpo": dpo_loss,
    "space": space_loss,
    "chi2": chi2_loss,
    "chi2_logratio": chi2_logratio_loss,
    "sft": sft_loss,
}

_TERM_BUILDERS: Dict[str, Callable] = {
    "iris": _iris_terms,
    "spin": _pair_terms,
    "dpo": _pair_terms,
    "space": _space_terms,
    "chi2": _chi2_terms,
    "chi2_logratio": _chi2_logratio_terms,
    "sft": _sft_terms,
}


def get_loss(name: str) -> Callable:
    """The loss function registered under ``name`` (one of ``LOSSES``)."""
    if not isinstance(name, str) or name not in LOSSES:
        raise ValueError(f"unknown loss {name!r}; valid names: {', '.join(sorted(LOSSES))}")
    return LOSSES[name]


# Per-batch keywords: they go with each call, not with the loss's configuration.
_BATCH_KEYWORDS = frozenset({"num_tokens_real"})
_CALL_KEYWORDS = frozenset({"return_metrics", "scope", "group", "stats"})


def check_loss_hparams(name: str, hparams: Mapping[str, Any], *, partial: bool = False) -> None:
    """Validate a loss's hyper-parameters up front (names and values), before any batch is seen.

    Unknown names, α < 0 or non-finite, β or μ ≤ 0 and an unknown SPIN/DPO variant raise
    ValueError/TypeError naming the argument. A tensor α is accepted unchecked (checking its sign
    would synchronise; a negative one makes the loss NaN). ``partial``: some hyper-parameters
    (α, for a caller that supplies it per step) are given later; don't require them here.
    """
    fn = get_loss(name)
    keywords = {
        k for k, p in inspect.signature(fn).parameters.items() if p.kind is inspect.Parameter.KEYWORD_ONLY
    } - _CALL_KEYWORDS - _BATCH_KEYWORDS
    for key, value in hparams.items():
        if key not in keywords:
            raise ValueError(f"unknown hyper-parameter {key!r} for loss {name!r}; it takes {sorted(keywords)}")
        if key == "alpha" and not isinstance(value, torch.Tensor):
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                raise TypeError(f"alpha must be a Python float or a 0-dim tensor, got {type(value).__name__}")
            if not (math.isfinite(value) and value >= 0):
                raise ValueError(f"alpha must be a finite number >= 0, got {value}")
        elif key in ("beta", "mu"):
            _check_positive(key, value)
        elif key == "variant" and value not in _PAIR_VARIANTS:
            raise ValueError(f"variant must be one of {_PAIR_VARIANTS}, got {value!r}")
    if not partial and "alpha" in keywords and "alpha" not in hparams:
        raise ValueError(f"alpha is required for loss {name!r}")


def loss_name(loss: Union[str, Callable]) -> str:
    """Registry name of a loss given by name or by function."""
    if callable(loss):
        for name, fn in LOSSES.items():
            if fn is loss:
                return name
        raise ValueError(f"{loss!r} is not a registered loss; valid names: {', '.join(sorted(LOSSES))}")
    get_loss(loss)
    return loss


@torch.no_grad()
def loss_term_stats(
    loss: Union[str, Callable], policy_real, policy_syn, ref_real, ref_syn, *, backend: str = "auto", **hparams
) -> Dict[str, TermStats]:
    """Detached local statistics of each term of ``loss`` on one micro-batch (no graph built).

    What ``StepNormalizer.observe`` records; hyper-parameters are validated as by the loss.
    """
    name = loss_name(loss)
    terms, _ = _TERM_BUILDERS[name](policy_real, policy_syn, ref_real, ref_syn, **hparams)
    be = _resolve_backend(backend, next(iter(terms.values())).ell.device)
    return {k: _term_local_stats(term, be) for k, term in terms.items()}
