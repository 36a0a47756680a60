"""benchmarks/bench_loss.py: record schema (JSON and CSV), the error column, the fp64 reference,
skip reasons, and the per-process CPU memory path. Tiny shapes only: the whole file runs in
well under 30 s on 2 cores."""
import csv
import importlib
import importlib.util
import json
import math
import sys
from pathlib import Path

import pytest
import torch

BENCH = Path(__file__).resolve().parent.parent / "benchmarks"
sys.path.insert(0, str(BENCH))
bench = importlib.import_module("bench_loss")
P = importlib.import_module("providers")

HAS_LIGER = importlib.util.find_spec("liger_kernel") is not None
TINY = "64,32,100"  # N, H, V: V is no multiple of any block size


def _run(tmp_path, *extra):
    argv = ["--device", "cpu", "--shapes", TINY, "--repeats", "2", "--warmup", "0",
            "--output-dir", str(tmp_path), *extra]
    return bench.main(argv)


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench")
    records = _run(
        out, "--isolate", "none",
        "--providers", "naive,torch-linear_cross_entropy,liger-flce,liger-dpo,cce,iris-torch,iris-triton",
        "--interpreter-shape", "32,16,50",
    )
    return out, records


def test_json_and_csv_schema(tiny_run):
    out, records = tiny_run
    data = json.loads((out / "bench_loss_cpu.json").read_text())
    assert isinstance(data, list) and len(data) == len(records) > 0
    for rec in data:
        assert set(bench.RECORD_FIELDS) <= set(rec), set(bench.RECORD_FIELDS) - set(rec)
        assert rec["device"] == "cpu" and rec["dtype"] == "fp32"
        assert rec["device_name"] and rec["date"] and rec["git_commit"]
        assert rec["versions"]["torch"] == torch.__version__.split("+")[0] or rec["versions"]["torch"].startswith(
            torch.__version__.split("+")[0]
        )
        assert rec["workload"] in ("logprobs", "selfplay")
    with (out / "bench_loss_cpu.csv").open() as f:
        reader = csv.DictReader(f)
        assert reader.fieldnames == bench.RECORD_FIELDS
        rows = list(reader)
    assert [r["provider"] for r in rows] == [r["provider"] for r in data]
    assert all("torch=" in r["versions"] for r in rows)
    pngs = sorted(p.name for p in out.glob("*.png"))
    assert "bench_loss_cpu_logprobs_H32_V100_fp32.png" in pngs
    assert all((out / p).stat().st_size > 1000 for p in pngs)


def test_measured_rows_are_sane_and_accurate(tiny_run):
    _, records = tiny_run
    ran = [r for r in records if r["status"] in ("ok", "interpreter")]
    names = {(r["provider"], r["workload"]) for r in ran}
    # Every CPU-capable provider produced both workloads (the IRIS rows need iris_kernels.losses).
    assert {("naive", "logprobs"), ("iris-torch", "logprobs"), ("torch-linear_cross_entropy", "logprobs")} <= names
    assert ("iris-torch", "selfplay") in names and ("naive", "selfplay") in names
    assert ("liger-dpo", "logprobs") not in names  # no per-token output: no row at all
    if HAS_LIGER:
        assert ("liger-dpo", "selfplay") in names
    for r in ran:
        for k in ("fwd", "bwd", "total"):
            assert r[f"{k}_p20"] <= r[f"{k}_ms"] <= r[f"{k}_p80"], r
        assert r["total_ms"] == pytest.approx(r["fwd_ms"] + r["bwd_ms"], rel=0.5)
        assert r["peak_mem_mb"] >= 0
        # fp32 against the fp64 reference: values and both gradients.
        assert 0 <= r["max_abs_err"] < 1e-4, r
        assert r["max_abs_err"] == max(r["err_value"], r["err_grad_hidden"], r["err_grad_weight"])
    timed_peers = [r for r in ran if r["family"] == "peer" and r["timing_valid"] and r["provider"] != "liger-dpo"]
    for wl in ("logprobs", "selfplay"):
        ratios = [r["ratio_to_best"] for r in timed_peers if r["workload"] == wl]
        assert min(ratios) == pytest.approx(1.0)
    # The interpreter rows are flagged and never ranked.
    interp = [r for r in ran if r["status"] == "interpreter"]
    assert {r["provider"] for r in interp} == ({"iris-triton", "liger-flce"} if HAS_LIGER else {"iris-triton"})
    assert all(not r["timing_valid"] and "not a timing" in r["note"] and r["ratio_to_best"] is None for r in interp)


def test_skips_carry_a_reason(tiny_run):
    _, records = tiny_run
    skipped = {(r["provider"], r["N"]): r["skip_reason"] for r in records if r["status"] == "skipped"}
    assert "CUDA" in skipped[("cce", 64)]
    assert "TRITON_INTERPRET" in skipped[("iris-triton", 64)]
    assert ("TRITON_INTERPRET" if HAS_LIGER else "not installed") in skipped[("liger-flce", 64)]
    assert all(reason for reason in skipped.values())


class _Wrong(P.Naive):
    """Fast and wrong: a 1% scale error in the log-probs (and hence in both gradients)."""

    name = "wrong"

    def logprobs(self, hidden, weight, targets):
        return 1.01 * super().logprobs(hidden, weight, targets)


class _NaNs(P.Naive):
    name = "nans"

    def logprobs(self, hidden, weight, targets):
        out = super().logprobs(hidden, weight, targets)
        return out + torch.where(targets == 5, float("nan"), 0.0)


def test_error_column_exposes_wrong_providers(tmp_path, monkeypatch):
    monkeypatch.setitem(P.PROVIDERS, "wrong", _Wrong())
    monkeypatch.setitem(P.PROVIDERS, "nans", _NaNs())
    records = _run(tmp_path, "--isolate", "none", "--providers", "naive,wrong,nans", "--workloads", "logprobs",
                   "--shapes", "256,32,10")  # V=10: target 5 is certainly present
    by = {r["provider"]: r for r in records}
    assert by["naive"]["max_abs_err"] < 1e-4
    assert by["wrong"]["max_abs_err"] > 1e-2
    assert by["wrong"]["err_grad_weight"] > 1e-2
    assert math.isnan(by["nans"]["max_abs_err"])
    saved = json.loads((tmp_path / "bench_loss_cpu.json").read_text())
    assert {r["provider"]: r["max_abs_err"] for r in saved}["nans"] == "nan"


@pytest.mark.parametrize("objective", ["logprobs", "iris", "spin"])
def test_fp64_reference_matches_autograd(objective):
    """The chunked fp64 reference against plain autograd through materialised fp64 logits."""
    case = bench.make_case(bench.Shape(48, 16, 37, ""), torch.float32, torch.device("cpu"), seed=3)
    ref = bench.fp64_reference(case, [objective])[objective]
    h = case.hidden.detach().double().requires_grad_()
    w = case.weight.detach().double().requires_grad_()
    t = case.targets
    logp_all = torch.log_softmax(h @ w.t(), -1)
    logp = torch.where(t != -100, logp_all.gather(-1, t.clamp(min=0)[..., None])[..., 0], 0.0)
    s = logp.sum(-1)
    if objective == "logprobs":
        value = logp
        value.backward(case.grad_logprobs.double())
    elif objective == "iris":
        value = bench.iris_fp64(s, case.ref_logps.double(), case.is_real, case.alpha, case.beta)
        value.backward()
    else:
        value = bench.spin_fp64(s, case.is_real, case.spin_beta)
        value.backward()
    torch.testing.assert_close(ref["value"], value.detach().reshape(ref["value"].shape), rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(ref["grad_hidden"], h.grad.reshape(-1, h.shape[-1]), rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(ref["grad_weight"], w.grad, rtol=1e-10, atol=1e-10)
    assert ref["grad_weight"].abs().max() > 1e-3  # the objective has a real gradient
    # A sample of rows is exactly those rows of the full gradients.
    part = bench.fp64_reference(case, [objective], set_ref_logps=False, token_rows=7, vocab_rows=5, seed=3)[objective]
    assert part["rows"].numel() == 7 and part["vocab_rows"].numel() == 5
    torch.testing.assert_close(part["grad_hidden"], ref["grad_hidden"][part["rows"]], rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(part["grad_weight"], ref["grad_weight"][part["vocab_rows"]], rtol=1e-12, atol=1e-12)


def test_iris_fp64_matches_the_closed_form():
    """iris_fp64 at alpha = 2: L = -log E_R[e^g] + 1/2 log E_S[e^{2g}] (docs/math.md#limits table)."""
    s = torch.tensor([-3.0, -1.0, -2.5, 0.5], dtype=torch.float64)
    ref = torch.tensor([-2.0, -1.5, -2.0, -1.0], dtype=torch.float64)
    real = torch.tensor([True, True, False, False])
    g = 0.7 * (s - ref)
    want = -torch.log(torch.exp(g[:2]).mean()) + 0.5 * torch.log(torch.exp(2 * g[2:]).mean())
    assert bench.iris_fp64(s, ref, real, 2.0, 0.7).item() == pytest.approx(want.item(), abs=1e-12)


def test_own_process_memory_path(tmp_path):
    """Each provider in its own process: naive holds [N, V] fp32 logits and log-softmax, the
    chunked library backend does not, and the RSS meter sees the difference."""
    N, V = 2048, 32000  # enough rows that the library's chunks (~32 MiB of logits) matter
    records = _run(tmp_path, "--isolate", "process", "--providers", "naive,iris-torch", "--workloads", "logprobs",
                   "--shapes", f"{N},32,{V}", "--warmup", "0", "--repeats", "1")
    by = {r["provider"]: r for r in records}
    logits_mb = N * V * 4 / 2**20
    assert by["naive"]["status"] == "ok" and by["iris-torch"]["status"] == "ok"
    assert "own process" in by["naive"]["mem_method"] or "ru_maxrss" in by["naive"]["mem_method"]
    assert by["naive"]["peak_mem_mb"] > 1.5 * logits_mb
    assert by["iris-torch"]["peak_mem_mb"] < 0.6 * by["naive"]["peak_mem_mb"]
    assert by["iris-torch"]["max_abs_err"] < 1e-4


def test_parse_shapes():
    shapes = bench.parse_shapes(["zephyr-7b", "100,8,50"], [1024, 2048])
    assert [(s.N, s.H, s.V) for s in shapes] == [(1024, 4096, 32000), (2048, 4096, 32000), (100, 8, 50)]
    with pytest.raises(ValueError, match="--shapes"):
        bench.parse_shapes(["llama-9000"], [1])
    with pytest.raises(ValueError, match="--shapes"):
        bench.parse_shapes(["2,8,50"], [1])


def test_batch_layout_is_even_and_covers_n():
    for N in (4, 63, 64, 8192, 16384, 32768, 1000):
        B, T = bench.batch_layout(N)
        assert B % 2 == 0 and T >= 2 and B * T <= N < B * (T + 1)
    case = bench.make_case(bench.Shape(64, 8, 20, ""), torch.float32, torch.device("cpu"), seed=0)
    scored = (case.targets != -100).sum(-1)
    assert bool((scored > 0).all())
    # targets are the HF labels shifted by one.
    assert torch.equal(case.targets[:, :-1], case.labels[:, 1:])
