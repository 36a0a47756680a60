"""benchmarks/bench_loss.py: where a run writes (never the committed results by default), the CPU
floor row, the load average and run time above the tables, and one colour per provider."""
import hashlib
import importlib
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent
BENCH = ROOT / "benchmarks"
sys.path.insert(0, str(BENCH))
bench = importlib.import_module("bench_loss")
P = importlib.import_module("providers")


def _digest(folder: Path) -> dict:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.glob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def default_run(tmp_path_factory):
    """A run without --output-dir, with the benchmark's home redirected to a scratch folder."""
    home = tmp_path_factory.mktemp("bench_home")
    committed = _digest(BENCH / "results")
    mp = pytest.MonkeyPatch()
    mp.setattr(bench, "HERE", home)
    try:
        records = bench.main(["--device", "cpu", "--shapes", "64,16,50", "128,16,50", "--repeats", "1",
                              "--warmup", "0", "--isolate", "none", "--no-interpreter",
                              "--providers", "naive,iris-torch,floor"])
    finally:
        mp.undo()
    assert _digest(BENCH / "results") == committed  # the reference results are untouched
    return home, records


def test_default_output_is_a_new_ignored_run_folder(default_run, capsys):
    home, _ = default_run
    runs = list((home / "runs").iterdir())
    assert len(runs) == 1 and runs[0].name.endswith("Z")
    assert {"bench_loss_cpu.json", "bench_loss_cpu.csv", "bench_loss_cpu_table.txt"} <= {p.name for p in runs[0].iterdir()}
    ignored = subprocess.run(["git", "check-ignore", "-q", "benchmarks/runs/20990101T000000Z/bench_loss_cpu.json"],
                             cwd=ROOT, capture_output=True)
    if ignored.returncode == 128:  # not a git checkout (a copied tree): nothing to ignore
        pytest.skip("not a git checkout")
    assert ignored.returncode == 0, "benchmarks/runs/ must be git-ignored"


def test_says_where_it_writes(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(bench, "HERE", tmp_path)
    bench.main(["--device", "cpu", "--shapes", "64,16,50", "--repeats", "1", "--warmup", "0", "--isolate", "none",
                "--no-interpreter", "--providers", "naive", "--workloads", "logprobs"])
    out, err = capsys.readouterr()
    folder = next((tmp_path / "runs").iterdir())
    assert f"writing to {folder}" in err
    assert f"wrote to {folder}/" in out


def test_floor_row_on_cpu_and_the_header(default_run):
    home, records = default_run
    floors = [r for r in records if r["provider"] == "floor"]
    assert {(r["N"], r["workload"]) for r in floors} == {(64, "logprobs"), (64, "selfplay"), (128, "logprobs"),
                                                         (128, "selfplay")}
    assert all(r["status"] == "ok" and r["total_ms"] > 0 for r in floors)
    lib = [r for r in records if r["provider"] == "iris-torch"]
    assert all(r["x_floor"] and r["x_floor"] > 0 for r in lib)
    table = next((home / "runs").iterdir()).joinpath("bench_loss_cpu_table.txt").read_text()
    assert table.startswith("machine: ")
    assert "load average (1/5/15 min): " in table and "whole run: " in table
    assert ", load avg " in table.splitlines()[4]  # every table heading carries its rows' load


def test_default_cpu_shapes_have_three_n():
    args = bench.build_parser().parse_args(["--device", "cpu"])
    bench.resolve_args(args)
    assert "floor" in args.provider_names
    ns = sorted({s.N for s in bench.parse_shapes(args.shapes, args.tokens)})
    assert len(ns) >= 3 and ns[-1] == 8192


def test_one_style_per_provider_colour_blind_safe():
    """Okabe-Ito colours; no two providers share colour, marker and line style (issue 21 item 8)."""
    names = [n for n in P.PROVIDERS if n != "floor"]
    styles = [bench.provider_style(n) for n in names]
    triples = {(s["color"], s["marker"], s["ls"]) for s in styles}
    assert len(triples) == len(names)
    assert len({s["marker"] for s in styles}) == min(len(names), 10)  # distinct markers as far as they go
    okabe_ito = {"#0072B2", "#E69F00", "#009E73", "#D55E00", "#CC79A7", "#56B4E9", "#F0E442"}
    assert {s["color"] for s in styles} <= okabe_ito
    assert styles == [bench.provider_style(n) for n in names]  # stable
    assert bench.provider_colour("floor") == "#000000" and "#000000" not in {s["color"] for s in styles}
    # The library's torch backend no longer hides under torch's linear_cross_entropy.
    assert bench.provider_style("iris-torch") != bench.provider_style("torch-linear_cross_entropy")
    assert bench.provider_colour("iris-torch") != bench.provider_colour("torch-linear_cross_entropy")


def test_default_make_bench_plan_and_full():
    args = bench.build_parser().parse_args(["--device", "cpu"])
    bench.resolve_args(args)
    assert args.plan is bench.DEFAULT_RUN_LIMITS and args.repeats == 3
    args = bench.build_parser().parse_args(["--device", "cpu", "--full"])
    bench.resolve_args(args)
    assert args.plan is None
    args = bench.build_parser().parse_args(["--device", "cpu", "--providers", "naive"])
    bench.resolve_args(args)
    assert args.plan is None  # an explicit selection is run as asked


def test_plan_limits_rows_and_repeats(monkeypatch, tmp_path):
    """The default plan's limits, exercised at tiny shapes: fewer repeats at the largest N, a
    limited provider skipped above its N with a reason that names --full."""
    monkeypatch.setattr(bench, "CPU_DEFAULT_SHAPES", ["64,16,50", "128,16,50"])
    monkeypatch.setitem(bench.DEFAULT_RUN_LIMITS, "max_n", {"naive": 64})
    monkeypatch.setattr(bench.P, "PROVIDERS", {n: bench.P.PROVIDERS[n] for n in ("naive", "iris-torch", "floor")})
    records = bench.main(["--device", "cpu", "--isolate", "none", "--no-interpreter", "--warmup", "0",
                          "--output-dir", str(tmp_path), "--workloads", "logprobs"])
    by = {(r["provider"], r["N"]): r for r in records}
    assert by[("naive", 64)]["status"] == "ok" and by[("naive", 64)]["repeats"] == 3
    assert by[("naive", 128)]["status"] == "skipped" and "--full" in by[("naive", 128)]["skip_reason"]
    assert by[("iris-torch", 128)]["repeats"] == 2


def test_unreliable_rows_are_flagged():
    def row(name, family, total, p20, p80):
        return dict(provider=name, family=family, total_ms=total, total_p20=p20, total_p80=p80, timing_valid=True,
                    N=8, H=2, V=3, dtype="fp32", device="cpu", workload="logprobs", peak_mem_mb=1.0, status="ok",
                    note="", B=2, T=4, device_name="cpu", load_avg=3.0, fwd_ms=1.0, bwd_ms=1.0, max_abs_err=0.0,
                    ratio_to_best=None, mem_ratio_to_best=None, x_floor=None, skip_reason="")
    recs = [row("floor", "floor", 10.0, 9.9, 10.1), row("iris-torch", "library", 9.0, 8.9, 9.1),
            row("naive", "peer", 20.0, 15.0, 30.0), row("naive-compile", "peer", 8.0, 7.9, 8.1)]
    bench.add_ratios(recs)
    by = {r["provider"]: r["unreliable"] for r in recs}
    assert by["iris-torch"] == "below the floor"
    assert by["naive"].startswith("spread 75%")
    # naive-compile keeps the logits (three products): below the four-product floor is not noise.
    assert by["naive-compile"] == "" and by["floor"] == ""
    table = bench.format_table(recs)
    assert "UNRELIABLE (below the floor)" in table and "2 row(s) marked UNRELIABLE" in table
    assert "machine was loaded" in table


def test_versions_name_every_peer():
    v = bench.versions()
    assert {"torch", "triton", "trl", "transformers", "liger-kernel", "cut-cross-entropy", "iris-kernels"} <= set(v)


def test_jsonl_rows_and_provider_timeout(tmp_path):
    """Each row is appended to --jsonl as it is measured; an isolated provider that hangs past
    --provider-timeout is a failed row with that reason (a child script that sleeps stands in)."""

    jsonl = tmp_path / "rows.jsonl"
    recs = bench.main(["--device", "cpu", "--shapes", "64,16,50", "--repeats", "1", "--warmup", "0",
                       "--isolate", "none", "--no-interpreter", "--providers", "naive,floor",
                       "--workloads", "logprobs", "--output-dir", str(tmp_path), "--jsonl", str(jsonl)])
    lines = [json.loads(x) for x in jsonl.read_text().splitlines()]
    assert [x["provider"] for x in lines] == ["naive", "floor"] and len(recs) == 2
    runner = importlib.import_module("runner")
    case = bench.make_case(bench.Shape(64, 16, 50, ""), torch.float32, torch.device("cpu"), seed=0)
    bench.save_case(case, tmp_path / "case.pt")
    script = tmp_path / "sleeper.py"
    script.write_text("import time\ntime.sleep(60)\n")
    res = runner.run_in_subprocess("naive", tmp_path / "case.pt", ["logprobs"], False, 0, 1, tmp_path,
                                   timeout=2, script=script)
    assert res["logprobs"]["error"].startswith("timed out after 2 s")
