"""Normalisation scope of the sequence-level losses: ``micro`` | ``rank`` | ``global`` (docs/math.md#normalisation-scopes).

The IRIS loss couples every sequence of a batch through two softmax normalisers, and the baselines
through their means. Which batch those normalisers run over is the *scope*:

- ``micro``: the tensors passed to one loss call (a micro-batch). Cheapest; with gradient
  accumulation or several ranks it is a different, biased estimator of the step's loss.
- ``rank``: everything this rank sees in one optimizer step (all its micro-batches). Without
  accumulation it is the same as ``micro``; with accumulation it needs a :class:`StepNormalizer`.
- ``global``: every rank's micro-batches of the step, i.e. what a single process would compute
  on the concatenated batch. Gradients match that single-process computation exactly. Passed to a
  loss call without ``stats`` it covers that call's tensors on every rank (one ``all_gather`` per
  call); with gradient accumulation use a :class:`StepNormalizer`. Without an initialised process
  group it is the same as ``rank``.

How ``global`` works. Each term of a loss reduces per-sample values ℓ_i to a scalar through a small
*mergeable* statistics vector (the tilted-risk statistics below, or a sum/denominator pair for
plain means). Every rank computes its local vector, one ``all_gather`` of the concatenated vectors
gives every rank the same [world_size, K] matrix, and ``merge_stats`` turns it into the global
vector by the same arithmetic on every rank, so the value and the weights are bit-identical across
ranks. The local surrogate then back-propagates ``grad_scale · w_i^global`` into each local ℓ_i,
with ``grad_scale = world_size`` because DDP and FSDP *average* gradients over the group:
(1/W)·Σ_ranks W·Σ_local w_i ∇ℓ_i = Σ_all w_i ∇ℓ_i, the single-process gradient. (A plain
``all_reduce(SUM)`` of gradients would need ``grad_scale = 1``; use ``scope="rank"`` semantics or
divide by W yourself in that case.)

With gradient accumulation the global statistics must exist before the first micro-batch's
backward. :class:`StepNormalizer` does one no-grad forward over the step's micro-batches, merges
the statistics (and gathers them across ranks for ``global``), then hands each micro-batch the same
fixed statistics. This is exact because θ does not change within an optimizer step; it assumes the
no-grad pass and the gradient pass compute the same log-probs (no dropout, which self-play
fine-tuning does not use).

This module is pure PyTorch and imports nothing else from the package at import time
(``iris_kernels.losses`` imports it).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Mapping, NamedTuple, Optional

import torch
import torch.distributed as dist

SCOPES = ("micro", "rank", "global")

# ---------------------------------------------------------------------------------------------
# Statistics layouts. TILTED is also the layout written by the Triton kernel in
# iris_kernels/ops/tilted_risk.py (its docstring explains each slot).
TILTED = "tilted"
NUM_TILTED_STATS = 10
COUNT, TMAX, SUMEXP, SUMEXP2, MEAN, M2, M3, LMAX, LMIN, NANS = range(NUM_TILTED_STATS)

# RATIO: value = NUMERATOR / DENOMINATOR with NUMERATOR = Σ_i ℓ_i. A plain mean has
# DENOMINATOR = count; SFT's token mean has DENOMINATOR = number of tokens.
RATIO = "ratio"
NUM_RATIO_STATS = 2
NUMERATOR, DENOMINATOR = range(NUM_RATIO_STATS)

_NUM_STATS = {TILTED: NUM_TILTED_STATS, RATIO: NUM_RATIO_STATS}


class TermStats(NamedTuple):
    """Detached fp64 statistics of one loss term (``kind`` is ``"tilted"`` or ``"ratio"``)."""

    kind: str
    values: torch.Tensor


def check_scope(scope: Any) -> str:
    if scope not in SCOPES:
        raise ValueError(f"scope must be one of {SCOPES}, got {scope!r}")
    return scope


def world_size(group: Optional[Any] = None) -> int:
    """World size of ``group`` (1 when torch.distributed is not initialised)."""
    if not (dist.is_available() and dist.is_initialized()):
        return 1
    return dist.get_world_size(group)


def merge_stats(kind: str, stacked: torch.Tensor) -> torch.Tensor:
    """Statistics of the concatenation of P parts from their statistics ``stacked`` [P, K].

    Pure tensor arithmetic in a fixed order (no host sync), so every rank merging the same gathered
    matrix gets bit-identical results.
    """
    if kind == RATIO:
        return stacked.sum(0)
    if kind != TILTED:
        raise ValueError(f"unknown statistics kind {kind!r}")
    cnt = stacked[:, COUNT]
    total = cnt.sum()
    # Log-sum-exp parts: bring every part's sums to the common shift max_p TMAX_p. A part whose
    # sum is 0 (empty, or every t·ℓ = -inf) has no shift to speak of and is left out of the max;
    # a shift is 0 where the max is infinite (as the kernel does).
    shifts = torch.where(stacked[:, SUMEXP] == 0, torch.full_like(stacked[:, TMAX], float("-inf")), stacked[:, TMAX])
    tmax = shifts.max()
    tmax = torch.where(torch.isinf(tmax), torch.zeros_like(tmax), tmax)
    rescale = torch.where(torch.isneginf(shifts), torch.zeros_like(shifts), torch.exp(shifts - tmax))
    sumexp = (stacked[:, SUMEXP] * rescale).sum()
    sumexp2 = (stacked[:, SUMEXP2] * rescale * rescale).sum()
    # Central moments. For part p with mean μ_p and offset δ_p = μ_p − μ from the merged mean,
    # every x of p satisfies x − μ = (x − μ_p) + δ_p; summing powers over p (Σ_p(x − μ_p) = 0):
    #   Σ(x − μ)² = M2_p + n_p·δ_p²,   Σ(x − μ)³ = M3_p + 3·δ_p·M2_p + n_p·δ_p³.
    mean = (cnt * stacked[:, MEAN]).sum() / total
    delta = stacked[:, MEAN] - mean
    m2 = (stacked[:, M2] + cnt * delta * delta).sum()
    m3 = (stacked[:, M3] + 3.0 * delta * stacked[:, M2] + cnt * delta * delta * delta).sum()
    return torch.stack(
        [
            total,
            tmax,
            sumexp,
            sumexp2,
            mean,
            m2,
            m3,
            stacked[:, LMAX].max(),
            stacked[:, LMIN].min(),
            stacked[:, NANS].sum(),
        ]
    )


def merge_term_stats(parts: List[Mapping[str, TermStats]]) -> Dict[str, TermStats]:
    """Merge per-term statistics of several micro-batches (same terms, same kinds) into one."""
    if not parts:
        raise ValueError("merge_term_stats needs at least one part")
    names = list(parts[0])
    for p in parts[1:]:
        if list(p) != names:
            raise ValueError(f"micro-batches have different loss terms: {names} vs {list(p)}")
    out = {}
    for name in names:
        kind = parts[0][name].kind
        stacked = torch.stack([p[name].values for p in parts])
        out[name] = TermStats(kind, merge_stats(kind, stacked))
    return out


def all_gather_term_stats(local: Mapping[str, TermStats], group: Optional[Any] = None) -> Dict[str, TermStats]:
    """Global statistics from every rank's local ones: ONE all_gather of the concatenated vectors.

    Sizes are fixed by the layouts, so ranks holding different numbers of samples need no padding
    and no host-side size exchange.
    """
    ws = world_size(group)
    if ws == 1:
        return dict(local)
    names = list(local)
    flat = torch.cat([local[n].values for n in names])
    gathered = [torch.empty_like(flat) for _ in range(ws)]
    dist.all_gather(gathered, flat, group=group)
    table = torch.stack(gathered)  # [W, K_total]
    out, offset = {}, 0
    for n in names:
        kind = local[n].kind
        k = _NUM_STATS[kind]
        out[n] = TermStats(kind, merge_stats(kind, table[:, offset : offset + k]))
        offset += k
    return out


@dataclass(frozen=True)
class StepStats:
    """Normalisation statistics of one optimizer step, as a loss's ``stats=`` argument takes them.

    Produced by :class:`StepNormalizer`; pass the loss the same ``scope`` and hyper-parameters
    that produced it (the normaliser does this for you when you call it).

    grad_scale: what every local gradient is multiplied by: ``world_size`` for ``global`` (undoes
    DDP's averaging) times the ``accumulation_divisor`` the training loop divides losses by.
    """

    loss: str
    scope: str
    terms: Mapping[str, TermStats]
    grad_scale: float
    world_size: int
    num_micro_batches: int
    # The loss hyper-parameters (alpha, beta, mu, ...) the statistics were made with; a loss
    # called with other values refuses them.
    hparams: Mapping[str, Any] = field(default_factory=dict)


class StepNormalizer:
    """Exact ``rank``/``global`` normalisation over the micro-batches of one optimizer step.

    Build one per optimizer step, with the loss's name and hyper-parameters::

        norm = StepNormalizer("iris", alpha=alpha, beta=0.1, scope="global")
        with torch.no_grad():                               # pass 1: statistics only
            for mb in micro_batches:
                norm.observe(*seq_logps(policy, mb), *ref_logps(mb))
        for mb in micro_batches:                            # pass 2: forward/backward
            loss = norm(*seq_logps(policy, mb), *ref_logps(mb))
            loss.backward()
        optimizer.step()

    where ``seq_logps`` returns (policy_real, policy_syn) and ``ref_logps`` (ref_real, ref_syn),
    per-sequence summed log-probs. ``observe`` computes and stores each micro-batch's detached
    statistics; the first call after the observations merges them (and, for ``global``, does the
    one ``all_gather``); every call returns the loss of that micro-batch with the step's weights.
    Its value is the step's loss (the same number on every micro-batch and rank) and its gradient
    is the micro-batch's share of the step's gradient, so the loop must NOT divide it by the number
    of micro-batches — if the loop does anyway (``accelerate``'s ``Accelerator.backward`` divides
    by ``gradient_accumulation_steps``), pass that number as ``accumulation_divisor`` and the
    gradient is scaled back.

    Per-micro-batch keyword arguments of the loss (e.g. ``num_tokens_real`` of ``sft_loss``) go
    to both ``observe`` and the call. With ``scope="micro"`` observation is skipped and each call
    normalises over its own inputs (the plain per-micro-batch estimator), so the same training
    loop serves all three scopes (``accumulation_divisor`` does not apply to ``micro``: there the
    loop's usual averaging of micro-batch losses is the estimator).
    """

    def __init__(
        self,
        loss: str | Callable,
        *,
        scope: str = "global",
        group: Optional[Any] = None,
        accumulation_divisor: int = 1,
        **hparams: Any,
    ) -> None:
        from . import losses as _losses  # losses imports this module at import time

        self._losses = _losses
        self.loss_name = _losses.loss_name(loss)
        self.loss_fn = _losses.LOSSES[self.loss_name]
        self.scope = check_scope(scope)
        if isinstance(accumulation_divisor, bool) or not isinstance(accumulation_divisor, int) or accumulation_divisor < 1:
            raise ValueError(f"accumulation_divisor must be a positive int, got {accumulation_divisor!r}")
        for reserved in ("stats", "scope", "group", "return_metrics"):
            if reserved in hparams:
                raise ValueError(f"{reserved!r} is set by StepNormalizer, not passed as a hyper-parameter")
        self._losses.check_loss_hparams(self.loss_name, hparams)  # fail at construction, not at observe()
        self.group = group
        self.accumulation_divisor = accumulation_divisor
        self.hparams = dict(hparams)
        self._parts: List[Dict[str, TermStats]] = []
        self._stats: Optional[StepStats] = None

    @torch.no_grad()
    def observe(self, policy_real, policy_syn, ref_real, ref_syn, **batch_kwargs: Any) -> None:
        """Record one micro-batch's statistics (no graph is built; call it for every micro-batch)."""
        if self._stats is not None:
            raise RuntimeError("observe() after the step's statistics were finalised; build a new StepNormalizer per step")
        if self.scope == "micro":
            return
        self._parts.append(
            self._losses.loss_term_stats(
                self.loss_name, policy_real, policy_syn, ref_real, ref_syn, **self.hparams, **batch_kwargs
            )
        )

    def finalize(self) -> Optional[StepStats]:
        """Merge the observed micro-batches (and gather across ranks for ``global``); idempotent."""
        if self.scope == "micro":
            return None
        if self._stats is None:
            if not self._parts:
                raise ValueError("StepNormalizer: observe() every micro-batch of the step before computing a loss")
            terms = merge_term_stats(self._parts)
            ws = 1
            if self.scope == "global":
                ws = world_size(self.group)
                terms = all_gather_term_stats(terms, self.group)
            self._stats = StepStats(
                loss=self.loss_name,
                scope=self.scope,
                terms=terms,
                grad_scale=float(ws * self.accumulation_divisor),
                world_size=ws,
                num_micro_batches=len(self._parts),
                hparams=dict(self.hparams),
            )
            self._parts = []
        return self._stats

    @property
    def stats(self) -> Optional[StepStats]:
        return self.finalize()

    def __call__(self, policy_real, policy_syn, ref_real, ref_syn, *, return_metrics: bool = False, **batch_kwargs: Any):
        """The loss of one micro-batch under the step's normalisation (see the class docstring)."""
        return self.loss_fn(
            policy_real,
            policy_syn,
            ref_real,
            ref_syn,
            **self.hparams,
            **batch_kwargs,
            return_metrics=return_metrics,
            scope=self.scope,
            group=self.group,
            stats=self.finalize(),
        )
