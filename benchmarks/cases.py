"""The benchmark's inputs and its oracle: shapes, a self-play batch, the fp64 reference (sampled or full).

Every provider gets bit-identical tensors (generated in fp32 on the CPU from one seed); the fp64
reference is written from the formulas (docs/math.md), independently of iris_kernels.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

import torch

import providers as P
from iris_kernels.measure import sample_rows

NAMED_SHAPES: Dict[str, Tuple[int, int]] = {
    "zephyr-7b": (4096, 32000),
    "qwen2.5-3b": (2048, 151936),
    "smollm2-135m": (576, 49152),
}

# IRIS settings of the self-play workload: alpha = 2 is the schedule's starting value (chi^2
# regime, sharp weights), beta = 1 the theory's value; SPIN's beta for the DPO reference point.
ALPHA, BETA, SPIN_BETA = 2.0, 1.0, 0.1


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


def fp64_reference(case: P.Case, objectives: Sequence[str], set_ref_logps: bool = True,
                   token_rows: Optional[int] = None, vocab_rows: Optional[int] = None, seed: int = 0) -> Dict[str, dict]:
    """Values and gradients of each objective in fp64, chunked over tokens (never [N, V] at once).

    Forward: lse and the target logit per token. Backward of an objective with per-token upstream
    gradient c_k (c = dObjective/dlogp_k): d logp_k / dz_k = onehot(y_k) - softmax(z_k), so
        dh_k = c_k (onehot - p_k) W,   dW_j = sum_k c_k (onehot(y_k)_j - p_kj) h_k.
    ``token_rows`` / ``vocab_rows``: check the gradients on a seeded sample of that many token
    rows of dHidden and vocabulary rows of dWeight (``measure.sample_rows``) instead of all of
    them: the sampled rows cost a slice of one product each, where the full dWeight in fp64 is
    2.5 GB at a 151936 x 2048 head. The values are always complete. Results stay on the case's
    device; "rows" / "vocab_rows" say which rows the gradients hold (dHidden flattened to [N, H]).
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

    rows = sample_rows(N, token_rows, seed, dev)
    vrows = sample_rows(V, vocab_rows, seed + 1, dev)
    grad_h = {o: torch.empty(rows.numel(), H, dtype=torch.float64, device=dev) for o in objectives}
    grad_w = {o: torch.zeros(vrows.numel(), H, dtype=torch.float64, device=dev) for o in objectives}
    # dHidden at the sampled token rows: full rows of p for those tokens.
    for i in range(0, rows.numel(), chunk):
        r = rows[i : i + chunk]
        onehot_minus_p = -torch.exp(h[r] @ W.t() - lse[r, None])
        onehot_minus_p[torch.arange(r.numel(), device=dev), safe[r]] += 1.0
        for o in objectives:
            grad_h[o][i : i + chunk] = (onehot_minus_p * upstream[o][r, None]) @ W
        del onehot_minus_p
    # dWeight at the sampled vocabulary rows: columns vrows of p for every token.
    Wq = W[vrows]
    vchunk = max(1, budget // max(1, vrows.numel()))
    for i in range(0, N, vchunk):
        hc = h[i : i + vchunk]
        onehot_minus_p = -torch.exp(hc @ Wq.t() - lse[i : i + vchunk, None])
        onehot_minus_p += (safe[i : i + vchunk, None] == vrows[None, :]).double()
        for o in objectives:
            grad_w[o].addmm_((onehot_minus_p * upstream[o][i : i + vchunk, None]).t(), hc)
        del onehot_minus_p
    return {
        o: {"value": values[o], "grad_hidden": grad_h[o], "grad_weight": grad_w[o], "rows": rows, "vocab_rows": vrows}
        for o in objectives
    }


def save_case(case: P.Case, path: Path, refs: Optional[Dict[str, dict]] = None) -> None:
    """The case (on the CPU) and its fp64 references (sampled: small) for a provider's own process."""
    torch.save(
        {
            "case": {
                "hidden": case.hidden.detach().cpu(),
                "weight": case.weight.detach().cpu(),
                "labels": case.labels.cpu(),
                "targets": case.targets.cpu(),
                "grad_logprobs": case.grad_logprobs.cpu(),
                "ref_logps": case.ref_logps.cpu(),
                "is_real": case.is_real.cpu(),
                "alpha": case.alpha,
                "beta": case.beta,
                "spin_beta": case.spin_beta,
            },
            "refs": None if refs is None else {o: {k: v.cpu() for k, v in r.items()} for o, r in refs.items()},
        },
        path,
    )


def load_case(path: Path, device: torch.device):
    """(case on ``device``, refs on ``device``) as written by ``save_case``."""
    d = torch.load(path, weights_only=True)
    c = {k: (v.to(device) if isinstance(v, torch.Tensor) else v) for k, v in d["case"].items()}
    c["hidden"].requires_grad_()
    c["weight"].requires_grad_()
    refs = d["refs"]
    if refs is not None:
        refs = {o: {k: v.to(device) for k, v in r.items()} for o, r in refs.items()}
    return P.Case(**c), refs
