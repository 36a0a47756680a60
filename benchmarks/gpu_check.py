"""The GPU run's plan and driver: decisive rows first, each provider in its own process, every row on disk at once.

    python benchmarks/gpu_check.py --out $OUT            # on the GPU machine (gpu_check.sh calls this)
    GPU_CHECK_DRY=1 python benchmarks/gpu_check.py       # on a CPU: same plan, tiny shapes, interpreter

Order (``plan``): the environment and the selfcheck (parity at small shapes and the compiled
kernels, in the background on spare CPU cores: its compiles are CPU work); then at N = 16384 bf16,
per head (Zephyr-7B, then Qwen2.5-3B): the four-product floor, the default path (autotuned), the
split forward and the atomic backward; then bwd_breakdown.py (where the time goes, part by part);
then compaction and the host count (the case has ~37.5 % ignored rows), the frozen head, the IRIS
loss fused vs composed, the torch backend; then the peers; then N = 32768; then the compiled
``pytest -m gpu`` suite with what time is left.

Each phase is one bench_loss.py call with ``--isolate process --provider-timeout``: every provider
runs in its own process (a sticky CUDA error or a hang costs that row only) and checks its errors
on the device against a sampled fp64 reference (no host fp64 of the full weight gradient). Rows are
appended to ``$OUT/rows.jsonl`` the moment they exist; a phase that would start after the budget
(``--budget`` s, default 480) is recorded as skipped. A summary table ends the run.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Dict, List

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
for _p in (str(HERE), str(REPO)):
    if _p not in sys.path:
        sys.path.insert(0, _p)

from report import unreliable_reason  # noqa: E402

DECISIVE = ["floor", "iris-triton", "iris-triton-split", "iris-triton-atomic"]
LIBRARY_MORE = ["iris-triton-ws-hostcount", "iris-triton-ws-nocompact", "iris-triton-atomic-nocompact",
                "iris-triton-split-atomic", "iris-triton-frozen", "iris-triton-composed", "iris-torch"]
PEERS = ["liger-flce", "liger-cute-sce", "cce", "cce-exact", "trl-chunked", "liger-dpo", "torch-linear_cross_entropy",
         "naive", "naive-compile"]


def plan(dry: bool) -> List[Dict]:
    """The phases in order: name, providers, shapes, tokens, workloads, timeout per provider (s)."""
    heads = ["zephyr-7b", "qwen2.5-3b"]
    if dry:
        # CPU: tiny shapes; the Triton providers run at the interpreter shape.
        heads = ["128,32,500"]
    phases = []
    for head in heads:
        phases.append(dict(name=f"decisive {head}" + ("" if dry else " N=16384"), providers=DECISIVE, shapes=[head],
                           tokens=[16384],
                           workloads=["logprobs"], timeout=90))
    phases.append(dict(name="breakdown", script="bwd_breakdown.py", timeout=100))
    phases.append(dict(name="library variants, frozen head, IRIS fused vs composed", providers=DECISIVE[1:2] + LIBRARY_MORE,
                       shapes=heads, tokens=[16384], workloads=["logprobs", "selfplay"], timeout=90))
    phases.append(dict(name="peers", providers=["floor"] + PEERS, shapes=heads, tokens=[16384],
                       workloads=["logprobs", "selfplay"], timeout=120))
    phases.append(dict(name="N=32768", providers=DECISIVE, shapes=heads, tokens=[32768], workloads=["logprobs"],
                       timeout=120))
    phases.append(dict(name="pytest -m gpu", pytest=True, timeout=150))
    return phases


def describe(phases: List[Dict], dry: bool) -> str:
    lines = ["row order:", "  0. environment; selfcheck (background)"]
    for i, ph in enumerate(phases, 1):
        if ph.get("script"):
            lines.append(f"  {i}. {ph['name']}: {ph['script']} (timeout {ph['timeout']} s)")
        elif ph.get("pytest"):
            lines.append(f"  {i}. {ph['name']} (whatever time is left, at most {ph['timeout']} s)")
        else:
            lines.append(f"  {i}. {ph['name']}: {', '.join(ph['providers'])} | shapes {' '.join(ph['shapes'])} "
                         f"| N {ph['tokens'] if not dry else 'tiny'} | {'+'.join(ph['workloads'])} "
                         f"| {ph['timeout']} s per provider")
    return "\n".join(lines)


def bench_cmd(ph: Dict, out: Path, dry: bool, budget_left: float) -> List[str]:
    cmd = [sys.executable, str(HERE / "bench_loss.py"), "--providers", ",".join(ph["providers"]),
           "--workloads", *ph["workloads"], "--isolate", "process", "--provider-timeout", str(ph["timeout"]),
           "--jsonl", str(out / "rows.jsonl"), "--output-dir", str(out / ph["name"].split()[0].replace(",", "")),
           "--time-budget", str(max(1.0, budget_left))]
    if dry:
        cmd += ["--device", "cpu", "--shapes", *ph["shapes"], "--interpreter-shape", "64,32,500", "--repeats", "1",
                "--warmup", "0", "--check-rows", "64", "--check-vocab-rows", "64"]
    else:
        cmd += ["--device", "cuda", "--dtype", "bf16", "--shapes", *ph["shapes"], "--tokens",
                *map(str, ph["tokens"]), "--repeats", "10", "--warmup", "2"]
    return cmd


def summary(out: Path) -> str:
    path = out / "rows.jsonl"
    rows = [json.loads(x) for x in path.read_text().splitlines()] if path.exists() else []
    lines = [f"{'provider':30s} {'workload':9s} {'shape':12s} {'N':>6s} {'status':11s} {'total ms':>9s} "
             f"{'x floor':>7s} {'max err':>9s}  note / reason"]
    floors = {(r["workload"], r["shape"], r["N"], r["H"], r["V"]): r for r in rows
              if r["provider"] == "floor" and r["status"] == "ok"}
    for r in rows:
        tot = r.get("total_ms")
        fl = floors.get((r["workload"], r["shape"], r["N"], r.get("H"), r.get("V")))
        xf = f"{tot / fl['total_ms']:.2f}" if (tot and fl and r["provider"] != "floor") else "-"
        err = r.get("max_abs_err")
        err = f"{err:.1e}" if isinstance(err, float) else (err or "-")
        why = r.get("skip_reason") or r.get("note") or ""
        if r.get("status") == "ok" and r.get("timing_valid"):
            flag = unreliable_reason(r, fl)
            why = f"UNRELIABLE ({flag}); {why}" if flag else why
        lines.append(f"{r['provider']:30s} {r['workload']:9s} {str(r['shape'])[:12]:12s} {r['N']:>6d} {r['status']:11s} "
                     f"{(f'{tot:.2f}' if tot else '-'):>9s} {xf:>7s} {err:>9s}  {why[:90]}")
    return "\n".join(lines)


def autotune_summary(folder: Path) -> str:
    """The autotuner's choices made during the run (its cache file), one line per key."""
    files = sorted(folder.glob("autotune-v*.json")) if folder.exists() else []
    if not files:
        return "autotune: no choice made in this run (CPU, tuning off, or the default path never ran)"
    lines = []
    for f in files:
        for key, e in json.loads(f.read_text()).get("entries", {}).items():
            lines.append(f"autotune: {key} -> fwd={e.get('fwd')} bwd={e.get('bwd')} times_ms={e.get('times_ms')}")
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default=os.environ.get("OUT") or str(HERE / "results" / "gpu"))
    ap.add_argument("--budget", type=float, default=None,
                    help="seconds for the whole run (default $GPU_CHECK_LIMIT, else 480 = 8 min; 1200 in the dry run, "
                         "whose interpreter rows are slow)")
    ap.add_argument("--dry", action="store_true", default=os.environ.get("GPU_CHECK_DRY") == "1",
                    help="CPU: the same plan at tiny shapes, Triton through the interpreter")
    ap.add_argument("--print-plan", action="store_true", help="print the row order and exit")
    ap.add_argument("--only", help="comma-separated phase numbers to run (default: all; the selfcheck always runs)")
    args = ap.parse_args(argv)
    if args.budget is None:
        args.budget = float(os.environ.get("GPU_CHECK_LIMIT") or (1200 if args.dry else 480))
    out = Path(args.out)
    phases = plan(args.dry)
    print(describe(phases, args.dry), flush=True)
    if args.print_plan:
        return 0
    out.mkdir(parents=True, exist_ok=True)
    (out / "rows.jsonl").unlink(missing_ok=True)
    env = dict(os.environ, PYTHONPATH=f"{REPO}{os.pathsep}{os.environ.get('PYTHONPATH', '')}")
    # The autotuner's cache goes to $OUT (it comes back with the results): its choice and the times
    # it measured, next to the rows that measure the same variants.
    env.setdefault("IRIS_KERNELS_CACHE_DIR", str(out / "autotune"))
    if args.dry:
        env.pop("TRITON_INTERPRET", None)  # bench_loss sets it for its interpreter rows only
    start = time.monotonic()
    failed = []
    sc_cmd = [sys.executable, "-m", "iris_kernels.selfcheck", "--no-timing", "--json", str(out / "selfcheck.json")]
    sc_cmd += ["--quick", "--parity-dtypes", "fp32"] if args.dry else ["--quick", "--parity-dtypes", "bf16", "fp32"]
    sc_log = open(out / "01_selfcheck.log", "w")
    selfcheck = subprocess.Popen(sc_cmd, env=env, stdout=sc_log, stderr=subprocess.STDOUT, cwd=REPO)
    timings = {}
    only = None if not args.only else {int(x) for x in args.only.split(",")}
    for i, ph in enumerate(phases, 1):
        if only is not None and i not in only:
            continue
        left = args.budget - (time.monotonic() - start)
        t0 = time.monotonic()
        log = out / f"{i:02d}_{ph['name'].split()[0].replace(',', '')}.log"
        if left < 20:
            print(f"== {i}. {ph['name']}: skipped ({left:.0f} s left of {args.budget:g})", flush=True)
            with open(out / "rows.jsonl", "a") as f:
                f.write(json.dumps(dict(provider=ph["name"], workload="-", shape="-", N=0, status="skipped",
                                        skip_reason=f"time budget exhausted ({args.budget:g} s)")) + "\n")
            continue
        print(f"== {i}. {ph['name']} ({left:.0f} s left)", flush=True)
        if ph.get("script"):
            cmd = [sys.executable, str(HERE / ph["script"]), "--output-dir", str(out)]
            cmd += ["--dry"] if args.dry else ["--tokens", "16384"]
            timeout = min(ph["timeout"], left)
        elif ph.get("pytest"):
            cmd = [sys.executable, "-m", "pytest", "-m", "gpu", "-q", "-p", "no:cacheprovider", "tests"]
            timeout = min(ph["timeout"], left)
        else:
            cmd = bench_cmd(ph, out, args.dry, left - 15)
            # Each provider has its own timeout; this one only guards the phase as a whole.
            timeout = left
        with open(log, "w") as f:
            try:
                rc = subprocess.run(cmd, env=env, stdout=f, stderr=subprocess.STDOUT, timeout=max(5, timeout),
                                    cwd=REPO).returncode
            except subprocess.TimeoutExpired:
                rc = "timeout"
        # pytest: 5 = nothing collected (no GPU test can run on a CPU): fine in the dry run only.
        if rc != 0 and not (ph.get("pytest") and args.dry and rc == 5):
            failed.append(f"{ph['name']} (rc={rc})")
        timings[ph["name"]] = time.monotonic() - t0
        print(f"   done in {timings[ph['name']]:.0f} s (rc={rc}; log {log.name})", flush=True)
    try:
        sc_rc = selfcheck.wait(timeout=max(5, args.budget + 60 - (time.monotonic() - start)))
    except subprocess.TimeoutExpired:
        selfcheck.kill()
        sc_rc = "timeout"
    sc_log.close()
    if sc_rc != 0:
        failed.append(f"selfcheck (rc={sc_rc})")
    print("\n== summary (every row, in the order measured; rows.jsonl has all fields)")
    print(summary(out))
    print(f"\nselfcheck: rc={sc_rc} ({out / 'selfcheck.json'})")
    print(autotune_summary(Path(env["IRIS_KERNELS_CACHE_DIR"])))
    print("phase times (s): " + ", ".join(f"{k} {v:.0f}" for k, v in timings.items()))
    print(f"whole run: {time.monotonic() - start:.0f} s")
    if failed:
        print("FAILED: " + "; ".join(failed))
        return 1
    print("all phases passed")
    return 0


if __name__ == "__main__":
    sys.exit(main())
