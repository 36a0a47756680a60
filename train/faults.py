"""Deterministic faults for the tests: a crash (IRIS_SELFPLAY_KILL_AT) and NaN losses (IRIS_SELFPLAY_NAN_STEPS).

``maybe_kill("generate", rows)`` SIGKILLs the process once this process has written K generated
rows; ``maybe_kill("train", step)`` once the global optimizer step reaches K. SIGKILL, not an
exception, so that no ``finally`` or atexit handler can tidy up: the rerun must cope with exactly
what a power cut or an OOM kill leaves behind. Unset in normal runs; costs one dict lookup.
"""
from __future__ import annotations

import os
import signal

KILL_ENV = "IRIS_SELFPLAY_KILL_AT"


def maybe_kill(phase: str, count: int) -> None:
    spec = os.environ.get(KILL_ENV)
    if not spec:
        return
    want_phase, _, k = spec.partition(":")
    if want_phase == phase and count >= int(k):
        os.kill(os.getpid(), signal.SIGKILL)


NAN_ENV = "IRIS_SELFPLAY_NAN_STEPS"


def maybe_poison(loss, step: int):
    """loss * NaN when ``step`` (global optimizer step, 1-based) is listed in IRIS_SELFPLAY_NAN_STEPS
    ("3,4,5"): exercises the trainer's non-finite-step guard with a real NaN through backward."""
    spec = os.environ.get(NAN_ENV)
    if spec and str(step) in spec.split(","):
        return loss * float("nan")
    return loss
