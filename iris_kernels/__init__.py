"""iris-kernels: fused log-prob kernels and the IRIS self-play loss family."""
from . import _warning_filters  # noqa: F401  (the Triton interpreter's expected masked-lane warnings only)
from ._version import __version__
from .distributed import StepNormalizer, StepStats
from .logprobs import linear_logprobs, sequence_logprobs
from .losses import (
    LOSSES,
    chi2_loss,
    chi2_logratio_loss,
    dpo_loss,
    get_loss,
    iris_loss,
    sft_loss,
    space_loss,
    spin_loss,
    tilted_risk,
)
from .module import SelfPlayLoss
from .schedules import (
    AlphaSchedule,
    ConstantAlpha,
    CosineAlpha,
    GapAdaptiveAlpha,
    LinearAlpha,
    TemperatureScoreAlpha,
    all_reduce_gap_sums,
    make_schedule,
)
from .two_sample import classifier_two_sample_test, response_features
from .types import Backend, LinearLogprobsOutput

__all__ = [
    "__version__",
    "Backend",
    "LinearLogprobsOutput",
    "linear_logprobs",
    "sequence_logprobs",
    "tilted_risk",
    "iris_loss",
    "spin_loss",
    "space_loss",
    "chi2_loss",
    "chi2_logratio_loss",
    "dpo_loss",
    "sft_loss",
    "LOSSES",
    "get_loss",
    "StepNormalizer",
    "StepStats",
    "SelfPlayLoss",
    "AlphaSchedule",
    "ConstantAlpha",
    "LinearAlpha",
    "CosineAlpha",
    "GapAdaptiveAlpha",
    "TemperatureScoreAlpha",
    "response_features",
    "classifier_two_sample_test",
    "make_schedule",
    "all_reduce_gap_sums",
]
