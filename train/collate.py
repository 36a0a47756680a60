"""A shuffle-safe collator for training with ``SelfPlayLoss`` in a Hugging Face ``Trainer``.

``SelfPlayLoss(..., num_real=n)`` reads rows ``[0, n)`` of a batch as the annotated responses and
rows ``[n, 2n)`` as the synthetic ones, annotated row i paired with synthetic row n + i (SPIN and
DPO need the pairing; IRIS needs the split), and ``ref_logps`` as one reference log-prob per row in
that same order. A ``Trainer`` shuffles its dataset, so a dataset of single rows loses that layout.
The fix is to make one dataset item per *prompt* — its annotated and its synthetic response
together — and to lay the batch out here, after the shuffle:

    dataset item  {"prompt_ids": [...], "real_ids": [...], "syn_ids": [...], "ref_real": s, "ref_syn": s'}
    batch         input_ids / attention_mask / labels [2B, T]: B annotated rows, then the B synthetic
                  rows in the same prompt order; ref_logps [2B] fp32 (ref_real..., ref_syn...)

Rows are built exactly as ``train.data.pair_batch`` builds them for scoring (prompt + response,
cut to ``max_length``, right-padded, prompt and padding labelled -100), so reference log-probs
computed by ``train/scoring.py`` belong to the rows the policy is trained on.
"""
from __future__ import annotations

import math
import numbers
from typing import Dict, List, Mapping, Optional, Sequence

import torch

from .data import pad_sequences

PAIR_KEYS = ("prompt_ids", "real_ids", "syn_ids", "ref_real", "ref_syn")


class PairCollator:
    """Collate self-play pairs into the [annotated; synthetic] batch ``SelfPlayLoss`` expects.

    Args:
        pad_token_id: id used to right-pad ``input_ids`` (an int).
        max_length: cut each prompt + response to this many tokens (None: no cut), as the scoring
            pass did, so the reference log-probs match the rows.

    Call with a list of B feature mappings (keys ``PAIR_KEYS``; token ids as lists of ints or 1-D
    integer tensors, the reference log-probs as numbers). Returns a dict of tensors:
    ``input_ids``, ``attention_mask``, ``labels`` (int64, [2B, T]) and ``ref_logps`` (fp32, [2B]).
    Use ``num_real = batch["input_ids"].shape[0] // 2`` with ``SelfPlayLoss``.

    Raises ValueError / TypeError naming the feature and key on a malformed item.
    """

    def __init__(self, pad_token_id: int, *, max_length: Optional[int] = None):
        if isinstance(pad_token_id, bool) or not isinstance(pad_token_id, numbers.Integral):
            raise TypeError(f"pad_token_id must be an int, got {type(pad_token_id).__name__}")
        if max_length is not None and (isinstance(max_length, bool) or not isinstance(max_length, int)
                                       or max_length < 2):
            raise ValueError(f"max_length must be an int >= 2 or None, got {max_length!r}")
        self.pad_token_id = int(pad_token_id)
        self.max_length = max_length

    @staticmethod
    def _ids(feature: Mapping, key: str, i: int) -> List[int]:
        value = feature[key]
        if isinstance(value, torch.Tensor):
            if value.dim() != 1 or value.dtype.is_floating_point:
                raise TypeError(f"features[{i}]['{key}'] must be a 1-D integer tensor, got {value.dtype} "
                                f"of shape {tuple(value.shape)}")
            value = value.tolist()
        if not isinstance(value, Sequence) or not all(
                isinstance(t, numbers.Integral) and not isinstance(t, bool) for t in value):
            raise TypeError(f"features[{i}]['{key}'] must be a sequence of token ids (ints)")
        return list(value)

    def __call__(self, features: Sequence[Mapping]) -> Dict[str, torch.Tensor]:
        if len(features) == 0:
            raise ValueError("features is empty: a batch needs at least one pair")
        prompts, real, syn, ref_real, ref_syn = [], [], [], [], []
        for i, f in enumerate(features):
            missing = [k for k in PAIR_KEYS if k not in f]
            if missing:
                raise ValueError(f"features[{i}] lacks {missing}: each item is one prompt with both responses "
                                 f"and their reference log-probs ({', '.join(PAIR_KEYS)})")
            prompt = self._ids(f, "prompt_ids", i)
            if not prompt:
                raise ValueError(f"features[{i}]['prompt_ids'] is empty")
            if self.max_length is not None and len(prompt) >= self.max_length:
                raise ValueError(f"features[{i}]: the prompt ({len(prompt)} tokens) leaves no room for a response "
                                 f"within max_length={self.max_length}")
            prompts.append(prompt)
            real.append(self._ids(f, "real_ids", i))
            syn.append(self._ids(f, "syn_ids", i))
            for key, out in (("ref_real", ref_real), ("ref_syn", ref_syn)):
                v = f[key]
                v = v.item() if isinstance(v, torch.Tensor) and v.numel() == 1 else v  # data, not a hot path
                if isinstance(v, bool) or not isinstance(v, numbers.Real):
                    raise TypeError(f"features[{i}]['{key}'] must be a number (a summed log-prob), got "
                                    f"{type(v).__name__}")
                if math.isnan(v):
                    raise ValueError(f"features[{i}]['{key}'] is NaN")
                out.append(float(v))
        # The layout SelfPlayLoss reads: every annotated row first, then the synthetic rows in the
        # same prompt order, so annotated row b and synthetic row B + b share prompt b.
        seqs, plens = [], []
        for responses in (real, syn):
            for p, r in zip(prompts, responses):
                s = p + r
                seqs.append(s[: self.max_length] if self.max_length is not None else s)
                plens.append(len(p))
        batch = pad_sequences(seqs, plens, self.pad_token_id)
        batch["ref_logps"] = torch.tensor(ref_real + ref_syn, dtype=torch.float32)
        return batch


def pair_features(examples, synthetic_rows, reference_rows) -> List[Dict]:
    """The harness's outputs as ``PairCollator`` items: ``train.data.Example`` objects, the generated
    rows (``response_ids``) and the scored rows (``ref_real`` / ``ref_syn``) of the same prompts, in
    the same order. Refuses rows of another prompt (their ``prompt_id`` differs)."""
    if not len(examples) == len(synthetic_rows) == len(reference_rows):
        raise ValueError(f"{len(examples)} examples, {len(synthetic_rows)} synthetic rows and "
                         f"{len(reference_rows)} reference rows: one of each per prompt")
    out = []
    for ex, syn, ref in zip(examples, synthetic_rows, reference_rows):
        if syn["prompt_id"] != ex.prompt_id or ref["prompt_id"] != ex.prompt_id:
            raise ValueError(f"prompt {ex.prompt_id}: synthetic row {syn['prompt_id']} / reference row "
                             f"{ref['prompt_id']} belong to another prompt")
        out.append({"prompt_ids": list(ex.prompt_ids), "real_ids": list(ex.response_ids),
                    "syn_ids": list(syn["response_ids"]), "ref_real": ref["ref_real"], "ref_syn": ref["ref_syn"]})
    return out
