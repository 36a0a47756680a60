"""What the harness does differently under DeepSpeed ZeRO-3 (``accelerate launch --config_file
train/configs/accelerate/deepspeed-zero3.yaml``), each at the cause of a failure seen without it.

* ``make_accelerator``: accelerate 1.15 on a machine without CUDA gets DeepSpeed wrong silently:
  ``cpu=True`` runs plain DDP (the DeepSpeed plugin is dropped) and ``cpu=False`` alone leaves
  every process believing it is rank 0 of 1. Under a DeepSpeed launch without CUDA the
  accelerator is built with ``cpu=False`` and a gloo process group (public API only); DeepSpeed
  then picks its CPU accelerator by itself.
* ``whole_model_loading``: accelerate registers its DeepSpeed config with transformers
  (``HfDeepSpeedConfig``) whatever ``zero3_init_flag`` says, and transformers then builds every
  model under ``deepspeed.zero.Init``: already partitioned, so the first evaluation fails with
  "'weight' must be 2-D". The harness needs θ_t whole on every process (generation, scoring and
  evaluation run outside the DeepSpeed engine, each process on its own rows); the engine
  partitions the model when ``accelerator.prepare`` wraps it for training. So models are
  built and loaded with that registration hidden.
* ``grad_norm_tensor``: under DeepSpeed ``clip_grad_norm_`` returns the engine's global gradient
  norm as a Python float (or None); the step's finite check needs a tensor.
* ``fill_micro_batch_size``: the shipped JSON leaves ``train_micro_batch_size_per_gpu`` at
  "auto", which accelerate fills from a prepared DataLoader; the harness prepares none, so it
  fills it from ``train.per_device_batch_size`` (DeepSpeed uses it only for its bookkeeping).

Gradient clipping under DeepSpeed is the engine's own (``gradient_clipping`` in the DeepSpeed
JSON, applied inside its step); ``optim.max_grad_norm`` is not used there.
"""
from __future__ import annotations

import contextlib
import os

import torch


def deepspeed_launch() -> bool:
    """True when started by ``accelerate launch`` with a DeepSpeed config."""
    return os.environ.get("ACCELERATE_USE_DEEPSPEED", "false").lower() == "true"


def make_accelerator(mixed_precision: str):
    from accelerate import Accelerator

    if deepspeed_launch() and not torch.cuda.is_available():
        from accelerate.utils import InitProcessGroupKwargs

        return Accelerator(mixed_precision=mixed_precision, cpu=False,
                           kwargs_handlers=[InitProcessGroupKwargs(backend="gloo")])
    # cpu=True without CUDA: under torchrun / `accelerate launch --multi_gpu` this gives one gloo
    # process group over CPU processes (accelerate's own `--cpu` flag runs a single process).
    return Accelerator(mixed_precision=mixed_precision, cpu=not torch.cuda.is_available())


@contextlib.contextmanager
def whole_model_loading():
    """Build or load a transformers model whole (not ZeRO-3 partitioned) even though accelerate
    registered a ZeRO-3 config with transformers; the registration is restored afterwards."""
    try:
        from transformers.integrations import deepspeed as hf_deepspeed
    except ImportError:  # pragma: no cover - transformers is a requirement of the harness
        yield
        return
    saved = getattr(hf_deepspeed, "_hf_deepspeed_config_weak_ref", None)
    hf_deepspeed._hf_deepspeed_config_weak_ref = None
    try:
        yield
    finally:
        hf_deepspeed._hf_deepspeed_config_weak_ref = saved


def grad_norm_tensor(value) -> torch.Tensor:
    """clip_grad_norm_'s result as a float32 tensor: a tensor (DDP), a DTensor (FSDP2: its full
    value), or a float (DeepSpeed: the norm the engine computed in the step it just took inside
    ``accelerator.backward``); None (no norm reported) becomes 0."""
    if value is None:
        return torch.zeros(())
    if hasattr(value, "full_tensor"):
        value = value.full_tensor()
    return torch.as_tensor(value).detach().float()


def fill_micro_batch_size(accelerator, per_device_batch_size: int) -> None:
    plugin = getattr(accelerator.state, "deepspeed_plugin", None)
    if plugin is None:
        return
    config = plugin.deepspeed_config
    if config.get("train_micro_batch_size_per_gpu", "auto") == "auto":
        config["train_micro_batch_size_per_gpu"] = per_device_batch_size
