"""Where the time of backend="triton" goes, part by part, next to one cuBLAS product (issue 8).

    python benchmarks/bwd_breakdown.py --tokens 16384           # on a CUDA device, bf16
    python benchmarks/bwd_breakdown.py --dry                     # CPU interpreter, tiny: checks the script

Per shape (zephyr-7b H4096 V32000, qwen2.5-3b H2048 V151936), with ~40 % ignored rows and a random
upstream gradient, CUDA-event medians after warm-up of:
  gemm        one logits product hidden @ W^T (N x H x V): the unit of the four-GEMM floor
  fwd         the fused forward kernel (online log-sum-exp over all N rows, no compaction)
  fwd_split   the split forward (cuBLAS fp32 logits per chunk + the Triton row kernel)
  dz          the workspace dZ kernel over all chunks (recompute + gradient + one store)
  dh          the chunks' dHidden = G W products
  dw          the chunks' dWeight += G^T h products (fp32 accumulation; autograd.WGRAD_PATH says how)
  bwd_<variant>  the whole backward through autograd for each variant (workspace / atomic, with and
              without compaction), and fwd_<variant> its forward
with TFLOP/s where the part is a product. A part much slower than ``gemm`` is where a target of the
issue is missed. Results: bwd_breakdown_<device>.json (with device, versions, date, commit).
"""
from __future__ import annotations

import argparse
import datetime as _dt
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

if "--dry" in sys.argv:
    os.environ["TRITON_INTERPRET"] = "1"  # before triton is imported

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))

import torch  # noqa: E402

from iris_kernels import autograd as A  # noqa: E402
from iris_kernels import linear_logprobs  # noqa: E402
from iris_kernels.device_timing import workspace_parts  # noqa: E402
from iris_kernels.tuning import AUTO  # noqa: E402

SHAPES = {"zephyr-7b": (4096, 32000), "qwen2.5-3b": (2048, 151936)}
VARIANTS = {
    "ws-compact": dict(bwd="workspace", compact=True),
    "ws-hostcount": dict(bwd="workspace", compact=True, host_count=True),
    "ws-nocompact": dict(bwd="workspace", compact=False),
    "atomic-compact": dict(bwd="atomic", compact=True),
    "atomic-nocompact": dict(bwd="atomic", compact=False),
    "split-ws-compact": dict(bwd="workspace", compact=True, fwd="split"),
}


def timer(device, fn, warmup, repeats):
    """Median milliseconds of fn() (CUDA events on a GPU, perf_counter on the CPU)."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        if device.type == "cuda":
            a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            a.record()
            fn()
            b.record()
            torch.cuda.synchronize()
            times.append(a.elapsed_time(b))
        else:
            t = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t) * 1e3)
    return statistics.median(times)


def run_shape(name, N, H, V, dtype, device, warmup, repeats):
    g = torch.Generator().manual_seed(0)
    hidden = torch.randn(N, H, generator=g).to(device=device, dtype=dtype)
    weight = (torch.randn(V, H, generator=g) * (3.0 / H**0.5)).to(device=device, dtype=dtype)
    targets = torch.randint(0, V, (N,), generator=g)
    targets[torch.rand(N, generator=g) < 0.4] = -100
    num_valid = int((targets != -100).sum())
    targets = targets.to(device)
    up = torch.randn(N, generator=g).to(device)
    rec = dict(shape=name, N=N, H=H, V=V, dtype=str(dtype).replace("torch.", ""), num_valid=num_valid)
    flop = 2.0 * N * H * V

    def tflops(ms, f=flop):
        return round(f / (ms * 1e-3) / 1e12, 1)

    # The parts (one product, fused / split forward, dZ, dH, dW): the selfcheck's code, so that
    # the two report the same thing (issue 17); a failing part is an error_<part> field.
    parts = workspace_parts(hidden, weight, targets, up, time_part=lambda fn: timer(device, fn, warmup, repeats))
    rec.update(parts)
    for key in ("gemm", "fwd", "fwd_split", "dz", "dh", "dw"):
        if f"{key}_ms" in parts:
            rec[f"{key}_tflops"] = tflops(parts[f"{key}_ms"])

    for vname, kw in VARIANTS.items():
        kw = dict(kw)
        nv = num_valid if kw.pop("host_count", False) else None
        h = hidden.detach().clone().requires_grad_()
        w = weight.detach().clone().requires_grad_()
        box = {}

        def fwd():
            box["out"] = linear_logprobs(h, w, targets, backend="triton", num_valid=nv, **kw)

        def bwd():
            fwd_out = box.pop("out")
            fwd_out.backward(up)

        try:
            # Fewer calls per variant than per part: five variants x two shapes within ~90 s.
            rec[f"fwd_{vname}_ms"] = timer(device, fwd, 1, min(repeats, 3))
            times = []
            for i in range(1 + min(repeats, 3)):
                fwd()
                t = timer(device, bwd, 0, 1)
                h.grad = w.grad = None
                if i >= 1:
                    times.append(t)
            rec[f"bwd_{vname}_ms"] = statistics.median(times)
        except Exception as e:  # noqa: BLE001 - one failing variant must not end the run
            if device.type == "cuda":
                torch.cuda.synchronize()
            rec[f"error_{vname}"] = f"{type(e).__name__}: {str(e).strip().splitlines()[-1:] }"[:300]
        del h, w, box
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return rec


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--tokens", type=int, default=16384)
    ap.add_argument("--shapes", nargs="+", default=list(SHAPES))
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--dry", action="store_true", help="CPU interpreter at a tiny shape: checks the script only")
    ap.add_argument("--output-dir", default=str(HERE / "results" / "gpu"))
    args = ap.parse_args()
    if args.dry:
        device, dtype = torch.device("cpu"), torch.float32
        shapes = {"dry": (96, 32, 300)}
        args.warmup, args.repeats = 0, 1
    else:
        if not torch.cuda.is_available():
            raise SystemExit("bwd_breakdown.py needs a CUDA device (or --dry)")
        device, dtype = torch.device("cuda"), torch.bfloat16
        shapes = {s: (args.tokens,) + SHAPES[s] for s in args.shapes}
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, cwd=HERE).stdout.strip()
    except OSError:
        commit = ""
    stamp = dict(
        device=torch.cuda.get_device_name(0) if device.type == "cuda" else "cpu (interpreter, dry run)",
        torch=torch.__version__, triton=__import__("triton").__version__,
        date=_dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        git_commit=os.environ.get("GIT_COMMIT") or commit, auto=AUTO.get("cuda"),
    )
    records = []
    out = Path(args.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    for name, (N, H, V) in shapes.items():
        try:
            rec = run_shape(name, N, H, V, dtype, device, args.warmup, args.repeats)
        except Exception as e:  # noqa: BLE001 - recorded, the next shape still runs
            rec = dict(shape=name, N=N, H=H, V=V, error=f"{type(e).__name__}: {e}"[:300])
        rec.update(stamp)
        records.append(rec)
        print(json.dumps({k: v for k, v in rec.items() if k not in stamp}), flush=True)
        (out / f"bwd_breakdown_{device.type}.json").write_text(json.dumps(records, indent=1))
    print("device:", stamp["device"], "| commit:", stamp["git_commit"])


if __name__ == "__main__":
    main()
