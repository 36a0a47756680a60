"""iris-kernels: fused log-prob kernels and the IRIS self-play loss family."""
from ._version import __version__
