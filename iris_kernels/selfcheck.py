"""``python -m iris_kernels.selfcheck``: what this machine runs, whether it is right, and how fast.

Run it first on a new GPU, and paste its JSON into bug reports. Meant to take about a minute on a
GPU (not yet run on one); on a machine without CUDA it runs the parity part through the Triton
interpreter at tiny shapes and says that no GPU was timed.

Sections (stdout table; the same in ``--json``, default ``iris_kernels_selfcheck.json``):
  versions   python, torch, triton, numpy, iris-kernels, and the peers if installed;
  device     name, compute capability, memory; or the CPU and "interpreter";
  wgrad      which fp32 weight-gradient accumulation this torch offers (autograd.WGRAD_PATH:
             "out_dtype" one mixed-dtype cuBLAS addmm into fp32, "partial" a per-chunk product
             cast and added, "upcast" fp32 operands) and whether mm(out_dtype=float32) exists
             (the split forward's product, ops/logprobs_split.SPLIT_PRODUCT);
  parity     every backend (reference, torch, triton with forward fused/split x backward
             workspace/atomic) at small odd shapes, fp32/bf16/fp16, against an fp64 computation
             written here from the formulas: plain, all features (bias, soft-cap, temperature,
             entropy, 37.5 % ignored rows), compaction by a host count, a frozen head (no weight
             gradient); log-probs, entropy, dHidden, dWeight, dBias;
  kernels    (CUDA) each compiled Triton kernel that ran: registers, spills, shared memory, and
             whether its PTX uses warpgroup MMA (wgmma);
  timing     (CUDA) per real head (--heads, default Zephyr-7B 4096 x 32000 and Qwen2.5-3B
             2048 x 151936) at --tokens rows: one cuBLAS product, the four-product floor, the
             parts of the default path (fwd, split fwd, dZ, dH, dW: ``workspace_parts``), and
             forward / backward / total of each triton variant and of the torch backend, with
             the user's flags (--bias, --softcap, --entropy; also the autotuner's key);
  autotune   (CUDA) the autotuner's choice per head (iris_kernels.autotune);
  peers      installed peers (Liger, CCE, TRL's op) and whether their op imports; on CUDA in a
             checkout also their fwd / bwd / total at the same heads (benchmarks/providers.py).
Exit status 1 on any parity failure, 0 otherwise. Timing uses iris_kernels.measure, the core the
benchmarks share.
"""
from __future__ import annotations

import argparse
import importlib
import importlib.metadata as md
import json
import math
import os
import platform
import subprocess
import sys
from typing import Dict, List, Optional

import torch

from .device_timing import (  # noqa: F401 - re-exported: python -m iris_kernels.selfcheck's GPU sections
    PEER_PROVIDERS, compiled_kernels, run_autotune, run_peer_timing, run_timing, workspace_parts,
)

PEERS = {
    "liger-kernel": "liger_kernel.transformers",
    "cut-cross-entropy": "cut_cross_entropy",
    "trl": "trl.kernels.chunked_logprob",
}
HEADS = {"zephyr-7b": (4096, 32000), "qwen2.5-3b": (2048, 151936)}
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
# Relative (Frobenius) error limits of the gradients per input dtype: the gradients are returned in
# the input dtype, so bf16 / fp16 rounding (2^-8 / 2^-11 per element) bounds them; a wrong formula
# is O(1) off. Values (log-probs, entropy) come from fp32 logits whatever the dtype.
GRAD_RTOL = {torch.float32: 1e-5, torch.bfloat16: 2e-2, torch.float16: 5e-3}
VALUE_ATOL = 1e-4  # times max(1, |value|): fp32 accumulation over H and V at these shapes


# ------------------------------------------------------------------------------------ environment


def versions() -> Dict[str, str]:
    import iris_kernels

    out = {"python": platform.python_version()}
    for dist in ("torch", "triton", "numpy", *PEERS, "transformers"):
        try:
            out[dist] = md.version(dist)
        except md.PackageNotFoundError:
            out[dist] = "not installed"
    out["iris-kernels"] = iris_kernels.__version__
    return out


def device_info() -> Dict[str, object]:
    if torch.cuda.is_available():
        p = torch.cuda.get_device_properties(0)
        return {"type": "cuda", "name": p.name, "capability": f"sm_{p.major}{p.minor}",
                "memory_gib": round(p.total_memory / 2**30, 1), "sms": p.multi_processor_count,
                "cuda": torch.version.cuda}
    return {"type": "cpu", "name": platform.processor() or platform.machine(), "cores": os.cpu_count(),
            "interpreter": os.environ.get("TRITON_INTERPRET") == "1"}


def peers() -> Dict[str, str]:
    out = {}
    for dist, module in PEERS.items():
        try:
            md.version(dist)
        except md.PackageNotFoundError:
            out[dist] = "not installed"
            continue
        try:
            importlib.import_module(module)
            out[dist] = "importable"
        except Exception as err:  # noqa: BLE001 - reported, not fatal
            out[dist] = f"installed, {module} fails: {type(err).__name__}: {err}"[:200]
    return out


# ------------------------------------------------------------------------------------ parity


def _oracle(h, w, t, b, *, temperature, softcap, up_lp, up_ent, ignore_index=-100):
    """fp64 log-probs, entropy and gradients, written from docs/math.md (not from the library)."""
    h = h.detach().double().requires_grad_()
    w = w.detach().double().requires_grad_()
    b = None if b is None else b.detach().double().requires_grad_()
    z = h @ w.t() + (0.0 if b is None else b)
    if softcap is not None:
        z = softcap * torch.tanh(z / softcap)
    z = z / temperature
    logp_all = torch.log_softmax(z, -1)
    ignored = t == ignore_index
    logp = torch.where(ignored, 0.0, logp_all.gather(1, t.clamp(min=0)[:, None]).squeeze(1))
    ent = torch.where(ignored, 0.0, -(logp_all.exp() * logp_all).sum(-1))
    ((logp * up_lp.double()).sum() + (ent * up_ent.double()).sum()).backward()
    return logp.detach(), ent.detach(), h.grad, w.grad, None if b is None else b.grad


def _rel(a, b) -> float:
    if a is None:
        return math.inf
    return float((a.double() - b).norm() / b.norm().clamp(min=1e-30))


def parity_cases(device: torch.device, gpu: bool) -> List[dict]:
    # Odd sizes: no tile divides them; larger on a GPU (compiled kernels are cheap there).
    N, H, V = (257, 136, 1001) if gpu else (37, 24, 101)
    return [
        dict(name="plain", N=N, H=H, V=V, bias=False, softcap=None, temperature=1.0, ignore=0.3, compact=False,
             host_count=False, frozen=False),
        dict(name="all-features", N=N, H=H, V=V, bias=True, softcap=5.0, temperature=0.7, ignore=0.375,
             compact=True, host_count=False, frozen=False),
        dict(name="host-count", N=N, H=H, V=V, bias=True, softcap=None, temperature=1.0, ignore=0.375,
             compact=True, host_count=True, frozen=False),
        dict(name="frozen-head", N=N, H=H, V=V, bias=False, softcap=5.0, temperature=1.0, ignore=0.375,
             compact=True, host_count=False, frozen=True),
    ]


def backends(quick: bool) -> List[dict]:
    out = [dict(backend="reference"), dict(backend="torch")]
    variants = [("fused", "workspace"), ("split", "atomic")] if quick else [
        (f, b) for f in ("fused", "split") for b in ("workspace", "atomic")]
    out += [dict(backend="triton", fwd=f, bwd=b) for f, b in variants]
    return out


def run_parity(device: torch.device, dtypes, quick: bool) -> List[dict]:
    from . import linear_logprobs

    rows = []
    gpu = device.type == "cuda"
    for case in parity_cases(device, gpu):
        N, H, V = case["N"], case["H"], case["V"]
        g = torch.Generator().manual_seed(N + H + V)
        h32 = torch.randn(N, H, generator=g)
        w32 = torch.randn(V, H, generator=g) * (2.0 / math.sqrt(H))
        b32 = torch.randn(V, generator=g) * 0.5 if case["bias"] else None
        t = torch.randint(0, V, (N,), generator=g)
        t[torch.rand(N, generator=g) < case["ignore"]] = -100
        up_lp, up_ent = torch.randn(N, generator=g), torch.randn(N, generator=g)
        t, up_lp, up_ent = t.to(device), up_lp.to(device), up_ent.to(device)
        num_valid = int((t != -100).sum()) if case["host_count"] else None
        for dt_name in dtypes:
            dtype = DTYPES[dt_name]
            h, w = h32.to(device, dtype), w32.to(device, dtype)
            b = None if b32 is None else b32.to(device, dtype)
            # The oracle sees the very inputs the backends get (already rounded to dtype).
            want = _oracle(h, w, t, b, temperature=case["temperature"], softcap=case["softcap"],
                           up_lp=up_lp, up_ent=up_ent)
            for be in backends(quick):
                label = be["backend"] + ("" if be["backend"] != "triton" else f"[fwd={be['fwd']},bwd={be['bwd']}]")
                row = dict(case=case["name"], dtype=dt_name, backend=label, N=N, H=H, V=V)
                try:
                    hh = h.detach().clone().requires_grad_()
                    ww = w.detach().clone().requires_grad_(not case["frozen"])
                    bb = None if b is None else b.detach().clone().requires_grad_()
                    kw = {k: v for k, v in be.items() if k != "backend"}
                    if be["backend"] == "triton":
                        kw.update(compact=case["compact"], num_valid=num_valid)
                    out = linear_logprobs(hh, ww, t, bias=bb, temperature=case["temperature"], softcap=case["softcap"],
                                          return_entropy=True, backend=be["backend"], **kw)
                    ((out.logprobs * up_lp).sum() + (out.entropy * up_ent).sum()).backward()
                    logp, ent, gh, gw, gb = want
                    scale = max(1.0, float(logp.abs().max()))
                    got_lp, got_ent = out.logprobs.detach().double(), out.entropy.detach().double()
                    row["err_logp"] = float((got_lp - logp).abs().max()) / scale
                    row["err_entropy"] = float((got_ent - ent).abs().max()) / max(1.0, float(ent.abs().max()))
                    row["rel_grad_hidden"] = _rel(hh.grad, gh)
                    row["rel_grad_weight"] = None if case["frozen"] else _rel(ww.grad, gw)
                    row["rel_grad_bias"] = None if b is None else _rel(bb.grad, gb)
                    ignored = t == -100
                    zero_ok = bool((got_lp[ignored] == 0).all()) and bool((hh.grad[ignored] == 0).all())
                    frozen_ok = (ww.grad is None) if case["frozen"] else True
                    # fp64 through the reference backend: held to fp64-level agreement would be too
                    # strict for fp32 inputs; every backend meets the same limits.
                    tol = GRAD_RTOL[dtype]
                    grads = [x for x in (row["rel_grad_hidden"], row["rel_grad_weight"], row["rel_grad_bias"])
                             if x is not None]
                    ok = (row["err_logp"] <= VALUE_ATOL and row["err_entropy"] <= VALUE_ATOL
                          and all(x <= tol for x in grads) and zero_ok and frozen_ok)
                    row["ok"] = ok
                    if not ok:
                        row["why"] = ("ignored rows not exactly 0" if not zero_ok else
                                      "a frozen head got a gradient" if not frozen_ok else "error above the limit")
                except Exception as err:  # noqa: BLE001 - a failing backend is a failed row
                    row.update(ok=False, why=f"{type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}"[:300])
                rows.append(row)
    return rows


def wgrad_paths() -> Dict[str, object]:
    from . import autograd
    from .ops.logprobs_split import SPLIT_PRODUCT
    from .reference import _MM_OUT_DTYPE

    return {"workspace_dW_accumulation": dict(autograd.WGRAD_PATH), "split_forward_product": dict(SPLIT_PRODUCT),
            "mm_out_dtype_available": bool(_MM_OUT_DTYPE)}


# ------------------------------------------------------------------------------------ output


def format_report(rep: dict) -> str:
    lines = ["iris_kernels selfcheck", ""]
    lines.append("versions: " + ", ".join(f"{k} {v}" for k, v in rep["versions"].items()))
    lines.append("device:   " + ", ".join(f"{k}={v}" for k, v in rep["device"].items()))
    lines.append("wgrad:    " + json.dumps(rep["wgrad"]))
    lines.append("peers:    " + ", ".join(f"{k}: {v}" for k, v in rep["peers"].items()))
    lines.append("")
    lines.append(f"{'parity':14s} {'dtype':5s} {'backend':36s} {'logp':>8s} {'entropy':>8s} {'dH':>8s} {'dW':>8s} "
                 f"{'db':>8s}  ok")

    def f(x):
        return "-" if x is None else f"{x:.1e}"

    for r in rep["parity"]:
        lines.append(f"{r['case']:14s} {r['dtype']:5s} {r['backend']:36s} {f(r.get('err_logp')):>8s} "
                     f"{f(r.get('err_entropy')):>8s} {f(r.get('rel_grad_hidden')):>8s} {f(r.get('rel_grad_weight')):>8s} "
                     f"{f(r.get('rel_grad_bias')):>8s}  {'ok' if r['ok'] else 'FAIL: ' + r.get('why', '')}")
    if rep["kernels"]:
        lines += ["", f"{'kernel':24s} {'regs':>5s} {'spills':>6s} {'smem':>7s} {'warps':>5s} wgmma"]
        for k in rep["kernels"]:
            lines.append(f"{k['kernel']:24s} {str(k.get('regs')):>5s} {str(k.get('spills')):>6s} "
                         f"{str(k.get('smem_bytes')):>7s} {str(k.get('num_warps')):>5s} {k.get('wgmma', k.get('error'))}")
    if rep["timing"]:
        lines += ["", f"{'head':11s} {'N':>6s} {'what':36s} {'fwd ms':>8s} {'bwd ms':>8s} {'total ms':>9s} "
                      f"{'x floor':>7s} {'TFLOP/s':>8s}"]
        for r in rep["timing"]:
            if "error" in r:
                lines.append(f"{r['head']:11s} {r.get('N', 0):>6d} {r['what']:36s} {r['error']}")
                continue

            def g(k, spec=".2f"):
                return "-" if r.get(k) is None else format(r[k], spec)

            lines.append(f"{r['head']:11s} {r['N']:>6d} {r['what']:36s} {g('fwd_ms'):>8s} {g('bwd_ms'):>8s} "
                         f"{g('total_ms'):>9s} {g('x_floor'):>7s} {g('tflops', '.0f'):>8s}")
    for a in rep["autotune"]:
        lines.append(f"autotune {a['head']}: {a.get('choice', a.get('error'))}")
    lines.append("")
    lines.append(rep["note"])
    n_fail = sum(not r["ok"] for r in rep["parity"])
    lines.append(f"parity: {len(rep['parity']) - n_fail} ok, {n_fail} failed")
    return "\n".join(lines)


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="python -m iris_kernels.selfcheck",
                                 description="Versions, device, parity of every backend against fp64, and (CUDA) "
                                             "compiled kernels, timings and the autotuner's choice.")
    ap.add_argument("--json", default="iris_kernels_selfcheck.json", help="where the JSON report goes")
    ap.add_argument("--heads", nargs="+", help="H,V pairs to time (default: zephyr-7b 4096,32000 and qwen2.5-3b "
                                               "2048,151936)")
    ap.add_argument("--tokens", type=int, default=8192, help="rows N of the timed calls (CUDA)")
    ap.add_argument("--dtype", default="bf16", choices=list(DTYPES), help="dtype of the timed calls (CUDA)")
    ap.add_argument("--repeats", type=int, default=5, help="timed calls per row (CUDA)")
    ap.add_argument("--parity-dtypes", nargs="+", default=list(DTYPES), choices=list(DTYPES))
    ap.add_argument("--quick", action="store_true", help="two triton variants instead of four in the parity part")
    ap.add_argument("--no-timing", action="store_true", help="parity only, even on CUDA")
    ap.add_argument("--bias", action="store_true", help="time (and tune) with a bias, as your head has one (CUDA)")
    ap.add_argument("--softcap", type=float, help="time (and tune) with this logit soft-cap (CUDA)")
    ap.add_argument("--entropy", action="store_true", help="time (and tune) with the entropy returned (CUDA)")
    return ap


def main(argv: Optional[List[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    gpu = torch.cuda.is_available()
    if not gpu and os.environ.get("TRITON_INTERPRET") != "1":
        # The interpreter is chosen when triton is imported: run again in a process that sets it.
        env = dict(os.environ, TRITON_INTERPRET="1")
        cmd = [sys.executable, "-m", "iris_kernels.selfcheck", *(argv if argv is not None else sys.argv[1:])]
        return subprocess.run(cmd, env=env).returncode
    heads = HEADS
    if args.softcap is not None and not (math.isfinite(args.softcap) and args.softcap > 0):
        raise SystemExit(f"--softcap must be a finite number > 0, got {args.softcap}")
    if args.heads:
        heads = {}
        for spec in args.heads:
            try:
                H, V = (int(x) for x in spec.split(","))
            except ValueError:
                raise SystemExit(f"--heads: expected H,V, got {spec!r}") from None
            heads[f"H{H}-V{V}"] = (H, V)
    device = torch.device("cuda" if gpu else "cpu")
    rep = {"versions": versions(), "device": device_info(), "peers": peers()}
    rep["parity"] = run_parity(device, args.parity_dtypes, args.quick)
    rep["wgrad"] = wgrad_paths()
    rep["kernels"], rep["timing"], rep["autotune"] = [], [], []
    if gpu:
        rep["kernels"] = compiled_kernels()
        if not args.no_timing:
            flags = dict(bias=args.bias, softcap=args.softcap, entropy=args.entropy)
            rep["timing"] = run_timing(heads, args.tokens, DTYPES[args.dtype], args.repeats, flags=flags)
            rep["timing"] += run_peer_timing(heads, args.tokens, DTYPES[args.dtype], args.repeats)
            rep["autotune"] = run_autotune(heads, args.tokens, DTYPES[args.dtype], flags=flags)
            rep["kernels"] = compiled_kernels()  # now with the real heads' kernels too
        rep["note"] = "GPU timed with CUDA events (iris_kernels.measure)." if rep["timing"] else "GPU: parity only."
    else:
        rep["note"] = ("No GPU: parity through the Triton interpreter at tiny shapes; no GPU was timed, no kernel "
                       "compiled, no autotuning.")
    rep["ok"] = all(r["ok"] for r in rep["parity"])
    print(format_report(rep))

    def clean(v):
        if isinstance(v, float) and not math.isfinite(v):
            return str(v)
        if isinstance(v, dict):
            return {str(k): clean(x) for k, x in v.items()}
        if isinstance(v, (list, tuple)):
            return [clean(x) for x in v]
        return v

    tmp = args.json + ".tmp"
    with open(tmp, "w") as f:
        json.dump(clean(rep), f, indent=1)
    os.replace(tmp, args.json)
    print(f"wrote {args.json}")
    return 0 if rep["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
