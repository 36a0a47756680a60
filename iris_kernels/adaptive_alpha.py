"""The adaptive α schedules: α from a gap measured once per self-play iteration (docs/math.md#alpha-schedule).

* :class:`GapAdaptiveAlpha` (``"gap_adaptive"``, alias ``"adaptive"``): a classifier two-sample
  test on the held-out annotated and synthetic responses bounds TV(p_data, p_θt) from below;
* :class:`TemperatureScoreAlpha` (``"temperature_score"``): the first rule, the opponent's
  temperature score D̂, kept to reproduce the committed results; not a distance.

Import them from ``iris_kernels.schedules``, whose factory ``make_schedule`` builds them by name.
"""
from __future__ import annotations

import math
import numbers
import warnings
from typing import Any, Dict, Mapping, Optional

import torch

from .schedule_base import AlphaSchedule, _check_alpha_value, _check_int, _check_step

__all__ = ["GapAdaptiveAlpha", "TemperatureScoreAlpha", "all_reduce_gap_sums"]


def all_reduce_gap_sums(sums: torch.Tensor, group=None) -> torch.Tensor:
    """Sum ``sums`` over the ranks of ``group`` (in place, and returned); a no-op without distributed.

    Every rank then divides the same fp64 totals, so the gap and α are bit-identical everywhere.
    NCCL only reduces CUDA tensors, so the sums are moved to the current CUDA device for it.
    """
    if not isinstance(sums, torch.Tensor):
        raise TypeError(f"sums must be a torch.Tensor, got {type(sums).__name__}")
    dist = torch.distributed
    if not (dist.is_available() and dist.is_initialized()):
        return sums
    if dist.get_world_size(group) == 1:
        return sums
    if dist.get_backend(group) == "nccl" and sums.device.type != "cuda":
        on_device = sums.to(torch.device("cuda", torch.cuda.current_device()))
        dist.all_reduce(on_device, op=dist.ReduceOp.SUM, group=group)
        sums.copy_(on_device)
        return sums
    dist.all_reduce(sums, op=dist.ReduceOp.SUM, group=group)
    return sums


class TemperatureScoreAlpha(AlphaSchedule):
    """The first "adaptive" rule, kept to reproduce the committed results: α from the opponent's
    *temperature score* D̂, which is not a distance (docs/math.md#alpha-schedule).

    D̂ estimates KL(p‖q) − (H(q) − H(p)), minus the derivative of the data log-likelihood with
    respect to a global inverse temperature of the opponent q: it is 0 for every temperature-
    calibrated model however far from p_data, < 0 when q is too flat and > 0 when it is too sharp.
    Use :class:`GapAdaptiveAlpha` (``"gap_adaptive"``, the default adaptive rule) for a gap.

        D̂_t = mean(s̄_θt over synthetic responses) − mean(s̄_θt over annotated responses)
        α_t = α_min + (α_max − α_min) · clip(D̂_t / D̂_0, 0, 1)

    s̄ is the per-token MEAN log-prob under the opponent θ_t (the reference model of iteration t),
    so response length does not enter the gap. With one annotated and one synthetic response per
    prompt, the difference of means is exactly the mean over prompts of s̄(x, y') − s̄(x, y); with
    n ≠ m it is the natural generalisation. A larger gap gives a larger α (sharper, mode-covering
    weights early); as the opponent approaches the data the gap shrinks and α → α_min.

    Usage, once per self-play iteration, before its first optimizer step::

        for each batch of the reference pass:  sched.accumulate_gap(syn_means, real_means)   # no sync
        sched.update_gap()        # all-reduces the sums, sets α_t; one host sync
        ... train the iteration with sched.alpha(step) ...

    Reference gap D̂_0: the first finite gap measured (or ``reference_gap`` if given). Choices for
    degenerate values, made so that α always stays in [α_min, α_max] or is NaN:

    * D̂_0 ≤ 0: the opponent gives its own samples no more per-token likelihood than the data, so
      there is no gap to close; the ratio is taken as 0 and α = α_min for the whole run (the smooth,
      refinement end). Pass ``reference_gap`` to impose a scale instead.
    * D̂_t ≤ 0 later (the opponent now fits the data better than its samples): clip gives α_min.
    * D̂_t > D̂_0 (the gap grew): clip gives α_max.
    * D̂_t NaN (NaN reference log-probs): α_t is NaN, so the NaN reaches the loss and the trainer's
      NaN guard instead of being hidden. ±inf clips to α_max / α_min once D̂_0 exists; a non-finite
      gap never becomes D̂_0 (α_t is NaN if there is no D̂_0 yet). An iteration with no samples on
      any rank raises ValueError.

    Before the first ``update_gap`` α = α_max: iteration 0's own gap is D̂_0, whose ratio is 1.
    """

    name = "temperature_score"

    def __init__(self, alpha_max: float = 2.0, alpha_min: float = 0.5, reference_gap: Optional[float] = None):
        self.alpha_max = _check_alpha_value(alpha_max, "alpha_max")
        self.alpha_min = _check_alpha_value(alpha_min, "alpha_min")
        if self.alpha_min > self.alpha_max:
            raise ValueError(
                f"alpha_min ({self.alpha_min}) must be <= alpha_max ({self.alpha_max}): a larger gap must give a larger α"
            )
        if reference_gap is not None:
            if isinstance(reference_gap, bool) or not isinstance(reference_gap, numbers.Real):
                raise TypeError(f"reference_gap must be a real number or None, got {type(reference_gap).__name__}")
            reference_gap = float(reference_gap)
            if not math.isfinite(reference_gap):
                raise ValueError(f"reference_gap must be finite, got {reference_gap}")
        self._fixed_reference = reference_gap
        self.reference_gap: Optional[float] = reference_gap  # D̂_0 once known
        self.last_gap: Optional[float] = None  # D̂_t of the latest update
        self.num_updates = 0
        self._alpha = self.alpha_max
        # [Σ s̄_syn, count_syn, Σ s̄_real, count_real], fp64 so that the sum of many batches and
        # ranks does not lose the small difference D̂_t between two large-ish means.
        self._sums: Optional[torch.Tensor] = None

    # -- reading α

    def alpha(self, step: Optional[int] = None) -> float:
        # α depends on the iteration's gap only, never on the step: constant within every step.
        if step is not None:
            _check_step(step)
        return self._alpha

    @staticmethod
    def alpha_from_gap(gap: float, reference_gap: float, alpha_min: float, alpha_max: float) -> float:
        """The formula alone, with the degenerate cases of the class docstring."""
        if math.isnan(gap):
            return float("nan")
        if not reference_gap > 0.0:
            return alpha_min
        ratio = min(max(gap / reference_gap, 0.0), 1.0)
        return alpha_min + (alpha_max - alpha_min) * ratio

    # -- feeding the gap

    @staticmethod
    def _as_flat(x: Any, name: str) -> torch.Tensor:
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor of per-token mean log-probs, got {type(x).__name__}")
        if not x.is_floating_point():
            raise TypeError(f"{name} must be a floating tensor, got {x.dtype}")
        if x.dim() > 1:
            raise ValueError(f"{name} must be 0-d or 1-d (one value per response), got shape {tuple(x.shape)}")
        return x.detach().reshape(-1).double()

    def accumulate_gap(self, syn_token_logps: torch.Tensor, real_token_logps: torch.Tensor) -> None:
        """Add one batch's per-token MEAN opponent log-probs: synthetic [m] and annotated [n].

        Device arithmetic only (no host sync); call it from the reference pass of the iteration.
        From summed log-probs ``s`` and token counts ``c`` the means are ``s / c``
        (``sequence_logprobs(..., length_normalize=True)`` returns them directly).
        """
        syn = self._as_flat(syn_token_logps, "syn_token_logps")
        real = self._as_flat(real_token_logps, "real_token_logps")
        if syn.device != real.device:
            raise ValueError(f"syn_token_logps is on {syn.device} but real_token_logps is on {real.device}")
        # Counts are known on the host; new_full writes them with a fill kernel, not a copy that
        # could wait on the stream.
        batch = torch.stack(
            [syn.sum(), syn.new_full((), float(syn.numel())), real.sum(), real.new_full((), float(real.numel()))]
        )
        if self._sums is None:
            self._sums = batch
        else:
            self._sums = self._sums.to(batch.device) + batch

    def update_gap(self, syn_token_logps=None, real_token_logps=None, *, group=None) -> float:
        """Close the iteration's gap measurement and set α_t; returns α_t.

        Optionally adds one last batch first. All-reduces the four sums over ``group`` (a no-op
        without torch.distributed) so that every rank computes the same D̂_t and α_t, then resets
        the sums for the next iteration. One host sync, once per iteration.
        """
        if (syn_token_logps is None) != (real_token_logps is None):
            raise ValueError("pass both syn_token_logps and real_token_logps, or neither")
        if syn_token_logps is not None:
            self.accumulate_gap(syn_token_logps, real_token_logps)
        sums = self._sums if self._sums is not None else torch.zeros(4, dtype=torch.float64)
        sums = all_reduce_gap_sums(sums.clone(), group=group)
        syn_sum, syn_count, real_sum, real_count = sums.tolist()
        if syn_count == 0 or real_count == 0:
            raise ValueError(
                "update_gap needs at least one synthetic and one annotated response across all ranks "
                f"(got {int(syn_count)} synthetic, {int(real_count)} annotated); call accumulate_gap first"
            )
        gap = syn_sum / syn_count - real_sum / real_count
        if self.reference_gap is None and math.isfinite(gap):
            self.reference_gap = gap
        self.last_gap = gap
        if self.reference_gap is None:  # only possible when this gap is NaN/inf and none came before
            self._alpha = float("nan")
        else:
            self._alpha = self.alpha_from_gap(gap, self.reference_gap, self.alpha_min, self.alpha_max)
        self.num_updates += 1
        self._sums = None
        return self._alpha

    # -- checkpointing

    def _config(self) -> Dict[str, Any]:
        return {"alpha_max": self.alpha_max, "alpha_min": self.alpha_min, "reference_gap": self._fixed_reference}

    def state_dict(self) -> Dict[str, Any]:
        state = super().state_dict()
        state.update(
            alpha=self._alpha,
            measured_reference_gap=self.reference_gap,
            last_gap=self.last_gap,
            num_updates=self.num_updates,
            # A checkpoint taken in the middle of a reference pass keeps its partial sums.
            pending_sums=None if self._sums is None else self._sums.detach().cpu().clone(),
        )
        return state

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        super().load_state_dict(state)
        for key in ("alpha", "measured_reference_gap", "last_gap", "num_updates", "pending_sums"):
            if key not in state:
                raise ValueError(f"state is missing {key!r}")
        self._alpha = float(state["alpha"])
        self.reference_gap = None if state["measured_reference_gap"] is None else float(state["measured_reference_gap"])
        self.last_gap = None if state["last_gap"] is None else float(state["last_gap"])
        self.num_updates = int(state["num_updates"])
        pending = state["pending_sums"]
        if pending is not None and (not isinstance(pending, torch.Tensor) or pending.shape != (4,)):
            raise ValueError("state['pending_sums'] must be None or a tensor of shape (4,)")
        self._sums = None if pending is None else pending.to(torch.float64).clone()


def _gather_to_first_and_broadcast(payload, compute, group=None):
    """Run ``compute(list of every rank's payload)`` on the group's first rank and return its
    result on every rank (gather_object + broadcast_object_list); without distributed, locally.

    One round trip per call: the adaptive schedule calls it once per self-play iteration.
    """
    dist = torch.distributed
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size(group) == 1:
        return compute([payload])
    first = dist.get_global_rank(group, 0) if group is not None else 0
    is_first = dist.get_rank() == first
    gathered = [None] * dist.get_world_size(group) if is_first else None
    dist.gather_object(payload, gathered, dst=first, group=group)
    box = [compute(gathered) if is_first else None]
    dist.broadcast_object_list(box, src=first, group=group)
    return box[0]


class GapAdaptiveAlpha(AlphaSchedule):
    """α from a measured distance between the data and the opponent (docs/math.md#alpha-schedule).

    Once per self-play iteration t, on the **held-out** split (never the training rows, where
    the opponent's fit measures over-fitting), a classifier two-sample test
    (:func:`iris_kernels.two_sample.classifier_two_sample_test`) separates annotated from
    synthetic responses on per-response features (:func:`iris_kernels.two_sample.response_features`)
    and gives u_t, a debiased lower bound on TV(p_data, p_θt) in [0, 1]. Then

        α_t = α_min + (α_max − α_min) · clip(u_t / u_ref, 0, 1)

    with ``u_ref`` (default 1: α is affine in the TV bound) or, with ``relative=True``,
    u_ref = max(u_0, 2/√N) (α_max at the first iteration, the 2/√N floor so that a u_0 at noise
    level does not make every later fluctuation look large). ``monotone=True``: α_t = min(α_{t−1}, α_t),
    α never rises again.

    Feeding it, once per iteration before the iteration's first optimizer step::

        real = response_features(annotated_ids, ref_real_logps, finished_real, vocab_size=V)
        syn = response_features(synthetic_ids, ref_syn_logps, finished_syn, vocab_size=V)
        sched.update_gap(real, syn, seed=(run_seed, t))     # this rank's held-out rows
        ... train the iteration with sched.alpha(step) ...

    Under torch.distributed each rank passes its own rows; they are gathered on the group's
    first rank, the test runs there and its result is broadcast, so α is identical on every
    rank (one host round trip per iteration). Asking for α before the first ``update_gap``
    raises RuntimeError: an unfed adaptive schedule has no α (the first version silently kept α_max).

    After each update, :attr:`last_metrics` holds ``gap_u``, ``gap_acc`` (cross-fitted
    accuracy), ``gap_ce`` (its held-out cross-entropy, nats), ``gap_N`` (rows) and
    ``temperature_score`` = mean s̄_θt(synthetic) − mean s̄_θt(annotated) on the same rows
    (< 0: the opponent is too flat, > 0: too sharp; not a distance; the first adaptive rule's D̂).
    Fewer than ``min_rows_per_side`` (256) rows per side gives a warning: the bound's noise is
    ≈ 1/√N (use ≥ 512 held-out prompts).
    """

    name = "gap_adaptive"

    def __init__(self, alpha_max: float = 2.0, alpha_min: float = 0.5, u_ref: float = 1.0, relative: bool = False,
                 monotone: bool = False, lam: float = 1e-2, max_iter: int = 25, min_rows_per_side: int = 256):
        self.alpha_max = _check_alpha_value(alpha_max, "alpha_max")
        self.alpha_min = _check_alpha_value(alpha_min, "alpha_min")
        if self.alpha_min > self.alpha_max:
            raise ValueError(
                f"alpha_min ({self.alpha_min}) must be <= alpha_max ({self.alpha_max}): a larger gap must give a larger α"
            )
        if isinstance(u_ref, bool) or not isinstance(u_ref, numbers.Real) or not (0 < float(u_ref) <= 1):
            raise ValueError(f"u_ref must be a number in (0, 1], got {u_ref!r}")
        for name, value in (("relative", relative), ("monotone", monotone)):
            if not isinstance(value, bool):
                raise TypeError(f"{name} must be a bool, got {type(value).__name__}")
        if isinstance(lam, bool) or not isinstance(lam, numbers.Real) or not (math.isfinite(lam) and lam > 0):
            raise ValueError(f"lam must be a finite number > 0, got {lam!r}")
        self.u_ref = float(u_ref)
        self.relative, self.monotone = relative, monotone
        self.lam = float(lam)
        self.max_iter = _check_int(max_iter, "max_iter", 1)
        self.min_rows_per_side = _check_int(min_rows_per_side, "min_rows_per_side", 0)
        self.u_0: Optional[float] = None
        self.last_u: Optional[float] = None
        self.num_updates = 0
        self._alpha: Optional[float] = None
        self.last_metrics: Dict[str, float] = {}

    def alpha(self, step: Optional[int] = None) -> float:
        if step is not None:
            _check_step(step)
        if self._alpha is None:
            raise RuntimeError(
                "the gap-adaptive α schedule has not been fed: call update_gap(real_features, syn_features, seed=...) "
                "with the held-out annotated and synthetic responses' features once per self-play iteration, before "
                "its first optimizer step (docs/math.md#alpha-schedule); train/selfplay.py does this itself"
            )
        return self._alpha

    def alpha_from_u(self, u: float, N: int) -> float:
        """The map u_t → α_t alone (u_0 and the previous α as stored)."""
        if math.isnan(u):
            return float("nan")
        u_ref = max(self.u_0 if self.u_0 is not None else u, 2.0 / math.sqrt(N)) if self.relative else self.u_ref
        a = self.alpha_min + (self.alpha_max - self.alpha_min) * min(max(u / u_ref, 0.0), 1.0)
        if self.monotone and self._alpha is not None:
            a = min(self._alpha, a)
        return a

    def update_gap(self, real_features=None, syn_features=None, *, seed: Any = 0, real_keys=None, syn_keys=None,
                   group=None) -> float:
        """Run the two-sample test on every rank's held-out rows and set α_t; returns α_t.

        real_features [n, F], syn_features [m, F]: this rank's rows (float, from
        ``response_features``; the last column must be s̄). ``seed``: an int or a tuple of ints
        (e.g. (run seed, iteration)) seeding the 2-fold split. ``real_keys`` [n] / ``syn_keys`` [m]:
        optional integer row ids (e.g. prompt ids); the gathered rows are sorted by them before the
        split, so the result does not depend on how the rows were sharded over ranks. Raises
        ValueError with fewer than 2 rows per side over all ranks.
        """
        from .two_sample import classifier_two_sample_test

        for name, x in (("real_features", real_features), ("syn_features", syn_features)):
            if not isinstance(x, torch.Tensor) or x.dim() != 2:
                raise TypeError(f"{name} must be a 2-D tensor [rows, features] from response_features")
        if real_features.shape[1] != syn_features.shape[1]:
            raise ValueError(f"real_features has {real_features.shape[1]} columns but syn_features has "
                             f"{syn_features.shape[1]}")
        parts = seed if isinstance(seed, (tuple, list)) else (seed,)
        seed_int = 0
        for p in parts:  # a fixed mix of the parts, the same on every platform (no hash())
            seed_int = (seed_int * 1_000_003 + int(p)) % (1 << 62)
        def keys(k, x, name):
            if k is None:
                return None
            k = torch.as_tensor(k, dtype=torch.int64).reshape(-1).cpu()
            if k.shape[0] != x.shape[0]:
                raise ValueError(f"{name} must have one key per row ({x.shape[0]}), got {k.shape[0]}")
            return k

        payload = (real_features.detach().to(torch.float64).cpu(), syn_features.detach().to(torch.float64).cpu(),
                   keys(real_keys, real_features, "real_keys"), keys(syn_keys, syn_features, "syn_keys"))
        lam, max_iter = self.lam, self.max_iter

        def compute(all_parts):
            real = torch.cat([p[0] for p in all_parts])
            syn = torch.cat([p[1] for p in all_parts])
            if all(p[2] is not None for p in all_parts):
                real = real[torch.argsort(torch.cat([p[2] for p in all_parts]), stable=True)]
            if all(p[3] is not None for p in all_parts):
                syn = syn[torch.argsort(torch.cat([p[3] for p in all_parts]), stable=True)]
            if real.shape[0] < 2 or syn.shape[0] < 2:
                return {"error": f"update_gap needs >= 2 annotated and >= 2 synthetic rows over all ranks, got "
                                 f"{real.shape[0]} and {syn.shape[0]}"}
            out = classifier_two_sample_test(real, syn, seed=seed_int, lam=lam, max_iter=max_iter)
            out["temperature_score"] = float(syn[:, -1].mean() - real[:, -1].mean())
            out["rows_per_side"] = min(real.shape[0], syn.shape[0])
            return out

        result = _gather_to_first_and_broadcast(payload, compute, group)
        if "error" in result:
            raise ValueError(result["error"])
        if result["rows_per_side"] < self.min_rows_per_side:
            warnings.warn(
                f"the gap-adaptive α measured its gap on {result['rows_per_side']} held-out rows per side "
                f"(< {self.min_rows_per_side}): u_t's noise is about 1/sqrt(N) = {1 / math.sqrt(result['N']):.3f}; "
                "use >= 512 held-out prompts (data.eval / data.max_eval_prompts)", RuntimeWarning, stacklevel=2)
        u = float(result["u"])
        if self.u_0 is None:
            self.u_0 = u
        self._alpha = self.alpha_from_u(u, int(result["N"]))
        self.last_u = u
        self.num_updates += 1
        self.last_metrics = {"gap_u": u, "gap_acc": float(result["acc"]), "gap_ce": float(result["ce"]),
                             "gap_N": int(result["N"]), "temperature_score": float(result["temperature_score"])}
        return self._alpha

    def _config(self) -> Dict[str, Any]:
        return {"alpha_max": self.alpha_max, "alpha_min": self.alpha_min, "u_ref": self.u_ref,
                "relative": self.relative, "monotone": self.monotone, "lam": self.lam, "max_iter": self.max_iter,
                "min_rows_per_side": self.min_rows_per_side}

    def state_dict(self) -> Dict[str, Any]:
        state = super().state_dict()
        state.update(alpha=self._alpha, u_0=self.u_0, last_u=self.last_u, num_updates=self.num_updates,
                     last_metrics=dict(self.last_metrics))
        return state

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        super().load_state_dict(state)
        for key in ("alpha", "u_0", "last_u", "num_updates", "last_metrics"):
            if key not in state:
                raise ValueError(f"state is missing {key!r}")
        self._alpha = None if state["alpha"] is None else float(state["alpha"])
        self.u_0 = None if state["u_0"] is None else float(state["u_0"])
        self.last_u = None if state["last_u"] is None else float(state["last_u"])
        self.num_updates = int(state["num_updates"])
        self.last_metrics = dict(state["last_metrics"])
