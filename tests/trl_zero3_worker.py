"""Worker of tests/test_integrations_trl_zero3.py, one per process:
``python -m torch.distributed.run --nproc_per_node 2 tests/trl_zero3_worker.py OUT_DIR``.

One SGD step of SelfPlayTrainer (IRIS, stored reference log-probs) under DeepSpeed ZeRO-3 on CPU
processes, every parameter partitioned. transformers' TrainingArguments on a machine without CUDA
builds a DeepSpeed state in which every process is rank 0 of 1; the public-API recipe used here:
a PartialState over gloo made first (with ACCELERATE_USE_DEEPSPEED set, as `accelerate launch`
sets it) and ``accelerator_config={"use_configured_state": True}``. Rank 0 writes θ_1 − θ_0
(gathered) and the logged step to OUT_DIR/zero3.pt.
"""
import os
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(HERE.parent), str(HERE)]
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402


def main(out_dir):
    from accelerate import PartialState

    os.environ["ACCELERATE_USE_DEEPSPEED"] = "true"
    state = PartialState(cpu=False, backend="gloo")
    import deepspeed

    import test_integrations_trl as T
    from iris_kernels.integrations.trl import SelfPlayTrainer

    tok = T._tokenizer()
    model = T._model(tok, tied=False)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    # gradient_clipping 0: the one-process reference does not clip (max_grad_norm=0), and without the
    # key the engine would clip at 1.0.
    ds = {"train_micro_batch_size_per_gpu": 2, "gradient_accumulation_steps": 1, "zero_allow_untested_optimizer": True,
          "gradient_clipping": 0.0,
          "zero_optimization": {"stage": 3, "stage3_param_persistence_threshold": 0}}
    args = T._sgd_args(Path(out_dir) / f"rank{state.process_index}", loss_name="iris", alpha=1.5, scope="global",
                       precompute_ref_log_probs=True, per_device_train_batch_size=2, use_cpu=False, deepspeed=ds,
                       ddp_backend="gloo", accelerator_config={"use_configured_state": True})
    trainer = SelfPlayTrainer(model, args=args, train_dataset=T._rows(ref=True), processing_class=tok)
    assert trainer.accelerator.num_processes == 2 and trainer.accelerator.distributed_type.name == "DEEPSPEED"
    trainer.train()
    head = model.lm_head.weight  # partitioned by the engine that train() built
    partitioned = bool(head.numel() == 0 and hasattr(head, "ds_id"))
    params = dict(model.named_parameters())
    with deepspeed.zero.GatheredParameters(list(params.values()), modifier_rank=None):
        delta = {n: p.detach().clone() - before[n] for n, p in params.items()}
    if state.is_main_process:
        torch.save({"delta": delta, "log": trainer.state.log_history[0], "partitioned": partitioned},
                   Path(out_dir) / "zero3.pt")
    torch.distributed.barrier()


if __name__ == "__main__":
    main(sys.argv[1])
