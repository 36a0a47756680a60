"""Phase b: reference log-probs s_θt of every annotated and synthetic response, computed ONCE.

Training then needs a single model: the frozen opponent θ_t exists only as these stored numbers.

* The TRAINING split is scored by :func:`score_in_training_layout`: in the micro-batches of the
  iteration's first epoch (the same prompts together, the same ``pair_batch`` padding), through
  ``PolicyLoss.sequence_logps`` (the body, lm_head, kernel and options of the training forward),
  under the same autocast. The numbers the loss compares with are therefore the ones the policy
  reproduces bit for bit at θ = θ_t: g = 0 exactly at the first step in every precision, instead
  of up to the batch-shape-dependent rounding of a differently batched pass (on a GPU, bf16 kernels
  picked by shape move per-token log-probs by ~0.05 nats; TRL issue 6789). The rows also carry
  ``loss_ref_real`` / ``loss_ref_syn``, the values in the loss's units (per-token means under
  ``loss.length_normalize``), which the trainer uses as they are.
* The held-out split (evaluation and the gap-adaptive α) is scored by :func:`reference_logprobs`
  in evaluation batches, as before. Sums are stored; under ``loss.length_normalize`` the trainer
  divides by the stored token counts where no ``loss_ref_*`` is present.
"""
from __future__ import annotations

import os
from contextlib import nullcontext
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence

import torch

from .data import IGNORE_INDEX, Example, epoch_order, pair_batch
from .faults import maybe_kill
from .io_utils import append_jsonl, atomic_write_jsonl, read_jsonl


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


def training_layout(n: int, *, per_device: int, accumulation: int, world: int, seed: int,
                    iteration: int) -> List[List[List[int]]]:
    """Per rank, the prompt-index micro-batches to score: first those of the iteration's first epoch
    in training order (``data.step_micro_batches``: the same prompts together as the steps that
    train on them), then the prompts no step of that epoch uses (the dropped incomplete global
    batch), in chunks of ``per_device`` dealt round-robin to the ranks."""
    G = per_device * accumulation * world
    steps = n // G
    order = epoch_order(n, seed=seed, iteration=iteration, epoch=0)
    out: List[List[List[int]]] = [[] for _ in range(world)]
    for j in range(steps):
        chosen = order[j * G : (j + 1) * G]
        for a in range(accumulation):
            for r in range(world):
                out[r].append(list(chosen[(a * world + r) * per_device : (a * world + r + 1) * per_device]))
    rest = sorted(order[steps * G :])
    for c, lo in enumerate(range(0, len(rest), per_device)):
        out[c % world].append(rest[lo : lo + per_device])
    return out


@torch.no_grad()
def score_in_training_layout(module, examples: Sequence[Example], synthetic: Sequence[Dict], *,
                             batches: Sequence[Sequence[int]], out_dir, rank: int, world: int, pad_id: int,
                             max_length: int, autocast=nullcontext, length_normalize: bool = False,
                             log: Optional[Callable[[str], None]] = None) -> None:
    """Score this rank's ``batches`` (from :func:`training_layout`) with ``module.sequence_logps``
    (a ``PolicyLoss``), resumably: rows go to ``reference-train-layout-r{rank}of{world}.jsonl.partial``
    one micro-batch at a time (fsynced), and a finished rank file is written atomically; a rerun
    skips micro-batches already written. Rows: {prompt_id, prompt_sha, ref_real, ref_syn, n_real,
    n_syn, loss_ref_real, loss_ref_syn}; under ``length_normalize`` the loss values are per-token
    means and the sums are those means times the token counts."""
    final = Path(out_dir) / f"reference-train-layout-r{rank}of{world}.jsonl"
    if final.exists():
        return
    partial = final.with_name(final.name + ".partial")
    done = set()
    if partial.exists():
        kept = read_jsonl(partial, tolerate_torn_tail=True)
        atomic_write_jsonl(partial, kept)
        done = {r["prompt_id"] for r in kept}
        if log is not None:
            log(f"scoring the training split: resuming after {len(done)} rows")
    device = next(module.parameters()).device
    was_training = module.training
    module.eval()
    written = len(done)
    try:
        for idx in batches:
            if all(i in done for i in idx):
                continue
            exs = [examples[i] for i in idx]
            syn = [synthetic[i] for i in idx]
            for ex, row in zip(exs, syn):
                if row["prompt_id"] != ex.prompt_id or row["prompt_sha"] != ex.prompt_sha:
                    raise ValueError(f"synthetic row {row['prompt_id']} does not belong to prompt {ex.prompt_id}")
            batch = {k: v.to(device) for k, v in pair_batch(exs, [r["response_ids"] for r in syn], pad_id,
                                                                max_length).items()}
            with autocast():
                s = module.sequence_logps(batch["input_ids"], batch["attention_mask"], batch["labels"])
            s = s.float().tolist()
            n = scored_token_counts(batch["labels"]).tolist()
            B = len(exs)
            rows = []
            for b, ex in enumerate(exs):
                real, fake = s[b], s[B + b]
                rows.append({"prompt_id": ex.prompt_id, "prompt_sha": ex.prompt_sha,
                             "ref_real": real * n[b] if length_normalize else real,
                             "ref_syn": fake * n[B + b] if length_normalize else fake,
                             "n_real": n[b], "n_syn": n[B + b], "loss_ref_real": real, "loss_ref_syn": fake})
            append_jsonl(partial, rows)
            written += len(rows)
            maybe_kill("score", written)
    finally:
        module.train(was_training)
    rows = read_jsonl(partial, tolerate_torn_tail=False) if partial.exists() else []
    atomic_write_jsonl(final, sorted(rows, key=lambda r: r["prompt_id"]))
    if partial.exists():
        os.unlink(partial)


def load_training_layout(examples: Sequence[Example], *, out_dir, world: int) -> List[Dict]:
    """Every rank's rows of :func:`score_in_training_layout`, one per prompt in prompt order;
    raises on a gap, a duplicate or a row made from another prompt rendering."""
    by_id: Dict[int, Dict] = {}
    for r in range(world):
        path = Path(out_dir) / f"reference-train-layout-r{r}of{world}.jsonl"
        if not path.exists():
            raise FileNotFoundError(f"{path} is missing: the scoring phase has not finished")
        for row in read_jsonl(path):
            pid = row["prompt_id"]
            if pid in by_id:
                raise ValueError(f"{path}: prompt {pid} scored twice")
            if not 0 <= pid < len(examples) or row["prompt_sha"] != examples[pid].prompt_sha:
                raise ValueError(f"{path}: row {pid} was made from a different prompt rendering; use a fresh output_dir")
            by_id[pid] = row
    if sorted(by_id) != list(range(len(examples))):
        missing = sorted(set(range(len(examples))) - set(by_id))[:5]
        raise ValueError(f"the training-layout reference misses prompts {missing}...")
    return [by_id[i] for i in range(len(examples))]
