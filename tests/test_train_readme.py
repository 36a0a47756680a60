"""The two SelfPlayLoss examples of train/README.md run as written (on a tiny random model);
the README's shell commands are checked by tests/test_readme_commands.py."""
import re
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from train.config import ModelConfig  # noqa: E402
from train.data import build_examples, load_rows, pair_batch, split_messages, stop_token_ids  # noqa: E402
from train.generation import generate_responses  # noqa: E402
from train.modeling import SequenceLogprobs, build_initial_model, load_tokenizer  # noqa: E402
from train.scoring import reference_logprobs  # noqa: E402

README = (ROOT / "train" / "README.md").read_text()
BLOCKS = re.findall(r"```python\n(.*?)```", README, flags=re.S)
CFG = ModelConfig(tokenizer=str(ROOT / "train" / "data" / "tiny-tokenizer"), init_config={
    "model_type": "llama", "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1,
    "num_attention_heads": 2, "num_key_value_heads": 1, "max_position_embeddings": 128})


@pytest.fixture(scope="module")
def pairs():
    """Four prompts as [annotated; synthetic] rows with their reference log-probs under θ_0."""
    tok = load_tokenizer(CFG)
    model = build_initial_model(CFG, tok, seed=0)
    stop = stop_token_ids(tok)
    rows = load_rows(str(ROOT / "train" / "data" / "verifiable" / "train.jsonl"), split="train", key="k", limit=8)
    exs = build_examples(rows, tok, stop, messages_field="messages", answer_field="answer", max_prompt_length=100,
                         max_length=128, name="t")
    syn = generate_responses(model, tok, exs, stop_ids=stop, max_new_tokens=6, do_sample=True, seed=0)
    ref = reference_logprobs(SequenceLogprobs(model), exs, syn, pad_id=tok.pad_token_id, max_length=128)
    items = []
    for lo in (0, 4):
        batch = pair_batch(exs[lo:lo + 4], [s["response_ids"] for s in syn[lo:lo + 4]], tok.pad_token_id, 128)
        chunk = ref[lo:lo + 4]
        batch["ref_logps"] = torch.tensor([r["ref_real"] for r in chunk] + [r["ref_syn"] for r in chunk])
        items.append(batch)
    model.harness_rows = (tok, exs, syn, ref)  # what the Trainer example starts from
    return model, items


def test_readme_has_the_two_examples():
    assert len(BLOCKS) == 2 and "class IrisTrainer" in BLOCKS[0] and "make_step_normalizer" in BLOCKS[1]


def test_trainer_example(pairs, tmp_path):
    """The example builds its rows from conversations with the installed package alone (no
    `train` import) and trains on them."""
    model, items = pairs
    tok = model.harness_rows[0]
    rows = load_rows(str(ROOT / "train" / "data" / "verifiable" / "train.jsonl"), split="train", key="k", limit=8)
    conversations = [split_messages(r["messages"], "t") for r in rows]
    assert "from train" not in BLOCKS[0] and "import train" not in BLOCKS[0]
    ns = {"model": model, "tokenizer": tok, "conversations": conversations, "output_dir": str(tmp_path)}
    code = BLOCKS[0].replace("trainer.train()", "").replace("max_new_tokens=64", "max_new_tokens=6")
    code = code.replace("remove_unused_columns=False)",  # CPU, quiet, two epochs: a test, not a run
                        "remove_unused_columns=False, use_cpu=True, report_to=[], save_strategy='no', "
                        "num_train_epochs=2, learning_rate=1e-3, disable_tqdm=True)")
    exec(code, ns)
    trainer = ns["trainer"]
    # The Trainer's own (shuffling) loader feeds the collator; at θ = θ_0 every batch's IRIS loss is
    # 0 only if each synthetic row's reference log-prob is its own, i.e. the pairs stayed together.
    for batch in trainer.get_train_dataloader():
        assert batch["input_ids"].shape[0] == 8 and batch["ref_logps"].shape == (8,)
        assert abs(float(trainer.compute_loss(model, batch).detach())) < 1e-5
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    trainer.train()
    assert trainer.state.global_step == 4  # 8 prompts / 4 per batch x 2 epochs
    assert any(not torch.equal(before[n], p) for n, p in model.named_parameters())


def test_plain_loop_example(pairs):
    model, items = pairs
    optimizer = torch.optim.SGD(model.parameters(), lr=1e-3)
    mbs = [dict(b, num_real=b["input_ids"].shape[0] // 2) for b in items]
    ns = {"torch": torch, "model": model, "optimizer": optimizer, "loader": [mbs, mbs]}
    exec("from iris_kernels import SelfPlayLoss\n" + BLOCKS[1], ns)
    assert torch.isfinite(ns["loss"]) and ns["norm"].stats.num_micro_batches == 2
