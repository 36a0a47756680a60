"""The runner: one provider on one case, timed, its peak memory and its error measured, optionally in its own process.

* ``measure_provider``: warm-up calls, one memory-measured call, then the timed repeats
  (``iris_kernels.measure.time_fwd_bwd``: CUDA events on a GPU), and the errors of the last call's
  output and gradients against the fp64 reference (on the case's device; gradients on the
  reference's sampled rows, see cases.fp64_reference), so that nothing of size V x H ever goes
  to the host.
* ``run_in_subprocess``: the same in a child process with a timeout, so that a crash, a sticky
  CUDA error or a hang costs one row, never the run; the child reads the case and its references
  from a file and writes back only times, memory and errors.

Shared by bench_loss.py (``make bench``), benchmarks/gpu_check.sh and, for timing and errors,
``python -m iris_kernels.selfcheck`` (iris_kernels.measure).
"""
from __future__ import annotations

import ctypes
import gc
import os
import re
import subprocess
import sys
from pathlib import Path
from typing import Dict, Optional, Sequence

import torch

import providers as P
from cases import load_case
from iris_kernels.measure import max_abs_err, time_fwd_bwd

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


def measure_provider(name: str, case: P.Case, workload: str, warmup: int, repeats: int,
                     ref: Optional[dict] = None) -> dict:
    """Warm-up, one memory-measured call, then the timed repeats. Returns times in ms, the peak
    memory, and the errors of the last call against ``ref`` (cases.fp64_reference's entry for the
    provider's objective; None: no error columns)."""
    prov = P.get(name)
    device = case.hidden.device
    cuda = device.type == "cuda"
    prov.setup(case)
    last = {}

    def call():
        case.hidden.grad = None
        case.weight.grad = None
        fwd, bwd, out = time_fwd_bwd(lambda: prov.forward(case, workload),
                                     lambda o: prov.backward(o, case, workload), device)
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
    out = last.pop("out")

    # The gradients are outputs every provider must produce; what a provider needs beyond them is
    # its working memory (issue 2's "peak extra memory").
    grad_mb = sum(x.grad.numel() * x.grad.element_size() for x in (case.hidden, case.weight) if x.grad is not None) / 2**20
    res = {
        "fwd": fwd,
        "bwd": bwd,
        "peak_mem_mb": peak_mb,
        "grad_mem_mb": grad_mb,
        "mem_method": mem_method,
        "threads": torch.get_num_threads(),
        "warmup": warmup,
    }
    if ref is not None and prov.family != "floor":
        res.update(errors(out, case, ref, frozen_head=prov.frozen_head))
    return res


def errors(out: torch.Tensor, case: P.Case, ref: dict, frozen_head: bool = False) -> Dict[str, Optional[float]]:
    """Largest absolute errors of the value and of both gradients (at the reference's rows), on the
    device. A frozen head has no weight gradient to check (None), and one produced anyway is inf."""
    gh = case.hidden.grad
    gw = case.weight.grad
    if frozen_head:
        err_w = None if gw is None else float("inf")
    else:
        err_w = max_abs_err(None if gw is None else gw[ref["vocab_rows"]], ref["grad_weight"])
    return {
        "err_value": max_abs_err(out, ref["value"]),
        "err_grad_hidden": max_abs_err(None if gh is None else gh.reshape(case.N, case.H)[ref["rows"]], ref["grad_hidden"]),
        "err_grad_weight": err_w,
    }


def measure_workloads(name: str, case: P.Case, workloads: Sequence[str], warmup: int, repeats: int,
                      refs: Optional[Dict[str, dict]] = None) -> Dict[str, dict]:
    """Both workloads of one provider in one process, so that a torch.compile is paid once. A
    workload that raises gives {"error": reason} and does not stop the other."""
    out = {}
    cuda = case.hidden.device.type == "cuda"
    prov = P.get(name)
    for i, wl in enumerate(workloads):
        # On CPU the first workload's warm-up (and torch.compile's compile, whose graph the
        # composed self-play reuses) serves the process; on CUDA each workload keeps its own,
        # because a Triton autotune on first use allocates scratch that would count as peak.
        n_warm = max(warmup, prov.min_warmup) if (i == 0 or cuda) else 0
        objective = prov.objective.get(wl)
        ref = None if refs is None or objective is None else refs.get(objective)
        try:
            out[wl] = measure_provider(name, case, wl, n_warm, repeats, ref)
        except Exception as e:  # noqa: BLE001 - reported in the row, not fatal
            out[wl] = {"error": failure_reason(e)}
        finally:
            case.hidden.grad = None
            case.weight.grad = None
            gc.collect()
            if cuda:
                torch.cuda.empty_cache()
    return out


def child_main(args) -> int:
    """Entry point of a provider's own process (bench_loss.py --_child): read the case, measure, write results."""
    case, refs = load_case(Path(args._child), torch.device(args.device))
    res = measure_workloads(args._provider, case, args._workload.split(","), args.warmup, args.repeats, refs)
    torch.save(res, args._result)
    return 0


def run_in_subprocess(name, case_file: Path, workloads: Sequence[str], interpreter: bool, warmup, repeats,
                      workdir: Path, device: str = "cpu", timeout: Optional[float] = None,
                      script: Optional[Path] = None):
    """measure_workloads in a child process of ``script`` (bench_loss.py), killed after ``timeout`` s."""
    result_file = workdir / f"result-{name}.pt"
    env = dict(os.environ)
    # The interpreter must be chosen before triton is imported, so it is a property of the process.
    if interpreter:
        env["TRITON_INTERPRET"] = "1"
    else:
        env.pop("TRITON_INTERPRET", None)
    script = script or Path(__file__).resolve().parent / "bench_loss.py"
    cmd = [
        sys.executable, str(script), "--device", device,
        "--_child", str(case_file), "--_provider", name, "--_workload", ",".join(workloads),
        "--_result", str(result_file), "--warmup", str(warmup), "--repeats", str(repeats),
    ]
    try:
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return {wl: {"error": f"timed out after {timeout:g} s (provider process killed)"} for wl in workloads}
    if proc.returncode != 0 or not result_file.exists():
        tail = (proc.stderr or proc.stdout or "").strip().splitlines()
        why = tail[-1] if tail else ""
        if proc.returncode in (-9, 137):
            why = "killed (out of memory?)"
        return {wl: {"error": f"provider process failed (rc={proc.returncode}): {why}"[:400]} for wl in workloads}
    res = torch.load(result_file, weights_only=False)
    result_file.unlink()
    return res


def failure_reason(e: BaseException) -> str:
    text = str(e).strip()
    if "out of memory" in text.lower():
        return "out of memory"
    last = text.splitlines()[-1] if text else ""
    return f"{type(e).__name__}: {last}"[:300]
