"""Annotated conversations -> token ids, rendered ONCE with the tokenizer's chat template.

A row is ``{"messages": [{"role": ..., "content": ...}, ...]}`` (plus optional ``id`` and
``answer``). The prompt is every message up to and including the last user turn; the response
is the final assistant turn. ``render`` is the only place a prompt is turned into tokens: the
generator feeds ``Example.prompt_ids`` to the model and the trainer builds its sequences from
the same ``Example.prompt_ids``, so generation and training see identical prompts by
construction (and every generated row records ``prompt_sha`` so that a mismatch is caught).
"""
from __future__ import annotations

import hashlib
import json
import warnings
from dataclasses import dataclass, replace
from pathlib import Path
from typing import List, Optional, Sequence

import torch

from iris_kernels.integrations.hf import pad_sequences as hf_pad_sequences

from .config import ConfigError, InputFileError
from .io_utils import read_jsonl

IGNORE_INDEX = -100


@dataclass(frozen=True)
class Example:
    prompt_id: int  # position in the (filtered) split; the key of every generated / scored row
    id: str
    prompt_ids: tuple
    response_ids: tuple  # annotated response, ending with the stop token unless cut by max_length
    answer: Optional[str]
    prompt_sha: str


def prompt_sha(prompt_ids: Sequence[int]) -> str:
    return hashlib.sha1(json.dumps(list(prompt_ids)).encode()).hexdigest()[:16]


def with_previous_synthetic(examples: Sequence[Example], synthetic: Sequence[dict],
                            previous: Sequence[dict]) -> tuple:
    """SPIN's data mixing (Chen et al. 2024, §5.1: from iteration 1 on, the previous iteration's
    synthetic responses are kept beside the new ones): the n prompts twice, the second copy with
    prompt_id n + i and paired with y'_{t-1}. Returns (examples, synthetic) of length 2n; every
    phase keys rows by prompt_id, so the copies are scored and trained as rows of their own."""
    n = len(examples)
    if len(synthetic) != n or len(previous) != n:
        raise ValueError(f"train.mix_previous_synthetic: {n} prompts, {len(synthetic)} new and {len(previous)} "
                         f"previous synthetic rows")
    for ex, row in zip(examples, previous):
        if row["prompt_id"] != ex.prompt_id or row["prompt_sha"] != ex.prompt_sha:
            raise ValueError(f"train.mix_previous_synthetic: the previous iteration's row {row['prompt_id']} "
                             f"does not belong to prompt {ex.prompt_id}")
    copies = [replace(ex, prompt_id=n + ex.prompt_id) for ex in examples]
    return list(examples) + copies, list(synthetic) + [{**r, "prompt_id": n + r["prompt_id"]} for r in previous]


# ----------------------------------------------------------------------------- loading


def load_rows(source: str, *, split: str, key: str, limit: Optional[int] = None) -> List[dict]:
    """Rows from a JSONL file, or from a `datasets` folder / id when `datasets` is importable.

    ``key`` is the config key that named the source, so a missing file says which setting to fix.
    """
    path = Path(source)
    if path.suffix in (".jsonl", ".json"):
        if not path.is_file():
            raise InputFileError(f"{key}: dataset file not found: {source}")
        try:
            rows = read_jsonl(path)
        except ValueError as err:  # a line that is not JSON: the message names the file and line
            raise ConfigError(f"{key}: {err}") from None
        except UnicodeDecodeError as err:
            raise ConfigError(f"{key}: {source} is not a UTF-8 text file ({err.reason})") from None
    else:
        try:
            import datasets  # optional
        except ImportError:
            raise InputFileError(
                f"{key}: {source!r} is not a .jsonl file and the `datasets` package is not installed "
                "to load it as a dataset folder or hub id"
            ) from None
        try:
            if path.is_dir() and any((path / f).exists() for f in ("dataset_dict.json", "dataset_info.json")):
                ds = datasets.load_from_disk(str(path))
                if isinstance(ds, datasets.DatasetDict):
                    ds = ds[split]
            else:
                ds = datasets.load_dataset(source, split=split)
        except FileNotFoundError as e:
            raise InputFileError(f"{key}: dataset not found: {source} ({e})") from None
        rows = [ds[i] for i in range(min(limit, len(ds)) if limit else len(ds))]
    return rows[:limit] if limit else rows


def split_messages(messages, where: str):
    """(prompt messages, response text); the prompt ends with the last user turn."""
    if not isinstance(messages, list) or len(messages) < 2:
        raise ConfigError(f"{where}: 'messages' must be a list of at least a user and an assistant turn")
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or not isinstance(m.get("role"), str) or not isinstance(m.get("content"), str):
            raise ConfigError(f"{where}: message {i} must be {{'role': str, 'content': str}}, got {m!r}")
    if messages[-1]["role"] != "assistant" or messages[-2]["role"] != "user":
        raise ConfigError(f"{where}: the conversation must end with a user turn followed by an assistant turn")
    return messages[:-1], messages[-1]["content"]


def stop_token_ids(tokenizer, generation_config=None) -> List[int]:
    """Token ids that end a response: the tokenizer's eos plus the model's generation eos ids."""
    ids = []
    for src in (getattr(generation_config, "eos_token_id", None), tokenizer.eos_token_id):
        if src is None:
            continue
        for i in src if isinstance(src, (list, tuple)) else [src]:
            if i not in ids:
                ids.append(int(i))
    if not ids:
        raise ValueError("the tokenizer has no eos_token and the model's generation config no eos_token_id")
    return ids


def render(tokenizer, prompt_messages, response: str, stop_ids: Sequence[int]):
    """(prompt_ids, response_ids) with the chat template: ``iris_kernels.integrations.hf.render_pair``
    (the prompt with the generation prompt, the response cut after its first stop token), so the
    harness and a user's own ``Trainer`` build the same rows."""
    from iris_kernels.integrations.hf import render_pair

    return render_pair(tokenizer, prompt_messages, response, list(stop_ids))


def first_turn(messages):
    """The conversation up to and including the first assistant turn (system turns kept)."""
    for i, m in enumerate(messages):
        if isinstance(m, dict) and m.get("role") == "assistant":
            return messages[: i + 1]
    return messages


def build_examples(rows, tokenizer, stop_ids, *, messages_field: str, answer_field: str,
                   max_prompt_length: int, max_length: int, name: str, first_turn_only: bool = False) -> List[Example]:
    """Render rows; prompts longer than max_prompt_length are dropped (a cut template is broken)."""
    out, dropped = [], 0
    for i, row in enumerate(rows):
        where = f"{name} row {i}" + (f" (id {row['id']!r})" if isinstance(row, dict) and "id" in row else "")
        if not isinstance(row, dict) or messages_field not in row:
            raise ConfigError(f"{where}: missing the '{messages_field}' field (data.messages_field)")
        messages = row[messages_field]
        if first_turn_only and isinstance(messages, list):
            messages = first_turn(messages)
        prompt_messages, response = split_messages(messages, where)
        p, r = render(tokenizer, prompt_messages, response, stop_ids)
        if len(p) > max_prompt_length:
            dropped += 1
            continue
        r = r[: max_length - len(p)]
        # A checkable answer belongs to the final turn; with first_turn_only it no longer applies.
        answer = None if first_turn_only else row.get(answer_field)
        out.append(Example(len(out), str(row.get("id", i)), tuple(p), tuple(r),
                           None if answer is None else str(answer), prompt_sha(p)))
    if dropped:
        warnings.warn(f"{name}: dropped {dropped} of {len(rows)} rows whose prompt exceeds data.max_prompt_length")
    if not out:
        raise ConfigError(f"{name}: no usable rows (all {len(rows)} prompts exceed data.max_prompt_length?)")
    return out


# ----------------------------------------------------------------------------- batches


# Right-padded input_ids / attention_mask / labels (prompt and padding -> IGNORE_INDEX): the one
# implementation lives with the collator users import (iris_kernels.integrations.hf).
pad_sequences = hf_pad_sequences


def pair_batch(examples: Sequence[Example], synthetic: Sequence[Sequence[int]], pad_id: int, max_length: int):
    """One batch of 2B rows: the B annotated sequences first, then the B synthetic ones, paired by
    position (row b and row B + b share prompt b). Used by scoring and training alike, so the
    reference log-probs and the policy log-probs are computed on identically built sequences."""
    if len(examples) != len(synthetic):
        raise ValueError(f"{len(examples)} examples but {len(synthetic)} synthetic responses")
    seqs, plens = [], []
    for resp_of in (lambda b: examples[b].response_ids, lambda b: synthetic[b]):
        for b, ex in enumerate(examples):
            seqs.append((list(ex.prompt_ids) + list(resp_of(b)))[:max_length])
            plens.append(len(ex.prompt_ids))
    return pad_sequences(seqs, plens, pad_id)


# ----------------------------------------------------------------------------- order of training


def epoch_order(n: int, *, seed: int, iteration: int, epoch: int) -> List[int]:
    """A permutation of 0..n-1 that depends only on (seed, iteration, epoch): a resumed run, or one
    with a different number of processes, visits the same global batches in the same order."""
    from .generation import batch_seed

    g = torch.Generator().manual_seed(batch_seed(seed, iteration, "epoch", epoch))
    return torch.randperm(n, generator=g).tolist()


def step_micro_batches(n: int, step: int, *, per_device: int, accumulation: int, rank: int, world: int,
                       seed: int, iteration: int) -> List[List[int]]:
    """Prompt indices of this rank's micro-batches for optimizer step ``step`` of an iteration.

    The global batch of a step is world x accumulation x per_device prompts of the epoch's order
    (an incomplete last batch is dropped, so every step and every rank has the same row counts).
    """
    G = per_device * accumulation * world
    steps_per_epoch = n // G
    if steps_per_epoch < 1:
        raise ValueError(f"{n} training prompts cannot fill one global batch of {G} prompts")
    epoch, j = divmod(step, steps_per_epoch)
    chosen = epoch_order(n, seed=seed, iteration=iteration, epoch=epoch)[j * G : (j + 1) * G]
    return [chosen[(a * world + rank) * per_device : (a * world + rank + 1) * per_device] for a in range(accumulation)]
