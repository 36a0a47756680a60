"""Mid-iteration training checkpoints and the per-iteration state that links iterations.

Training checkpoint (``iter_t/checkpoint/``): ``accelerator.save_state`` writes the model
(safetensors), the optimizer and every process's RNG states — sharded correctly under FSDP or
DeepSpeed — and the main process adds ``trainer_state.pt`` (progress counters, LR scheduler,
α schedule). Everything is written into ``checkpoint.tmp`` and moved into place with
``replace_dir`` once all processes are done, so a crash leaves the previous checkpoint usable.

Iteration state (``iter_t/state.pt``): global step and α schedule after iteration t, read by
iteration t+1 (with θ_{t+1} from ``iter_t/model/``).
"""
from __future__ import annotations

import contextlib
import io
import logging
import re
import shutil
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Optional

import torch

from .io_utils import atomic_write_bytes, find_dir, replace_dir

TRAINER_STATE = "trainer_state.pt"


@dataclass
class Progress:
    iteration: int
    step_in_iteration: int = 0  # optimizer steps done in this iteration
    global_step: int = 0  # optimizer steps done since the start of the run
    nan_streak: int = 0  # consecutive skipped (non-finite) steps


def _save_torch(path, obj) -> None:
    buf = io.BytesIO()
    torch.save(obj, buf)
    atomic_write_bytes(path, buf.getvalue())


def _load_torch(path):
    # weights_only: the files hold tensors and plain containers; never unpickle arbitrary objects.
    return torch.load(path, map_location="cpu", weights_only=True)


def tied_aliases(accelerator) -> set:
    """State-dict names of the parameters that share storage with an earlier one (a tied lm_head),
    in every model the accelerator prepared: safetensors stores each storage once, so these are
    the names accelerate drops on save and the model re-ties on load."""
    names = set()
    for wrapped in getattr(accelerator, "_models", []):
        model = accelerator.unwrap_model(wrapped)
        seen = set()
        for name, p in model.named_parameters(remove_duplicate=False):
            key = (p.device, p.data_ptr())
            if key in seen:
                names.add(name)
            seen.add(key)
    return names


class _DropExpectedTieNotice(logging.Filter):
    """Drops accelerate's "Removed shared tensor {...} while saving" notice when every name in it is
    an expected tied alias; a notice naming anything else still shows."""

    def __init__(self, expected: set):
        super().__init__()
        self.expected = expected

    def filter(self, record: logging.LogRecord) -> bool:
        msg = record.getMessage()  # accelerate may prefix it with "[RANK r] "
        if "Removed shared tensor" not in msg:
            return True
        names = set(re.findall(r"'([^']+)'", msg.partition("Removed shared tensor")[2].split(" while saving")[0]))
        return not (names and names <= self.expected)


@contextlib.contextmanager
def _quiet_about_tied_weights(accelerator):
    log = logging.getLogger("accelerate.utils.other")
    filt = _DropExpectedTieNotice(tied_aliases(accelerator))
    log.addFilter(filt)
    try:
        yield
    finally:
        log.removeFilter(filt)


def save_training_checkpoint(accelerator, final_dir, progress: Progress, lr_scheduler, alpha_schedule) -> None:
    final_dir = Path(final_dir)
    tmp = final_dir.with_name(final_dir.name + ".tmp")
    if accelerator.is_main_process:
        if tmp.exists():
            shutil.rmtree(tmp)
        tmp.mkdir(parents=True)
    accelerator.wait_for_everyone()
    with _quiet_about_tied_weights(accelerator):
        accelerator.save_state(str(tmp), safe_serialization=True)
    if accelerator.is_main_process:
        _save_torch(tmp / TRAINER_STATE, {
            "progress": asdict(progress),
            "lr_scheduler": lr_scheduler.state_dict(),
            "alpha_schedule": alpha_schedule.state_dict(),
        })
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        replace_dir(tmp, final_dir)
    accelerator.wait_for_everyone()


def read_training_progress(final_dir) -> Optional[Progress]:
    """The progress stored in the latest complete checkpoint, or None when there is none."""
    found = find_dir(final_dir)
    if found is None or not (found / TRAINER_STATE).exists():
        return None
    return Progress(**_load_torch(found / TRAINER_STATE)["progress"])


def load_training_checkpoint(accelerator, final_dir, lr_scheduler, alpha_schedule) -> Optional[Progress]:
    """Restore model, optimizer, RNG, LR and α schedules in place; returns the progress (or None)."""
    found = find_dir(final_dir)
    if found is None or not (found / TRAINER_STATE).exists():
        return None
    accelerator.load_state(str(found))
    state = _load_torch(found / TRAINER_STATE)
    lr_scheduler.load_state_dict(state["lr_scheduler"])
    alpha_schedule.load_state_dict(state["alpha_schedule"])
    return Progress(**state["progress"])


def remove_training_checkpoint(accelerator, final_dir) -> None:
    if accelerator.is_main_process:
        final_dir = Path(final_dir)
        for suffix in ("", ".old", ".tmp"):
            d = final_dir.with_name(final_dir.name + suffix)
            if d.exists():
                shutil.rmtree(d)
    accelerator.wait_for_everyone()


def save_iteration_state(path, *, global_step: int, alpha: float, alpha_schedule) -> None:
    _save_torch(path, {"global_step": global_step, "alpha": alpha, "alpha_schedule": alpha_schedule.state_dict()})


def load_iteration_state(path) -> dict:
    return _load_torch(path)
