"""iris-kernels: fused log-prob kernels and the IRIS self-play loss family."""
from ._version import __version__
from .logprobs import linear_logprobs, sequence_logprobs
from .module import SelfPlayLoss
from .schedules import (
    AlphaSchedule,
    ConstantAlpha,
    CosineAlpha,
    GapAdaptiveAlpha,
    LinearAlpha,
    all_reduce_gap_sums,
    make_schedule,
)
from .types import Backend, LinearLogprobsOutput

__all__ = [
    "__version__",
    "Backend",
    "LinearLogprobsOutput",
    "linear_logprobs",
    "sequence_logprobs",
    "SelfPlayLoss",
    "AlphaSchedule",
    "ConstantAlpha",
    "LinearAlpha",
    "CosineAlpha",
    "GapAdaptiveAlpha",
    "make_schedule",
    "all_reduce_gap_sums",
]
