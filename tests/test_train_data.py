"""train/data.py + generation: one rendering for generation and training, the bundled data, batching."""
import filecmp
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from train.config import ModelConfig  # noqa: E402
from train.data import (IGNORE_INDEX, build_examples, first_turn, load_rows, pair_batch, render,  # noqa: E402
                        split_messages, step_micro_batches, stop_token_ids)
from train.generation import generate_responses  # noqa: E402
from train.modeling import build_initial_model, load_tokenizer  # noqa: E402

DATA = ROOT / "train" / "data"
TOKENIZER = str(DATA / "tiny-tokenizer")
TINY_MODEL = {"model_type": "llama", "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1,
              "num_attention_heads": 2, "num_key_value_heads": 1, "max_position_embeddings": 256,
              "tie_word_embeddings": True}
# A ChatML-style template: it writes "\n" after the end-of-turn token, which generation never produces.
CHATML = ("{% for m in messages %}<|user|>{{ m['role'] }}\n{{ m['content'] }}<|end|>\n{% endfor %}"
          "{% if add_generation_prompt %}<|user|>assistant\n{% endif %}")


@pytest.fixture(scope="module")
def tokenizer():
    return load_tokenizer(ModelConfig(tokenizer=TOKENIZER, init_config=TINY_MODEL))


@pytest.fixture(scope="module")
def rows():
    return load_rows(str(DATA / "verifiable" / "train.jsonl"), split="train", key="data.train", limit=24)


def _examples(tokenizer, rows, **kw):
    stop = stop_token_ids(tokenizer)
    args = dict(messages_field="messages", answer_field="answer", max_prompt_length=200, max_length=256, name="t")
    args.update(kw)
    return build_examples(rows, tokenizer, stop, **args)


def test_generation_and_training_see_the_same_prompt_tokens(tokenizer, rows):
    torch.manual_seed(0)
    model = build_initial_model(ModelConfig(tokenizer=TOKENIZER, init_config=TINY_MODEL), tokenizer, seed=0)
    examples = _examples(tokenizer, rows)
    assert len({len(e.prompt_ids) for e in examples}) > 1  # left padding really happens
    seen = {}
    original = model.generate

    def spy(input_ids, attention_mask, **kw):
        for b in range(input_ids.shape[0]):
            seen[len(seen)] = input_ids[b][attention_mask[b].bool()].tolist()
        return original(input_ids=input_ids, attention_mask=attention_mask, **kw)

    model.generate = spy
    synthetic = generate_responses(model, tokenizer, examples, stop_ids=stop_token_ids(tokenizer),
                                   max_new_tokens=6, do_sample=True, seed=1)
    batch = pair_batch(examples, [r["response_ids"] for r in synthetic], tokenizer.pad_token_id, 256)
    B = len(examples)
    for b, ex in enumerate(examples):
        # What the model was asked to continue == the prompt part of BOTH training rows of prompt b ==
        # the chat template's own tokenisation with the generation prompt.
        direct = tokenizer.apply_chat_template(split_messages(rows[b]["messages"], "")[0], tokenize=True,
                                               add_generation_prompt=True)
        direct = direct["input_ids"] if isinstance(direct, dict) or hasattr(direct, "keys") else direct
        for row in (b, B + b):
            ids, mask, labels = batch["input_ids"][row], batch["attention_mask"][row], batch["labels"][row]
            prompt_part = ids[mask.bool() & (labels == IGNORE_INDEX)].tolist()
            assert prompt_part == seen[b] == list(ex.prompt_ids) == list(direct)
        # The synthetic row continues with exactly the sampled tokens, all of them scored.
        n = len(ex.prompt_ids)
        syn_len = len(synthetic[b]["response_ids"])
        assert batch["input_ids"][B + b, n:n + syn_len].tolist() == synthetic[b]["response_ids"]
        assert (batch["labels"][B + b, n:n + syn_len] != IGNORE_INDEX).all()
        assert synthetic[b]["prompt_sha"] == ex.prompt_sha


def test_response_ends_with_the_stop_token_like_a_sample(tokenizer):
    tokenizer = type(tokenizer).from_pretrained(TOKENIZER)
    tokenizer.chat_template = CHATML
    stop = stop_token_ids(tokenizer)
    msgs = [{"role": "user", "content": "What is 2+3?"}]
    p, r = render(tokenizer, msgs, "5", stop)
    assert tokenizer.decode(p) == "<|user|>user\nWhat is 2+3?<|end|>\n<|user|>assistant\n"
    # The template's "\n" after <|end|> is cut: a sampled response stops at <|end|> too.
    assert r == tokenizer("5", add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]


def test_template_without_stop_token_gets_one(tokenizer):
    tokenizer = type(tokenizer).from_pretrained(TOKENIZER)
    tokenizer.chat_template = "{% for m in messages %}{{ m['content'] }}|{% endfor %}"
    stop = stop_token_ids(tokenizer)
    _, r = render(tokenizer, [{"role": "user", "content": "hi"}], "yo", stop)
    assert r[-1] == tokenizer.eos_token_id and tokenizer.decode(r[:-1]) == "yo|"


def test_prompt_is_everything_up_to_the_last_user_turn(tokenizer, rows):
    multi = next(r for r in rows if len(r["messages"]) >= 4)
    prompt, response = split_messages(multi["messages"], "x")
    assert prompt == multi["messages"][:-1] and prompt[-1]["role"] == "user"
    assert response == multi["answer"]
    assert first_turn(multi["messages"])[-1] == next(m for m in multi["messages"] if m["role"] == "assistant")
    ex_first = _examples(tokenizer, [multi], first_turn_only=True)[0]
    ex_last = _examples(tokenizer, [multi])[0]
    assert len(ex_first.prompt_ids) < len(ex_last.prompt_ids) and ex_first.answer is None


@pytest.mark.parametrize("messages, match", [
    ([{"role": "user", "content": "hi"}], "at least a user and an assistant"),
    ([{"role": "assistant", "content": "a"}, {"role": "assistant", "content": "b"}], "user turn followed"),
    ([{"role": "user", "content": "q"}, {"role": "assistant"}], "message 1"),
    ("not a list", "must be a list"),
])
def test_bad_conversations_are_rejected_with_the_row(tokenizer, messages, match):
    with pytest.raises(ValueError, match=match):
        _examples(tokenizer, [{"id": "r7", "messages": messages}])
    with pytest.raises(ValueError, match="row 0 \\(id 'r7'\\)"):
        _examples(tokenizer, [{"id": "r7", "messages": messages}])


def test_missing_messages_field_names_the_setting(tokenizer):
    with pytest.raises(ValueError, match="data.messages_field"):
        _examples(tokenizer, [{"id": "r", "conversation": []}])


def test_long_prompts_are_dropped_not_cut(tokenizer, rows):
    with pytest.warns(UserWarning, match="dropped"):
        examples = _examples(tokenizer, rows, max_prompt_length=40)
    assert 0 < len(examples) < len(rows)
    assert all(len(e.prompt_ids) <= 40 for e in examples)
    assert [e.prompt_id for e in examples] == list(range(len(examples)))
    with pytest.raises(ValueError, match="no usable rows"):
        with pytest.warns(UserWarning):
            _examples(tokenizer, rows, max_prompt_length=5)


def test_missing_dataset_file_names_the_key(tmp_path):
    with pytest.raises(FileNotFoundError, match="data.eval: dataset file not found"):
        load_rows(str(tmp_path / "nope.jsonl"), split="test", key="data.eval")


def test_pair_batch_masks_prompt_and_padding():
    from train.data import Example

    exs = [Example(0, "a", (1, 2, 3), (4, 5), None, "x"), Example(1, "b", (6,), (7,), None, "y")]
    batch = pair_batch(exs, [(8, 9, 10), (11,)], pad_id=0, max_length=5)
    assert batch["input_ids"].tolist() == [[1, 2, 3, 4, 5], [6, 7, 0, 0, 0], [1, 2, 3, 8, 9], [6, 11, 0, 0, 0]]
    assert batch["labels"].tolist() == [[-100, -100, -100, 4, 5], [-100, 7, -100, -100, -100],
                                        [-100, -100, -100, 8, 9], [-100, 11, -100, -100, -100]]
    assert batch["attention_mask"].sum(1).tolist() == [5, 2, 5, 2]


def test_global_batches_do_not_depend_on_the_number_of_processes():
    n, kw = 50, dict(seed=3, iteration=1)
    for step in range(12):  # 6 steps per epoch of 8 prompts: crosses an epoch boundary
        one = step_micro_batches(n, step, per_device=8, accumulation=1, rank=0, world=1, **kw)
        two = [step_micro_batches(n, step, per_device=2, accumulation=2, rank=r, world=2, **kw) for r in (0, 1)]
        flat_two = sorted(i for rank in two for mb in rank for i in mb)
        assert sorted(one[0]) == flat_two
        assert all(len(mb) == 2 for rank in two for mb in rank)
    epoch = [i for s in range(6)
             for i in step_micro_batches(n, s, per_device=8, accumulation=1, rank=0, world=1, **kw)[0]]
    assert len(set(epoch)) == 48  # every prompt at most once per epoch, the 2 left over dropped
    other = step_micro_batches(n, 0, per_device=8, accumulation=1, rank=0, world=1, seed=3, iteration=2)
    assert other != step_micro_batches(n, 0, per_device=8, accumulation=1, rank=0, world=1, **kw)
    with pytest.raises(ValueError, match="cannot fill one global batch"):
        step_micro_batches(5, 0, per_device=8, accumulation=1, rank=0, world=1, **kw)


def test_bundled_data_is_reproducible_and_checkable(tmp_path):
    import subprocess

    subprocess.run([sys.executable, str(DATA / "make_data.py"), "--out_dir", str(tmp_path)], check=True,
                   capture_output=True)
    for rel in ("verifiable/train.jsonl", "verifiable/heldout.jsonl", "tiny-tokenizer/tokenizer.json",
                "tiny-tokenizer/tokenizer_config.json"):
        assert filecmp.cmp(tmp_path / rel, DATA / rel, shallow=False), rel
    train = load_rows(str(DATA / "verifiable" / "train.jsonl"), split="train", key="k")
    held = load_rows(str(DATA / "verifiable" / "heldout.jsonl"), split="test", key="k")
    assert len(train) == 1000 and len(held) == 100
    prompts = lambda rs: {tuple(m["content"] for m in r["messages"][:-1]) for r in rs}  # noqa: E731
    assert not prompts(train) & prompts(held)  # the held-out split is really held out
    for r in train + held:  # every annotated answer is the code-computed one
        assert r["messages"][-1]["content"] == r["answer"]
        if r["task"] == "reverse":
            word = r["messages"][-2]["content"].split("'")[1]
            assert r["answer"] == word[::-1]
        if r["task"] == "add":
            a, b = r["messages"][-2]["content"][len("What is "):-1].split("+")
            assert int(r["answer"]) == int(a) + int(b)


def test_previous_synthetic_rows_become_rows_of_their_own():
    from train.data import Example, prompt_sha, with_previous_synthetic

    exs = [Example(i, f"r{i}", (5, 6 + i), (7, 8, i), None, prompt_sha((5, 6 + i))) for i in range(3)]
    new = [{"prompt_id": e.prompt_id, "prompt_sha": e.prompt_sha, "response_ids": [9, e.prompt_id]} for e in exs]
    old = [{"prompt_id": e.prompt_id, "prompt_sha": e.prompt_sha, "response_ids": [4, 4, e.prompt_id]} for e in exs]
    rows, syn = with_previous_synthetic(exs, new, old)
    assert [e.prompt_id for e in rows] == [0, 1, 2, 3, 4, 5] and [r["prompt_id"] for r in syn] == [0, 1, 2, 3, 4, 5]
    assert rows[4].prompt_ids == exs[1].prompt_ids and rows[4].response_ids == exs[1].response_ids
    assert syn[1]["response_ids"] == [9, 1] and syn[4]["response_ids"] == [4, 4, 1]
    assert old[1]["prompt_id"] == 1  # the loaded rows are not modified
    with pytest.raises(ValueError, match="train.mix_previous_synthetic"):
        with_previous_synthetic(exs, new, old[:2])
    with pytest.raises(ValueError, match="does not belong to prompt 2"):
        with_previous_synthetic(exs, new, old[:2] + [{**old[2], "prompt_sha": "x"}])
