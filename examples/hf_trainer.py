"""IRIS in a Hugging Face ``Trainer``, from the installed package only: build the dataset rows
(tokenise the conversations, sample the opponent's responses, score both once), then train a few
steps with ``SelfPlayLoss`` in ``compute_loss``.

    .venv/bin/python examples/hf_trainer.py                        # a tiny random Llama, CPU: 30-50 s on a loaded 2-core VM, mostly imports
    .venv/bin/python examples/hf_trainer.py --model PATH_OR_HUB_ID --max_steps 20

Without ``--model`` the model is a tiny random Llama (2 layers, hidden 64) on the repository's
character tokenizer (``--tokenizer``; any tokenizer with a chat template works). It prints the
loss of every step: the first is 0 (θ = θ_0, the opponent that scored the rows; IRIS losses are
negative after that, and lower is better). The rows' format is documented in
``iris_kernels.integrations.hf``; docs/api.md lists the names.
"""
from __future__ import annotations

import argparse
import random
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig, LlamaForCausalLM, Trainer, TrainingArguments

from iris_kernels import SelfPlayLoss, make_schedule
from iris_kernels.integrations.hf import PairCollator, render_pair, score_pairs

HERE = Path(__file__).resolve().parent


def conversations(n: int, seed: int = 0):
    """(prompt messages, annotated answer) pairs: small sums, answers computed, not sampled."""
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        a, b = rng.randint(0, 99), rng.randint(0, 99)
        out.append(([{"role": "system", "content": "Answer with the result only."},
                     {"role": "user", "content": f"What is {a}+{b}?"}], str(a + b)))
    return out


def build_rows(model, tokenizer, convs, *, max_new_tokens: int, max_length: int, seed: int):
    """One dataset row per prompt: prompt_ids, annotated_ids, synthetic_ids (the opponent's own
    sample), and the opponent's summed log-probs of both responses."""
    rows = []
    for prompt, answer in convs:
        prompt_ids, annotated_ids = render_pair(tokenizer, prompt, answer)
        rows.append({"prompt_ids": prompt_ids, "annotated_ids": annotated_ids})
    # The opponent θ_0 answers every prompt once (one at a time: no left-padding to get right).
    torch.manual_seed(seed)
    model.eval()
    for row in rows:
        ids = torch.tensor([row["prompt_ids"]])
        with torch.no_grad():
            out = model.generate(ids, attention_mask=torch.ones_like(ids), do_sample=True, top_k=0,
                                 max_new_tokens=max_new_tokens, pad_token_id=tokenizer.pad_token_id)
        sample = out[0, ids.shape[1]:].tolist()
        eos = tokenizer.eos_token_id
        row["synthetic_ids"] = sample[: sample.index(eos) + 1] if eos in sample else sample
    # Score both responses under θ_0, once, on the rows exactly as the collator will build them.
    return score_pairs(model, rows, pad_token_id=tokenizer.pad_token_id, max_length=max_length)


class IrisTrainer(Trainer):
    def __init__(self, *args, criterion: SelfPlayLoss, **kwargs):
        super().__init__(*args, **kwargs)
        self.criterion = criterion

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        # PairCollator's batch: the B annotated rows, then the B synthetic rows; ref_logps [2B].
        hidden = self.accelerator.unwrap_model(model).get_decoder()(
            input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"]).last_hidden_state
        head = self.accelerator.unwrap_model(model).get_output_embeddings()
        loss, metrics = self.criterion(hidden, head.weight, inputs["labels"],
                                       num_real=inputs["input_ids"].shape[0] // 2, ref_logps=inputs["ref_logps"],
                                       step=self.state.global_step)
        return (loss, metrics) if return_outputs else loss


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default=None, help="a causal LM folder or hub id (default: a tiny random Llama)")
    ap.add_argument("--tokenizer", default=str(HERE.parent / "train" / "data" / "tiny-tokenizer"),
                    help="tokenizer folder or hub id, used without --model (default: the repository's tiny one)")
    ap.add_argument("--output_dir", default="runs/example-hf-trainer")
    ap.add_argument("--prompts", type=int, default=16)
    ap.add_argument("--max_steps", type=int, default=3)
    ap.add_argument("--batch_size", type=int, default=4, help="prompts per batch (each gives 2 rows)")
    ap.add_argument("--max_new_tokens", type=int, default=8)
    ap.add_argument("--max_length", type=int, default=128)
    args = ap.parse_args(argv)

    if args.model is not None:
        tokenizer = AutoTokenizer.from_pretrained(args.model)
        model = AutoModelForCausalLM.from_pretrained(args.model)
    else:
        tokenizer = AutoTokenizer.from_pretrained(args.tokenizer)
        torch.manual_seed(0)
        model = LlamaForCausalLM(LlamaConfig(
            vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256, tie_word_embeddings=True,
            pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id, bos_token_id=None))
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token

    rows = build_rows(model, tokenizer, conversations(args.prompts), max_new_tokens=args.max_new_tokens,
                      max_length=args.max_length, seed=0)
    criterion = SelfPlayLoss("iris", alpha=make_schedule("constant", alpha=0.5), beta=1.0, scope="global")
    targs = TrainingArguments(output_dir=args.output_dir, per_device_train_batch_size=args.batch_size,
                              max_steps=args.max_steps, learning_rate=1e-3, logging_steps=1, report_to=[],
                              save_strategy="no", use_cpu=not torch.cuda.is_available(), disable_tqdm=True,
                              remove_unused_columns=False)  # keep the row keys for the collator
    trainer = IrisTrainer(model=model, args=targs, train_dataset=rows, criterion=criterion,
                          data_collator=PairCollator(tokenizer.pad_token_id, max_length=args.max_length))
    trainer.train()
    losses = [r["loss"] for r in trainer.state.log_history if "loss" in r]
    print("losses per step:", " ".join(f"{v:.4g}" for v in losses), flush=True)
    return losses


if __name__ == "__main__":
    main()
