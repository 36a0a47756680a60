"""Self-play losses in a Hugging Face ``Trainer``: the dataset row format, the scoring pass that
fills in the opponent's log-probs, and a shuffle-safe collator.

``SelfPlayLoss(..., num_real=n, ref_logps=r)`` reads rows ``[0, n)`` of a batch as the
**annotated** responses (the data set's own answers) and rows ``[n, 2n)`` as the **synthetic**
ones (the opponent θ_t's samples of the same prompts), annotated row i paired with synthetic row
n + i, and ``ref_logps`` as one summed reference log-prob per row in that order. A ``Trainer``
shuffles its dataset, so a dataset of single rows loses that layout. Here the dataset holds one
row per *prompt*, and ``PairCollator`` lays out each batch after the shuffle.

The dataset row (a dict; ``ROW_KEYS``)::

    prompt_ids            list[int]  the prompt's tokens, chat template applied with the generation prompt
    annotated_ids         list[int]  the annotated response's tokens (what follows the prompt), stop token included
    synthetic_ids         list[int]  the opponent's sampled response to the same prompt
    ref_annotated_logps   float      the opponent's summed log-prob of annotated_ids after prompt_ids (nats)
    ref_synthetic_logps   float      the same for synthetic_ids

``render_pair`` tokenises a conversation into ``prompt_ids`` / ``annotated_ids``;
``score_pairs`` computes the two ``ref_*_logps`` under the opponent, once, with the same row
layout the collator builds, so at θ = θ_t the policy's log-probs equal them and the first IRIS
loss is 0. TRL's preference format names the same fields ``prompt_ids`` / ``chosen_ids`` /
``rejected_ids`` / ``ref_chosen_logps`` / ``ref_rejected_logps`` (chosen = annotated,
rejected = synthetic); ``from_trl_row`` converts one of its rows (e.g. the harness's
``iter_t/trl_pairs-train.jsonl``).

Importing this module needs torch only; ``transformers`` is needed by the model and tokenizer
you pass. A complete example: ``examples/hf_trainer.py`` in the repository.
"""
from __future__ import annotations

import math
import numbers
from typing import Dict, List, Mapping, Optional, Sequence, Tuple

import torch

from ..logprobs import sequence_logprobs

__all__ = ["ROW_KEYS", "PairCollator", "render_pair", "score_pairs", "from_trl_row"]

IGNORE_INDEX = -100
ROW_KEYS = ("prompt_ids", "annotated_ids", "synthetic_ids", "ref_annotated_logps", "ref_synthetic_logps")
_TRL_KEYS = {"prompt_ids": "prompt_ids", "chosen_ids": "annotated_ids", "rejected_ids": "synthetic_ids",
             "ref_chosen_logps": "ref_annotated_logps", "ref_rejected_logps": "ref_synthetic_logps"}


def _ids(feature: Mapping, key: str, i: int) -> List[int]:
    value = feature[key]
    if isinstance(value, torch.Tensor):
        if value.dim() != 1 or value.dtype.is_floating_point or value.dtype == torch.bool:
            raise TypeError(f"features[{i}]['{key}'] must be a 1-D integer tensor, got {value.dtype} "
                            f"of shape {tuple(value.shape)}")
        value = value.tolist()
    if isinstance(value, (str, bytes)) or not isinstance(value, Sequence) or not all(
            isinstance(t, numbers.Integral) and not isinstance(t, bool) for t in value):
        raise TypeError(f"features[{i}]['{key}'] must be a sequence of token ids (ints)")
    return list(value)


def pad_sequences(seqs: Sequence[Sequence[int]], prompt_lens: Sequence[int], pad_token_id: int) -> Dict[str, torch.Tensor]:
    """Right-padded input_ids / attention_mask / labels (prompt and padding labelled -100; labels
    equal input_ids on response tokens: the Hugging Face convention, position t-1 predicts t)."""
    T = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), T), pad_token_id, dtype=torch.long)
    mask = torch.zeros((len(seqs), T), dtype=torch.long)
    labels = torch.full((len(seqs), T), IGNORE_INDEX, dtype=torch.long)
    for b, (s, p) in enumerate(zip(seqs, prompt_lens)):
        ids[b, : len(s)] = torch.tensor(s, dtype=torch.long)
        mask[b, : len(s)] = 1
        labels[b, p: len(s)] = ids[b, p: len(s)]
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


class PairCollator:
    """Collate dataset rows (``ROW_KEYS``) into the ``[annotated; synthetic]`` batch of ``SelfPlayLoss``.

    Args:
        pad_token_id: id used to right-pad ``input_ids`` (an int).
        max_length: cut each prompt + response to this many tokens (None: no cut). Use the value
            the scoring pass used (``score_pairs``), so the reference log-probs match the rows.
        with_reference: False collates rows without ``ref_*_logps`` (what ``score_pairs`` does);
            the batch then has no ``ref_logps``.

    Call with a list of B rows (token ids as lists of ints or 1-D integer tensors; log-probs as
    numbers). Returns a dict of tensors: ``input_ids``, ``attention_mask``, ``labels`` (int64,
    ``[2B, T]``: the B annotated rows, then the B synthetic rows in the same prompt order; prompt
    and padding labelled -100) and ``ref_logps`` (fp32, ``[2B]``: ref_annotated_logps...,
    ref_synthetic_logps...). Use ``num_real = batch["input_ids"].shape[0] // 2`` with ``SelfPlayLoss``.

    Raises ValueError / TypeError naming the row and key on a malformed row (a missing key, a
    non-integer token id, an empty prompt, a prompt leaving no room for a response within
    ``max_length``, a NaN log-prob).
    """

    def __init__(self, pad_token_id: int, *, max_length: Optional[int] = None, with_reference: bool = True):
        if isinstance(pad_token_id, bool) or not isinstance(pad_token_id, numbers.Integral):
            raise TypeError(f"pad_token_id must be an int, got {type(pad_token_id).__name__}")
        if max_length is not None and (isinstance(max_length, bool) or not isinstance(max_length, int)
                                       or max_length < 2):
            raise ValueError(f"max_length must be an int >= 2 or None, got {max_length!r}")
        self.pad_token_id = int(pad_token_id)
        self.max_length = max_length
        self.with_reference = bool(with_reference)

    def __call__(self, features: Sequence[Mapping]) -> Dict[str, torch.Tensor]:
        if len(features) == 0:
            raise ValueError("features is empty: a batch needs at least one row")
        keys = ROW_KEYS if self.with_reference else ROW_KEYS[:3]
        prompts, annotated, synthetic, ref_a, ref_s = [], [], [], [], []
        for i, f in enumerate(features):
            missing = [k for k in keys if k not in f]
            if missing:
                hint = " (a TRL row? convert it with from_trl_row)" if "chosen_ids" in f else ""
                raise ValueError(f"features[{i}] lacks {missing}: each row is one prompt with both responses "
                                 f"and their reference log-probs ({', '.join(keys)}){hint}")
            prompt = _ids(f, "prompt_ids", i)
            if not prompt:
                raise ValueError(f"features[{i}]['prompt_ids'] is empty")
            if self.max_length is not None and len(prompt) >= self.max_length:
                raise ValueError(f"features[{i}]: the prompt ({len(prompt)} tokens) leaves no room for a response "
                                 f"within max_length={self.max_length}")
            prompts.append(prompt)
            annotated.append(_ids(f, "annotated_ids", i))
            synthetic.append(_ids(f, "synthetic_ids", i))
            if not self.with_reference:
                continue
            for key, out in (("ref_annotated_logps", ref_a), ("ref_synthetic_logps", ref_s)):
                v = f[key]
                v = v.item() if isinstance(v, torch.Tensor) and v.numel() == 1 else v  # data loading, not a hot path
                if isinstance(v, bool) or not isinstance(v, numbers.Real):
                    raise TypeError(f"features[{i}]['{key}'] must be a number (a summed log-prob), got "
                                    f"{type(v).__name__}")
                if math.isnan(v):
                    raise ValueError(f"features[{i}]['{key}'] is NaN")
                out.append(float(v))
        # Every annotated row first, then the synthetic rows in the same prompt order, so annotated
        # row b and synthetic row B + b share prompt b.
        seqs, plens = [], []
        for responses in (annotated, synthetic):
            for p, r in zip(prompts, responses):
                s = p + r
                seqs.append(s[: self.max_length] if self.max_length is not None else s)
                plens.append(len(p))
        batch = pad_sequences(seqs, plens, self.pad_token_id)
        if self.with_reference:
            batch["ref_logps"] = torch.tensor(ref_a + ref_s, dtype=torch.float32)
        return batch


def render_pair(tokenizer, prompt_messages: Sequence[Mapping], response: str,
                stop_ids: Optional[Sequence[int]] = None) -> Tuple[List[int], List[int]]:
    """``(prompt_ids, response_ids)`` of a conversation, with the tokenizer's chat template.

    The prompt is rendered with ``add_generation_prompt=True`` (exactly what generation sees); the
    response is the text the template adds after it for the assistant turn, tokenised on its own
    (as a model generates it: never merged across the boundary) and cut after its first stop token
    (``stop_ids``; default the tokenizer's ``eos_token_id``), so an annotated response ends the way
    a sampled one does. A template that adds no stop token gets the first stop id appended.

    Args: ``tokenizer`` a Hugging Face tokenizer with a chat template; ``prompt_messages`` the
    turns up to and including the last user turn (``{"role", "content"}`` dicts); ``response``
    the assistant's answer (text). Raises ValueError when the template renders the prompt
    differently with and without the assistant turn (no response can be split off it), or when
    there is no stop id.
    """
    if stop_ids is None:
        eos = tokenizer.eos_token_id
        stop_ids = [] if eos is None else ([eos] if isinstance(eos, int) else list(eos))
    if not stop_ids:
        raise ValueError("stop_ids: the tokenizer has no eos_token_id; pass the end-of-turn token ids")
    prompt_text = tokenizer.apply_chat_template(list(prompt_messages), tokenize=False, add_generation_prompt=True)
    full_text = tokenizer.apply_chat_template(
        list(prompt_messages) + [{"role": "assistant", "content": response}], tokenize=False)
    if not full_text.startswith(prompt_text):
        raise ValueError(
            "the chat template renders the prompt differently with and without the assistant turn, so "
            f"no response can be split off it:\nprompt: {prompt_text!r}\nfull:   {full_text!r}")
    prompt_ids = tokenizer(prompt_text, add_special_tokens=False)["input_ids"]
    response_ids = tokenizer(full_text[len(prompt_text):], add_special_tokens=False)["input_ids"]
    cut = next((i for i, t in enumerate(response_ids) if t in stop_ids), None)
    response_ids = response_ids[: cut + 1] if cut is not None else response_ids + [stop_ids[0]]
    return list(prompt_ids), list(response_ids)


@torch.no_grad()
def score_pairs(model, rows: Sequence[Mapping], *, pad_token_id: int, max_length: Optional[int] = None,
                batch_size: int = 8, backend: str = "auto", softcap: Optional[float] = None) -> List[Dict]:
    """The rows with ``ref_annotated_logps`` / ``ref_synthetic_logps`` filled in by ``model``.

    ``model`` is the opponent θ_t (the model training starts from): a Hugging Face causal LM whose
    ``get_decoder()`` returns the final-norm hidden states and ``get_output_embeddings()`` the
    lm_head. Each log-prob is ``sequence_logprobs`` of the row ``PairCollator(pad_token_id,
    max_length=max_length)`` builds (summed over the response tokens, fp32 accumulation, in nats),
    computed once in eval mode without gradients; the model's train/eval mode is restored after.
    ``softcap``: the model's final-logit soft-cap (Gemma 2), if it has one; pass the same to the loss.

    Args: ``rows`` mappings with ``prompt_ids``, ``annotated_ids``, ``synthetic_ids`` (other keys
    are kept); ``batch_size`` prompts per forward pass. Returns new dicts, the input order kept.
    Raises what ``PairCollator`` raises on a malformed row, ValueError for ``batch_size`` < 1.
    """
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive int, got {batch_size!r}")
    collate = PairCollator(pad_token_id, max_length=max_length, with_reference=False)
    decoder, head = model.get_decoder(), model.get_output_embeddings()
    device = head.weight.device
    was_training = model.training
    model.eval()
    out: List[Dict] = []
    try:
        for lo in range(0, len(rows), batch_size):
            chunk = rows[lo: lo + batch_size]
            batch = collate(chunk)
            hidden = decoder(input_ids=batch["input_ids"].to(device),
                             attention_mask=batch["attention_mask"].to(device)).last_hidden_state
            s = sequence_logprobs(hidden, head.weight, batch["labels"].to(device), bias=head.bias,
                                  softcap=softcap, backend=backend).tolist()  # once per batch: data preparation
            n = len(chunk)
            for i, row in enumerate(chunk):
                out.append(dict(row, ref_annotated_logps=s[i], ref_synthetic_logps=s[n + i]))
    finally:
        model.train(was_training)
    return out


def from_trl_row(row: Mapping) -> Dict:
    """A TRL preference row with token ids (``prompt_ids`` / ``chosen_ids`` / ``rejected_ids`` /
    ``ref_chosen_logps`` / ``ref_rejected_logps``, as the harness's ``trl_pairs-*.jsonl`` hold
    them) as a row of this module's format (chosen → annotated, rejected → synthetic). Other keys
    are dropped. Raises KeyError naming the missing TRL key."""
    missing = [k for k in _TRL_KEYS if k not in row]
    if missing:
        raise KeyError(f"row lacks the TRL keys {missing} (needs {', '.join(_TRL_KEYS)})")
    return {ours: row[theirs] for theirs, ours in _TRL_KEYS.items()}
