"""The Hugging Face ``Trainer`` collator now lives in the library: ``iris_kernels.integrations.hf``
(``PairCollator``, the row format ``ROW_KEYS``, ``score_pairs``, ``render_pair``). This module
re-exports it for the harness and adds ``pair_features``, which turns the harness's own outputs
into rows of that format.
"""
from __future__ import annotations

from typing import Dict, List

from iris_kernels.integrations.hf import ROW_KEYS, PairCollator, from_trl_row, render_pair, score_pairs

__all__ = ["ROW_KEYS", "PairCollator", "pair_features", "from_trl_row", "render_pair", "score_pairs"]


def pair_features(examples, synthetic_rows, reference_rows) -> List[Dict]:
    """The harness's outputs as ``PairCollator`` rows: ``train.data.Example`` objects, the generated
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
        out.append({"prompt_ids": list(ex.prompt_ids), "annotated_ids": list(ex.response_ids),
                    "synthetic_ids": list(syn["response_ids"]), "ref_annotated_logps": ref["ref_real"],
                    "ref_synthetic_logps": ref["ref_syn"]})
    return out
