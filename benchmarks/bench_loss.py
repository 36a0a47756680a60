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
of the output and both gradients against an fp64 reference, and the ratio to the best peer (and,
where the "floor" provider ran, to four plain GEMMs: docs/math.md#floor). Results: a table on
stdout (with the machine's load average), bench_loss_<device>.json (a list of records) and .csv,
the table as text, and PNG plots of time and memory against N, in --output-dir. By default that
is a new, git-ignored run folder benchmarks/runs/<UTC time>/, so that no run overwrites the
committed reference results in benchmarks/results/ unless asked to (--output-dir).
"""
from __future__ import annotations

import argparse
import csv
import ctypes
import datetime as _dt
import gc
import importlib.metadata
import json
import math
import os
import platform
import re
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
if str(HERE) not in sys.path:
    sys.path.insert(0, str(HERE))

import torch  # noqa: E402

import providers as P  # noqa: E402

NAMED_SHAPES: Dict[str, Tuple[int, int]] = {
    "zephyr-7b": (4096, 32000),
    "qwen2.5-3b": (2048, 151936),
    "smollm2-135m": (576, 49152),
}
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
WORKLOADS = ("logprobs", "selfplay")
WORKLOAD_ALIASES = {"a": "logprobs", "b": "selfplay"}

# CPU default: the targets' shape (N 8192, issues 2 and 4) and two smaller N, so that the
# time/memory-vs-N plots have three points per line; ~6-7 min on 2 otherwise idle cores.
CPU_DEFAULT_SHAPES = ["1024,512,32000", "4096,512,32000", "8192,512,32000"]
CPU_QUICK_SHAPES = ["1024,128,4000"]
# Tiny enough for the Triton interpreter (its cost grows with programs x loop steps, not FLOPs);
# V is deliberately not a multiple of any block size.
INTERPRETER_SHAPE = "128,64,1000"
QUICK_INTERPRETER_SHAPE = "64,32,500"
CUDA_DEFAULT_SHAPES = ["zephyr-7b", "qwen2.5-3b"]

# IRIS settings of the self-play workload: alpha = 2 is the schedule's starting value (chi^2
# regime, sharp weights), beta = 1 the theory's value; SPIN's beta for the DPO reference point.
ALPHA, BETA, SPIN_BETA = 2.0, 1.0, 0.1

RECORD_FIELDS = [
    "provider", "family", "workload", "objective", "status", "N", "H", "V", "B", "T", "shape",
    "dtype", "device", "fwd_ms", "fwd_p20", "fwd_p80", "bwd_ms", "bwd_p20", "bwd_p80",
    "total_ms", "total_p20", "total_p80", "peak_mem_mb", "grad_mem_mb", "extra_mem_mb", "mem_method", "max_abs_err",
    "err_value", "err_grad_hidden", "err_grad_weight", "ratio_to_best", "best_peer",
    "mem_ratio_to_best", "x_floor", "timing_valid", "repeats", "warmup", "note", "skip_reason",
    "device_name", "versions", "date", "git_commit", "load_avg", "threads",
]


# ------------------------------------------------------------------------------------------------
# Cases and the fp64 reference
# ------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Shape:
    N: int
    H: int
    V: int
    name: str
    interpreter: bool = False  # run only Triton providers, under TRITON_INTERPRET=1, untimed

    @property
    def label(self) -> str:
        return f"{self.name} N={self.N}" if self.name else f"N={self.N} H={self.H} V={self.V}"


def parse_shapes(specs: Sequence[str], tokens: Sequence[int]) -> List[Shape]:
    shapes = []
    for spec in specs:
        if spec in NAMED_SHAPES:
            H, V = NAMED_SHAPES[spec]
            shapes.extend(Shape(n, H, V, spec) for n in tokens)
            continue
        parts = spec.split(",")
        if len(parts) != 3 or not all(p.strip().isdigit() for p in parts):
            raise ValueError(
                f"--shapes: {spec!r} is neither a named shape ({', '.join(NAMED_SHAPES)}) nor N,H,V"
            )
        N, H, V = (int(p) for p in parts)
        if N < 4 or H < 1 or V < 2:
            raise ValueError(f"--shapes: {spec!r} needs N >= 4, H >= 1, V >= 2")
        shapes.append(Shape(N, H, V, ""))
    return shapes


def batch_layout(N: int) -> Tuple[int, int]:
    """B sequences x T tokens for N tokens: 8 sequences as in a real micro-batch (landscape.md),
    more once sequences would exceed 2048 tokens, 2 for toy sizes. B is even (half annotated,
    half synthetic); N is rounded down to B x T when it does not divide."""
    if N < 64:
        B = 2
    elif N <= 8 * 2048:
        B = 8
    else:
        B = 2 * max(4, N // 4096)
    return B, N // B


def make_case(shape: Shape, dtype: torch.dtype, device: torch.device, seed: int) -> P.Case:
    """Random inputs shaped like a self-play batch. Generated in fp32 on the CPU from one seed, so
    every provider (and every process) gets bit-identical tensors, then cast and moved."""
    B, T = batch_layout(shape.N)
    H, V = shape.H, shape.V
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(B, T, H, generator=g)
    # Logit scale ~3 (std over the vocabulary), about what a trained LM head produces.
    weight = torch.randn(V, H, generator=g) * (3.0 / math.sqrt(H))
    labels = torch.randint(0, V, (B, T), generator=g)
    for b in range(B):
        # Prompt (1/8 to 1/2 of the sequence) and right padding (up to 1/8) carry no label.
        prompt = int(torch.randint(max(1, T // 8), max(2, T // 2 + 1), (1,), generator=g))
        pad = int(torch.randint(0, max(1, T // 8 + 1), (1,), generator=g))
        labels[b, :prompt] = P.IGNORE_INDEX
        if pad:
            labels[b, T - pad :] = P.IGNORE_INDEX
    targets = torch.full_like(labels, P.IGNORE_INDEX)
    targets[:, :-1] = labels[:, 1:]
    # A sequence must score at least one token (T >= 4 guarantees it; keep tiny cases valid too).
    empty = (targets != P.IGNORE_INDEX).sum(-1) == 0
    targets[empty, 0] = 0
    labels[empty, 1] = 0
    grad_logprobs = torch.randn(B, T, generator=g)
    # Layout every provider relies on (Case.n_real): annotated first half, synthetic second half.
    is_real = torch.arange(B) < B // 2
    case = P.Case(
        hidden=hidden.to(device=device, dtype=dtype).requires_grad_(),
        weight=weight.to(device=device, dtype=dtype).requires_grad_(),
        labels=labels.to(device),
        targets=targets.to(device),
        grad_logprobs=grad_logprobs.to(device),
        ref_logps=torch.zeros(B, device=device),  # set from the fp64 forward below
        is_real=is_real.to(device),
        alpha=ALPHA,
        beta=BETA,
        spin_beta=SPIN_BETA,
    )
    return case


def iris_fp64(s: torch.Tensor, s_ref: torch.Tensor, is_real: torch.Tensor, alpha: float, beta: float):
    """L = kappa_{1-alpha}(-g over R) + kappa_alpha(g over S), g = beta (s - s_ref) (docs/math.md#objective).

    Written from the formula, independently of iris_kernels.losses, as the oracle of the IRIS rows.
    kappa_t(l) = (logsumexp(t l) - log n) / t, and the mean at t = 0.
    """

    def kappa(l: torch.Tensor, t: float) -> torch.Tensor:
        if t == 0.0:
            return l.mean()
        return (torch.logsumexp(t * l, 0) - math.log(l.numel())) / t

    g = beta * (s - s_ref)
    return kappa(-g[is_real], 1.0 - alpha) + kappa(g[~is_real], alpha)


def spin_fp64(s: torch.Tensor, is_real: torch.Tensor, beta: float) -> torch.Tensor:
    """SPIN / DPO sigmoid loss with reference log-probs 0 (how liger-dpo runs here): pairs (R_i, S_i)."""
    return torch.nn.functional.softplus(-beta * (s[is_real] - s[~is_real])).mean()


def fp64_reference(case: P.Case, objectives: Sequence[str], set_ref_logps: bool = True) -> Dict[str, dict]:
    """Values and gradients of each objective in fp64, chunked over tokens (never [N, V] at once).

    Forward: lse and the target logit per token. Backward of an objective with per-token upstream
    gradient c_k (c = dObjective/dlogp_k): d logp_k / dz_k = onehot(y_k) - softmax(z_k), so
        dh_k = c_k (onehot - p_k) W,   dW = sum_k c_k (onehot - p_k)^T h_k.
    One recompute of each chunk's logits serves every objective. Results live on the CPU.
    """
    B, T, N, H, V = case.B, case.T, case.N, case.H, case.V
    dev = case.hidden.device
    h = case.hidden.detach().reshape(N, H).double()
    W = case.weight.detach().double()
    t = case.targets.reshape(N)
    scored = t != P.IGNORE_INDEX
    safe = torch.where(scored, t, torch.zeros_like(t))
    # ~64 MiB of fp64 logits per chunk on CPU, ~1 GiB on a GPU.
    budget = (1 << 27 if dev.type == "cuda" else 1 << 23)
    chunk = max(1, budget // V)
    lse = torch.empty(N, dtype=torch.float64, device=dev)
    tgt = torch.empty(N, dtype=torch.float64, device=dev)
    for i in range(0, N, chunk):
        z = h[i : i + chunk] @ W.t()
        lse[i : i + chunk] = torch.logsumexp(z, -1)
        tgt[i : i + chunk] = z.gather(1, safe[i : i + chunk, None]).squeeze(1)
        del z
    logp = torch.where(scored, tgt - lse, torch.zeros_like(lse))
    s = logp.view(B, T).sum(-1)
    if set_ref_logps:
        # The opponent's log-probs: the policy's own, shifted by ~1 nat per sequence, so that
        # g = beta (s - s_ref) is O(1) and the IRIS weights are neither uniform nor one-hot.
        noise = torch.randn(B, generator=torch.Generator().manual_seed(B * 7919 + T)).double().to(dev)
        case.ref_logps.copy_((s + noise).float())
    s_ref = case.ref_logps.double()

    upstream, values = {}, {}
    for obj in objectives:
        if obj == P.OBJECTIVE_LOGPROBS:
            upstream[obj] = case.grad_logprobs.reshape(N).double()
            values[obj] = logp
            continue
        s_var = s.clone().requires_grad_()
        if obj == P.OBJECTIVE_IRIS:
            loss = iris_fp64(s_var, s_ref, case.is_real, case.alpha, case.beta)
        elif obj == P.OBJECTIVE_SPIN:
            loss = spin_fp64(s_var, case.is_real, case.spin_beta)
        else:
            raise ValueError(f"unknown objective {obj!r}")
        (c_seq,) = torch.autograd.grad(loss, s_var)
        # Every scored token of sequence b gets dL/ds_b (s_b is a plain sum of its token log-probs).
        upstream[obj] = c_seq[:, None].expand(B, T).reshape(N)
        values[obj] = loss.detach()
    for obj in upstream:
        upstream[obj] = torch.where(scored, upstream[obj], torch.zeros_like(upstream[obj]))

    grad_h = {o: torch.empty(N, H, dtype=torch.float64, device=dev) for o in objectives}
    grad_w = {o: torch.zeros(V, H, dtype=torch.float64, device=dev) for o in objectives}
    rows = torch.arange(N, device=dev)
    for i in range(0, N, chunk):
        hc = h[i : i + chunk]
        onehot_minus_p = -torch.exp(hc @ W.t() - lse[i : i + chunk, None])
        r = rows[i : i + chunk] - i
        onehot_minus_p[r, safe[i : i + chunk]] += 1.0
        for o in objectives:
            gz = onehot_minus_p * upstream[o][i : i + chunk, None]
            grad_h[o][i : i + chunk] = gz @ W
            grad_w[o].addmm_(gz.t(), hc)
            del gz
        del onehot_minus_p
    return {
        o: {
            "value": values[o].cpu(),
            "grad_hidden": grad_h[o].view(B, T, H).cpu(),
            "grad_weight": grad_w[o].cpu(),
        }
        for o in objectives
    }


# ------------------------------------------------------------------------------------------------
# Memory meters
# ------------------------------------------------------------------------------------------------


class CpuMemoryMeter:
    """Peak resident memory of one call, above the resident memory just before it.

    Linux: VmHWM after resetting it through /proc/self/clear_refs ("5"), with glibc told to
    return freed blocks to the OS during the measured call (mmap threshold and trim threshold
    64 KiB), so that memory a previous call freed but kept cannot hide this call's peak.
    Elsewhere: ru_maxrss (a process-lifetime high-water mark) above the baseline: an upper bound
    that is meaningful because each provider runs in its own process.
    """

    M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3

    def __init__(self):
        self.method = "ru_maxrss - baseline"
        self._libc = None
        try:
            self._libc = ctypes.CDLL("libc.so.6")
        except OSError:
            pass
        if self._status("VmHWM") is not None and os.access("/proc/self/clear_refs", os.W_OK):
            self.method = "VmHWM - VmRSS (clear_refs), own process"

    @staticmethod
    def _status(key: str) -> Optional[int]:
        try:
            text = Path("/proc/self/status").read_text()
        except OSError:
            return None
        m = re.search(rf"^{key}:\s+(\d+) kB", text, re.M)
        return int(m.group(1)) * 1024 if m else None

    def _mallopt(self, trim: int, mmap: int) -> None:
        if self._libc is not None:
            self._libc.mallopt(self.M_TRIM_THRESHOLD, trim)
            self._libc.mallopt(self.M_MMAP_THRESHOLD, mmap)

    def measure(self, fn) -> float:
        gc.collect()
        self._mallopt(1 << 16, 1 << 16)
        if self._libc is not None:
            # Hand back what earlier calls freed but glibc kept, so it cannot absorb this call's peak.
            self._libc.malloc_trim(0)
        try:
            if self.method.startswith("VmHWM"):
                Path("/proc/self/clear_refs").write_text("5")
                base = self._status("VmRSS")
                fn()
                peak = self._status("VmHWM")
            else:
                import resource

                base = int(__import__("psutil").Process().memory_info().rss)
                fn()
                peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
        finally:
            # Back to what glibc's dynamic thresholds settle at after large frees, so that the
            # timed calls do not pay a page fault for every mid-sized buffer.
            self._mallopt(64 << 20, 32 << 20)
        return max(0, peak - base) / 2**20


def cuda_measure(fn, device) -> float:
    torch.cuda.synchronize(device)
    gc.collect()
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats(device)
    base = torch.cuda.memory_allocated(device)
    fn()
    torch.cuda.synchronize(device)
    return (torch.cuda.max_memory_allocated(device) - base) / 2**20


# ------------------------------------------------------------------------------------------------
# Running one provider on one case (in this process, or as the child of a subprocess)
# ------------------------------------------------------------------------------------------------


def measure_provider(name: str, case: P.Case, workload: str, warmup: int, repeats: int) -> dict:
    """Warm-up, one memory-measured call, then the timed repeats. Returns times in ms, the peak
    memory, and the outputs of the last call (for the error column)."""
    prov = P.get(name)
    device = case.hidden.device
    cuda = device.type == "cuda"
    prov.setup(case)
    last = {}

    def call():
        case.hidden.grad = None
        case.weight.grad = None
        if cuda:
            start, mid, end = (torch.cuda.Event(enable_timing=True) for _ in range(3))
            start.record()
            out = prov.forward(case, workload)
            mid.record()
            prov.backward(out, case, workload)
            end.record()
            end.synchronize()
            fwd, bwd = start.elapsed_time(mid), mid.elapsed_time(end)
        else:
            t0 = time.perf_counter()
            out = prov.forward(case, workload)
            t1 = time.perf_counter()
            prov.backward(out, case, workload)
            t2 = time.perf_counter()
            fwd, bwd = (t1 - t0) * 1e3, (t2 - t1) * 1e3
        last["out"] = out
        return fwd, bwd

    for _ in range(warmup):
        call()
    # Drop the warm-up's output and gradients before the baseline is read: freed inside the
    # measured call they would offset its own allocations.
    last.clear()
    case.hidden.grad = None
    case.weight.grad = None
    if cuda:
        peak_mb, mem_method = cuda_measure(call, device), "cuda max_memory_allocated - allocated before"
    else:
        meter = CpuMemoryMeter()
        peak_mb, mem_method = meter.measure(call), meter.method
    fwd, bwd = [], []
    for _ in range(repeats):
        last.clear()
        f, b = call()
        fwd.append(f)
        bwd.append(b)
    out = last["out"]
    value = None if prov.family == "floor" else out.detach().cpu().double()

    # The gradients are outputs every provider must produce; what a provider needs beyond them is
    # its working memory (issue 2's "peak extra memory").
    grad_mb = sum(x.grad.numel() * x.grad.element_size() for x in (case.hidden, case.weight) if x.grad is not None) / 2**20

    def grad(x):
        # To the host first: a float64 copy of a 150k-vocabulary weight gradient is 2.5 GB.
        return None if x.grad is None else x.grad.detach().cpu().double()

    return {
        "fwd": fwd,
        "bwd": bwd,
        "peak_mem_mb": peak_mb,
        "grad_mem_mb": grad_mb,
        "mem_method": mem_method,
        "value": value,
        "grad_hidden": None if prov.family == "floor" else grad(case.hidden),
        "grad_weight": None if prov.family == "floor" else grad(case.weight),
        "threads": torch.get_num_threads(),
        "warmup": warmup,
    }


def save_case(case: P.Case, path: Path) -> None:
    torch.save(
        {
            "hidden": case.hidden.detach(),
            "weight": case.weight.detach(),
            "labels": case.labels,
            "targets": case.targets,
            "grad_logprobs": case.grad_logprobs,
            "ref_logps": case.ref_logps,
            "is_real": case.is_real,
            "alpha": case.alpha,
            "beta": case.beta,
            "spin_beta": case.spin_beta,
        },
        path,
    )


def load_case(path: Path) -> P.Case:
    d = torch.load(path, weights_only=True)
    d["hidden"].requires_grad_()
    d["weight"].requires_grad_()
    return P.Case(**d)


def measure_workloads(name: str, case: P.Case, workloads: Sequence[str], warmup: int, repeats: int) -> Dict[str, dict]:
    """Both workloads of one provider in one process, so that a torch.compile is paid once. A
    workload that raises gives {"error": reason} and does not stop the other."""
    out = {}
    cuda = case.hidden.device.type == "cuda"
    for i, wl in enumerate(workloads):
        # On CPU the first workload's warm-up (and torch.compile's compile, whose graph the
        # composed self-play reuses) serves the process; on CUDA each workload keeps its own,
        # because a Triton autotune on first use allocates scratch that would count as peak.
        n_warm = max(warmup, P.get(name).min_warmup) if (i == 0 or cuda) else 0
        try:
            out[wl] = measure_provider(name, case, wl, n_warm, repeats)
        except Exception as e:  # noqa: BLE001 - reported in the row, not fatal
            out[wl] = {"error": failure_reason(e)}
        finally:
            case.hidden.grad = None
            case.weight.grad = None
            gc.collect()
            if case.hidden.device.type == "cuda":
                torch.cuda.empty_cache()
    return out


def child_main(args) -> int:
    """Entry point of a provider's own process (--_child): read the case, measure, write results."""
    case = load_case(Path(args._child))
    res = measure_workloads(args._provider, case, args._workload.split(","), args.warmup, args.repeats)
    torch.save(res, args._result)
    return 0


def run_in_subprocess(name, case_file: Path, workloads: Sequence[str], shape: Shape, warmup, repeats, workdir: Path):
    result_file = workdir / f"result-{name}.pt"
    env = dict(os.environ)
    # The interpreter must be chosen before triton is imported, so it is a property of the process.
    if shape.interpreter:
        env["TRITON_INTERPRET"] = "1"
    else:
        env.pop("TRITON_INTERPRET", None)
    cmd = [
        sys.executable, str(Path(__file__).resolve()), "--device", "cpu",
        "--_child", str(case_file), "--_provider", name, "--_workload", ",".join(workloads),
        "--_result", str(result_file), "--warmup", str(warmup), "--repeats", str(repeats),
    ]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if proc.returncode != 0 or not result_file.exists():
        tail = (proc.stderr or proc.stdout or "").strip().splitlines()
        why = tail[-1] if tail else ""
        if proc.returncode in (-9, 137):
            why = "killed (out of memory?)"
        return {wl: {"error": f"provider process failed (rc={proc.returncode}): {why}"} for wl in workloads}
    res = torch.load(result_file, weights_only=False)
    result_file.unlink()
    return res


# ------------------------------------------------------------------------------------------------
# Records
# ------------------------------------------------------------------------------------------------


def _quantiles(xs: List[float]) -> Tuple[float, float, float]:
    if len(xs) == 1:
        return xs[0], xs[0], xs[0]
    qs = statistics.quantiles(xs, n=10, method="inclusive")
    return statistics.median(xs), qs[1], qs[7]


def _max_err(a: Optional[torch.Tensor], b: torch.Tensor) -> float:
    if a is None:
        return math.inf  # no gradient where one is due: as wrong as it gets
    if a.shape != b.shape:
        a = a.reshape(b.shape)
    # torch.max propagates NaN, so a NaN output shows as NaN error, never as 0.
    return float((a - b).abs().max()) if b.numel() else 0.0


def git_commit() -> str:
    try:
        sha = subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO, capture_output=True, text=True, check=True)
        dirty = subprocess.run(["git", "status", "--porcelain"], cwd=REPO, capture_output=True, text=True)
        return sha.stdout.strip() + ("-dirty" if dirty.stdout.strip() else "")
    except (OSError, subprocess.CalledProcessError):
        # A copy of the tree without .git (e.g. on the GPU machine): the caller may pass it in.
        return os.environ.get("GIT_COMMIT", "unknown")


def versions() -> Dict[str, str]:
    out = {"python": platform.python_version()}
    for dist in ("torch", "triton", "numpy", "liger-kernel", "cut-cross-entropy"):
        try:
            out[dist] = importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            out[dist] = "not installed"
    # From the module, not the distribution: the GPU check imports it from the checkout.
    out["iris-kernels"] = P.iris_kernels.__version__
    return out


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    model = platform.processor() or platform.machine()
    try:
        m = re.search(r"^model name\s*:\s*(.+)$", Path("/proc/cpuinfo").read_text(), re.M)
        model = m.group(1).strip() if m else model
    except OSError:
        pass
    return f"{model} ({os.cpu_count()} cores)"


def base_record(name, workload, shape: Shape, dtype_name, device, stamp) -> dict:
    prov = P.get(name)
    B, T = batch_layout(shape.N)
    rec = {k: None for k in RECORD_FIELDS}
    rec.update(
        provider=name,
        family=prov.family,
        workload=workload,
        objective=prov.objective.get(workload) if prov.family != "floor" else "gemm",
        N=B * T,
        H=shape.H,
        V=shape.V,
        B=B,
        T=T,
        shape=shape.name or "custom",
        dtype=dtype_name,
        device=device.type,
        timing_valid=False,
        note="",
        skip_reason="",
        load_avg=round(os.getloadavg()[0], 2) if hasattr(os, "getloadavg") else None,
        **stamp,
    )
    return rec


def fill_measurement(rec: dict, res: dict, ref: Optional[dict], shape: Shape, repeats: int) -> None:
    total = [f + b for f, b in zip(res["fwd"], res["bwd"])]
    for key, xs in (("fwd", res["fwd"]), ("bwd", res["bwd"]), ("total", total)):
        med, p20, p80 = _quantiles(xs)
        rec[f"{key}_ms"], rec[f"{key}_p20"], rec[f"{key}_p80"] = med, p20, p80
    rec["peak_mem_mb"] = res["peak_mem_mb"]
    if P.get(rec["provider"]).family != "floor":
        rec["grad_mem_mb"] = res["grad_mem_mb"]
        rec["extra_mem_mb"] = max(0.0, res["peak_mem_mb"] - res["grad_mem_mb"])
    rec["mem_method"] = res["mem_method"]
    rec["threads"] = res.get("threads")
    rec["repeats"], rec["warmup"] = repeats, res["warmup"]
    notes = []
    if ref is not None:
        rec["err_value"] = _max_err(res["value"], ref["value"])
        rec["err_grad_hidden"] = _max_err(res["grad_hidden"], ref["grad_hidden"])
        rec["err_grad_weight"] = _max_err(res["grad_weight"], ref["grad_weight"])
        errs = [rec["err_value"], rec["err_grad_hidden"], rec["err_grad_weight"]]
        rec["max_abs_err"] = math.nan if any(math.isnan(e) for e in errs) else max(errs)
    if shape.interpreter:
        rec["status"] = "interpreter"
        notes.append("interpreter, not a timing")
    else:
        rec["status"] = "ok"
        rec["timing_valid"] = True
    prov = P.get(rec["provider"])
    if prov.grads_in_forward:
        notes.append("computes gradients inside forward: read total, not fwd/bwd")
    if rec["provider"] == "liger-dpo":
        notes.append("SPIN/DPO loss (ref log-probs 0: no reference pass), checked against fp64 SPIN")
    if prov.family == "floor":
        notes.append("four torch.mm of [NxH].[HxV] (docs/math.md#floor), not a loss")
    if rec["objective"] == P.OBJECTIVE_IRIS and prov.family == "peer":
        notes.append("IRIS composed on its per-token output")
    if rec["objective"] == P.OBJECTIVE_IRIS and prov.family == "library":
        notes.append("IRIS fused (sequence_logprobs + iris_loss)")
    if rec["provider"] == "torch-linear_cross_entropy":
        notes.append("options=LinearCrossEntropyOptions() (auto chunking)")
    rec["note"] = "; ".join(notes)


def add_ratios(records: List[dict]) -> None:
    """ratio_to_best: total time over the fastest comparable peer's; mem_ratio_to_best likewise for
    peak memory; x_floor: total time over the floor's, all within one (shape, dtype, workload)."""
    groups: Dict[tuple, List[dict]] = {}
    for r in records:
        groups.setdefault((r["N"], r["H"], r["V"], r["dtype"], r["device"], r["workload"]), []).append(r)
    for rows in groups.values():
        timed = [r for r in rows if r["timing_valid"]]
        peers = [r for r in timed if r["family"] == "peer" and P.get(r["provider"]).comparable]
        floor = next((r for r in timed if r["family"] == "floor"), None)
        best = min(peers, key=lambda r: r["total_ms"]) if peers else None
        mem_peers = [r["peak_mem_mb"] for r in peers if r["peak_mem_mb"]]
        for r in timed:
            if best is not None:
                r["ratio_to_best"] = r["total_ms"] / best["total_ms"]
                r["best_peer"] = best["provider"]
            if mem_peers and r["family"] != "floor":
                r["mem_ratio_to_best"] = r["peak_mem_mb"] / min(mem_peers)
            if floor is not None and r is not floor:
                r["x_floor"] = r["total_ms"] / floor["total_ms"]


# ------------------------------------------------------------------------------------------------
# Output: table, JSON, CSV, plots
# ------------------------------------------------------------------------------------------------


def _fmt(x, spec=".1f", none="-"):
    if x is None:
        return none
    if isinstance(x, float) and math.isnan(x):
        return "nan"
    if isinstance(x, float) and math.isinf(x):
        return "inf"
    return format(x, spec)


def format_table(records: List[dict]) -> str:
    lines = []
    groups: Dict[tuple, List[dict]] = {}
    for r in records:
        groups.setdefault((r["workload"], r["N"], r["H"], r["V"], r["dtype"], r["device"]), []).append(r)
    head = (
        f"{'provider':28s} {'fwd ms':>9s} {'bwd ms':>9s} {'total ms':>9s} {'p20-p80':>17s} "
        f"{'peak MB':>9s} {'max err':>9s} {'x best':>7s} {'x mem':>7s} {'x floor':>7s}  note"
    )
    for (wl, N, H, V, dt, dev), rows in groups.items():
        r0 = rows[0]
        lines.append("")
        loads = [r["load_avg"] for r in rows if r["load_avg"] is not None]
        load = "" if not loads else f", load avg {min(loads):.1f}-{max(loads):.1f}"
        lines.append(
            f"== {wl}: N={N} (B={r0['B']} x T={r0['T']}) H={H} V={V} {dt} on {dev} ({r0['device_name']}{load}) =="
        )
        lines.append(head)
        skipped = []
        for r in rows:
            if r["status"] in ("skipped", "failed"):
                skipped.append(r)
                continue
            spread = f"{_fmt(r['total_p20'])}-{_fmt(r['total_p80'])}"
            lines.append(
                f"{r['provider']:28s} {_fmt(r['fwd_ms']):>9s} {_fmt(r['bwd_ms']):>9s} "
                f"{_fmt(r['total_ms']):>9s} {spread:>17s} {_fmt(r['peak_mem_mb']):>9s} "
                f"{_fmt(r['max_abs_err'], '.1e'):>9s} {_fmt(r['ratio_to_best'], '.2f'):>7s} "
                f"{_fmt(r['mem_ratio_to_best'], '.2f'):>7s} {_fmt(r['x_floor'], '.2f'):>7s}  {r['note']}"
            )
        for r in skipped:
            lines.append(f"  {r['status']}: {r['provider']}: {r['skip_reason']}")
    return "\n".join(lines)


def write_outputs(records: List[dict], out_dir: Path, tag: str, plots: bool = True) -> List[Path]:
    out_dir.mkdir(parents=True, exist_ok=True)
    records = [dict(r) for r in records]
    add_ratios(records)
    json_path = out_dir / f"bench_loss_{tag}.json"
    csv_path = out_dir / f"bench_loss_{tag}.csv"

    def clean(v):
        # JSON has no NaN/inf: write them as strings so that they stay visible and the file valid.
        if isinstance(v, float) and (math.isnan(v) or math.isinf(v)):
            return str(v)
        return v

    json_path.write_text(json.dumps([{k: clean(v) for k, v in r.items()} for r in records], indent=1))
    with csv_path.open("w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=RECORD_FIELDS)
        w.writeheader()
        for r in records:
            row = dict(r)
            row["versions"] = ";".join(f"{k}={v}" for k, v in r["versions"].items())
            w.writerow(row)
    return [json_path, csv_path] + (plot(records, out_dir, tag) if plots else [])


# 20 distinct colours: tab10, then the lighter halves of tab20.
_PALETTE = [
    "#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2", "#7f7f7f", "#bcbd22",
    "#17becf", "#aec7e8", "#ffbb78", "#98df8a", "#ff9896", "#c5b0d5", "#c49c94", "#f7b6d2", "#c7c7c7",
    "#dbdb8d", "#9edae5",
]


def provider_colour(name: str) -> str:
    """One colour per provider, the same in every figure of every run: taken from the provider's
    position in the registry (not from the order a figure happens to draw its lines in); the
    floor is always black."""
    if name == "floor":
        return "#000000"
    names = [n for n in P.PROVIDERS if n != "floor"]
    i = names.index(name) if name in names else sum(map(ord, name))
    return _PALETTE[i % len(_PALETTE)]


def plot(records: List[dict], out_dir: Path, tag: str) -> List[Path]:
    try:
        import matplotlib
    except ImportError:
        print("plots skipped: matplotlib is not installed", file=sys.stderr)
        return []

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    paths = []
    groups: Dict[tuple, List[dict]] = {}
    for r in records:
        if r["timing_valid"]:
            groups.setdefault((r["workload"], r["H"], r["V"], r["dtype"]), []).append(r)
    for (wl, H, V, dt), rows in groups.items():
        fig, (ax_t, ax_m) = plt.subplots(1, 2, figsize=(11, 4.2))
        for name in dict.fromkeys(r["provider"] for r in rows):
            pts = sorted((r["N"], r["total_ms"], r["total_p20"], r["total_p80"], r["peak_mem_mb"]) for r in rows if r["provider"] == name)
            ns = [p[0] for p in pts]
            style = "--" if name == "floor" else "-"
            lw = 2.5 if P.get(name).family == "library" else 1.3
            colour = provider_colour(name)
            ax_t.errorbar(
                ns, [p[1] for p in pts], yerr=[[p[1] - p[2] for p in pts], [p[3] - p[1] for p in pts]],
                marker="o", ls=style, lw=lw, capsize=3, label=name, color=colour,
            )
            mem = [(n, p[4]) for n, p in zip(ns, pts) if p[4] and p[4] > 0]  # log axis: drop 0 MB
            if name != "floor" and mem:
                ax_m.plot([m[0] for m in mem], [m[1] for m in mem], marker="o", ls=style, lw=lw, label=name,
                          color=colour)
        ax_t.set_title("time (lower is better)", fontsize=9)
        ax_m.set_title("peak memory (lower is better)", fontsize=9)
        for ax, ylabel in ((ax_t, "fwd+bwd time, ms (median, p20-p80)"), (ax_m, "peak memory above inputs, MB")):
            ax.set_xscale("log", base=2)
            ax.set_yscale("log")
            ax.set_xlabel("tokens N")
            ax.set_ylabel(ylabel)
            ax.grid(True, which="both", alpha=0.3)
        ax_t.legend(fontsize=8)
        ax_m.legend(fontsize=8)
        loads = [r["load_avg"] for r in rows if r["load_avg"] is not None]
        load = f", load avg {min(loads):.1f}-{max(loads):.1f}" if loads else ""
        fig.suptitle(f"{wl}: H={H} V={V} {dt} on {rows[0]['device_name']}{load}", fontsize=10)
        fig.tight_layout()
        path = out_dir / f"bench_loss_{tag}_{wl}_H{H}_V{V}_{dt}.png"
        fig.savefig(path, dpi=110)
        plt.close(fig)
        paths.append(path)
    return paths


# ------------------------------------------------------------------------------------------------
# Main
# ------------------------------------------------------------------------------------------------


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
    ap.add_argument("--repeats", type=int, help="timed calls per row (default 3 on CPU, 20 on CUDA; --quick 2)")
    ap.add_argument("--warmup", type=int, help="untimed calls before the memory call (default 1 on CPU, 3 on CUDA; torch.compile rows always get >= 1)")
    ap.add_argument("--interpreter-shape", help=f"N,H,V of the Triton-interpreter rows on CPU (default {INTERPRETER_SHAPE})")
    ap.add_argument("--no-interpreter", action="store_true", help="no Triton-interpreter rows on CPU")
    ap.add_argument("--isolate", default="auto", choices=["auto", "process", "none"],
                    help="each provider in its own process (auto: on CPU, where RSS is per process)")
    ap.add_argument("--seed", type=int, default=0)
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
    if not args.shapes:
        args.shapes = (CPU_QUICK_SHAPES if args.quick else CPU_DEFAULT_SHAPES) if cpu else CUDA_DEFAULT_SHAPES
    if args.repeats is None:
        args.repeats = 2 if args.quick else (3 if cpu else 20)
    if args.warmup is None:
        # CPU: one call absorbs lazy initialisation (oneDNN primitives, thread pools, compile),
        # which would otherwise count as the first call's memory; CUDA: also cuBLAS handles,
        # Triton JIT and autotuning.
        args.warmup = 1 if cpu else 3
    if args.repeats < 1 or args.warmup < 0:
        raise SystemExit("--repeats must be >= 1 and --warmup >= 0")
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


def failure_reason(e: BaseException) -> str:
    text = str(e).strip()
    if "out of memory" in text.lower():
        return "out of memory"
    last = text.splitlines()[-1] if text else ""
    return f"{type(e).__name__}: {last}"[:300]


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
    with tempfile.TemporaryDirectory(prefix="bench_loss_") as tmp:
        workdir = Path(tmp)
        for shape in shapes:
            shape_jobs = [(wl, n) for s_, wl, n in jobs if s_ == shape]
            if args.time_budget is not None and time.monotonic() - t_start > args.time_budget:
                for wl, name in shape_jobs:
                    rec = base_record(name, wl, shape, args.dtype, device, stamp)
                    rec["status"] = "skipped"
                    rec["skip_reason"] = f"time budget exhausted (--time-budget {args.time_budget:g} s)"
                    records.append(rec)
                    bar.update(1)
                continue
            case = make_case(shape, dtype, device, args.seed)
            objectives = sorted(
                {P.get(n).objective.get(wl) for wl, n in shape_jobs if P.get(n).family != "floor"} - {None}
            )
            bar.set_postfix_str(f"fp64 reference {shape.label}")
            refs = fp64_reference(case, objectives)
            case_file = workdir / "case.pt"
            if args.isolate == "process":
                save_case(case, case_file)
            for name in dict.fromkeys(n for _, n in shape_jobs):
                wls = [wl for wl, n in shape_jobs if n == name]
                recs = {wl: base_record(name, wl, shape, args.dtype, device, stamp) for wl in wls}
                runnable = []
                for wl in wls:
                    reason = P.get(name).skip_reason(device, dtype, wl, shape.interpreter)
                    if not reason and shape.interpreter and args.isolate == "none" and os.environ.get("TRITON_INTERPRET") != "1":
                        reason = "in-process run without TRITON_INTERPRET=1 (it must be set before triton is imported)"
                    if not reason and args.time_budget is not None and time.monotonic() - t_start > args.time_budget:
                        reason = f"time budget exhausted (--time-budget {args.time_budget:g} s)"
                    if reason:
                        recs[wl]["status"], recs[wl]["skip_reason"] = "skipped", reason
                    else:
                        runnable.append(wl)
                if runnable:
                    bar.set_postfix_str(f"{name} {'+'.join(runnable)} {shape.label}")
                    if args.isolate == "process":
                        results = run_in_subprocess(name, case_file, runnable, shape, args.warmup, args.repeats, workdir)
                    else:
                        results = measure_workloads(name, case, runnable, args.warmup, args.repeats)
                    for wl, res in results.items():
                        if "error" in res:
                            recs[wl]["status"], recs[wl]["skip_reason"] = "failed", res["error"]
                        else:
                            fill_measurement(recs[wl], res, refs.get(recs[wl]["objective"]), shape, args.repeats)
                    del results
                records.extend(recs.values())
                bar.update(len(wls))
                # Written after every provider, so that a run cut short still leaves its results.
                write_outputs(records, out_dir, tag, plots=False)
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


def load_average() -> Optional[Tuple[float, float, float]]:
    return tuple(round(x, 2) for x in os.getloadavg()) if hasattr(os, "getloadavg") else None


def run_header(stamp: dict, load_start, load_end, elapsed_s: float, cores: Optional[int]) -> str:
    """Machine, load and run time above the tables: time ratios move with the load, so a table is
    only readable next to it. A load average above the core count means other processes competed
    for the cores during the run (the benchmark itself accounts for about one per thread)."""

    def fmt(load):
        return "n/a" if load is None else " / ".join(f"{x:.2f}" for x in load)

    busy = ""
    if load_end is not None and cores and max(load_start[0], load_end[0]) > 1.25 * cores:
        busy = f"  (above the {cores} cores: other processes shared the machine; time ratios are noisy)"
    m, sec = divmod(int(round(elapsed_s)), 60)
    return (
        f"machine: {stamp['device_name']}; commit {stamp['git_commit']}; {stamp['date']}\n"
        f"load average (1/5/15 min): {fmt(load_start)} at start, {fmt(load_end)} at end{busy}\n"
        f"whole run: {m} min {sec:02d} s"
    )


if __name__ == "__main__":
    main()
