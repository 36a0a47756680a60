"""Compile evidence for Hopper (issue 16, item 1): every dispatched kernel compiled as launched.

``benchmarks/compile_report.py`` (shared with this test) calls each op's own launch wrapper on
meta tensors of the real shapes (N 16384; Qwen2.5-3B and Zephyr-7B heads), intercepts the launch,
binds the captured arguments with the JIT's own binder for an sm_90 backend (so the
divisibility-16 hints and integer specialisation are a launch's) and compiles for sm_90a with the
ptxas bundled with the installed Triton. Needs no GPU. Per dispatched case: 0 spilled bytes,
warpgroup MMA (wgmma in the PTX, HGMMA in the SASS; not mma.sync) at bf16/fp16, pipelined loads
(cp.async or TMA), and the occupancy ``tuning.TILE_TABLE`` claims. The committed record
(benchmarks/results/compile/compile_sm90a.json) must list the same cases at the same tiles, and
under the Triton that wrote it, the same registers, spills and shared memory.
"""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from iris_kernels import tuning

ROOT = Path(__file__).resolve().parents[1]
RECORD = ROOT / "benchmarks" / "results" / "compile" / "compile_sm90a.json"
KEY = ("kernel", "role", "dtype", "flags", "head", "tile", "warps", "stages")


def _bundled_ptxas():
    import triton
    path = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "ptxas"
    return path if path.exists() else None


def _tile_of(row):
    n, v, h = (int(x) for x in row["tile"].split("x"))
    return n, v, h, row["warps"], row["stages"]


def test_committed_record_matches_the_tile_table():
    """Fast: the record lists every kernel x dtype with today's default tile (no stale record)."""
    rows = json.loads(RECORD.read_text())
    defaults = [r for r in rows if r["role"] == "default"]
    assert {(r["kernel"], r["dtype"]) for r in defaults} >= {
        ("fwd", d) for d in ("bf16", "fp16", "fp32")} | {("dz", d) for d in ("bf16", "fp16", "fp32")} | {
        ("atomic", d) for d in ("bf16", "fp16")}
    for r in defaults:
        flags = {} if r["flags"] == "-" else {f: True for f in r["flags"].split("+")}
        assert _tile_of(r) == tuple(tuning.kernel_tiles(r["kernel"], r["dtype"], flags)), r
        assert r["spill_bytes"] == 0, r
    for r in rows:
        assert r["arch"] == "sm_90a" and r["triton"]


@pytest.mark.slow
def test_every_dispatched_kernel_compiles_for_hopper_as_launched(tmp_path):
    if _bundled_ptxas() is None:
        pytest.skip("this Triton ships no ptxas (no NVIDIA backend)")
    env = {k: v for k, v in os.environ.items() if k not in ("TRITON_INTERPRET", "TRITON_PTXAS_PATH")}
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    out = tmp_path / "rows.json"
    r = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "compile_report.py"), "--json", str(out)],
                       env=env, capture_output=True, text=True, timeout=1500)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-4000:]
    rows = json.loads(out.read_text())
    assert rows
    for row in rows:
        if row["role"] != "default":
            continue
        where = {k: row[k] for k in KEY}
        assert row["spill_bytes"] == 0, where
        assert row["cp_async"] or row["tma"], where
        if row["dtype"] != "fp32":
            assert row["wgmma"] and row["hgmma_sass"] and not row["mma_sync"], where
        claim = tuning.tile_entry(row["kernel"], row["dtype"], {})["ctas_per_sm"]
        assert row["ctas_per_sm"] >= claim, where
        assert row["regs"] <= 255 and row["smem"] <= 227 * 1024, where

    committed = json.loads(RECORD.read_text())
    assert [{k: c[k] for k in KEY} for c in committed] == [{k: f[k] for k in KEY} for f in rows], (
        "benchmarks/results/compile/ is stale: rerun python benchmarks/compile_report.py "
        "--write benchmarks/results/compile")
    import triton
    if committed[0]["triton"] == triton.__version__:
        for c, f in zip(committed, rows):
            assert (c["regs"], c["spill_bytes"], c["smem"]) == (f["regs"], f["spill_bytes"], f["smem"]), c
