"""Compile every Triton kernel of the CUDA path for Hopper exactly as a launch specialises it.

No GPU is needed. Each case calls the op's own launch wrapper (``logprobs_fwd``, ``logits_grad``,
``logprobs_bwd``) on ``meta`` tensors of the real shapes (N = 16384 and the two heads below); the
kernel's launch is intercepted, the captured arguments go through the JIT's own argument binder
(``create_function_from_signature`` for an sm_90 CUDA backend), and the result is compiled with
``triton.compiler.compile``. So the divisibility-16 hints on pointers and integers, the
specialisation of integers equal to 1, the constexprs and ``num_warps`` / ``num_stages`` are those
of a real launch. (Meta tensors report ``data_ptr() == 0``: 16-byte aligned, as every fresh
allocation of torch's caching allocator is, 512-byte aligned; the workspace chunks are slices at
multiples of 128 rows, which keep that alignment.)

Triton assembles the PTX with the ptxas that ships with it (``triton/backends/nvidia/bin``;
``TRITON_PTXAS_PATH`` is unset so that no ptxas found elsewhere, whose PTX ISA may not match, is
used) and ``-v``; its log gives the registers and spill bytes (a fresh cache directory makes every
case compile, so the log is always there); the SASS (bundled
cuobjdump) says whether warpgroup MMA (HGMMA) was emitted. Per case the report records: kernel,
dtype, flag set, tile (BLOCK_N x BLOCK_V x BLOCK_H), warps, stages, registers, spill bytes,
shared memory, CTAs per SM (from registers and shared memory, H100/H200 limits), wgmma / mma.sync
present, cp.async / TMA present, and the Triton / ptxas versions.

    python benchmarks/compile_report.py                       # print the table
    python benchmarks/compile_report.py --write benchmarks/results/compile   # replace the record
    python benchmarks/compile_report.py --json out.json       # machine-readable (the test uses it)

Run it without TRITON_INTERPRET (the script unsets it before importing Triton).
"""
from __future__ import annotations

import argparse
import contextlib
import io
import itertools
import json
import os
import re
import subprocess
import sys
import tempfile
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

os.environ.pop("TRITON_INTERPRET", None)
os.environ.pop("TRITON_PTXAS_PATH", None)  # the bundled ptxas, not a system one
# A fresh cache: every case really compiles, so ptxas's -v log (read below) is always printed.
os.environ["TRITON_CACHE_DIR"] = tempfile.mkdtemp(prefix="iris-compile-report-")
ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

N_TOKENS = 16384
# name: (H, V)
HEADS = {"qwen2.5-3b": (2048, 151936), "zephyr-7b": (4096, 32000)}
DTYPES = ("bf16", "fp16", "fp32")

# Hopper (H100 / H200, sm_90) per-SM limits used for the occupancy column.
SM_REGISTERS = 65536
SM_SMEM = 233472  # 228 KiB
CTA_RESERVED_SMEM = 1024  # reserved by the system per CTA
SM_MAX_CTAS = 32
SM_MAX_WARPS = 64
REG_ALLOC_UNIT = 256  # registers are allocated per warp in units of 256


def ctas_per_sm(regs: int, smem: int, num_warps: int) -> int:
    """Resident CTAs per SM allowed by registers, shared memory, warps and the CTA limit."""
    per_warp = -(-max(regs, 1) * 32 // REG_ALLOC_UNIT) * REG_ALLOC_UNIT
    by_regs = (SM_REGISTERS // per_warp) // num_warps
    by_smem = SM_SMEM // (smem + CTA_RESERVED_SMEM)
    return min(by_regs, by_smem, SM_MAX_CTAS, SM_MAX_WARPS // num_warps)


def _torch_dtype(name):
    import torch
    return {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[name]


# ---------------------------------------------------------------------------------------------
# The cases: every flag set the dispatcher (autograd.py) can launch, per kernel and dtype.
# ---------------------------------------------------------------------------------------------
FLAGS = {
    # forward: bias, soft-cap, entropy, device-resident count (compaction without num_valid)
    "fwd": ("bias", "softcap", "entropy", "count"),
    # workspace dZ: bias (with its gradient), soft-cap, an lse gradient, an entropy gradient, count
    "dz": ("bias", "softcap", "grad_lse", "grad_entropy", "count"),
    # atomic backward (bwd="atomic"): the same flags
    "atomic": ("bias", "softcap", "grad_lse", "grad_entropy", "count"),
}


def all_cases(kernels=("fwd", "dz", "atomic"), dtypes=DTYPES, heads=tuple(HEADS), *, full_atomic=False,
              candidates=True):
    """(kernel, dtype, head, flags, tile) cases; tile None = the dispatcher's (tuning.kernel_tiles).

    The forward and the dZ kernel (the default backward) at bf16 and fp16: every flag combination.
    fp32 inputs (ieee dot, no tensor cores; a correctness path) and the atomic backward (not the
    default; every combination with ``full_atomic``): all flags off and all on. With
    ``candidates``: each non-default candidate of tuning.TILE_TABLE at bf16, all flags off and on.
    """
    from iris_kernels import tuning

    out = []
    for kernel in kernels:
        names = FLAGS[kernel]
        corners = [(False,) * len(names), (True,) * len(names)]
        for dtype in dtypes:
            if dtype == "fp32" and kernel == "atomic":
                continue
            full = dtype != "fp32" and (kernel != "atomic" or full_atomic)
            combos = itertools.product((False, True), repeat=len(names)) if full else corners
            for combo in combos:
                for head in heads:
                    out.append((kernel, dtype, head, dict(zip(names, combo)), None))
        if candidates and "bf16" in dtypes:
            for tile in tuning.tile_entry(kernel, "bf16")["candidates"][1:]:
                for combo in corners:
                    out.append((kernel, "bf16", heads[0], dict(zip(names, combo)), tuple(tile)))
    return out


def flag_string(flags) -> str:
    on = [k for k, v in flags.items() if v]
    return "+".join(on) if on else "-"


class _Captured(Exception):
    pass


def capture_launch(kernel_name, dtype, head, flags, tile=None):
    """Run the op's launch wrapper on meta tensors; return (jit_fn, args, kwargs, grid, tiles)."""
    import torch

    from iris_kernels import tuning
    from iris_kernels.ops import logits_grad as grad_mod
    from iris_kernels.ops import logprobs_bwd as bwd_mod
    from iris_kernels.ops import logprobs_fwd as fwd_mod

    H, V = HEADS[head]
    N = N_TOKENS
    dt = _torch_dtype(dtype)
    meta = dict(device="meta")
    f32 = dict(dtype=torch.float32, device="meta")
    hidden = torch.empty((N, H), dtype=dt, **meta)
    weight = torch.empty((V, H), dtype=dt, **meta)
    targets = torch.empty((N,), dtype=torch.int64, **meta)
    bias = torch.empty((V,), dtype=dt, **meta) if flags.get("bias") else None
    softcap = 30.0 if flags.get("softcap") else None
    n_valid = torch.empty((1,), dtype=torch.int64, **meta) if flags.get("count") else None
    jit_fn = {"fwd": fwd_mod.logprobs_fwd_kernel, "dz": grad_mod.logits_grad_kernel,
              "atomic": bwd_mod.logprobs_bwd_kernel}[kernel_name]
    seen = {}

    def fake_run(*args, grid, warmup, **kwargs):
        seen.update(args=args, kwargs=kwargs, grid=grid)
        raise _Captured()

    jit_fn.run = fake_run
    try:
        if kernel_name == "fwd":
            tiles = tuning.Tile(*tile) if tile else tuning.kernel_tiles("fwd", dt, flags, device_type="cuda")
            fwd_mod.logprobs_fwd(hidden, weight, targets, bias, inv_temperature=1.0, softcap=softcap,
                                 with_entropy=flags["entropy"], upcast=False, tiles=tiles, with_lse_lo=True,
                                 n_valid=n_valid, sm_count=132)
        else:
            vec = torch.empty((N,), **f32)
            grad_lse = vec if flags["grad_lse"] else None
            grad_ent = vec if flags["grad_entropy"] else None
            entropy = vec if flags["grad_entropy"] else None
            if kernel_name == "dz":
                tiles = tuning.Tile(*tile) if tile else tuning.kernel_tiles("dz", dt, flags, device_type="cuda")
                rows = tuning.workspace_rows(V, hidden.element_size(), 1 << 30, N, multiple=tiles.block_n)
                workspace = torch.empty((rows, tuning.padded_vocab(V)), dtype=dt, **meta)[:, :V]
                grad_bias = torch.empty((V,), **f32) if bias is not None else None
                grad_mod.logits_grad(hidden[:rows], weight, targets[:rows], bias, vec[:rows], vec[:rows],
                                     None if entropy is None else entropy[:rows], vec[:rows],
                                     None if grad_lse is None else grad_lse[:rows],
                                     None if grad_ent is None else grad_ent[:rows], workspace, grad_bias,
                                     row0=0, n_valid=n_valid, inv_temperature=1.0, softcap=softcap,
                                     temperature=1.0, upcast=False, tiles=tiles)
            else:
                tiles = tuning.Tile(*tile) if tile else tuning.kernel_tiles("atomic", dt, flags, device_type="cuda")
                bwd_mod.logprobs_bwd(hidden, weight, targets, bias, vec, entropy, vec, grad_lse, grad_ent,
                                     need_hidden=True, need_weight=True, need_bias=bias is not None,
                                     inv_temperature=1.0, softcap=softcap, temperature=1.0, upcast=False,
                                     tiles=tiles, lse_lo=vec, n_valid=n_valid)
    except _Captured:
        pass
    finally:
        del jit_fn.run  # back to the class's method
    if not seen:
        raise RuntimeError(f"{kernel_name}: the wrapper did not launch its kernel")
    return jit_fn, seen["args"], seen["kwargs"], seen["grid"], tiles


def _bundled_tool(name):
    import triton
    return os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", name)


def compile_case(case):
    """Compile one case as launched; return its table row (a dict)."""
    kernel_name, dtype, head, flags, tile = case
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource, make_backend
    from triton.compiler.compiler import compile as triton_compile
    from triton.runtime.jit import create_function_from_signature
    import triton
    from triton import knobs

    target = GPUTarget("cuda", 90, 32)
    backend = make_backend(target)
    jit_fn, args, kwargs, grid, tiles = capture_launch(kernel_name, dtype, head, flags, tile)
    binder = create_function_from_signature(jit_fn.signature, jit_fn.params, backend)
    kwargs = dict(kwargs)
    bound, specialization, options = binder(*args, **kwargs)
    options, signature, constexprs, attrs = jit_fn._pack_args(backend, kwargs, bound, specialization, options)
    # Triton's make_cubin runs the bundled ptxas with -v and prints its log when asked to.
    knobs.nvidia.dump_ptxas_log = True
    ptxas_log = io.StringIO()
    with contextlib.redirect_stdout(ptxas_log):
        compiled = triton_compile(ASTSource(jit_fn, signature, constexprs, attrs), target=target,
                                  options=options.__dict__)
    ptx = compiled.asm["ptx"]
    log = ptxas_log.getvalue()
    with tempfile.TemporaryDirectory() as tmp:
        cubin = os.path.join(tmp, "k.cubin")
        with open(cubin, "wb") as f:
            f.write(compiled.asm["cubin"])
        sass = subprocess.run([_bundled_tool("cuobjdump"), "-sass", cubin], capture_output=True, text=True).stdout
    regs = int(re.search(r"Used (\d+) registers", log).group(1))
    spill_st = sum(int(m) for m in re.findall(r"(\d+) bytes spill stores", log))
    spill_ld = sum(int(m) for m in re.findall(r"(\d+) bytes spill loads", log))
    smem = int(compiled.metadata.shared)
    nw = compiled.metadata.num_warps
    ptxas_version = re.search(r"release (\d+\.\d+)", subprocess.run(
        [_bundled_tool("ptxas"), "--version"], capture_output=True, text=True).stdout).group(1)
    return dict(
        kernel=kernel_name, role="candidate" if tile else "default", dtype=dtype, head=head,
        flags=flag_string(flags),
        tile=f"{tiles.block_n}x{tiles.block_v}x{tiles.block_h}", warps=nw,
        stages=compiled.metadata.num_stages, regs=regs, spill_bytes=spill_st + spill_ld, smem=smem,
        ctas_per_sm=ctas_per_sm(regs, smem, nw),
        wgmma="wgmma.mma_async" in ptx, hgmma_sass="HGMMA" in sass,
        # The warpgroup MMA shapes issued (the instruction mix a roofline credits).
        wgmma_shapes=sorted(set(re.findall(r"wgmma\.mma_async\.sync\.aligned\.(m\d+n\d+k\d+)", ptx))),
        mma_sync="mma.sync" in ptx,
        cp_async=bool(re.search(r"cp\.async\.c[ag]", ptx)), tma="cp.async.bulk.tensor" in ptx,
        grid=list(grid) if isinstance(grid, (tuple, list)) else str(grid),
        attrs=sorted(str(k[0]) for k, v in attrs.items() if v),
        triton=triton.__version__, ptxas=ptxas_version, arch="sm_90a",
    )


def _spec_key(case):
    """Cases whose launch specialises identically compile to the same kernel: compile once.

    Both heads have N, H, V and every stride divisible by 16, so they differ only in the grid.
    """
    kernel_name, dtype, head, flags, tile = case
    return (kernel_name, dtype, tuple(sorted(flags.items())), tile)


def run_cases(cases, jobs=None):
    unique = {}
    for case in cases:
        unique.setdefault(_spec_key(case), case)
    jobs = jobs or min(2, os.cpu_count() or 1)
    keys = list(unique)
    if jobs > 1:
        with ProcessPoolExecutor(jobs) as pool:
            rows = list(pool.map(compile_case, [unique[k] for k in keys]))
    else:
        rows = [compile_case(unique[k]) for k in keys]
    by_key = dict(zip(keys, rows))
    out = []
    for case in cases:
        row = dict(by_key[_spec_key(case)])
        if row["head"] != case[2]:
            # The same compiled kernel; the grid is this head's.
            jit_fn, _, _, grid, _ = capture_launch(*case)
            row.update(head=case[2], grid=list(grid))
        out.append(row)
    return out


COLUMNS = ("kernel", "role", "dtype", "flags", "head", "tile", "warps", "stages", "regs", "spill_bytes", "smem",
           "ctas_per_sm", "wgmma", "wgmma_shapes", "hgmma_sass", "mma_sync", "cp_async", "tma", "grid")


def format_table(rows) -> str:
    def cell(v):
        if isinstance(v, bool):
            return "yes" if v else "no"
        if isinstance(v, list):
            return "x".join(map(str, v)) if all(isinstance(x, int) for x in v) else " ".join(v) or "-"
        return str(v)

    lines = ["| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    for r in rows:
        lines.append("| " + " | ".join(cell(r[c]) for c in COLUMNS) + " |")
    return "\n".join(lines)


def summarize(rows) -> str:
    """One line per (kernel, role, dtype, tile, stages): register range, worst spills, smem, CTAs/SM."""
    groups = {}
    for r in rows:
        key = (r["kernel"], r.get("role", "default"), r["dtype"], r["tile"], r["warps"], r["stages"])
        groups.setdefault(key, []).append(r)
    lines = ["| kernel | role | dtype | tile | warps | stages | cases | regs | max spill B | smem B | CTAs/SM "
             "| wgmma shapes | cp.async |", "|" + "---|" * 13]
    for (kernel, role, dtype, tile, warps, stages), rs in groups.items():
        regs = sorted(r["regs"] for r in rs)
        ctas = sorted({r["ctas_per_sm"] for r in rs})
        shapes = sorted({x for r in rs for x in r.get("wgmma_shapes", [])}) or (["?"] if any(
            r["wgmma"] for r in rs) else ["-"])
        lines.append(f"| {kernel} | {role} | {dtype} | {tile} | {warps} | {stages} | {len(rs)} | "
                     f"{regs[0]}-{regs[-1]} | {max(r['spill_bytes'] for r in rs)} | "
                     f"{'/'.join(str(x) for x in sorted({r['smem'] for r in rs}))} | "
                     f"{'-'.join(str(c) for c in (ctas[0], ctas[-1])) if len(ctas) > 1 else ctas[0]} | "
                     f"{' '.join(shapes)} | {'yes' if all(r['cp_async'] for r in rs) else 'no'} |")
    return "\n".join(lines)


def write_record(rows, folder: Path, shown_as: str) -> None:
    """compile_sm90a.md (summary + every case) and compile_sm90a.json in ``folder``."""
    folder.mkdir(parents=True, exist_ok=True)
    head = (f"# Compile evidence, sm_90a, N = {N_TOKENS}, as launched\n\n"
            f"Triton {rows[0]['triton']}, bundled ptxas {rows[0]['ptxas']}; "
            f"written by `python benchmarks/compile_report.py --write {shown_as}` "
            "(no GPU needed; see the script's docstring for how each case is compiled). "
            "regs = registers per thread, smem = dynamic shared memory in bytes, ctas_per_sm from "
            "registers and shared memory at H100/H200 limits (65536 registers, 228 KiB). "
            "wgmma/mma_sync/cp_async/tma: found in the PTX; wgmma_shapes: the warpgroup MMA "
            "instructions issued; hgmma_sass: HGMMA in the SASS. role: default = what the "
            "dispatcher launches (tuning.TILE_TABLE), candidate = an alternative an autotuner may "
            "try. grid: programs of the 1-D grouped launch (forward: row blocks x vocabulary "
            "splits at 132 SMs; dZ: the first workspace chunk).\n\n")
    (folder / "compile_sm90a.md").write_text(head + "## Summary\n\n" + summarize(rows) + "\n\n## Every case\n\n"
                                             + format_table(rows) + "\n")
    (folder / "compile_sm90a.json").write_text(rows_json(rows))


def rows_json(rows) -> str:
    """A JSON list, one case per line (reviewable diffs)."""
    return "[\n" + ",\n".join(json.dumps(r) for r in rows) + "\n]\n"


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--kernels", nargs="+", default=["fwd", "dz", "atomic"], choices=["fwd", "dz", "atomic"])
    ap.add_argument("--dtypes", nargs="+", default=list(DTYPES), choices=list(DTYPES))
    ap.add_argument("--heads", nargs="+", default=list(HEADS), choices=list(HEADS))
    ap.add_argument("--jobs", type=int, default=None)
    ap.add_argument("--full-atomic", action="store_true", help="every flag set of the atomic backward too")
    ap.add_argument("--no-candidates", action="store_true", help="only the dispatched tiles")
    ap.add_argument("--json", help="write the rows as JSON here")
    ap.add_argument("--summarize", metavar="JSON", help="only print the summary of a rows JSON (no compile)")
    ap.add_argument("--write", help="folder: write compile_sm90a.md and .json there (the committed record)")
    args = ap.parse_args(argv)
    if args.summarize:
        print(summarize(json.loads(Path(args.summarize).read_text())))
        return None
    import triton

    rows = run_cases(all_cases(args.kernels, args.dtypes, tuple(args.heads), full_atomic=args.full_atomic,
                               candidates=not args.no_candidates), jobs=args.jobs)
    table = format_table(rows)
    print(table)
    if args.json:
        Path(args.json).write_text(rows_json(rows))
    if args.write:
        write_record(rows, Path(args.write), args.write)
    return rows


if __name__ == "__main__":
    main()
