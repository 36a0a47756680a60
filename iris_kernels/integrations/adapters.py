"""The weight a fused head must use when the lm_head carries a PEFT adapter (issue 19).

The fused op reads the lm_head's weight tensor and never calls the module, so an adapter placed
on the output projection (``LoraConfig(target_modules=[..., "lm_head"])``) would add nothing to
the loss and get no gradient, without a word. ``head_weight`` returns what the module computes:

* a plain module: its own ``weight`` and ``bias``;
* a PEFT LoRA ``Linear`` with active, unmerged adapters: the effective weight
  W + sum_a scaling_a * B_a A_a (PEFT's ``get_delta_weight``, differentiable, so the adapters
  get exactly the gradient a module call would give them: d loss / dB_a = scaling_a *
  (d loss / dW_eff) A_a^T and d loss / dA_a = scaling_a * B_a^T (d loss / dW_eff)). It costs one
  extra [V, H] tensor (and its gradient) per call;
* merged adapters (already in W) and disabled adapters (the reference pass): the base weight;
* anything else it cannot represent as a weight (other PEFT tuners, LoRA variants such as DoRA,
  a LoRA bias, a LoRA dropout active in training): ValueError naming the module.
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch

__all__ = ["head_weight"]


def _is_peft_layer(module) -> bool:
    # Without importing peft (an optional dependency): every PEFT tuner layer derives from it.
    return any(cls.__name__ == "BaseTunerLayer" for cls in type(module).__mro__)


def head_weight(head: torch.nn.Module, name: str = "lm_head") -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
    """(weight [V, H], bias [V] or None) that reproduce ``head``'s output projection.

    ``name`` names the module in errors. Raises ValueError for an adapter that cannot be
    expressed as a weight (see the module docstring) and for a module without a weight.
    """
    if not _is_peft_layer(head):
        if not isinstance(getattr(head, "weight", None), torch.Tensor):
            raise ValueError(f"{name} ({type(head).__name__}) has no weight tensor to score with")
        return head.weight, getattr(head, "bias", None)
    base = head.get_base_layer()
    weight, bias = base.weight, getattr(base, "bias", None)
    if getattr(head, "disable_adapters", False):
        return weight, bias
    pending = [a for a in head.active_adapters if a not in getattr(head, "merged_adapters", [])]
    if not pending:
        return weight, bias
    what = f"{name} carries the PEFT adapter(s) {pending} ({type(head).__module__}.{type(head).__name__})"
    is_lora_linear = type(head).__name__ == "Linear" and hasattr(head, "lora_A") and hasattr(head, "get_delta_weight")
    if not is_lora_linear:
        raise ValueError(f"{what}, which the fused log-prob op cannot apply (it reads the weight, never calls "
                         f"the module): merge the adapter (merge_and_unload) or leave {name} out of target_modules")
    for a in pending:
        if getattr(head, "use_dora", {}).get(a, False) or getattr(head, "lora_variant", {}).get(a) is not None:
            raise ValueError(f"{what}: a LoRA variant (e.g. DoRA) is not a weight the fused op can use; "
                             f"merge it or leave {name} out of target_modules")
        if getattr(head, "lora_bias", {}).get(a, False):
            raise ValueError(f"{what}: lora_bias=True is not supported on {name}; leave {name} out of target_modules")
        drop = head.lora_dropout[a]
        if isinstance(drop, torch.nn.Dropout) and drop.training and drop.p > 0:
            raise ValueError(f"{what}: its lora_dropout (p = {drop.p}) acts on the input and cannot be folded "
                             f"into the weight; disable dropout (the self-play default) or set lora_dropout=0")
    for a in pending:
        weight = weight + head.get_delta_weight(a).to(weight.dtype)
    return weight, bias
