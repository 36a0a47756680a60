"""Worker of tests/test_zero3_op.py, one per process:
``python -m torch.distributed.run --nproc_per_node 2 tests/zero3_op_worker.py --tied 1 --out DIR``.

A tiny Llama whose lm_head is read inside the forward of the module the DeepSpeed ZeRO-3 engine
runs, then handed to ``sequence_logprobs``; ``stage3_param_persistence_threshold: 0`` makes
DeepSpeed partition every parameter, the head included (checked). Each process takes its half
of the batch; the engine averages the gradients over the processes, which is the gradient of
the whole batch's mean loss. The reference is the same model without DeepSpeed, in one process,
on the whole batch. Rank 0 writes both to DIR/result.pt. Then the misuse: the forward inside
``deepspeed.zero.GatheredParameters`` and the backward after it, whose error is recorded.
"""
import argparse
import copy
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import deepspeed  # noqa: E402
import torch  # noqa: E402
from torch import nn  # noqa: E402

from iris_kernels import sequence_logprobs  # noqa: E402

IGNORE = -100


class HeadLoss(nn.Module):
    """Mean over rows of -Σ log p(response): the body runs, the head weight is read here."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, input_ids, labels):
        hidden = self.model.model(input_ids=input_ids).last_hidden_state
        weight = self.model.lm_head.weight
        return -sequence_logprobs(hidden, weight, labels, ignore_index=IGNORE).mean()


def batch(vocab):
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, vocab, (4, 11), generator=g)
    labels = ids.clone()
    labels[:, :4] = IGNORE  # the prompt
    labels[1, 8:] = IGNORE  # a shorter response
    labels[3, 6:] = IGNORE
    return ids, labels


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--tied", type=int, required=True)
    ap.add_argument("--out", required=True)
    args = ap.parse_args()
    deepspeed.init_distributed(dist_backend="gloo")
    rank, world = torch.distributed.get_rank(), torch.distributed.get_world_size()
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(vocab_size=97, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                         tie_word_embeddings=bool(args.tied))
    torch.manual_seed(0)
    model = LlamaForCausalLM(config)
    with torch.no_grad():  # a head unlike the embedding's default init, so a swapped weight shows
        model.lm_head.weight.normal_(0, 0.5)
    ids, labels = batch(config.vocab_size)

    # Reference: one process, no DeepSpeed, the whole batch (fp64 for the comparison's sake).
    ref = HeadLoss(copy.deepcopy(model)).double()
    ref_loss = ref(ids, labels)
    ref_loss.backward()
    ref_grads = {n: p.grad.detach().clone() for n, p in ref.named_parameters()}

    ds_config = {
        "train_micro_batch_size_per_gpu": ids.shape[0] // world,
        "gradient_accumulation_steps": 1,
        "zero_optimization": {"stage": 3, "stage3_param_persistence_threshold": 0, "overlap_comm": False},
        "steps_per_print": 10**9,
        "zero_allow_untested_optimizer": True,
    }
    module = HeadLoss(model)
    engine, *_ = deepspeed.initialize(model=module, model_parameters=module.parameters(),
                                      optimizer=torch.optim.SGD(module.parameters(), lr=0.1), config=ds_config)
    head = engine.module.model.lm_head.weight
    partitioned = bool(head.numel() == 0 and head.ds_tensor.numel() < head.ds_numel)
    mine = slice(rank * ids.shape[0] // world, (rank + 1) * ids.shape[0] // world)
    loss = engine(ids[mine], labels[mine])
    engine.backward(loss)
    from deepspeed.utils import safe_get_full_grad

    grads = {n: safe_get_full_grad(p).detach().clone() for n, p in engine.module.named_parameters()}
    losses = [torch.zeros(()) for _ in range(world)]
    torch.distributed.all_gather(losses, loss.detach().float())

    # Misuse: forward inside GatheredParameters, backward after it.
    misuse = "no error"
    hidden = torch.randn(2, ids.shape[1], config.hidden_size, requires_grad=True)
    with deepspeed.zero.GatheredParameters([head], modifier_rank=None):
        out = -sequence_logprobs(hidden, head, labels[:2], ignore_index=IGNORE).sum()
    try:
        out.backward()
    except Exception as e:  # noqa: BLE001 - the test reads the message
        misuse = f"{type(e).__name__}: {e}"
    if rank == 0:
        torch.save({"ref_loss": float(ref_loss), "loss": float(torch.stack(losses).mean()), "grads": grads,
                    "ref_grads": ref_grads, "partitioned": partitioned, "world": world, "misuse": misuse},
                   str(Path(args.out) / "result.pt"))
    torch.distributed.barrier()


if __name__ == "__main__":
    main()
