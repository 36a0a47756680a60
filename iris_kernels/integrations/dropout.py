"""Every dropout of a policy off, for self-play training (issue 19).

Why. The reference log-probs s_θt are scored with the model in eval mode; training then runs the
same weights in train mode. With dropout active the two disagree at θ = θ_t: the first step's
IRIS loss is not 0 (+0.0057 for GPT-2's default 0.1, +0.032 for a Llama with
``attention_dropout: 0.1``), g = β (s_θ − s_ref) ≠ 0 where it must vanish, and two forwards of
one batch differ (the step normaliser's statistics pass assumes they agree). TRL's
``disable_dropout_in_model`` sets ``p = 0`` on ``nn.Dropout`` modules only, which misses the
functional dropout of Hugging Face attention (``dropout=self.attention_dropout if
self.training``), e.g. Llama / Qwen2 / Mistral ``attention_dropout``.

What. ``disable_dropout(model)`` sets ``p = 0`` on every ``nn.Dropout*`` module and 0.0 on every
float attribute of a module whose name says dropout (``attention_dropout``, ``dropout``,
``hidden_dropout``, ``*_pdrop``, ...), which is what the attention functions read at forward
time. The model config is left alone, so a saved checkpoint keeps the dropout it was given.
The model stays in train mode (gradient checkpointing and other train-only behaviour are kept).
"""
from __future__ import annotations

from typing import List

import torch

__all__ = ["disable_dropout"]


def _is_dropout_name(name: str) -> bool:
    name = name.lower()
    return "dropout" in name or name.endswith("pdrop")


def disable_dropout(model: torch.nn.Module) -> List[str]:
    """Turn off every dropout of ``model`` in place; returns the names changed (for logging).

    Raises TypeError if ``model`` is not an ``nn.Module``.
    """
    if not isinstance(model, torch.nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    changed = []
    for module_name, module in model.named_modules():
        if isinstance(module, torch.nn.modules.dropout._DropoutNd):
            if module.p != 0:
                module.p = 0.0
                changed.append(module_name)
            continue
        for attr, value in list(vars(module).items()):
            if (_is_dropout_name(attr) and isinstance(value, (int, float)) and not isinstance(value, bool)
                    and value != 0):
                setattr(module, attr, 0.0)
                changed.append(f"{module_name}.{attr}" if module_name else attr)
    return changed
