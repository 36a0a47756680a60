"""Optimizer and learning-rate schedule for one self-play iteration (SPIN: RMSprop, warm-up 10%,
then linear decay to 0; a fresh optimizer each iteration, as each iteration is its own run)."""
from __future__ import annotations

import torch

from .config import OptimConfig


def lr_for_iteration(cfg: OptimConfig, iteration: int) -> float:
    if cfg.lr_per_iteration:
        return cfg.lr_per_iteration[min(iteration, len(cfg.lr_per_iteration) - 1)]
    return cfg.lr


def make_optimizer(params, cfg: OptimConfig, lr: float) -> torch.optim.Optimizer:
    params = [p for p in params if p.requires_grad]
    if cfg.optimizer == "rmsprop":
        return torch.optim.RMSprop(params, lr=lr, weight_decay=cfg.weight_decay, eps=cfg.eps)
    if cfg.optimizer == "adamw":
        return torch.optim.AdamW(params, lr=lr, weight_decay=cfg.weight_decay, betas=tuple(cfg.betas), eps=cfg.eps)
    raise ValueError(f"optim.optimizer must be rmsprop or adamw, got {cfg.optimizer!r}")


def warmup_linear_decay(optimizer, total_steps: int, warmup_steps: int) -> torch.optim.lr_scheduler.LambdaLR:
    """lr factor (k+1)/warmup for the first warmup steps (never 0 at step 0: a wasted step), then
    linear decay reaching 0 after total_steps."""
    if total_steps < 1:
        raise ValueError(f"total_steps must be >= 1, got {total_steps}")
    if not 0 <= warmup_steps < total_steps:
        raise ValueError(f"warmup_steps must be in [0, total_steps), got {warmup_steps} (total {total_steps})")

    def factor(k: int) -> float:
        if k < warmup_steps:
            return (k + 1) / warmup_steps
        return max(0.0, (total_steps - k) / (total_steps - warmup_steps))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def step_or_skip(accelerator, optimizer, loss, grad_norm) -> bool:
    """Take the optimizer step, or skip it when the loss or the gradient norm is non-finite on any
    process (the same decision everywhere: all-reduced). Returns True when skipped.

    One host sync per optimizer step: skipping needs a decision. Under fp16 mixed precision
    (accelerate's ``GradScaler``) a skipped step still ends the scaler's step: ``clip_grad_norm_``
    has unscaled the gradients and recorded their inf checks, so ``scaler.update()`` backs the
    scale off (an overflow) and resets the per-optimizer state. Without it the next step's
    ``unscale_()`` raises "unscale_() has already been called on this optimizer since the last
    update()", and fp16 scalers overflow in the first steps of most runs.
    """
    bad = (~torch.isfinite(loss.detach().float()) | ~torch.isfinite(grad_norm.detach().float())).float()
    skipped = bool(accelerator.reduce(bad.reshape(1).to(accelerator.device), "sum").item() > 0)
    if not skipped:
        optimizer.step()  # accelerate's optimizer: scaler.step() + scaler.update() under fp16
        return False
    scaler = getattr(accelerator, "scaler", None)
    if scaler is not None and scaler.is_enabled():
        inner = getattr(optimizer, "optimizer", optimizer)  # accelerate's AcceleratedOptimizer wraps it
        # Normally clip_grad_norm_ unscaled already; if not, unscale_ records the inf checks that
        # update() needs. (A non-finite loss with finite gradients counts as no overflow there.)
        # (The stage is GradScaler's private per-optimizer state; a missing entry means READY.)
        state = getattr(scaler, "_per_optimizer_states", {}).get(id(inner))
        if state is None or state["stage"].name == "READY":
            scaler.unscale_(inner)
        scaler.update()
    return True
