"""Phase d: held-out metrics of θ_{t+1} against the opponent θ_t.

* nll: per-token NLL of the annotated held-out responses, Σ −s / Σ tokens.
* reward_margin: mean of g(real) − g(synthetic) with g = β(s_θ{t+1} − s_θt), the synthetic
  responses sampled from θ_t for the held-out prompts in phase a, s_θt stored in phase b.
* win_rate: fraction of prompts with g(real) > g(synthetic).
* ess_real / ess_syn: effective sample size 1/Σw² of the IRIS weights over the held-out set,
  w_R = softmax((α−1)·g_R), w_S = softmax(α·g_S), also as a fraction of the set (…_frac).
* accuracy: exact match of the greedy answer with the row's checkable answer.
* choice_accuracy: multiple choice by likelihood, the way lm-evaluation-harness scores its
  multiple-choice tasks: the row's answer against ``choices − 1`` distractors (other held-out
  answers of the same kind, numeric or not), each scored as the full response (answer and stop
  token) after the prompt; correct when the true answer's summed log-prob is strictly the highest.
  Chance is 1/choices. Unlike exact match it needs no generation and does not depend on the model
  answering tersely, so it is not stuck at 0 for a small instruct model that explains before it
  answers (SmolLM2-135M: see ``choice_candidates``).

Every rank evaluates a strided slice; sums and the g values are gathered so that all ranks
return the same numbers.
"""
from __future__ import annotations

import math
import random
from contextlib import nullcontext
from typing import Dict, Optional, Sequence

import torch

from .data import Example, pad_sequences, pair_batch
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


def _answer_kind(answer: str) -> str:
    a = answer.strip()
    return "number" if a.lstrip("-").isdigit() else "text"


def choice_candidates(examples: Sequence[Example], tokenizer, stop_ids, *, choices: int):
    """Per example, the response ids of [true answer, distractor, ...] (true first), or None.

    The distractors are up to ``choices − 1`` distinct answers of other examples of the same kind
    (numeric or not), drawn with a generator seeded by the prompt id, so every rank and every
    evaluation of a run uses the same candidates. A candidate's response is the annotated
    response with its leading answer text replaced: the decoded annotated response (special
    tokens kept) must start with the answer, else the example gets None (skipped and not
    counted). Tokenised like ``data.render`` tokenises responses, cut after the first stop token.
    """
    if choices < 2:
        raise ValueError(f"choices must be >= 2, got {choices}")
    pools: Dict[str, list] = {}
    for e in examples:
        if e.answer is not None and e.answer.strip():
            pool = pools.setdefault(_answer_kind(e.answer), [])
            if e.answer.strip() not in pool:
                pool.append(e.answer.strip())
    out = []
    for e in examples:
        if e.answer is None or not e.answer.strip():
            out.append(None)
            continue
        answer = e.answer.strip()
        text = tokenizer.decode(list(e.response_ids), skip_special_tokens=False)
        lead = len(text) - len(text.lstrip())
        if not text[lead:].startswith(answer):
            out.append(None)
            continue
        others = sorted(a for a in pools[_answer_kind(answer)] if a != answer)
        if not others:
            out.append(None)
            continue
        picks = random.Random(e.prompt_id).sample(others, min(choices - 1, len(others)))
        cands = [list(e.response_ids)]
        for a in picks:
            ids = tokenizer(text[:lead] + a + text[lead + len(answer):], add_special_tokens=False)["input_ids"]
            cut = next((i for i, t in enumerate(ids) if t in stop_ids), None)
            cands.append(ids[: cut + 1] if cut is not None else ids + [stop_ids[0]])
        out.append(cands)
    return out


@torch.no_grad()
def evaluate(seq_model, model, tokenizer, examples: Sequence[Example], *, synthetic=None, reference=None,
             beta: float = 1.0, alpha: Optional[float] = None, stop_ids, pad_id: int, max_length: int,
             batch_size: int, max_new_tokens: int, accuracy: bool = True, choices: int = 4, accelerator=None,
             autocast=nullcontext) -> Dict[str, float]:
    """Metrics on the held-out examples; margin/win-rate/ESS only when synthetic and reference
    rows (aligned with examples) are given, i.e. not for θ_0 before any iteration. With
    ``accuracy``, exact match of greedy answers and (``choices`` >= 2) the multiple-choice
    ``choice_accuracy`` over the examples that carry an answer; ``choices=0`` turns the latter off."""
    rank = accelerator.process_index if accelerator is not None else 0
    world = accelerator.num_processes if accelerator is not None else 1
    mine = list(range(rank, len(examples), world))
    device = next(seq_model.parameters()).device
    was_training = seq_model.training
    seq_model.eval()
    nll, tokens, g_real, g_syn, correct, answered = 0.0, 0, [], [], 0, 0
    chosen, offered = 0, 0
    candidates = choice_candidates(examples, tokenizer, stop_ids, choices=choices) \
        if accuracy and choices and choices >= 2 else [None] * len(examples)
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
            mc = [(examples[i], candidates[i]) for i in idx if candidates[i] is not None]
            if mc:
                seqs, plens, owner = [], [], []
                for j, (e, cands) in enumerate(mc):
                    for c in cands:
                        seqs.append((list(e.prompt_ids) + c)[:max_length])
                        plens.append(len(e.prompt_ids))
                        owner.append(j)
                b = {k: v.to(device) for k, v in pad_sequences(seqs, plens, pad_id).items()}
                with autocast():
                    sc = seq_model(**b).double().cpu()
                owner_t = torch.tensor(owner)
                for j in range(len(mc)):
                    s_j = sc[owner_t == j]
                    chosen += int(bool(s_j[0] > s_j[1:].max()))  # ties count as wrong
                    offered += 1
    finally:
        seq_model.train(was_training)

    sums = _gather_floats([nll, tokens, correct, answered, chosen, offered], accelerator).reshape(-1, 6).sum(0)
    out = {"nll": float(sums[0] / sums[1]) if sums[1] > 0 else math.nan, "eval_prompts": len(examples)}
    if accuracy and sums[3] > 0:
        out["accuracy"] = float(sums[2] / sums[3])
    if sums[5] > 0:
        out["choice_accuracy"] = float(sums[4] / sums[5])
        out["choice_prompts"] = int(sums[5])
        out["choices"] = choices
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
