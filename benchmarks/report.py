"""The report: records (one dict per provider x workload x shape), the table, JSON, CSV and plots.

Record fields are RECORD_FIELDS; ``add_ratios`` fills the comparisons (x best peer, x floor) and
the ``unreliable`` flag; ``format_table`` prints them with the machine's load; ``write_outputs``
writes bench_loss_<device>.json / .csv and the PNG plots (one colour-blind-safe colour, marker
and line style per provider).
"""
from __future__ import annotations

import csv
import importlib.metadata
import json
import math
import os
import platform
import re
import subprocess
import sys
from pathlib import Path
from typing import Dict, List, Optional, Tuple

import torch

import providers as P
from cases import Shape, batch_layout
from iris_kernels.measure import summarize

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
WORKLOADS = ("logprobs", "selfplay")
# Distributions whose versions every record carries: the library's stack and every peer measured.
PEER_DISTRIBUTIONS = ("torch", "triton", "numpy", "liger-kernel", "cut-cross-entropy", "trl", "transformers",
                      "accelerate", "quack-kernels", "nvidia-cutlass-dsl")

RECORD_FIELDS = [
    "provider", "family", "workload", "objective", "status", "N", "H", "V", "B", "T", "shape",
    "dtype", "device", "fwd_ms", "fwd_p20", "fwd_p80", "bwd_ms", "bwd_p20", "bwd_p80",
    "total_ms", "total_p20", "total_p80", "peak_mem_mb", "grad_mem_mb", "extra_mem_mb", "mem_method", "max_abs_err",
    "err_value", "err_grad_hidden", "err_grad_weight", "ratio_to_best", "best_peer",
    "mem_ratio_to_best", "x_floor", "timing_valid", "unreliable", "repeats", "warmup", "note", "skip_reason",
    "device_name", "versions", "date", "git_commit", "load_avg", "threads",
]


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
    # Every package a provider measures or is built on (issue 21 item 8): the peers' own versions.
    for dist in PEER_DISTRIBUTIONS:
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


def fill_measurement(rec: dict, res: dict, shape: Shape, repeats: int) -> None:
    """Times (median, p20, p80), memory and errors of one measured row (runner.measure_provider's result)."""
    total = [f + b for f, b in zip(res["fwd"], res["bwd"])]
    for key, xs in (("fwd", res["fwd"]), ("bwd", res["bwd"]), ("total", total)):
        med, p20, p80 = summarize(xs)
        rec[f"{key}_ms"], rec[f"{key}_p20"], rec[f"{key}_p80"] = med, p20, p80
    rec["peak_mem_mb"] = res["peak_mem_mb"]
    if P.get(rec["provider"]).family != "floor":
        rec["grad_mem_mb"] = res["grad_mem_mb"]
        rec["extra_mem_mb"] = max(0.0, res["peak_mem_mb"] - res["grad_mem_mb"])
    rec["mem_method"] = res["mem_method"]
    rec["threads"] = res.get("threads")
    rec["repeats"], rec["warmup"] = repeats, res["warmup"]
    notes = []
    if "err_value" in res:
        for k in ("err_value", "err_grad_hidden", "err_grad_weight"):
            rec[k] = res[k]
        errs = [e for e in (rec["err_value"], rec["err_grad_hidden"], rec["err_grad_weight"]) if e is not None]
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
    if rec["objective"] == P.OBJECTIVE_IRIS and prov.family == "library" and rec["provider"] != "iris-triton-composed":
        notes.append("IRIS fused (sequence_logprobs + iris_loss)")
    if prov.frozen_head:
        notes.append("frozen head: no dWeight (its floor is three products)")
    if rec["provider"] == "iris-triton-composed":
        notes.append("IRIS composed on the library's per-token output")
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
            r["unreliable"] = unreliable_reason(r, floor)


# A p20-p80 spread wider than this fraction of the median: the repeats disagree too much to rank.
SPREAD_LIMIT = 0.2


def unreliable_reason(r: dict, floor: Optional[dict]) -> str:
    """Why a timed row cannot be trusted ("" if it can): a total below the floor's (four GEMMs are
    the least work a method that neither keeps the logits nor skips the weight gradient does, so
    only noise puts such a row under it; ``Provider.products`` exempts the others) or a wide spread."""
    why = []
    provider = P.PROVIDERS.get(r.get("provider"))
    bound_by_floor = provider is None or getattr(provider, "products", None) is None
    if (bound_by_floor and floor is not None and r is not floor and r["family"] != "floor"
            and r["total_ms"] < floor["total_ms"]):
        why.append("below the floor")
    med, p20, p80 = r["total_ms"], r["total_p20"], r["total_p80"]
    if med and p20 is not None and p80 is not None and (p80 - p20) > SPREAD_LIMIT * med:
        why.append(f"spread {100 * (p80 - p20) / med:.0f}% of the median")
    return "; ".join(why)


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
    flagged = 0
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
            note = r["note"]
            if r.get("unreliable"):
                flagged += 1
                note = f"UNRELIABLE ({r['unreliable']}); {note}" if note else f"UNRELIABLE ({r['unreliable']})"
            lines.append(
                f"{r['provider']:28s} {_fmt(r['fwd_ms']):>9s} {_fmt(r['bwd_ms']):>9s} "
                f"{_fmt(r['total_ms']):>9s} {spread:>17s} {_fmt(r['peak_mem_mb']):>9s} "
                f"{_fmt(r['max_abs_err'], '.1e'):>9s} {_fmt(r['ratio_to_best'], '.2f'):>7s} "
                f"{_fmt(r['mem_ratio_to_best'], '.2f'):>7s} {_fmt(r['x_floor'], '.2f'):>7s}  {note}"
            )
        for r in skipped:
            lines.append(f"  {r['status']}: {r['provider']}: {r['skip_reason']}")
    if flagged:
        lines.append("")
        lines.append(
            f"{flagged} row(s) marked UNRELIABLE: a time below the four-GEMM floor's (no exact method does less "
            f"work, so only a loaded machine puts a row there) or a p20-p80 spread above {100 * SPREAD_LIMIT:.0f}% "
            "of the median. The machine was loaded during those rows: rerun on quiet cores before comparing them."
        )
    return "\n".join(lines)


def clean(v):
    """JSON has no NaN/inf: write them as strings so that they stay visible and the file valid."""
    if isinstance(v, float) and (math.isnan(v) or math.isinf(v)):
        return str(v)
    return v


def write_outputs(records: List[dict], out_dir: Path, tag: str, plots: bool = True) -> List[Path]:
    out_dir.mkdir(parents=True, exist_ok=True)
    records = [dict(r) for r in records]
    add_ratios(records)
    json_path = out_dir / f"bench_loss_{tag}.json"
    csv_path = out_dir / f"bench_loss_{tag}.csv"

    json_path.write_text(json.dumps([{k: clean(v) for k, v in r.items()} for r in records], indent=1))
    with csv_path.open("w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=RECORD_FIELDS)
        w.writeheader()
        for r in records:
            row = dict(r)
            row["versions"] = ";".join(f"{k}={v}" for k, v in r["versions"].items())
            w.writerow(row)
    return [json_path, csv_path] + (plot(records, out_dir, tag) if plots else [])


# Okabe & Ito's colour-blind-safe palette (Okabe and Ito 2008, "Color Universal Design"), without
# its black (kept for the floor); a provider past the seventh reuses a colour with another marker
# and line style, so no two providers share all three. The library's rows are drawn thicker.
_PALETTE = ["#0072B2", "#E69F00", "#009E73", "#D55E00", "#CC79A7", "#56B4E9", "#F0E442"]
_MARKERS = ["o", "s", "^", "D", "v", "P", "X", "*", "<", ">"]
_LINESTYLES = ["-", "--", "-.", ":"]


def provider_style(name: str) -> Dict[str, str]:
    """colour, marker and line style of one provider, the same in every figure of every run: taken
    from the provider's position in the registry (not from the order a figure draws its lines in).
    The floor is black, dashed, without markers."""
    if name == "floor":
        return {"color": "#000000", "marker": "", "ls": "--"}
    names = [n for n in P.PROVIDERS if n != "floor"]
    i = names.index(name) if name in names else sum(map(ord, name))
    # Colour cycles fastest, marker with every row of colours, line style slowest: distinct triples.
    return {"color": _PALETTE[i % len(_PALETTE)], "marker": _MARKERS[i % len(_MARKERS)],
            "ls": _LINESTYLES[(i // len(_PALETTE)) % len(_LINESTYLES)]}


def provider_colour(name: str) -> str:
    return provider_style(name)["color"]


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
            st = provider_style(name)
            lw = 2.5 if P.get(name).family == "library" else 1.3
            ax_t.errorbar(
                ns, [p[1] for p in pts], yerr=[[p[1] - p[2] for p in pts], [p[3] - p[1] for p in pts]],
                marker=st["marker"] or None, ls=st["ls"], lw=lw, capsize=3, label=name, color=st["color"],
                markersize=6,
            )
            mem = [(n, p[4]) for n, p in zip(ns, pts) if p[4] and p[4] > 0]  # log axis: drop 0 MB
            if name != "floor" and mem:
                ax_m.plot([m[0] for m in mem], [m[1] for m in mem], marker=st["marker"] or None, ls=st["ls"], lw=lw,
                          label=name, color=st["color"], markersize=6)
        ax_t.set_title("time (lower is better)", fontsize=9)
        ax_m.set_title("peak memory (lower is better)", fontsize=9)
        for ax, ylabel in ((ax_t, "fwd+bwd time, ms (median, p20-p80)"), (ax_m, "peak memory above inputs, MB")):
            ax.set_xscale("log", base=2)
            ax.set_yscale("log")
            ax.set_xlabel("tokens N")
            ax.set_ylabel(ylabel)
            ax.grid(True, which="both", alpha=0.3)
        for ax in (ax_t, ax_m):
            if ax.get_legend_handles_labels()[0]:  # a panel with no line (floor only) has no legend
                ax.legend(fontsize=8)
        loads = [r["load_avg"] for r in rows if r["load_avg"] is not None]
        load = f", load avg {min(loads):.1f}-{max(loads):.1f}" if loads else ""
        fig.suptitle(f"{wl}: H={H} V={V} {dt} on {rows[0]['device_name']}{load}", fontsize=10)
        fig.tight_layout()
        path = out_dir / f"bench_loss_{tag}_{wl}_H{H}_V{V}_{dt}.png"
        fig.savefig(path, dpi=110)
        plt.close(fig)
        paths.append(path)
    return paths


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

