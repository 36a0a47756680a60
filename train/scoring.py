"""Phase b: reference log-probs s_θt of every annotated and synthetic response, computed ONCE.

Training then needs a single model: the frozen opponent θ_t exists only as these stored numbers.
Scoring runs the same ``SequenceLogprobs`` module on batches built by the same ``pair_batch`` as
training, so at the first step of an iteration the policy reproduces them (g = 0) up to
floating-point reassociation. Sums are stored; with ``loss.length_normalize`` the trainer
divides by the stored token counts.
"""
from __future__ import annotations

from contextlib import nullcontext
from typing import Dict, List, Sequence

import torch

from .data import IGNORE_INDEX, Example, pair_batch


def scored_token_counts(labels: torch.Tensor) -> torch.Tensor:
    # sequence_logprobs shifts: position t-1 predicts labels[t], so labels[:, 0] is never scored.
    return (labels[:, 1:] != IGNORE_INDEX).sum(1)


@torch.no_grad()
def reference_logprobs(seq_model, examples: Sequence[Example], synthetic: Sequence[Dict], *, pad_id: int,
                       max_length: int, autocast=nullcontext) -> List[Dict]:
    """Rows {prompt_id, prompt_sha, ref_real, ref_syn, n_real, n_syn} for one batch of prompts."""
    for ex, row in zip(examples, synthetic):
        if row["prompt_id"] != ex.prompt_id or row["prompt_sha"] != ex.prompt_sha:
            raise ValueError(f"synthetic row {row['prompt_id']} does not belong to prompt {ex.prompt_id}")
    device = next(seq_model.parameters()).device
    batch = pair_batch(examples, [r["response_ids"] for r in synthetic], pad_id, max_length)
    batch = {k: v.to(device) for k, v in batch.items()}
    was_training = seq_model.training
    seq_model.eval()
    try:
        with autocast():
            s = seq_model(**batch)
    finally:
        seq_model.train(was_training)
    B = len(examples)
    s = s.float().tolist()
    n = scored_token_counts(batch["labels"]).tolist()
    return [
        {"prompt_id": ex.prompt_id, "prompt_sha": ex.prompt_sha, "ref_real": s[b], "ref_syn": s[B + b],
         "n_real": n[b], "n_syn": n[B + b]}
        for b, ex in enumerate(examples)
    ]


def heldout_gap_features(examples: Sequence[Example], synthetic: Sequence[Dict], reference: Sequence[Dict], *,
                         stop_ids, vocab_size: int, rank: int = 0, world: int = 1):
    """This rank's (strided) held-out rows as the gap-adaptive schedule's features, (real, syn).

    Both sides the same way (``iris_kernels.two_sample.response_features``): the response ids
    as scored (cut to the stored scored-token count), the stored opponent log-probs s_θt, and
    the finished flag = the scored response ends with a stop token.
    """
    from iris_kernels.two_sample import response_features

    stops = set(int(s) for s in stop_ids)
    idx = range(rank, len(examples), world)
    real_ids = [list(examples[i].response_ids)[: max(reference[i]["n_real"], 0)] for i in idx]
    syn_ids = [list(synthetic[i]["response_ids"])[: max(reference[i]["n_syn"], 0)] for i in idx]

    def side(ids, key, count):
        logps = torch.tensor([reference[i][key] for i in idx], dtype=torch.float64)
        return response_features(ids, logps, [bool(r) and r[-1] in stops for r in ids], vocab_size=vocab_size,
                                 lengths=[reference[i][count] for i in idx])

    return side(real_ids, "ref_real", "n_real"), side(syn_ids, "ref_syn", "n_syn")
