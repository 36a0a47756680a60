"""benchmarks/bench_loss.py: where a run writes (never the committed results by default), the CPU
floor row, the load average and run time above the tables, and one colour per provider."""
import hashlib
import importlib
import subprocess
import sys
from pathlib import Path

import pytest

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


def test_one_colour_per_provider():
    names = [n for n in P.PROVIDERS if n != "floor"]
    colours = [bench.provider_colour(n) for n in names]
    assert len(set(colours)) == len(colours)  # distinct
    assert colours == [bench.provider_colour(n) for n in names]  # stable
    assert bench.provider_colour("floor") == "#000000" and "#000000" not in colours
