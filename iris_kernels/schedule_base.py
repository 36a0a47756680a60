"""The α-schedule interface and its argument checks (docs/math.md#alpha-schedule).

Shared by ``schedules.py`` (the per-step schedules and the factory) and ``adaptive_alpha.py``
(the schedules that measure a gap once per self-play iteration); import them from
``iris_kernels.schedules``.
"""
from __future__ import annotations

import math
import numbers
from typing import Any, Dict, Mapping, Optional

import torch

__all__ = ["AlphaSchedule"]


# ----------------------------------------------------------------------------- validation helpers


def _check_alpha_value(value: Any, name: str) -> float:
    """α ∈ [0, ∞): negative α swaps the roles of the two IRIS terms (docs/math.md#objective), so it is an error."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be a real number, got {type(value).__name__}")
    value = float(value)
    if not math.isfinite(value):
        raise ValueError(f"{name} must be finite, got {value}")
    if value < 0.0:
        raise ValueError(f"{name} must be >= 0 (alpha < 0 swaps the IRIS terms), got {value}")
    return value


def _check_int(value: Any, name: str, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{name} must be an int, got {type(value).__name__}")
    value = int(value)
    if value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value}")
    return value


def _check_step(step: Any) -> int:
    return _check_int(step, "step", 0)


class AlphaSchedule:
    """The common interface. Subclasses implement :meth:`alpha` and their config/state.

    ``update_gap`` and ``accumulate_gap`` exist on every schedule so a training loop can call them
    unconditionally; only :class:`GapAdaptiveAlpha` reads the gap.
    """

    name: str = ""

    def alpha(self, step: Optional[int] = None) -> float:
        raise NotImplementedError

    def __call__(self, step: Optional[int] = None) -> float:
        return self.alpha(step)

    def accumulate_gap(self, *args: Any, **kwargs: Any) -> None:
        """No-op except for ``TemperatureScoreAlpha``."""

    def update_gap(self, *args: Any, **kwargs: Any) -> Optional[float]:
        """No-op except for the two gap-reading schedules; returns None.

        Takes whatever either of them takes (``GapAdaptiveAlpha``: real and synthetic held-out
        features, ``seed=``, ``real_keys=``/``syn_keys=``, ``group=``; ``TemperatureScoreAlpha``:
        synthetic and annotated per-token log-probs, ``group=``), so that a loop written for one
        runs unchanged with a schedule that reads no gap."""
        return None

    # Subclasses list their constructor arguments here; state_dict stores them so that loading a
    # checkpoint into a differently configured schedule is caught instead of silently diverging.
    def _config(self) -> Dict[str, Any]:
        raise NotImplementedError

    def state_dict(self) -> Dict[str, Any]:
        return {"type": self.name, "config": self._config()}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        if not isinstance(state, Mapping):
            raise TypeError(f"state must be a mapping, got {type(state).__name__}")
        if state.get("type") != self.name:
            raise ValueError(f"state is for a {state.get('type')!r} schedule, this one is {self.name!r}")
        if dict(state.get("config", {})) != self._config():
            raise ValueError(
                f"state config {dict(state.get('config', {}))} does not match this schedule's {self._config()}"
            )

    def __repr__(self) -> str:
        args = ", ".join(f"{k}={v!r}" for k, v in self._config().items())
        return f"{type(self).__name__}({args})"


