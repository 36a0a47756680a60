"""α schedules for the IRIS loss (docs/math.md#alpha-schedule).

A schedule turns "where are we in training" into the α that ``iris_loss`` uses. Three rules hold
for every schedule here:

* **Constant within an optimizer step.** ``alpha(step)`` is a pure function of the optimizer step
  (and, for the adaptive schedule, of state that changes only between self-play iterations), so
  every micro-batch of a gradient-accumulation step sees the same α. The schedule never counts
  calls itself: the caller passes the optimizer step.
* **Identical on every rank.** The per-step schedules depend on nothing but the step. The
  gap-adaptive schedule measures its gap on one rank and broadcasts it; the temperature-score
  rule reads sums all-reduced over the process group before dividing.
* **Deterministic and resumable.** ``state_dict()`` / ``load_state_dict()`` capture everything, so a
  resumed run produces the same α sequence bit for bit.

α is returned as a Python float: the losses are exact at α ∈ {0, 1} only for float α, and a float
costs no host sync per step. The adaptive schedules do one host round trip per self-play iteration
(in ``update_gap``, outside any optimizer step) to turn their gap into a float.

Example::

    sched = make_schedule({"type": "cosine", "alpha_start": 2.0, "alpha_end": 0.5, "num_steps": 1000})
    loss = iris_loss(pr, ps, rr, rs, alpha=sched.alpha(optimizer_step))

    adaptive = make_schedule("gap_adaptive")        # α_max = 2, α_min = 0.5; alias "adaptive"
    # once per self-play iteration, on the held-out split's annotated and synthetic responses:
    real = response_features(real_ids, ref_real_logps, real_finished, vocab_size=V)
    syn = response_features(syn_ids, ref_syn_logps, syn_finished, vocab_size=V)
    adaptive.update_gap(real, syn, seed=(run_seed, iteration))   # gathers, tests, broadcasts α
"""
from __future__ import annotations

import inspect
import math
import numbers
from typing import Any, Dict, Mapping, Optional, Union

from .adaptive_alpha import GapAdaptiveAlpha, TemperatureScoreAlpha, all_reduce_gap_sums
from .schedule_base import AlphaSchedule, _check_alpha_value, _check_int, _check_step

__all__ = [
    "AlphaSchedule",
    "ConstantAlpha",
    "LinearAlpha",
    "CosineAlpha",
    "GapAdaptiveAlpha",
    "TemperatureScoreAlpha",
    "SCHEDULES",
    "make_schedule",
    "all_reduce_gap_sums",
]


# ----------------------------------------------------------------------------- per-step schedules


class ConstantAlpha(AlphaSchedule):
    """α fixed for the whole run."""

    name = "constant"

    def __init__(self, alpha: float = 0.5):
        self._alpha = _check_alpha_value(alpha, "alpha")

    def alpha(self, step: Optional[int] = None) -> float:
        if step is not None:
            _check_step(step)
        return self._alpha

    def _config(self) -> Dict[str, Any]:
        return {"alpha": self._alpha}


class _Interpolated(AlphaSchedule):
    """α goes from ``alpha_start`` at step 0 to ``alpha_end`` at ``num_steps`` and stays there."""

    def __init__(self, alpha_start: float, alpha_end: float, num_steps: int):
        self.alpha_start = _check_alpha_value(alpha_start, "alpha_start")
        self.alpha_end = _check_alpha_value(alpha_end, "alpha_end")
        self.num_steps = _check_int(num_steps, "num_steps", 1)

    def _shape(self, frac: float) -> float:
        """Fraction of the way from start to end at progress frac ∈ [0, 1]; 0 at 0, 1 at 1."""
        raise NotImplementedError

    def alpha(self, step: Optional[int] = None) -> float:
        if step is None:
            raise ValueError(f"step is required: a {self.name} schedule changes α every optimizer step")
        step = _check_step(step)
        frac = min(step, self.num_steps) / self.num_steps
        # Written as start + (end − start)·shape so that shape = 0 and 1 give the end points exactly.
        if frac >= 1.0:
            return self.alpha_end
        return self.alpha_start + (self.alpha_end - self.alpha_start) * self._shape(frac)

    def _config(self) -> Dict[str, Any]:
        return {"alpha_start": self.alpha_start, "alpha_end": self.alpha_end, "num_steps": self.num_steps}


class LinearAlpha(_Interpolated):
    """α moves linearly from ``alpha_start`` to ``alpha_end`` over ``num_steps`` optimizer steps."""

    name = "linear"

    def _shape(self, frac: float) -> float:
        return frac


class CosineAlpha(_Interpolated):
    """Half-cosine from ``alpha_start`` to ``alpha_end``: flat at both ends, steepest in the middle."""

    name = "cosine"

    def _shape(self, frac: float) -> float:
        return 0.5 * (1.0 - math.cos(math.pi * frac))


# ----------------------------------------------------------------------------- factory

SCHEDULES = {
    "constant": ConstantAlpha,
    "linear": LinearAlpha,
    "cosine": CosineAlpha,
    "gap_adaptive": GapAdaptiveAlpha,
    "temperature_score": TemperatureScoreAlpha,
}
_ALIASES = {"adaptive": "gap_adaptive", "fixed": "constant"}


def make_schedule(
    config: Union[str, float, int, Mapping[str, Any], AlphaSchedule], **kwargs: Any
) -> AlphaSchedule:
    """Build a schedule from a name, a number (constant α), a config dict, or pass one through.

    ``config`` dicts name the schedule under ``"type"`` (or ``"name"``); the other keys, updated by
    ``kwargs``, are the constructor's arguments::

        make_schedule(0.5)                                   # ConstantAlpha(0.5)
        make_schedule("linear", alpha_start=2, alpha_end=0.5, num_steps=100)
        make_schedule({"type": "gap_adaptive", "alpha_max": 3.0, "monotone": True})
    """
    if isinstance(config, AlphaSchedule):
        if kwargs:
            raise ValueError(f"kwargs {sorted(kwargs)} cannot be applied to an already built schedule")
        return config
    if isinstance(config, numbers.Real) and not isinstance(config, bool):
        if kwargs:
            raise ValueError(f"a numeric config means a constant α; unexpected kwargs {sorted(kwargs)}")
        return ConstantAlpha(config)
    if isinstance(config, str):
        name, args = config, dict(kwargs)
    elif isinstance(config, Mapping):
        args = dict(config)
        if "type" in args and "name" in args:
            raise ValueError("config has both 'type' and 'name'; give one")
        name = args.pop("type", args.pop("name", None))
        if not isinstance(name, str):
            raise ValueError(f"config must name the schedule under 'type', got {name!r}")
        args.update(kwargs)
    else:
        raise TypeError(
            f"config must be a schedule name, a number, a mapping or an AlphaSchedule, got {type(config).__name__}"
        )
    key = _ALIASES.get(name.lower(), name.lower())
    if key not in SCHEDULES:
        raise ValueError(f"unknown schedule {name!r}; valid: {sorted(SCHEDULES) + sorted(_ALIASES)}")
    cls = SCHEDULES[key]
    params = inspect.signature(cls.__init__).parameters
    accepted = set(params) - {"self"}
    unknown = set(args) - accepted
    if unknown:
        raise ValueError(f"unknown argument(s) {sorted(unknown)} for the {key!r} schedule; accepted: {sorted(accepted)}")
    missing = [n for n in accepted if params[n].default is inspect.Parameter.empty and n not in args]
    if missing:
        raise ValueError(f"the {key!r} schedule needs argument(s) {sorted(missing)}")
    return cls(**args)
