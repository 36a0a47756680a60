"""Phase a: one sampled response per prompt from θ_t (and greedy answers for evaluation).

Prompts are the ``Example.prompt_ids`` that training uses (left-padded here, right-padded
there; padding is masked, so the model sees the same tokens). Each batch is sampled under its
own seed, derived from the run seed, the iteration, the split and the batch's first prompt_id:
a batch regenerated after a crash, or by another rank, draws the same samples.
"""
from __future__ import annotations

import hashlib
from typing import Dict, List, Sequence

import torch

from .config import GenerationConfig
from .data import Example


def batch_seed(*parts) -> int:
    digest = hashlib.sha256("/".join(map(str, parts)).encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


def left_pad(prompts: Sequence[Sequence[int]], pad_id: int, device):
    T = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), T), pad_id, dtype=torch.long)
    mask = torch.zeros((len(prompts), T), dtype=torch.long)
    for b, p in enumerate(prompts):
        ids[b, T - len(p):] = torch.tensor(p, dtype=torch.long)
        mask[b, T - len(p):] = 1
    return ids.to(device), mask.to(device)


def cut_at_stop(tokens: List[int], stop_ids: Sequence[int]):
    """(tokens up to and including the first stop token, whether one was found)."""
    for i, t in enumerate(tokens):
        if t in stop_ids:
            return tokens[: i + 1], True
    return tokens, False


@torch.no_grad()
def generate_responses(model, tokenizer, examples: Sequence[Example], *, stop_ids: Sequence[int],
                       max_new_tokens: int, do_sample: bool, temperature: float = 1.0, top_p: float = 1.0,
                       top_k: int = 0, seed: int = 0) -> List[Dict]:
    """One response per example: rows {prompt_id, id, prompt_sha, response_ids, response, finished}."""
    from transformers import GenerationConfig as HFGenerationConfig

    device = next(model.parameters()).device
    ids, mask = left_pad([ex.prompt_ids for ex in examples], tokenizer.pad_token_id, device)
    # An explicit config, so that sampling defaults shipped with a checkpoint (top_k=50,
    # repetition penalties, ...) never change what the run's config says.
    gen_config = HFGenerationConfig(
        do_sample=do_sample, max_new_tokens=max_new_tokens, pad_token_id=tokenizer.pad_token_id,
        eos_token_id=list(stop_ids), **(dict(temperature=temperature, top_p=top_p, top_k=top_k) if do_sample else {}),
    )
    was_training = model.training
    model.eval()
    try:
        # fork_rng: the sampler's seed must not disturb the training RNG stream (dropout, order).
        devices = [torch.cuda.current_device()] if device.type == "cuda" else []
        with torch.random.fork_rng(devices=devices):
            torch.manual_seed(seed)
            # synced_gpus=False: each process generates its own rows with a whole model. transformers
            # turns the sync on whenever a ZeRO-3 config is registered (accelerate registers one under
            # DeepSpeed), and then a process that has no rows left never joins: every process hangs.
            out = model.generate(input_ids=ids, attention_mask=mask, generation_config=gen_config,
                                 synced_gpus=False)
    finally:
        model.train(was_training)
    return rows_from_token_ids(examples, out[:, ids.shape[1]:].tolist(), tokenizer, stop_ids)


def rows_from_token_ids(examples: Sequence[Example], new_tokens: Sequence[Sequence[int]], tokenizer,
                        stop_ids: Sequence[int]) -> List[Dict]:
    """Rows {prompt_id, id, prompt_sha, response_ids, response, finished} from each example's
    generated token ids (any backend): cut after the first stop token (``finished``) or kept
    whole (the length limit hit; padding after a stop is cut with it)."""
    rows = []
    for ex, toks in zip(examples, new_tokens):
        resp, finished = cut_at_stop(list(toks), stop_ids)
        rows.append({
            "prompt_id": ex.prompt_id, "id": ex.id, "prompt_sha": ex.prompt_sha, "response_ids": resp,
            "response": tokenizer.decode(resp, skip_special_tokens=True), "finished": finished,
        })
    return rows


def make_sampler(model, tokenizer, cfg: GenerationConfig, *, stop_ids, seed_parts):
    """The ``process`` callback of run_sharded for the sampling phase."""
    do_sample = cfg.temperature > 0

    def process(batch: List[Example]) -> List[Dict]:
        return generate_responses(
            model, tokenizer, batch, stop_ids=stop_ids, max_new_tokens=cfg.max_new_tokens, do_sample=do_sample,
            temperature=cfg.temperature, top_p=cfg.top_p, top_k=cfg.top_k,
            seed=batch_seed(*seed_parts, batch[0].prompt_id),
        )

    return process
