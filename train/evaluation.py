"""Phase d: held-out metrics of θ_{t+1} against the opponent θ_t.

* nll: per-token NLL of the annotated held-out responses, Σ −s / Σ tokens.
* reward_margin: mean of g(real) − g(synthetic) with g = β(s_θ{t+1} − s_θt), the synthetic
  responses sampled from θ_t for the held-out prompts in phase a, s_θt stored in phase b.
* win_rate: fraction of prompts with g(real) > g(synthetic).
* ess_real / ess_syn: effective sample size 1/Σw² of the IRIS weights over the held-out set,
  w_R = softmax((α−1)·g_R), w_S = softmax(α·g_S), also as a fraction of the set (…_frac).
* accuracy: exact match of the greedy answer with the row's checkable answer.

Every rank evaluates a strided slice; sums and the g values are gathered so that all ranks
return the same numbers.
"""
from __future__ import annotations

import math
from contextlib import nullcontext
from typing import Dict, Optional, Sequence

import torch

from .data import Example, pair_batch
from .generation import generate_responses
from .scoring import scored_token_counts


def ess(logits: torch.Tensor) -> float:
    """1/Σw² of w = softmax(logits) (fp64): N for uniform weights, 1 when one sample takes all."""
    w = torch.softmax(logits.double(), 0)
    return float(1.0 / (w * w).sum())


def _gather_floats(values, accelerator) -> torch.Tensor:
    if accelerator is None or accelerator.num_processes == 1:
        return torch.tensor(values, dtype=torch.float64)
    from accelerate.utils import gather_object

    return torch.tensor(gather_object(list(values)), dtype=torch.float64)


def normalize_answer(text: str) -> str:
    return " ".join(text.strip().split())


@torch.no_grad()
def evaluate(seq_model, model, tokenizer, examples: Sequence[Example], *, synthetic=None, reference=None,
             beta: float = 1.0, alpha: Optional[float] = None, stop_ids, pad_id: int, max_length: int,
             batch_size: int, max_new_tokens: int, accuracy: bool = True, accelerator=None,
             autocast=nullcontext) -> Dict[str, float]:
    """Metrics on the held-out examples; margin/win-rate/ESS only when synthetic and reference
    rows (aligned with examples) are given, i.e. not for θ_0 before any iteration."""
    rank = accelerator.process_index if accelerator is not None else 0
    world = accelerator.num_processes if accelerator is not None else 1
    mine = list(range(rank, len(examples), world))
    device = next(seq_model.parameters()).device
    was_training = seq_model.training
    seq_model.eval()
    nll, tokens, g_real, g_syn, correct, answered = 0.0, 0, [], [], 0, 0
    try:
        for start in range(0, len(mine), batch_size):
            idx = mine[start : start + batch_size]
            exs = [examples[i] for i in idx]
            # Without synthetic rows the annotated response stands in for both halves of the pair
            # batch; only the annotated half is read.
            if synthetic is not None:
                syn = [synthetic[i]["response_ids"] for i in idx]
            else:
                syn = [e.response_ids for e in exs]
            batch = {k: v.to(device) for k, v in pair_batch(exs, syn, pad_id, max_length).items()}
            with autocast():
                s = seq_model(**batch).double().cpu()
            n = scored_token_counts(batch["labels"]).cpu()
            B = len(exs)
            nll += float(-s[:B].sum())
            tokens += int(n[:B].sum())
            if synthetic is not None:
                ref_real = torch.tensor([reference[i]["ref_real"] for i in idx], dtype=torch.float64)
                ref_syn = torch.tensor([reference[i]["ref_syn"] for i in idx], dtype=torch.float64)
                g_real += (beta * (s[:B] - ref_real)).tolist()
                g_syn += (beta * (s[B:] - ref_syn)).tolist()
            if accuracy:
                to_check = [e for e in exs if e.answer is not None]
                if to_check:
                    rows = generate_responses(model, tokenizer, to_check, stop_ids=stop_ids,
                                              max_new_tokens=max_new_tokens, do_sample=False)
                    correct += sum(normalize_answer(r["response"]) == normalize_answer(e.answer)
                                   for r, e in zip(rows, to_check))
                    answered += len(to_check)
    finally:
        seq_model.train(was_training)

    sums = _gather_floats([nll, tokens, correct, answered], accelerator).reshape(-1, 4).sum(0)
    out = {"nll": float(sums[0] / sums[1]) if sums[1] > 0 else math.nan, "eval_prompts": len(examples)}
    if accuracy and sums[3] > 0:
        out["accuracy"] = float(sums[2] / sums[3])
    if synthetic is not None:
        gr = _gather_floats(g_real, accelerator)
        gs = _gather_floats(g_syn, accelerator)
        out["reward_margin"] = float((gr - gs).mean())
        out["win_rate"] = float((gr > gs).double().mean())
        if alpha is not None and math.isfinite(alpha):
            out["alpha"] = alpha
            out["ess_real"] = ess((alpha - 1.0) * gr)
            out["ess_syn"] = ess(alpha * gs)
            out["ess_real_frac"] = out["ess_real"] / len(gr)
            out["ess_syn_frac"] = out["ess_syn"] / len(gs)
    return out


def lm_eval_scores(model, tokenizer, tasks, *, batch_size: int) -> Dict[str, float]:
    """lm-evaluation-harness scores of the in-memory model (main process only), flattened to
    ``lm_eval/<task>/<metric>``. Needs the ``lm_eval`` package; its tasks fetch their data sets,
    so this is for machines with hub access (or a warm cache), not for the offline tests."""
    import lm_eval
    from lm_eval.models.huggingface import HFLM

    results = lm_eval.simple_evaluate(model=HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size),
                                      tasks=list(tasks))
    out = {}
    for task, metrics in results["results"].items():
        for name, value in metrics.items():
            if isinstance(value, (int, float)) and not isinstance(value, bool) and "stderr" not in name:
                out[f"lm_eval/{task}/{name}"] = float(value)
    return out
