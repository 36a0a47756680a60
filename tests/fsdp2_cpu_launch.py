"""Run train/selfplay.py under accelerate's FSDP2 on CPU processes (test shim).

accelerate 1.15 turns ``distributed_type: FSDP`` into FSDP only for accelerator device types
(CUDA, XPU, ...); on a CPU-only machine it silently falls back to plain multi-CPU DDP. This shim,
started by ``accelerate launch --config_file train/configs/accelerate/fsdp2.yaml``, switches the
state to FSDP after accelerate has built it, so the harness runs accelerate's own FSDP2 code
(``fully_shard`` of every decoder layer and the root, sharded state dicts, gathered full state
dict at save) over a gloo group. Nothing else is changed.
"""
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import accelerate.state as _state  # noqa: E402
from accelerate.utils import DistributedType  # noqa: E402

_orig_init = _state.AcceleratorState.__init__


def _init(self, *args, fsdp_plugin=None, **kwargs):
    _orig_init(self, *args, fsdp_plugin=fsdp_plugin, **kwargs)
    if fsdp_plugin is not None and self.distributed_type == DistributedType.MULTI_CPU:
        # Both shared states: every later AcceleratorState() copies PartialState's fields back.
        _state.PartialState._shared_state["distributed_type"] = DistributedType.FSDP
        self.distributed_type = DistributedType.FSDP
        self.fsdp_plugin = fsdp_plugin


def _report_units(prepare):
    def wrapped(accelerator, model):
        from torch.distributed.fsdp import FSDPModule

        model = prepare(accelerator, model)
        units = sum(isinstance(m, FSDPModule) for m in model.modules())
        print(f"[fsdp2_cpu_launch] rank {accelerator.process_index}: {units} FSDP2 units", file=sys.stderr)
        return model

    return wrapped


if os.environ.get("ACCELERATE_USE_FSDP", "false").lower() == "true":
    import accelerate.accelerator as _accelerator

    _state.AcceleratorState.__init__ = _init
    # The test reads this line to know that the model really went through fully_shard.
    _accelerator.fsdp2_prepare_model = _report_units(_accelerator.fsdp2_prepare_model)

from train.selfplay import cli  # noqa: E402

if __name__ == "__main__":
    sys.exit(cli())
