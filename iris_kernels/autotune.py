"""First-use autotuning of backend="triton" on CUDA: measure the variants on the user's device, keep the fastest.

Why. The fastest variant depends on the device (H100/H200 with warpgroup MMA, A100 without, consumer
cards with 99 KiB of shared memory) and on the Triton version (the same tile took 171, 230 and 181
registers under Triton 3.6, 3.7.1 and 3.9). ``tuning.AUTO`` holds one guess per device type; this
module replaces the guess by a measurement, once per key, the way Triton's autotuner and cuBLAS's
heuristics do.

What it times. The first time a key is seen -- (device name, compute capability, dtype, H, V, the
flag set {bias, soft-cap, entropy}, Triton version, iris-kernels version) -- each candidate of
``CANDIDATES`` (forward "fused" | "split" x backward "workspace" | "atomic") runs forward + backward
on the caller's own hidden states and weight (at most ``TUNE_ROWS`` rows of them, random targets),
timed with CUDA events: one warm-up call, then up to ``REPEATS`` timed calls while the budget
(``IRIS_KERNELS_AUTOTUNE_BUDGET`` seconds, default 4) lasts. A candidate counts only if it passed a
parity probe against ``backend="torch"`` on a 257-row slice (log-probs, dHidden, dWeight). The
fastest passing one is chosen; if none passes, the ``tuning.AUTO`` table's entry is used and the
log says why.

Where it caches. ``$IRIS_KERNELS_CACHE_DIR`` or ``$XDG_CACHE_HOME/iris_kernels`` (default
``~/.cache/iris_kernels``), file ``autotune-v{CACHE_VERSION}.json``: ``{"version": ..., "entries":
{key: {"fwd", "bwd", "times_ms", "probe", "date"}}}``, written atomically (a temporary file in the
same folder, then ``os.replace``), merged with what other processes wrote meanwhile. A file of
another version is ignored (and replaced at the next write). Each key is logged once per process
(logger ``iris_kernels.autotune``, INFO).

Every rank the same. Under ``torch.distributed`` (initialised, world size > 1) rank 0 decides --
from its cache or by tuning -- and broadcasts the choice; the other ranks neither tune nor read
their own cache, so ranks with different caches (different nodes) still agree. This is a
collective at the first call per key and process; every rank makes that call at the same step,
because the key depends only on shapes and flags that data-parallel ranks share.

Turning it off. ``IRIS_KERNELS_AUTOTUNE=0``: no tuning, ``tuning.AUTO`` decides.
``IRIS_KERNELS_VARIANT=fwd=split,bwd=atomic`` (either part may be left out) forces a variant
everywhere (no tuning, no cache); explicit ``fwd=`` / ``bwd=`` arguments still win over both.
"""
from __future__ import annotations

import datetime as _dt
import functools
import json
import logging
import os
import tempfile
import time
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import torch

from ._version import __version__
from .tuning import AUTO, BACKWARDS, FORWARDS

__all__ = ["tuned_choice", "cache_path", "tuning_key", "forced_variant", "tune", "CANDIDATES", "clear_memory_cache"]

log = logging.getLogger("iris_kernels.autotune")

CACHE_VERSION = 1
ENV_OFF = "IRIS_KERNELS_AUTOTUNE"
ENV_FORCE = "IRIS_KERNELS_VARIANT"
ENV_CACHE_DIR = "IRIS_KERNELS_CACHE_DIR"
ENV_BUDGET = "IRIS_KERNELS_AUTOTUNE_BUDGET"
DEFAULT_BUDGET_S = 4.0
REPEATS = 5
# Rows timed: the caller's own, up to this many (the work per row is what varies between
# variants; 8192 rows are >= 1 ms of work on any head of interest, well above launch overhead).
TUNE_ROWS = 8192
PROBE_ROWS = 257  # odd: no tile divides it
# The forward x backward grid. Issue 16's tile and vocabulary-chunked workspace candidates add
# keys here once merged; a candidate is a dict of linear_logprobs keywords.
CANDIDATES: List[Dict[str, str]] = [{"fwd": f, "bwd": b} for f in FORWARDS for b in BACKWARDS]

_MEMORY: Dict[str, Dict] = {}
_LOGGED = set()

Timer = Callable[[Dict[str, str], Callable[[], None]], float]


# ------------------------------------------------------------------------------------ settings


def forced_variant() -> Optional[Dict[str, str]]:
    """The variant ``IRIS_KERNELS_VARIANT`` forces ({"fwd", "bwd"} subset), or None.

    Format: ``fwd=split,bwd=atomic`` (comma-separated, either part optional). A bad value is a
    ValueError naming the variable, raised at the first call that would use it.
    """
    text = os.environ.get(ENV_FORCE, "").strip()
    if not text:
        return None
    out: Dict[str, str] = {}
    allowed = {"fwd": FORWARDS, "bwd": BACKWARDS}
    for part in text.split(","):
        name, _, value = part.strip().partition("=")
        name, value = name.strip(), value.strip()
        if name not in allowed or value not in allowed[name]:
            raise ValueError(
                f"{ENV_FORCE}={text!r}: expected comma-separated fwd=<{'|'.join(FORWARDS)}> and/or "
                f"bwd=<{'|'.join(BACKWARDS)}>, got {part.strip()!r}"
            )
        out[name] = value
    return out


def tuning_enabled() -> bool:
    return os.environ.get(ENV_OFF, "1").strip().lower() not in ("0", "false", "off", "no")


def budget_seconds() -> float:
    text = os.environ.get(ENV_BUDGET)
    if not text:
        return DEFAULT_BUDGET_S
    try:
        value = float(text)
    except ValueError:
        raise ValueError(f"{ENV_BUDGET} must be a number of seconds, got {text!r}") from None
    if not value > 0:
        raise ValueError(f"{ENV_BUDGET} must be > 0 seconds, got {text!r}")
    return value


def cache_path() -> Path:
    """The cache file: $IRIS_KERNELS_CACHE_DIR, else $XDG_CACHE_HOME/iris_kernels, else ~/.cache/iris_kernels."""
    folder = os.environ.get(ENV_CACHE_DIR)
    if folder:
        base = Path(folder)
    else:
        xdg = os.environ.get("XDG_CACHE_HOME")
        base = (Path(xdg) if xdg else Path.home() / ".cache") / "iris_kernels"
    return base / f"autotune-v{CACHE_VERSION}.json"


def cuda_device_info(device: torch.device) -> Tuple[str, Tuple[int, int]]:
    return _cuda_device_info(device.index if device.index is not None else torch.cuda.current_device())


@functools.lru_cache(maxsize=None)
def _cuda_device_info(index: int) -> Tuple[str, Tuple[int, int]]:
    # Once per device: the key is built at every call of linear_logprobs on CUDA.
    return torch.cuda.get_device_name(index), tuple(torch.cuda.get_device_capability(index))


@functools.lru_cache(maxsize=None)
def _triton_version() -> str:
    try:
        import triton

        return triton.__version__
    except ImportError:  # pragma: no cover - triton is a dependency on Linux
        return "none"


def tuning_key(device_name: str, capability: Sequence[int], dtype: torch.dtype, H: int, V: int, *,
               bias: bool, softcap: bool, entropy: bool, triton_version: Optional[str] = None,
               library_version: str = __version__) -> str:
    """One string per (device, capability, dtype, H, V, flags, Triton, iris-kernels) -- the JSON key."""
    flags = "+".join(f for f, on in (("bias", bias), ("softcap", softcap), ("entropy", entropy)) if on) or "plain"
    tv = _triton_version() if triton_version is None else triton_version
    cap = "sm_" + "".join(str(int(c)) for c in capability)
    return f"{device_name}|{cap}|{str(dtype).replace('torch.', '')}|H{H}|V{V}|{flags}|triton-{tv}|iris-{library_version}"


# ------------------------------------------------------------------------------------ the cache


def _read_cache(path: Path) -> Dict[str, Dict]:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    if not isinstance(data, dict) or data.get("version") != CACHE_VERSION or not isinstance(data.get("entries"), dict):
        return {}
    return data["entries"]


def _write_cache(path: Path, key: str, entry: Dict) -> None:
    """Merge ``entry`` under ``key`` into the file, atomically (temporary file + os.replace)."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        entries = _read_cache(path)  # what other processes wrote since we last looked
        entries[key] = entry
        fd, tmp = tempfile.mkstemp(prefix=".autotune-", suffix=".json", dir=path.parent)
        try:
            with os.fdopen(fd, "w") as f:
                json.dump({"version": CACHE_VERSION, "entries": entries}, f, indent=1, sort_keys=True)
            os.replace(tmp, path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
    except OSError as err:  # a read-only home must not stop training: the choice stays in memory
        log.warning("iris_kernels autotune: could not write the cache %s (%s); the choice is kept in memory only",
                    path, err)


def clear_memory_cache() -> None:
    """Forget this process's choices and log marks (tests; a new cache folder)."""
    _MEMORY.clear()
    _LOGGED.clear()


# ------------------------------------------------------------------------------------ measuring


def cuda_event_timer(candidate: Dict[str, str], fn: Callable[[], None]) -> float:
    """Milliseconds of one call of ``fn`` by CUDA events (the default timer)."""
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    fn()
    end.record()
    end.synchronize()
    return start.elapsed_time(end)


def tune(candidates: Sequence[Dict[str, str]], *, run: Callable[[Dict[str, str]], Callable[[], None]],
         probe: Callable[[Dict[str, str]], Tuple[bool, str]], timer: Timer, budget_s: float,
         clock: Callable[[], float] = time.monotonic) -> Dict:
    """Probe every candidate, then time the passing ones round-robin within ``budget_s``.

    ``run(c)`` returns a callable doing one forward + backward of candidate c; ``probe(c)`` says
    whether c matches the torch backend (and how far off it is); ``timer(c, fn)`` returns the
    milliseconds of one call. Round-robin (one call of each per round, median over rounds) so that
    a budget cut still leaves every candidate with the same number of samples, and clock drift
    or a noisy neighbour affects all alike. Returns {"choice": c | None, "times_ms": {...},
    "probe": {...}}; ``clock`` is injectable so that tests need no wall clock.
    """
    deadline = clock() + budget_s
    probe_report, fns = {}, {}
    for c in candidates:
        name = _name(c)
        try:
            ok, detail = probe(c)
        except Exception as err:  # noqa: BLE001 - a failing variant is excluded, not fatal
            ok, detail = False, f"{type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}"[:200]
        probe_report[name] = "ok" if ok else f"failed: {detail}"
        if ok:
            try:
                fns[name] = (c, run(c))
                fns[name][1]()  # warm-up: compiles, allocations
            except Exception as err:  # noqa: BLE001
                probe_report[name] = f"failed: {type(err).__name__}"
                fns.pop(name, None)
    samples: Dict[str, List[float]] = {n: [] for n in fns}
    for _ in range(REPEATS):
        if not fns or (samples and min(map(len, samples.values())) > 0 and clock() > deadline):
            break
        for name, (c, fn) in list(fns.items()):
            try:
                samples[name].append(float(timer(c, fn)))
            except Exception as err:  # noqa: BLE001 - e.g. out of memory at first use: drop it
                probe_report[name] = f"failed while timed: {type(err).__name__}"
                del fns[name], samples[name]
    times = {n: sorted(xs)[len(xs) // 2] for n, xs in samples.items() if xs}
    best = min(times, key=times.get) if times else None
    return {"choice": None if best is None else dict(fns[best][0]), "times_ms": times, "probe": probe_report}


def _name(c: Dict[str, str]) -> str:
    return ",".join(f"{k}={c[k]}" for k in sorted(c))


def _candidate_runs(hidden, weight, bias, *, temperature, softcap, with_entropy, seed=0):
    """(run, probe) for ``tune`` on the caller's tensors (detached; random targets and upstream)."""
    from .logprobs import linear_logprobs  # noqa: PLC0415 - autotune is imported from logprobs

    H = hidden.shape[-1]
    V = weight.shape[0]
    h_all = hidden.detach().reshape(-1, H)
    w0 = weight.detach()
    b0 = None if bias is None else bias.detach()
    g = torch.Generator(device="cpu").manual_seed(seed)
    rows = min(h_all.shape[0], TUNE_ROWS)
    h_time = h_all[:rows]
    t_time = torch.randint(0, V, (rows,), generator=g).to(hidden.device)
    kw = dict(temperature=temperature, softcap=softcap, return_entropy=with_entropy)

    def call(c, h, t, backend="triton"):
        # New leaves sharing the caller's storage (no copy of the weight).
        hh = h.detach().requires_grad_()
        ww = w0.detach().requires_grad_()
        bb = None if b0 is None else b0.detach().requires_grad_()
        extra = dict(c) if backend == "triton" else {}
        out = linear_logprobs(hh, ww, t, bias=bb, backend=backend, **kw, **extra)
        logp = out if isinstance(out, torch.Tensor) else out.logprobs
        loss = logp.sum() if not with_entropy else logp.sum() + 0.5 * out.entropy.sum()
        loss.backward()
        return logp.detach(), hh.grad, ww.grad

    def run(c):
        # The timed call: new leaves each time (their gradients are what a training step pays for).
        return lambda: call(c, h_time, t_time)

    pr = min(h_all.shape[0], PROBE_ROWS)
    h_probe = h_all[:pr]
    t_probe = torch.randint(0, V, (pr,), generator=g).to(hidden.device)
    want = None

    def probe(c):
        nonlocal want
        if want is None:
            want = call(None, h_probe, t_probe, backend="torch")
        got = call(c, h_probe, t_probe)
        errs = []
        for name, a, b in zip(("logp", "grad_hidden", "grad_weight"), got, want):
            rel = ((a.float() - b.float()).norm() / b.float().norm().clamp(min=1e-30)).item()
            errs.append(f"{name} {rel:.1e}")
            # bf16/fp16 gradients round to ~4e-3 relative per element; a wrong variant is O(1) off.
            limit = 1e-4 if (name == "logp" or hidden.dtype == torch.float32) else 2e-2
            if not rel <= limit:  # NaN fails too
                return False, "; ".join(errs)
        return True, "; ".join(errs)

    return run, probe


# ------------------------------------------------------------------------------------ the entry point


def _broadcast_from_rank0(decide: Callable[[], Dict]) -> Dict:
    dist = torch.distributed
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        obj = [decide() if dist.get_rank() == 0 else None]
        dist.broadcast_object_list(obj, src=0)
        return obj[0]
    return decide()


def tuned_choice(hidden: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor], *, temperature: float = 1.0,
                 softcap: Optional[float] = None, with_entropy: bool = False, timer: Optional[Timer] = None,
                 device_info: Optional[Callable[[torch.device], Tuple[str, Tuple[int, int]]]] = None,
                 clock: Callable[[], float] = time.monotonic) -> Optional[Dict[str, str]]:
    """{"fwd", "bwd"} for backend="triton" on these shapes, or None (tuning off: tuning.AUTO decides).

    Order: ``IRIS_KERNELS_VARIANT`` (forced), ``IRIS_KERNELS_AUTOTUNE=0`` (None), this process's
    memory, then (rank 0 only under torch.distributed) the cache file, then a measurement
    (``tune``), whose result goes to the cache. ``timer`` / ``device_info`` / ``clock`` are
    injectable for tests (default: CUDA events, torch.cuda's name and capability, time.monotonic).
    Synchronises with the device while it measures (first use of a key only).
    """
    forced = forced_variant()
    if forced is not None:
        table = AUTO.get(hidden.device.type, AUTO["cuda"])
        return {"fwd": forced.get("fwd", table["fwd"]), "bwd": forced.get("bwd", table["bwd"])}
    if not tuning_enabled():
        return None
    name, cap = (device_info or cuda_device_info)(hidden.device)
    key = tuning_key(name, cap, hidden.dtype, hidden.shape[-1], weight.shape[0], bias=bias is not None,
                     softcap=softcap is not None, entropy=with_entropy)
    if key in _MEMORY:
        return dict(_MEMORY[key]["choice"])

    def decide() -> Dict:
        path = cache_path()
        entry = _read_cache(path).get(key)
        if entry is not None and entry.get("fwd") in FORWARDS and entry.get("bwd") in BACKWARDS:
            return {"choice": {"fwd": entry["fwd"], "bwd": entry["bwd"]}, "source": f"cache {path}"}
        run, probe = _candidate_runs(hidden, weight, bias, temperature=temperature, softcap=softcap,
                                     with_entropy=with_entropy)
        result = tune(CANDIDATES, run=run, probe=probe, timer=timer or cuda_event_timer, budget_s=budget_seconds(),
                      clock=clock)
        choice = result["choice"]
        if choice is None:
            table = AUTO.get(hidden.device.type, AUTO["cuda"])
            choice = {"fwd": table["fwd"], "bwd": table["bwd"]}
            source = "no candidate passed the parity probe: tuning.AUTO"
        else:
            source = "measured"
        record = dict(choice, times_ms=result["times_ms"], probe=result["probe"], source=source,
                      date=_dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"))
        if result["choice"] is not None:  # a failed tuning is retried next process, not cached
            _write_cache(path, key, record)
        return {"choice": choice, "source": f"{source} {result['times_ms']} probe {result['probe']}"}

    decided = _broadcast_from_rank0(decide)
    _MEMORY[key] = decided
    if key not in _LOGGED:
        _LOGGED.add(key)
        log.info("iris_kernels autotune: %s -> fwd=%s bwd=%s (%s)", key, decided["choice"]["fwd"],
                 decided["choice"]["bwd"], decided["source"])
    return dict(decided["choice"])
