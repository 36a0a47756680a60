"""The ``auto`` choices of the CUDA path, in one table, with where each value came from.

Nothing here has been measured on a GPU yet (no device was available to the session that wrote
it, 2026-11-29). Until ``benchmarks/gpu_check.sh`` has run on an H100/H200 and its numbers are
entered below (with the device and date), the defaults follow the peers' published evidence:
Apple CCE (its atomic backward without gradient filtering is 2.7x slower than the naive
materialised one on an A100), verl and Megatron (both default to materialised dlogits chunks +
cuBLAS), Liger's SM90 path and QuACK (a bf16 gradient workspace + tensor-core GEMMs). Hence the
workspace backward and a 1 GiB workspace.

On CUDA the forward and backward variants ("fwd", "bwd") are measured at first use by
iris_kernels/autotune.py and cached per device and shape; this table decides when the autotuner is
off (IRIS_KERNELS_AUTOTUNE=0), while torch.compile traces, and where no candidate passed its probe.

Also here: the workspace's chunk height and the torch backend's CUDA chunk size, both derived
from the same byte budget (iris-kernels issue 8, items 1 and 3).
"""
from __future__ import annotations

from typing import Optional

import torch

# Backward and forward variants of backend="triton".
BACKWARDS = ("workspace", "atomic")
FORWARDS = ("fused", "split")

# key: device type (later: (device name, dtype) once measured). Each entry says its provenance.
AUTO = {
    "cuda": {
        "bwd": "workspace",
        "fwd": "fused",
        "compact": True,
        "workspace_bytes": 1 << 30,
        "source": "no measurement yet -> workspace, per peers' evidence (issue 8; 2026-11-29, no GPU)",
    },
    # The interpreter / CPU: same defaults so the tests exercise the default path.
    "cpu": {
        "bwd": "workspace",
        "fwd": "fused",
        "compact": True,
        "workspace_bytes": 1 << 30,
        "source": "mirrors cuda so that interpreter tests exercise the default path",
    },
}

# Height of one workspace chunk is a multiple of this (the dZ kernel's largest BLOCK_N).
ROW_MULTIPLE = 128
# The torch backend on CPU: 4 Mi fp32 logits (16 MiB) per chunk measured best there (issue 4).
CPU_CHUNK_ELEMENTS = 1 << 22


def auto_choice(device: torch.device, key: str):
    return AUTO.get(device.type, AUTO["cuda"])[key]


def workspace_rows(vocab_size: int, itemsize: int, budget_bytes: int, n_rows: int,
                   multiple: int = ROW_MULTIPLE) -> int:
    """Rows C of the [C, V] gradient workspace: as many as ``budget_bytes`` allows.

    C is a multiple of ``multiple`` (the kernel's tile height), at least one multiple (so a tiny
    budget still works, above the budget by at most one tile of rows), and no more than the rows
    there are (rounded up to the multiple).
    """
    per_row = padded_vocab(vocab_size) * itemsize
    c = max(multiple, (budget_bytes // per_row) // multiple * multiple)
    need = -(-max(n_rows, 1) // multiple) * multiple
    return min(c, need)


def padded_vocab(vocab_size: int) -> int:
    """Workspace row stride: V rounded up to 8 elements (16-byte rows for the tensor-core GEMMs)."""
    return -(-vocab_size // 8) * 8


def torch_chunk_size(vocab_size: int, device: Optional[torch.device], budget_bytes: Optional[int] = None) -> int:
    """Tokens per chunk of the torch backend.

    CPU (and unknown devices): 4 Mi fp32 logits per chunk, unchanged (it measures best there).
    CUDA: the chunk's fp32 logits fill the workspace budget (default 1 GiB), rounded down to a
    multiple of 128 tokens: 1664 tokens at V = 151936, 8320 at V = 32000. The chunked backend
    holds up to two such buffers at once (logits and gradient with the entropy), so its peak
    is about twice the budget.
    """
    v = max(vocab_size, 1)
    if device is None or device.type != "cuda":
        return max(16, CPU_CHUNK_ELEMENTS // v)
    budget = auto_choice(device, "workspace_bytes") if budget_bytes is None else budget_bytes
    return max(ROW_MULTIPLE, (budget // (4 * v)) // ROW_MULTIPLE * ROW_MULTIPLE)
