"""python -m iris_kernels.selfcheck: exits 0 through the interpreter on a CPU machine, writes its
JSON, says no GPU was timed, and exits 1 when a backend is wrong (issue 17 item 3)."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from iris_kernels import autograd, selfcheck

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.slow
@pytest.mark.skipif(torch.cuda.is_available(), reason="the CPU path (interpreter, no timing)")
def test_selfcheck_subprocess_exit_0_and_json(tmp_path):
    env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    env.pop("TRITON_INTERPRET", None)  # the module must set it up itself
    out = tmp_path / "sc.json"
    proc = subprocess.run([sys.executable, "-m", "iris_kernels.selfcheck", "--quick", "--json", str(out)],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "no GPU was timed" in proc.stdout and "parity:" in proc.stdout
    rep = json.loads(out.read_text())
    assert rep["ok"] is True and rep["device"]["type"] == "cpu" and rep["device"]["interpreter"] is True
    assert rep["timing"] == [] and rep["kernels"] == [] and rep["autotune"] == []
    assert {"torch", "triton", "iris-kernels", "trl", "liger-kernel"} <= set(rep["versions"])
    backends = {r["backend"] for r in rep["parity"]}
    assert {"reference", "torch", "triton[fwd=fused,bwd=workspace]", "triton[fwd=split,bwd=atomic]"} <= backends
    assert {r["case"] for r in rep["parity"]} == {"plain", "all-features", "host-count", "frozen-head"}
    assert {r["dtype"] for r in rep["parity"]} == {"fp32", "bf16", "fp16"}
    assert all(r["ok"] and r["err_logp"] < 1e-4 for r in rep["parity"])
    # The frozen head has no weight gradient to check; the others have one.
    assert all((r["rel_grad_weight"] is None) == (r["case"] == "frozen-head") for r in rep["parity"])
    assert rep["wgrad"]["workspace_dW_accumulation"].get("cpu") == "upcast"


def test_a_wrong_backend_fails_with_exit_1(tmp_path, monkeypatch, capsys):
    real = autograd.logprobs_split_fwd

    def wrong(*args, **kw):
        lse, tz, ent, lo = real(*args, **kw)
        return lse, tz * 1.01, ent, lo

    monkeypatch.setattr(autograd, "logprobs_split_fwd", wrong)
    out = tmp_path / "sc.json"
    rc = selfcheck.main(["--quick", "--parity-dtypes", "fp32", "--json", str(out)])
    assert rc == 1
    rep = json.loads(out.read_text())
    failed = {r["backend"] for r in rep["parity"] if not r["ok"]}
    assert failed == {"triton[fwd=split,bwd=atomic]"}
    assert "failed" in capsys.readouterr().out


def test_workspace_parts_all_run():
    """Every part the selfcheck and bwd_breakdown.py time runs (interpreter, a timer that calls
    each part once), none reports an error, and the workspace covers the rows."""
    g = torch.Generator().manual_seed(0)
    N, H, V = 40, 16, 77
    h, w = torch.randn(N, H, generator=g), torch.randn(V, H, generator=g) * 0.3
    t = torch.randint(0, V, (N,), generator=g)
    t[::3] = -100
    up = torch.randn(N, generator=g)
    calls = []

    def time_part(fn):
        fn()
        calls.append(fn)
        return 1.0

    parts = selfcheck.workspace_parts(h, w, t, up, time_part=time_part)
    assert {f"{k}_ms" for k in ("gemm", "fwd", "fwd_split", "dz", "dh", "dw")} <= set(parts), parts
    assert not [k for k in parts if k.startswith("error_")]
    assert parts["chunk_rows"] >= N and len(calls) == 6


def test_gpu_sections_run_on_the_cpu_through_the_interpreter():
    """The CUDA-only sections' code (timing rows, parts, peers through benchmarks/providers.py,
    the compiled-kernel reader, the table) run at a tiny head on the CPU, so that a typo in them
    cannot first show on a GPU. The numbers mean nothing here."""
    cpu = torch.device("cpu")
    heads = {"tiny": (16, 50)}
    rows = selfcheck.run_timing(heads, 32, torch.float32, 1, device=cpu)
    whats = [r["what"] for r in rows]
    assert whats[:2] == ["one cuBLAS product", "four-product floor"]
    assert {"part fwd", "part fwd_split", "part dz", "part dh", "part dw", "triton[fwd=split,bwd=atomic]",
            "triton[auto]", "torch"} <= set(whats)
    assert not [r for r in rows if "error" in r], [r for r in rows if "error" in r]
    flagged = selfcheck.run_timing(heads, 32, torch.float32, 1, device=cpu,
                                   flags=dict(bias=True, softcap=5.0, entropy=True))
    assert not [r for r in flagged if "error" in r], [r for r in flagged if "error" in r]
    peers = selfcheck.run_peer_timing(heads, 32, torch.float32, 1, device=cpu)
    assert [r["what"] for r in peers] == list(selfcheck.PEER_PROVIDERS)
    assert all(("total_ms" in r) or r["error"].startswith("skipped: ") for r in peers), peers
    assert isinstance(selfcheck.compiled_kernels(), list)
    rep = dict(versions={}, device={}, wgrad={}, peers={}, parity=[], kernels=[], timing=rows + peers, autotune=[],
               note="")
    assert "four-product floor" in selfcheck.format_report(rep)
