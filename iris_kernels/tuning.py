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

from typing import NamedTuple, Optional

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


class Tile(NamedTuple):
    """One launch configuration of a logits kernel: the [BLOCK_N, BLOCK_V] output tile, the hidden
    (reduction) step BLOCK_H, warps and software-pipeline stages."""

    block_n: int
    block_v: int
    block_h: int
    num_warps: int
    num_stages: int = 3


# The interpreter's cost grows with programs x loop steps, not FLOPs: few, large tiles.
INTERPRETER_TILE = Tile(32, 128, 64, 4)

# The compiled kernels' tiles, per kernel ("fwd" forward, "dz" workspace dZ, "atomic" atomic
# backward), dtype and flag set. The first entry whose kernel and dtype match and whose ``when``
# flags are all on wins; ``candidates[0]`` is the default, the rest are what an autotuner may
# try (issue 17); ``ctas_per_sm`` is the occupancy the default must reach (registers and shared
# memory at H100/H200 limits). Every default and candidate is in the compile table
# (benchmarks/results/compile/compile_sm90a.md: sm_90a, compiled as launched through the JIT's
# binder, Triton 3.7.1 with its bundled ptxas 12.8), which tests/test_kernels_compile.py
# regenerates and checks (0 spills, wgmma, pipelined loads). No tile has been timed on a GPU.
# The forward's tile must not depend on the "count" flag (compaction): a row's lse would then
# depend on whether the batch was compacted (batch invariance, item 7).
_EVIDENCE = "compile table 2026-12-03 (issue 16; Triton 3.7.1, sm_90a, as launched; no GPU timing)"
TILE_TABLE = (
    dict(kernel="fwd", dtypes=("bf16", "fp16"), when=(), ctas_per_sm=1,
         candidates=(Tile(128, 128, 64, 8, 3), Tile(128, 128, 64, 8, 4), Tile(128, 128, 32, 8, 3)),
         source=_EVIDENCE + ": 128x128x64 0 spills at every flag set (232-254 regs, 96 KiB smem, "
                "1 CTA/SM); twice the hidden step of issue 8's 128x128x32, which was chosen from "
                "a compile without the launch's divisibility hints. 128x256x{32,64} spill "
                "(336-640 B) under Triton 3.7.1, and 256x128x64 spills 3728 B under Triton 3.6.0 "
                "(the H200 image's; benchmarks/results/compile/triton-3.6.0/): not listed."),
    dict(kernel="fwd", dtypes=("fp32",), when=(), ctas_per_sm=1,
         candidates=(Tile(64, 128, 32, 8, 3), Tile(128, 64, 32, 8, 3)),
         source=_EVIDENCE + ": 128x128x32 spilled 52 B with every flag on (fp32 ieee dot, no "
                "tensor cores); 64x128x32 0 spills (170-192 regs)"),
    dict(kernel="dz", dtypes=("bf16", "fp16"), when=(), ctas_per_sm=1,
         candidates=(Tile(128, 128, 64, 8, 3), Tile(128, 128, 64, 8, 4), Tile(64, 256, 64, 8, 3),
                     Tile(64, 128, 64, 8, 3)),
         source=_EVIDENCE + ": 128x128x64 0 spills at every flag set (152-254 regs, 96 KiB smem, "
                "1 CTA/SM); issue 8's 64x128x64 was chosen from a compile without launch hints. "
                "128x256x64 spills 2240 B with every flag on."),
    dict(kernel="dz", dtypes=("fp32",), when=(), ctas_per_sm=1,
         candidates=(Tile(64, 128, 32, 8, 3),),
         source="issue 8 (2026-11-29); 0 spills as launched (compile table 2026-12-03)"),
    dict(kernel="atomic", dtypes=("bf16", "fp16"), when=(), ctas_per_sm=1,
         candidates=(Tile(64, 128, 32, 8, 3), Tile(128, 128, 32, 8, 3), Tile(64, 128, 16, 8, 3)),
         source=_EVIDENCE + ": 64x128x32 0 spills (122-174 regs); issue 8's hidden step of 16 is "
                "one wgmma k-step per load"),
    dict(kernel="atomic", dtypes=("fp32",), when=(), ctas_per_sm=1,
         candidates=(Tile(64, 128, 16, 8, 3),),
         source="issue 8 (2026-11-29); fp32 atomic path not in the compile table"),
)

_DTYPE_NAMES = {torch.bfloat16: "bf16", torch.float16: "fp16", torch.float32: "fp32"}


def tile_entry(kernel: str, dtype, flags: Optional[dict] = None) -> dict:
    """The TILE_TABLE entry for ``kernel`` at ``dtype`` (torch dtype or "bf16"/"fp16"/"fp32")
    with the feature ``flags`` (names as in the table's ``when``; missing flags count as off)."""
    name = _DTYPE_NAMES.get(dtype, dtype)
    on = {k for k, v in (flags or {}).items() if v}
    for entry in TILE_TABLE:
        if entry["kernel"] == kernel and name in entry["dtypes"] and set(entry["when"]) <= on:
            return entry
    raise KeyError(f"no tile entry for kernel {kernel!r}, dtype {name!r}")


def kernel_tiles(kernel: str, dtype, flags: Optional[dict] = None, *, device_type: str = "cuda",
                 interpreting: bool = False) -> Tile:
    """The tile a launch uses: the table's default on CUDA, INTERPRETER_TILE otherwise."""
    if interpreting or device_type != "cuda":
        return INTERPRETER_TILE
    return tile_entry(kernel, dtype, flags)["candidates"][0]


# The forward's vocabulary splits (ops/logprobs_fwd.py). A row's lse and entropy depend on where
# the splits begin (each split is one sequential online log-sum-exp), so their count may depend on
# V, the tile and the device, never on N, the batch, compaction or chunking (batch invariance,
# issue 16 item 7). Sized so that N = 16384 (128 row blocks of 128) fills an H200's 132 SMs with
# >= 8 waves of one CTA each: S = ceil(8 x 132 / 128) = 9 (1152 programs, 8.7 waves, the last 73 %
# full), and no split shorter than FWD_MIN_TILES_PER_SPLIT vocabulary tiles.
FWD_WAVES = 8
FWD_REFERENCE_ROW_BLOCKS = 128
FWD_MIN_TILES_PER_SPLIT = 4
# Without a CUDA device (the interpreter): two splits wherever there are two vocabulary tiles, so
# that the tests go through the combine of partial results.
INTERPRETER_SPLITS = 2


def vocab_splits(v_tiles: int, sm_count: Optional[int]) -> int:
    """Vocabulary splits of the forward for ``v_tiles`` tiles on a device with ``sm_count`` SMs
    (None: no CUDA device)."""
    if sm_count is None:
        return max(1, min(INTERPRETER_SPLITS, v_tiles))
    want = -(-FWD_WAVES * sm_count // FWD_REFERENCE_ROW_BLOCKS)
    return max(1, min(want, v_tiles // FWD_MIN_TILES_PER_SPLIT))


def vocab_slice_columns(n_rows: int, vocab_size: int, itemsize: int, budget_bytes: int,
                        multiple: int = 128) -> int:
    """Columns Vc of the vocabulary-sliced workspace [rows, Vc]: as many as the budget allows, a
    multiple of ``multiple`` (16-byte rows for the GEMMs), at least one multiple, at most V."""
    vc = max(multiple, (budget_bytes // (max(n_rows, 1) * itemsize)) // multiple * multiple)
    return min(vc, -(-vocab_size // multiple) * multiple)


def workspace_layout(n_rows: int, vocab_size: int, hidden_size: int, itemsize: int, budget_bytes: int,
                     row_multiple: int = ROW_MULTIPLE) -> str:
    """"rows" (row chunks, fp32 [V, H] weight-gradient accumulator) or "vocab" (vocabulary slices,
    fp32 [N, H] hidden-gradient accumulator): whichever moves fewer bytes beyond what both do.

    Both write and read the same dZ bytes (N V itemsize) and run the same three products. What
    differs is the fp32 accumulator, zero-filled once, read and written once per chunk/slice
    after the first, and cast once at the end (read 4 B, write itemsize B):
        rows:  A = V H, chunks k_r = ceil(N / C)   extra = A (4 + 8 (k_r - 1) + 4 + itemsize)
        vocab: A = N H, slices k_v = ceil(V / Vc)  extra = A (4 + 8 (k_v - 1) + 4 + itemsize)
    (the first chunk's product writes the accumulator without reading it, but the zero-fill is
    counted instead). k_r and k_v are both about N V itemsize / budget, so this is mostly V vs N:
    Qwen2.5-3B at N 16384 (V 151936, H 2048, bf16, 1 GiB): rows 1.25 GB x (5 chunks) -> 12.5 GB,
    vocab 134 MB x (5 slices) -> 1.3 GB; "vocab". A short batch of a small vocabulary
    (N > V) keeps "rows".
    """
    c = workspace_rows(vocab_size, itemsize, budget_bytes, n_rows, multiple=row_multiple)
    k_r = -(-max(n_rows, 1) // c)
    vc = vocab_slice_columns(n_rows, vocab_size, itemsize, budget_bytes)
    k_v = -(-vocab_size // vc)
    per_elem = lambda k: 4 + 8 * (k - 1) + 4 + itemsize  # noqa: E731
    rows_bytes = vocab_size * hidden_size * per_elem(k_r)
    vocab_bytes = n_rows * hidden_size * per_elem(k_v)
    return "vocab" if vocab_bytes < rows_bytes else "rows"
