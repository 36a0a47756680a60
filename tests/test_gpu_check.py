"""benchmarks/gpu_check.py: the decisive rows come first, and the dry run works on a CPU (issue 17 item 4)."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "benchmarks"))
import gpu_check  # noqa: E402


def test_plan_puts_the_decisive_rows_first():
    phases = gpu_check.plan(dry=False)
    assert [p["shapes"] for p in phases[:2]] == [["zephyr-7b"], ["qwen2.5-3b"]]
    for p in phases[:2]:
        assert p["providers"] == ["floor", "iris-triton", "iris-triton-split", "iris-triton-atomic"]
        assert p["tokens"] == [16384]
    names = [p["name"] for p in phases]
    assert names.index("peers") > names.index("library variants, frozen head, IRIS fused vs composed")
    assert phases[-2]["tokens"] == [32768] and phases[-1].get("pytest")
    every = {n for p in phases for n in p.get("providers", [])}
    assert {"iris-triton-frozen", "iris-triton-composed", "iris-triton-ws-hostcount", "liger-cute-sce"} <= every
    import providers as P
    assert every <= set(P.PROVIDERS)


@pytest.mark.slow
def test_dry_run_prints_its_order_and_returns_rows(tmp_path):
    env = dict(os.environ, GPU_CHECK_DRY="1")
    env.pop("TRITON_INTERPRET", None)
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "gpu_check.py"), "--out", str(tmp_path),
                           "--only", "1"], env=env, capture_output=True, text=True, timeout=900, cwd=ROOT)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    out = proc.stdout
    assert out.index("row order:") < out.index("1. decisive") < out.index("== summary")
    rows = [json.loads(x) for x in (tmp_path / "rows.jsonl").read_text().splitlines()]
    by = {r["provider"]: r for r in rows}
    assert by["floor"]["status"] == "ok"
    # The Triton rows run in the interpreter at the tiny shape and are checked against fp64.
    for name in ("iris-triton", "iris-triton-split", "iris-triton-atomic"):
        r = [x for x in rows if x["provider"] == name and x["status"] == "interpreter"]
        assert r and r[0]["max_abs_err"] < 1e-4, name
    assert json.loads((tmp_path / "selfcheck.json").read_text())["ok"] is True
