"""iris-kernels: fused log-prob kernels and the IRIS self-play loss family."""
from ._version import __version__
from .logprobs import linear_logprobs, sequence_logprobs
from .types import Backend, LinearLogprobsOutput

__all__ = [
    "__version__",
    "Backend",
    "LinearLogprobsOutput",
    "linear_logprobs",
    "sequence_logprobs",
]
