"""The loss side of one optimizer step, kept in one place so the training loop stays short.

A micro-batch holds B prompts as 2B rows: the B annotated sequences, then the B synthetic ones
(``num_real=B``: row b and row B + b share prompt b — the explicit pairing SPIN/DPO need), plus
the opponent's stored log-probs of both. ``PolicyLoss`` — the module accelerate wraps — runs
the model body, reads the lm_head weight and calls ``iris_kernels.SelfPlayLoss`` INSIDE its
forward, so FSDP / ZeRO-3 have the full weight there and the [tokens × vocab] logits are never
built.

Normalisation over an optimizer step (docs/math.md#normalisation-scopes):
* one micro-batch per step: SelfPlayLoss normalises over its own rows (``scope: rank``) or over
  every rank's rows with one all-gather (``scope: global``); no extra pass;
* gradient accumulation (A > 1) under rank/global: a no-grad forward over the A micro-batches
  fixes the step's statistics (``StepNormalizer``), then A forward/backward passes use them —
  exact, because θ does not change within a step. Under ``scope: micro`` each micro-batch is
  normalised alone and the A losses are averaged.
"""
from __future__ import annotations

from contextlib import nullcontext
from typing import Dict, List, Sequence

import torch
from torch import nn

from iris_kernels.module import SelfPlayLoss
from iris_kernels.schedules import make_schedule

from .config import LossConfig
from .data import IGNORE_INDEX, Example, pair_batch
from .faults import maybe_poison
from .modeling import body_hidden_states, output_projection


def build_alpha_schedule(cfg: LossConfig, total_steps: int):
    name = cfg.alpha_schedule
    if cfg.name != "iris":
        # Only IRIS reads α; an adaptive schedule here would measure a gap nobody uses (and a
        # held-out split the other losses do not need).
        return make_schedule("constant", alpha=cfg.alpha)
    if name in ("adaptive", "gap_adaptive"):
        return make_schedule("gap_adaptive", alpha_max=cfg.alpha_max, alpha_min=cfg.alpha_min, u_ref=cfg.gap_u_ref,
                             relative=cfg.gap_relative, monotone=cfg.gap_monotone)
    if name == "temperature_score":
        return make_schedule("temperature_score", alpha_max=cfg.alpha_max, alpha_min=cfg.alpha_min)
    if name == "constant":
        return make_schedule("constant", alpha=cfg.alpha)
    # linear / cosine: from alpha_max at the first step of the run to alpha_min at its last.
    return make_schedule(name, alpha_start=cfg.alpha_max, alpha_end=cfg.alpha_min, num_steps=max(total_steps, 1))


def build_criterion(cfg: LossConfig, alpha_schedule, softcap=None) -> SelfPlayLoss:
    """SelfPlayLoss from the config (softcap: the model's final logit cap, e.g. Gemma-2's); bad
    loss.options keys fail here, at start-up."""
    try:
        return SelfPlayLoss(
            cfg.name,
            softcap=softcap,
            alpha=alpha_schedule if cfg.name == "iris" else None,
            beta=None if cfg.name == "sft" else cfg.beta,
            ignore_index=IGNORE_INDEX,
            length_normalize=cfg.length_normalize and cfg.name != "sft",
            scope=cfg.scope,
            **cfg.options,
        )
    except (TypeError, ValueError) as e:
        raise type(e)(f"loss (loss.name={cfg.name!r}, loss.options={cfg.options}): {e}") from None


class PolicyLoss(nn.Module):
    """forward(batch) -> (loss, metrics); with ``normalizer=`` it records the batch in that
    StepNormalizer instead and returns None (the statistics pass of gradient accumulation)."""

    def __init__(self, model, criterion: SelfPlayLoss):
        super().__init__()
        self.model = model
        # Not registered as a submodule: its α schedule is checkpointed in trainer_state.pt, and
        # as module extra state it would have to go through model.safetensors, which holds tensors only.
        self.__dict__["criterion"] = criterion

    @property
    def _no_split_modules(self):
        # accelerate's FSDP transformer-based auto-wrap reads this from the module it prepares:
        # this wrapper, not the model. Forwarding it makes every decoder layer its own FSDP unit.
        return getattr(self.model, "_no_split_modules", None)

    def sequence_logps(self, input_ids, attention_mask, labels) -> torch.Tensor:
        """[2B] the per-row log-probs exactly as :meth:`forward` feeds them to the loss (same body,
        lm_head, kernel and options; per-token means under ``length_normalize``): the reference
        pass calls this on the training micro-batches so that g = 0 bit for bit at θ = θ_t."""
        from iris_kernels.sharding import full_weights

        hidden = body_hidden_states(self.model, input_ids, attention_mask)
        hidden, weight, bias, _ = output_projection(self.model, hidden)
        weight, bias = full_weights(hidden, weight=weight, bias=bias)
        return self.criterion._seq_logps(hidden, weight, labels, bias, None)

    def forward(self, input_ids, attention_mask, labels, ref_logps=None, *, num_real: int = 0, step=None, stats=None,
                normalizer=None, scores_only: bool = False):
        if scores_only:
            # Through the wrapped module's forward (FSDP2 / ZeRO-3 gather their shards only there).
            return self.sequence_logps(input_ids, attention_mask, labels)
        hidden = body_hidden_states(self.model, input_ids, attention_mask)
        hidden, weight, bias, softcap = output_projection(self.model, hidden)
        if softcap is not None and self.criterion.softcap != softcap:
            raise ValueError(f"the model caps its logits at {softcap}; SelfPlayLoss must use softcap={softcap}")
        if normalizer is not None:
            # criterion.observe, not StepNormalizer.observe(*split_logps(...)): it also records the
            # per-batch keywords a loss needs (SFT's token counts), as the loss call will use them.
            self.criterion.observe(normalizer, hidden, weight, labels, num_real=num_real, ref_logps=ref_logps, bias=bias)
            return None
        return self.criterion(hidden, weight, labels, num_real=num_real, ref_logps=ref_logps, bias=bias,
                              step=step, stats=stats)


def move_micro_batch(mb: Dict[str, torch.Tensor], device) -> Dict[str, torch.Tensor]:
    """The micro-batch on ``device``, except the labels when the device is not the host: SelfPlayLoss
    counts host labels there and moves them itself, so the kernels get the scored-row count as
    ``num_valid`` without a device read-back (iris_kernels.module.labels_for_op; issue 16, item 5).
    A wrapper that moves its inputs (DDP) hands the loss device labels: no count, same result."""
    keep_on_host = torch.device(device).type != "cpu"
    return {k: (v if (k == "labels" and keep_on_host) else v.to(device)) for k, v in mb.items()}


class Objective:
    def __init__(self, cfg: LossConfig, alpha_schedule, accelerator, softcap=None):
        self.cfg = cfg
        self.accelerator = accelerator
        self.criterion = build_criterion(cfg, alpha_schedule, softcap)

    def training_module(self, model) -> nn.Module:
        return PolicyLoss(model, self.criterion)

    def make_batch(self, examples: Sequence[Example], synthetic: Sequence[Dict], reference: Sequence[Dict], *,
                   pad_id: int, max_length: int) -> Dict[str, torch.Tensor]:
        for ex, syn, ref in zip(examples, synthetic, reference):
            if not (ex.prompt_sha == syn["prompt_sha"] == ref["prompt_sha"]):
                raise ValueError(f"prompt {ex.prompt_id}: generated / scored rows belong to a different prompt")
        batch = pair_batch(examples, [r["response_ids"] for r in synthetic], pad_id, max_length)
        if all("loss_ref_real" in r for r in reference):
            # Scored by PolicyLoss.sequence_logps on this very micro-batch layout (train/scoring.py):
            # already in the loss's units, and equal bit for bit to the policy's values at θ = θ_t.
            batch["ref_logps"] = torch.tensor([r["loss_ref_real"] for r in reference]
                                              + [r["loss_ref_syn"] for r in reference], dtype=torch.float32)
            return batch
        ref = torch.tensor([r["ref_real"] for r in reference] + [r["ref_syn"] for r in reference], dtype=torch.float32)
        if self.criterion.length_normalize:
            # The stored reference is a sum; the policy side is a per-token mean under this option.
            counts = [r["n_real"] for r in reference] + [r["n_syn"] for r in reference]
            ref = ref / torch.tensor(counts, dtype=torch.float32).clamp(min=1)
        batch["ref_logps"] = ref
        return batch

    @torch.no_grad()
    def abs_g_sums(self, wrapped, micro_batches: List[Dict], *, autocast=nullcontext) -> torch.Tensor:
        """[Σ|g|, count] (fp64, on the micro-batches' device) of g = β·(s_θ − s_ref) over the rows
        of these micro-batches, in the loss's units: at the first step of an iteration θ = θ_t, so
        any value ≠ 0 is the reference pass's numerical disagreement with the training pass.

        ``wrapped``: the prepared PolicyLoss (DDP / FSDP2 / DeepSpeed engine, or the module itself),
        called with ``scores_only=True``: sharded parameters are gathered only inside its forward."""
        beta = self.criterion.beta if self.criterion.beta is not None else 1.0
        total = None
        for mb in micro_batches:
            with autocast():
                s = wrapped(mb["input_ids"], mb["attention_mask"], mb["labels"], scores_only=True)
            g = beta * (s.double() - mb["ref_logps"].to(s.device).double())
            part = torch.stack([g.abs().sum(), g.new_full((), float(g.numel()))])
            total = part if total is None else total + part
        return total

    def forward_backward(self, wrapped, micro_batches: List[Dict], *, step: int, autocast=nullcontext):
        """Forward and backward of one optimizer step; returns (the step's loss, its metrics), detached.

        Gradients accumulate in .grad; the cross-rank gradient sync runs on the last micro-batch only.
        """
        acc = self.accelerator
        micro_batches = [move_micro_batch(mb, acc.device) for mb in micro_batches]
        A = len(micro_batches)
        scope = self.cfg.scope
        stats = None
        if A > 1 and scope != "micro":
            norm = self.criterion.make_step_normalizer(step=step)
            with torch.no_grad(), autocast():
                for mb in micro_batches:
                    wrapped(**mb, num_real=mb["ref_logps"].shape[0] // 2, normalizer=norm)
            stats = norm.stats
        total = None
        for a, mb in enumerate(micro_batches):
            sync = acc.no_sync(wrapped) if a < A - 1 else nullcontext()
            with sync:
                with autocast():
                    loss, metrics = wrapped(**mb, num_real=mb["ref_logps"].shape[0] // 2, step=step, stats=stats)
                loss = maybe_poison(loss, step + 1)
                if scope == "micro":
                    loss = loss / A  # each micro-batch is its own estimate of the step's loss: average
                acc.backward(loss)
            total = loss.detach() if total is None else total + loss.detach()
        # Under rank/global every micro-batch reports the step's loss; under micro, sum of loss/A = mean.
        step_loss = total if scope == "micro" else loss.detach()
        return step_loss, {k: v for k, v in metrics.items() if k != "loss"}
