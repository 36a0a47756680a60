"""Small shared types: the backend enum, the frozen params every backend receives, the output tuple."""
from __future__ import annotations

import enum
from dataclasses import dataclass
from typing import NamedTuple, Optional

import torch


class Backend(str, enum.Enum):
    """Which implementation computes the log-probs.

    AUTO picks TRITON for CUDA tensors and TORCH everywhere else.
    """

    AUTO = "auto"
    TRITON = "triton"
    TORCH = "torch"
    REFERENCE = "reference"


@dataclass(frozen=True)
class LogprobsParams:
    """Everything about one linear-logprobs call that is not a tensor.

    Frozen so that an autograd Function can carry it from forward to backward unchanged.
    """

    ignore_index: int = -100
    temperature: float = 1.0
    softcap: Optional[float] = None
    return_entropy: bool = False
    # torch backend: tokens per chunk (None = chosen from V so a chunk's logits stay ~16 MiB).
    chunk_size: Optional[int] = None
    # backend="triton" (issue 8): backward variant ("workspace" | "atomic"), ignored-row
    # compaction, the workspace budget in bytes (also sizes the torch backend's CUDA chunks) and
    # the caller's host count of scored rows (None: the kernels read a device-resident count).
    bwd: str = "workspace"
    compact: bool = False
    workspace_bytes: int = 1 << 30
    num_valid: Optional[int] = None
    # backend="triton" forward (issue 17): "fused" (logits in registers) or "split" (cuBLAS fp32
    # logits per chunk of rows + a Triton row kernel); same outputs and saved statistics.
    fwd: str = "fused"


def accumulation_dtype(dtype: torch.dtype) -> torch.dtype:
    """Log-probs, lse and softmax statistics are fp32 for fp32/bf16/fp16 inputs, fp64 for fp64."""
    return torch.float64 if dtype == torch.float64 else torch.float32


class LinearLogprobsOutput(NamedTuple):
    """Returned by ``linear_logprobs`` when ``return_lse`` or ``return_entropy`` is set.

    All fp32 with the targets' shape. ``lse`` is log-sum-exp of the (soft-capped, tempered)
    logits at every position; ``entropy`` is the entropy of the predicted distribution, 0.0 at
    ignored positions. Fields that were not asked for are None.
    """

    logprobs: torch.Tensor
    lse: Optional[torch.Tensor]
    entropy: Optional[torch.Tensor]
