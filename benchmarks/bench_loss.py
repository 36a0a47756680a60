"""Speed, memory and accuracy of per-token log-probs and the IRIS loss, against every peer.

    python benchmarks/bench_loss.py                 # default device, shapes that fit it
    python benchmarks/bench_loss.py --quick         # a smoke run (well under a minute on CPU)
    python benchmarks/bench_loss.py --output-dir benchmarks/results   # replace the committed record
    python benchmarks/bench_loss.py --device cuda --shapes zephyr-7b qwen2.5-3b --tokens 16384 --dtype bf16

Two workloads, every provider on the same inputs (see providers.py):
  logprobs  per-token log p(target) forward + backward with a random upstream gradient;
  selfplay  the IRIS loss forward + backward on a self-play batch (B sequences x T tokens, first
            half annotated, second half synthetic, prompt and padding ignored): this library's
            fused path vs IRIS composed on each peer's per-token output, plus Liger's chunked
            DPO loss as a SPIN-shaped reference point.

Per row: forward, backward and total time (median and p20/p80 over the repeats after warm-up; CUDA
events on GPU), peak memory (CUDA: max_memory_allocated above the inputs; CPU: each provider in
its own process, high-water RSS above the RSS just before the call), the largest absolute error
of the output and both gradients against an fp64 reference (gradients on a seeded sample of
rows: --check-rows, --check-vocab-rows), and the ratio to the best peer (and, where the "floor"
provider ran, to four plain GEMMs: docs/math.md#floor). A row whose time is below the floor's or
whose spread is wide is marked unreliable.

The parts, by name: cases.py (inputs, fp64 reference), providers.py (one adapter per
implementation), runner.py (one provider timed and checked, in its own process with a timeout),
report.py (records, table, JSON, CSV, plots); this file is the command line and the loop. Results: a table on
stdout (with the machine's load average), bench_loss_<device>.json (a list of records) and .csv,
the table as text, and PNG plots of time and memory against N, in --output-dir. By default that
is a new, git-ignored run folder benchmarks/runs/<UTC time>/, so that no run overwrites the
committed reference results in benchmarks/results/ unless asked to (--output-dir).
"""
from __future__ import annotations

import argparse
import datetime as _dt
import gc
import json
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import List, Optional, Sequence

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
for _p in (str(HERE), str(REPO)):
    if _p not in sys.path:
        sys.path.insert(0, _p)

import torch  # noqa: E402

import providers as P  # noqa: E402
from cases import (  # noqa: E402,F401 - re-exported: tests and notebooks use bench_loss.<name>
    ALPHA, BETA, NAMED_SHAPES, SPIN_BETA, Shape, batch_layout, fp64_reference, iris_fp64, load_case, make_case,
    parse_shapes, save_case, spin_fp64,
)
from report import (  # noqa: E402,F401
    RECORD_FIELDS, WORKLOADS, add_ratios, base_record, clean, device_name, fill_measurement, format_table,
    git_commit, load_average, plot, provider_colour, provider_style, run_header, versions, write_outputs,
)
from runner import (  # noqa: E402,F401
    CpuMemoryMeter, child_main, cuda_measure, failure_reason, measure_provider, measure_workloads, run_in_subprocess,
)

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
WORKLOAD_ALIASES = {"a": "logprobs", "b": "selfplay"}

# CPU default: the targets' shape (N 8192, issues 2 and 4) and two smaller N, so that the
# time/memory-vs-N plots have three points per line.
CPU_DEFAULT_SHAPES = ["1024,512,32000", "2048,512,32000", "8192,512,32000"]
CPU_QUICK_SHAPES = ["1024,128,4000"]
# What keeps the default CPU run (make bench) within 10 minutes on 2 quiet cores (issue 21 item 2),
# estimated from the quiet reference run of 2026-11-30 (15 min 55 s with N = 1024, 4096, 8192,
# 3 repeats everywhere, every peer at every N; benchmarks/README.md#run-time): N = 2048 in the
# middle instead of 4096, 2 timed repeats at the largest N, and the two peers slowest there
# (trl-chunked 12.0 s and torch's linear_cross_entropy 8.0 s per call at N = 8192, both behind
# the best peer, naive-compile at 5.3 s) measured at the two smaller N only. --full lifts all three.
# The interpreter rows (a correctness check, not a timing) of the variants added for the GPU run
# are left to tests/ and the selfcheck, which check every variant.
DEFAULT_RUN_LIMITS = {
    "repeats_at_largest_n": 2,
    "max_n": {"trl-chunked": 2048, "torch-linear_cross_entropy": 2048},
    "no_interpreter_rows": ("iris-triton-ws-nocompact", "iris-triton-atomic-nocompact", "iris-triton-split-atomic",
                            "iris-triton-frozen", "iris-triton-composed"),
}
# Gradients checked against fp64 on this many sampled token / vocabulary rows (all when fewer).
CHECK_ROWS, CHECK_VOCAB_ROWS = 1024, 2048
# Tiny enough for the Triton interpreter (its cost grows with programs x loop steps, not FLOPs);
# V is deliberately not a multiple of any block size.
INTERPRETER_SHAPE = "128,64,1000"
QUICK_INTERPRETER_SHAPE = "64,32,500"
CUDA_DEFAULT_SHAPES = ["zephyr-7b", "qwen2.5-3b"]


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    ap.add_argument("--quick", action="store_true", help="small shapes, 2 repeats: a smoke run")
    ap.add_argument("--shapes", nargs="+", help=f"named ({', '.join(NAMED_SHAPES)}) or N,H,V")
    ap.add_argument("--tokens", nargs="+", type=int, help="N for named shapes (default: 16384 on CUDA, 8192 on CPU)")
    ap.add_argument("--providers", help=f"comma-separated subset of: {', '.join(P.PROVIDERS)} (default: all)")
    ap.add_argument("--dtype", choices=list(DTYPES), help="default fp32 on CPU, bf16 on CUDA")
    ap.add_argument("--workloads", nargs="+", default=list(WORKLOADS), help="logprobs (a) and/or selfplay (b)")
    ap.add_argument(
        "--output-dir",
        help="where the JSON, CSV, table and plots go (default: a new run folder benchmarks/runs/<UTC time>/, "
        "git-ignored; pass benchmarks/results to replace the committed reference results)",
    )
    ap.add_argument("--repeats", type=int, help="timed calls per row (default 3 on CPU, 2 at its largest N; "
                    "20 on CUDA; --quick 2)")
    ap.add_argument("--warmup", type=int, help="untimed calls before the memory call (default 1 on CPU, 3 on CUDA; torch.compile rows always get >= 1)")
    ap.add_argument("--interpreter-shape", help=f"N,H,V of the Triton-interpreter rows on CPU (default {INTERPRETER_SHAPE})")
    ap.add_argument("--no-interpreter", action="store_true", help="no Triton-interpreter rows on CPU")
    ap.add_argument("--isolate", default="auto", choices=["auto", "process", "none"],
                    help="each provider in its own process (auto: on CPU, where RSS is per process)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--jsonl", help="also append every row to this JSON-lines file as soon as it is measured")
    ap.add_argument("--provider-timeout", type=float,
                    help="seconds: a provider's own process is killed after this and its rows marked failed "
                    "(isolated runs only; gpu_check.sh uses it)")
    ap.add_argument("--full", action="store_true",
                    help="CPU default run without its time savers (every provider at every N, 3 repeats everywhere)")
    ap.add_argument("--check-rows", type=int, default=CHECK_ROWS,
                    help=f"token rows of dHidden checked against fp64 (default {CHECK_ROWS}; all when N is smaller)")
    ap.add_argument("--check-vocab-rows", type=int, default=CHECK_VOCAB_ROWS,
                    help=f"vocabulary rows of dWeight checked against fp64 (default {CHECK_VOCAB_ROWS}; all when V is smaller)")
    ap.add_argument("--time-budget", type=float,
                    help="seconds: rows not started by then are recorded as skipped (gpu_check.sh uses it)")
    ap.add_argument("--_child", help=argparse.SUPPRESS)
    ap.add_argument("--_provider", help=argparse.SUPPRESS)
    ap.add_argument("--_workload", help=argparse.SUPPRESS)
    ap.add_argument("--_result", help=argparse.SUPPRESS)
    return ap


def resolve_args(args) -> None:
    if args.device == "auto":
        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    if args.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: no CUDA device is visible")
    cpu = args.device == "cpu"
    args.dtype = args.dtype or ("fp32" if cpu else "bf16")
    args.tokens = args.tokens or ([8192] if cpu else [16384] if not args.quick else [4096])
    # The default CPU run (make bench: no shapes, repeats or providers given) keeps within 10 min
    # on 2 quiet cores by DEFAULT_RUN_LIMITS; --full lifts them.
    args.plan = None
    if cpu and not (args.quick or args.full or args.shapes or args.repeats or args.providers):
        args.plan = DEFAULT_RUN_LIMITS
    if not args.shapes:
        args.shapes = (CPU_QUICK_SHAPES if args.quick else CPU_DEFAULT_SHAPES) if cpu else CUDA_DEFAULT_SHAPES
    if args.repeats is None:
        args.repeats = 2 if args.quick else (3 if cpu else 20)
    if args.warmup is None:
        # CPU: one call absorbs lazy initialisation (oneDNN primitives, thread pools, compile),
        # which would otherwise count as the first call's memory; CUDA: also cuBLAS handles,
        # Triton JIT and autotuning.
        args.warmup = 1 if cpu else 3
    if args.repeats < 1 or args.warmup < 0 or args.check_rows < 1 or args.check_vocab_rows < 1:
        raise SystemExit("--repeats, --check-rows and --check-vocab-rows must be >= 1 and --warmup >= 0")
    wl = []
    for w in args.workloads:
        for part in w.split(","):
            part = WORKLOAD_ALIASES.get(part, part)
            if part not in WORKLOADS:
                raise SystemExit(f"--workloads: unknown {part!r}; choose logprobs (a), selfplay (b)")
            wl.append(part)
    args.workloads = list(dict.fromkeys(wl))
    if args.providers:
        names = [n.strip() for n in args.providers.split(",") if n.strip()]
        for n in names:
            if n not in P.PROVIDERS:
                raise SystemExit(f"--providers: unknown {n!r}; choose from {', '.join(P.PROVIDERS)}")
    else:
        names = list(P.PROVIDERS)
    args.provider_names = names
    if args.isolate == "auto":
        args.isolate = "process" if cpu else "none"
    if args.interpreter_shape is None:
        args.interpreter_shape = QUICK_INTERPRETER_SHAPE if args.quick else INTERPRETER_SHAPE


def progress_bar(total: int):
    """tqdm when installed (it is in the bench extra); a silent stand-in otherwise."""
    try:
        from tqdm import tqdm

        return tqdm(total=total, desc="bench_loss", unit="row", file=sys.stderr)
    except ImportError:

        class _Quiet:
            def update(self, n=1):
                pass

            def set_postfix_str(self, s):
                print(f"bench_loss: {s}", file=sys.stderr, flush=True)

            def close(self):
                pass

        return _Quiet()


def main(argv: Optional[Sequence[str]] = None) -> List[dict]:
    args = build_parser().parse_args(argv)
    if args._child:
        sys.exit(child_main(args))
    resolve_args(args)
    device = torch.device(args.device)
    dtype = DTYPES[args.dtype]
    try:
        shapes = parse_shapes(args.shapes, args.tokens)
    except ValueError as e:
        raise SystemExit(str(e))
    # Smallest N first: with --time-budget the rows that fit are the cheap ones of every shape.
    shapes.sort(key=lambda s: s.N)
    triton_names = [n for n in args.provider_names if P.get(n).uses_triton]
    if device.type == "cpu" and triton_names and not args.no_interpreter:
        (interp,) = parse_shapes([args.interpreter_shape], [])
        shapes.append(Shape(interp.N, interp.H, interp.V, "interpreter", interpreter=True))
    largest_n = max(s.N for s in shapes if not s.interpreter) if any(not s.interpreter for s in shapes) else 0

    stamp = {
        "device_name": device_name(device),
        "versions": versions(),
        "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "git_commit": git_commit(),
    }
    out_dir, tag = Path(args.output_dir) if args.output_dir else default_output_dir(), device.type
    load_start = load_average()
    print(f"bench_loss: writing to {out_dir}", file=sys.stderr, flush=True)
    jobs = []
    for shape in shapes:
        names = triton_names if shape.interpreter else args.provider_names
        # A workload a provider does not have (liger-dpo has no per-token output) is no row at all.
        jobs.extend((shape, wl, n) for wl in args.workloads for n in names if wl in P.get(n).workloads)
    records: List[dict] = []
    t_start = time.monotonic()
    bar = progress_bar(len(jobs))

    def out_of_time() -> bool:
        return args.time_budget is not None and time.monotonic() - t_start > args.time_budget

    with tempfile.TemporaryDirectory(prefix="bench_loss_") as tmp:
        workdir = Path(tmp)
        for shape in shapes:
            shape_jobs = [(wl, n) for s_, wl, n in jobs if s_ == shape]
            if out_of_time():
                for wl, name in shape_jobs:
                    rec = base_record(name, wl, shape, args.dtype, device, stamp)
                    rec["status"] = "skipped"
                    rec["skip_reason"] = f"time budget exhausted (--time-budget {args.time_budget:g} s)"
                    records.append(rec)
                    bar.update(1)
                continue
            repeats = args.repeats
            if args.plan and shape.N == largest_n and not shape.interpreter:
                repeats = min(repeats, args.plan["repeats_at_largest_n"])
            case = make_case(shape, dtype, device, args.seed)
            objectives = sorted(
                {P.get(n).objective.get(wl) for wl, n in shape_jobs if P.get(n).family != "floor"} - {None}
            )
            bar.set_postfix_str(f"fp64 reference {shape.label}")
            refs = fp64_reference(case, objectives, token_rows=args.check_rows, vocab_rows=args.check_vocab_rows,
                                  seed=args.seed)
            case_file = workdir / "case.pt"
            if args.isolate == "process":
                save_case(case, case_file, refs)
            for name in dict.fromkeys(n for _, n in shape_jobs):
                wls = [wl for wl, n in shape_jobs if n == name]
                recs = {wl: base_record(name, wl, shape, args.dtype, device, stamp) for wl in wls}
                runnable = []
                for wl in wls:
                    reason = P.get(name).skip_reason(device, dtype, wl, shape.interpreter)
                    if not reason and shape.interpreter and args.isolate == "none" and os.environ.get("TRITON_INTERPRET") != "1":
                        reason = "in-process run without TRITON_INTERPRET=1 (it must be set before triton is imported)"
                    limit = (args.plan or {}).get("max_n", {}).get(name)
                    if not reason and limit is not None and not shape.interpreter and shape.N > limit:
                        reason = (f"default make bench runs {name} at N <= {limit} only (to stay within 10 min on "
                                  "2 cores; it trails the best peer there); --full runs it everywhere")
                    if not reason and shape.interpreter and name in (args.plan or {}).get("no_interpreter_rows", ()):
                        reason = ("default make bench: interpreter rows for this variant are left to tests/ and "
                                  "python -m iris_kernels.selfcheck; --full runs them")
                    if not reason and out_of_time():
                        reason = f"time budget exhausted (--time-budget {args.time_budget:g} s)"
                    if reason:
                        recs[wl]["status"], recs[wl]["skip_reason"] = "skipped", reason
                    else:
                        runnable.append(wl)
                if runnable:
                    bar.set_postfix_str(f"{name} {'+'.join(runnable)} {shape.label}")
                    if args.isolate == "process":
                        results = run_in_subprocess(name, case_file, runnable, shape.interpreter, args.warmup,
                                                    repeats, workdir, device=args.device,
                                                    timeout=args.provider_timeout, script=Path(__file__).resolve())
                    else:
                        results = measure_workloads(name, case, runnable, args.warmup, repeats, refs)
                    for wl, res in results.items():
                        if "error" in res:
                            recs[wl]["status"], recs[wl]["skip_reason"] = "failed", res["error"]
                        else:
                            fill_measurement(recs[wl], res, shape, repeats)
                    del results
                records.extend(recs.values())
                bar.update(len(wls))
                # Written after every provider, so that a run cut short still leaves its results.
                write_outputs(records, out_dir, tag, plots=False)
                for rec in recs.values():
                    append_jsonl(rec, args.jsonl)
            del case, refs
            gc.collect()
    bar.close()
    # Table order: shape, workload, then the provider order of --providers.
    order = {n: i for i, n in enumerate(args.provider_names)}
    records.sort(key=lambda r: (r["shape"] == "interpreter", r["N"], r["H"], r["V"], WORKLOADS.index(r["workload"]), order[r["provider"]]))
    add_ratios(records)
    elapsed = time.monotonic() - t_start
    header = run_header(stamp, load_start, load_average(), elapsed, os.cpu_count())
    table = header + "\n" + format_table(records)
    print(table)
    paths = write_outputs(records, out_dir, tag)
    table_path = out_dir / f"bench_loss_{tag}_table.txt"
    table_path.write_text(table.lstrip("\n") + "\n")
    paths.append(table_path)
    print(f"\nwrote to {out_dir}/: " + ", ".join(p.name for p in paths))
    return records


def append_jsonl(rec: dict, path: Optional[str]) -> None:
    """One JSON line per row, appended the moment the row exists (gpu_check.sh reads $OUT/rows.jsonl)."""
    if not path:
        return
    with open(path, "a") as f:
        f.write(json.dumps({k: clean(v) for k, v in rec.items()}) + "\n")


def default_output_dir() -> Path:
    """A new run folder per run: benchmarks/runs/ is git-ignored (.gitignore: runs/), so a default
    or --quick run never replaces the committed reference in benchmarks/results/."""
    stamp = _dt.datetime.now(_dt.timezone.utc).strftime("%Y%m%dT%H%M%SZ")
    out = HERE / "runs" / stamp
    i = 1
    while out.exists():  # two runs started in the same second
        out = HERE / "runs" / f"{stamp}-{i}"
        i += 1
    return out


if __name__ == "__main__":
    main()
