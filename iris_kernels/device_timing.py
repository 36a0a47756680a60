"""The selfcheck's GPU sections: compiled kernels, the default path's parts, variant and peer timings, the autotuner.

Everything here measures (CUDA events through iris_kernels.measure) or reads compiled kernels;
``python -m iris_kernels.selfcheck`` calls it on a CUDA machine, benchmarks/bwd_breakdown.py calls
``workspace_parts``. The functions take a ``device`` so that tests can run their code on the CPU
through the Triton interpreter (the numbers then mean nothing).
"""
from __future__ import annotations

import math
import sys
from typing import Dict, List, Optional

import torch

def compiled_kernels() -> List[dict]:
    """Registers, spills, shared memory and wgmma use of every Triton kernel compiled so far.

    Read from each JIT function's cache of compiled kernels (``device_caches`` in Triton >= 3.0,
    ``cache`` before): the kernels that actually ran, at the tiles and flags they ran with.
    """
    from .ops import logits_grad, logprobs_bwd, logprobs_fwd, logprobs_split

    fns = {
        "logprobs_fwd_kernel": logprobs_fwd.logprobs_fwd_kernel,
        "logprobs_bwd_kernel": logprobs_bwd.logprobs_bwd_kernel,
        "logits_grad_kernel": logits_grad.logits_grad_kernel,
        "logprobs_rows_kernel": logprobs_split.logprobs_rows_kernel,
    }
    out = []
    for name, fn in fns.items():
        kernels = []
        caches = getattr(fn, "device_caches", None)
        if caches:
            for entry in caches.values():
                cache = entry[0] if isinstance(entry, tuple) else entry
                if isinstance(cache, dict):
                    kernels.extend(cache.values())
        for cache in (getattr(fn, "cache", None) or {}).values():
            if isinstance(cache, dict):
                kernels.extend(cache.values())
        for k in kernels:
            row = {"kernel": name}
            try:
                if getattr(k, "n_regs", None) is None and hasattr(k, "_init_handles"):
                    k._init_handles()
                meta = getattr(k, "metadata", None)
                ptx = (getattr(k, "asm", None) or {}).get("ptx", "")
                row.update(
                    regs=getattr(k, "n_regs", None), spills=getattr(k, "n_spills", None),
                    smem_bytes=getattr(meta, "shared", None), num_warps=getattr(meta, "num_warps", None),
                    wgmma="wgmma" in ptx if ptx else None,
                    constants={str(kk): v for kk, v in (getattr(getattr(k, "src", None), "constants", None) or {}).items()
                               if isinstance(v, (int, bool))},
                )
            except Exception as err:  # noqa: BLE001
                row["error"] = f"{type(err).__name__}: {err}"[:200]
            out.append(row)
    return out


def workspace_parts(hidden, weight, targets, up, *, time_part, workspace_bytes=None) -> Dict[str, object]:
    """Milliseconds of the parts of the default triton path, one by one, each next to one product.

    ``time_part(fn) -> ms`` times one part (a median over repeats; CUDA events on a GPU). Parts:
    ``gemm`` one logits product h W^T; ``fwd`` the fused forward kernel; ``fwd_split`` the split
    forward; ``dz`` the workspace dZ kernel over all chunks; ``dh`` the chunks' dHidden = G W;
    ``dw`` the chunks' dWeight += G^T h (fp32 accumulation, autograd.WGRAD_PATH says how). No
    compaction, no bias / soft-cap / entropy. A part that fails is an ``error_<part>`` entry, not
    the loss of the others. Used by the selfcheck and by benchmarks/bwd_breakdown.py.
    """
    from . import autograd as A
    from .ops.logits_grad import logits_grad
    from .ops.logprobs_fwd import logprobs_fwd
    from .ops.logprobs_split import logprobs_split_fwd
    from .tuning import AUTO, padded_vocab, workspace_rows

    N, H = hidden.shape
    V = weight.shape[0]
    dev = hidden.device
    budget = workspace_bytes or AUTO.get(dev.type, AUTO["cuda"])["workspace_bytes"]
    out: Dict[str, object] = {}

    def part(key, fn):
        try:
            out[f"{key}_ms"] = time_part(fn)
        except Exception as err:  # noqa: BLE001 - one part failing must not lose the others
            out[f"error_{key}"] = f"{type(err).__name__}: {str(err).strip().splitlines()[-1:]}"[:300]
            if dev.type == "cuda":
                torch.cuda.synchronize()

    part("gemm", lambda: hidden @ weight.t())
    fwd_kw = dict(inv_temperature=1.0, softcap=None, with_entropy=False)
    part("fwd", lambda: logprobs_fwd(hidden, weight, targets, None, upcast=A.interpreting(),
                                     tiles=A.tile_config(hidden, forward=True), **fwd_kw))
    rows = A.INTERPRETER_ROW_TILES if (A.interpreting() or dev.type != "cuda") else A.GPU_ROW_TILES
    part("fwd_split", lambda: logprobs_split_fwd(hidden, weight, targets, None, chunk_bytes=budget, tiles=rows,
                                                 **fwd_kw))
    gtiles = A.tile_config(hidden, forward=False, workspace=True)
    C = workspace_rows(V, hidden.element_size(), budget, N, multiple=gtiles[0])
    out["chunk_rows"] = C
    try:
        lse = logprobs_split_fwd(hidden, weight, targets, None, chunk_bytes=budget, tiles=rows, **fwd_kw)[0]
    except Exception as err:  # noqa: BLE001
        out["error_lse"] = f"{type(err).__name__}: {err}"[:300]
        return out
    ws = torch.empty((C, padded_vocab(V)), dtype=hidden.dtype, device=dev)[:, :V]
    c_lp = torch.where(targets != -100, up.float(), 0.0).contiguous()
    chunks = [(s, min(s + C, N)) for s in range(0, N, C)]

    def dz():
        for s, e in chunks:
            logits_grad(hidden[s:e], weight, targets[s:e], None, lse[s:e], None, None, c_lp[s:e], None, None,
                        ws[: e - s], None, row0=s, n_valid=None, inv_temperature=1.0, softcap=None,
                        temperature=1.0, upcast=A.interpreting(), tiles=gtiles)

    part("dz", dz)  # also fills the workspace with real gradients for the products below
    gh = torch.empty_like(hidden)
    gw = torch.zeros(V, H, dtype=torch.float32, device=dev)

    def dh():
        for s, e in chunks:
            torch.mm(ws[: e - s], weight, out=gh[s:e])

    def dw():
        for s, e in chunks:
            A._accumulate_wgrad(gw, ws[: e - s], hidden[s:e])

    part("dh", dh)
    part("dw", dw)
    out["wgrad_path"] = dict(A.WGRAD_PATH)
    return out


def run_timing(heads: Dict[str, tuple], tokens: int, dtype: torch.dtype, repeats: int,
               device: Optional[torch.device] = None, flags: Optional[dict] = None) -> List[dict]:
    """fwd / bwd / total of each variant against one cuBLAS product and the four-product floor
    (``device``: CUDA; the CPU only to test this code through the interpreter). ``flags``: the
    user's feature set for the variant rows, {"bias": bool, "softcap": float | None, "entropy":
    bool} (the parts are timed without features)."""
    from . import linear_logprobs
    from .measure import summarize, time_call, time_fwd_bwd

    dev = device or torch.device("cuda")
    rows = []
    for head, (H, V) in heads.items():
        g = torch.Generator(device="cpu").manual_seed(0)
        h = torch.randn(tokens, H, generator=g).to(dev, dtype)
        w = (torch.randn(V, H, generator=g) * (2.0 / math.sqrt(H))).to(dev, dtype)
        t = torch.randint(0, V, (tokens,), generator=g).to(dev)
        t[torch.rand(tokens, generator=g).to(dev) < 0.375] = -100
        up = torch.randn(tokens, generator=g).to(dev)
        flop = 2.0 * tokens * H * V
        fl = flags or {}
        bias = (torch.randn(V, generator=g) * 0.5).to(dev, dtype) if fl.get("bias") else None
        feat = dict(softcap=fl.get("softcap"), return_entropy=bool(fl.get("entropy")))

        def median_ms(fn):
            return summarize([time_call(fn, dev) for _ in range(repeats + 1)][1:])[0]  # first call: compile

        one = median_ms(lambda: torch.mm(h, w.t()))
        rows.append(dict(head=head, N=tokens, H=H, V=V, what="one cuBLAS product", total_ms=one,
                         tflops=flop / one / 1e9))
        rows.append(dict(head=head, N=tokens, H=H, V=V, what="four-product floor", total_ms=4 * one,
                         tflops=4 * flop / (4 * one) / 1e9))
        parts = workspace_parts(h, w, t, up, time_part=median_ms)
        for key in ("fwd", "fwd_split", "dz", "dh", "dw"):
            ms = parts.get(f"{key}_ms")
            if ms is None:
                rows.append(dict(head=head, N=tokens, H=H, V=V, what=f"part {key}",
                                 error="failed: " + str(parts.get(f"error_{key}", "?"))))
            else:
                rows.append(dict(head=head, N=tokens, H=H, V=V, what=f"part {key}", total_ms=ms, x_gemm=ms / one,
                                 tflops=flop / ms / 1e9))
        variants = [("triton", dict(fwd=f, bwd=b)) for f in ("fused", "split") for b in ("workspace", "atomic")]
        variants += [("triton", dict()), ("torch", dict())]
        for backend, kw in variants:
            label = backend + (f"[fwd={kw['fwd']},bwd={kw['bwd']}]" if kw else "[auto]" if backend == "triton" else "")
            hh = h.detach().requires_grad_()
            ww = w.detach().requires_grad_()
            bb = None if bias is None else bias.detach().requires_grad_()

            def fwd():
                return linear_logprobs(hh, ww, t, bias=bb, backend=backend, **feat, **kw)

            def bwd(out):
                if isinstance(out, torch.Tensor):
                    out.backward(up)
                else:  # with the entropy: both outputs carry a gradient, as in an entropy-regularised loss
                    (out.logprobs * up + out.entropy).sum().backward()

            try:
                samples = []
                for i in range(repeats + 1):
                    hh.grad = ww.grad = None
                    f_ms, b_ms, _ = time_fwd_bwd(fwd, bwd, dev)
                    if i:  # the first call compiles / tunes
                        samples.append((f_ms, b_ms))
                fm, bm = summarize([s[0] for s in samples])[0], summarize([s[1] for s in samples])[0]
                tot = summarize([s[0] + s[1] for s in samples])[0]
                rows.append(dict(head=head, N=tokens, H=H, V=V, what=label, fwd_ms=fm, bwd_ms=bm, total_ms=tot,
                                 x_floor=tot / (4 * one), tflops=4 * flop / tot / 1e9))
            except Exception as err:  # noqa: BLE001
                rows.append(dict(head=head, N=tokens, H=H, V=V, what=label,
                                 error=f"failed: {type(err).__name__}: {err}"[:300]))
            finally:
                hh.grad = ww.grad = None
                if dev.type == "cuda":
                    torch.cuda.empty_cache()
        del h, w, bias
        if dev.type == "cuda":
            torch.cuda.empty_cache()
    return rows


PEER_PROVIDERS = ("liger-flce", "liger-cute-sce", "cce", "trl-chunked")


def run_peer_timing(heads: Dict[str, tuple], tokens: int, dtype: torch.dtype, repeats: int,
                    device: Optional[torch.device] = None) -> List[dict]:
    """The installed peers' fwd + bwd at the same heads, through benchmarks/providers.py (the
    benchmark's own adapters) when this is a checkout; in a pip install the peers are listed, not timed."""
    from pathlib import Path

    from .measure import summarize, time_fwd_bwd

    bench = Path(__file__).resolve().parent.parent / "benchmarks"
    if not (bench / "providers.py").exists():
        return [dict(head="-", what="peers", error="not timed: benchmarks/ not found (not a checkout)")]
    if str(bench) not in sys.path:
        sys.path.insert(0, str(bench))
    import providers as P  # noqa: PLC0415 - from the checkout, on demand
    from cases import Shape, make_case  # noqa: PLC0415

    dev = device or torch.device("cuda")
    rows = []
    for head, (H, V) in heads.items():
        case = make_case(Shape(tokens, H, V, head), dtype, dev, seed=0)
        for name in PEER_PROVIDERS:
            prov = P.get(name)
            reason = prov.skip_reason(dev, dtype, "logprobs")
            if reason:
                rows.append(dict(head=head, N=case.N, H=H, V=V, what=name, error=f"skipped: {reason}"))
                continue
            try:
                prov.setup(case)
                samples = []
                for i in range(repeats + 1):
                    case.hidden.grad = case.weight.grad = None
                    f, b, _ = time_fwd_bwd(lambda: prov.forward(case, "logprobs"),
                                           lambda o: prov.backward(o, case, "logprobs"), dev)
                    if i:
                        samples.append((f, b))
                rows.append(dict(head=head, N=case.N, H=H, V=V, what=name,
                                 fwd_ms=summarize([x[0] for x in samples])[0], bwd_ms=summarize([x[1] for x in samples])[0],
                                 total_ms=summarize([x[0] + x[1] for x in samples])[0]))
            except Exception as err:  # noqa: BLE001
                rows.append(dict(head=head, N=case.N, H=H, V=V, what=name,
                                 error=f"failed: {type(err).__name__}: {err}"[:300]))
            finally:
                case.hidden.grad = case.weight.grad = None
                if dev.type == "cuda":
                    torch.cuda.empty_cache()
        del case
        if dev.type == "cuda":
            torch.cuda.empty_cache()
    return rows


def run_autotune(heads: Dict[str, tuple], tokens: int, dtype: torch.dtype, flags: Optional[dict] = None) -> List[dict]:
    from .autotune import cache_path, tuned_choice

    rows = []
    for head, (H, V) in heads.items():
        h = torch.randn(tokens, H, device="cuda", dtype=dtype)
        w = torch.randn(V, H, device="cuda", dtype=dtype) * (2.0 / math.sqrt(H))
        try:
            fl = flags or {}
            bias = torch.zeros(V, device="cuda", dtype=dtype) if fl.get("bias") else None
            choice = tuned_choice(h, w, bias, softcap=fl.get("softcap"), with_entropy=bool(fl.get("entropy")))
            rows.append(dict(head=head, choice=choice, cache=str(cache_path())))
        except Exception as err:  # noqa: BLE001
            rows.append(dict(head=head, error=f"{type(err).__name__}: {err}"[:300]))
        del h, w
    return rows
