"""Make the bundled, verifiable self-play data set and the tiny character-level tokenizer.

    python train/data/make_data.py            # rewrites train/data/verifiable/ and train/data/tiny-tokenizer/

Every annotated answer is computed by code, so a model's greedy answer can be checked by exact
match (train/evaluation.py). Rows are in the conversational ``messages`` format; a few are
two-turn conversations so that "prompt = everything up to the last user turn" is exercised.
Output is deterministic (fixed seed, sorted keys): rerunning reproduces the committed files byte
for byte, which tests/test_train_data.py checks.
"""
from __future__ import annotations

import argparse
import json
import random
import string
from pathlib import Path

HERE = Path(__file__).resolve().parent
SEED = 1234
N_TRAIN = 1000
N_HELDOUT = 100
SYSTEM = "Answer with the result only."

# The tiny tokenizer: one token per printable ASCII character (and tab, newline) plus the
# chat-template specials. A character vocabulary keeps the random tiny model's vocabulary small
# (~100) and makes string reversal and arithmetic token-exact.
SPECIAL_TOKENS = ["<pad>", "<unk>", "<|system|>", "<|user|>", "<|assistant|>", "<|end|>"]
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "<|{{ message['role'] }}|>{{ message['content'] }}<|end|>"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)


def _word(rng: random.Random, lo: int, hi: int) -> str:
    return "".join(rng.choice(string.ascii_lowercase) for _ in range(rng.randint(lo, hi)))


def _task_add(rng):
    a, b = rng.randint(0, 99), rng.randint(0, 99)
    return [f"What is {a}+{b}?"], [str(a + b)]


def _task_sub(rng):
    a = rng.randint(0, 99)
    b = rng.randint(0, a)
    return [f"What is {a}-{b}?"], [str(a - b)]


def _task_mul(rng):
    a, b = rng.randint(1, 12), rng.randint(1, 12)
    return [f"What is {a}*{b}?"], [str(a * b)]


def _task_reverse(rng):
    w = _word(rng, 3, 6)
    return [f"Reverse '{w}'."], [w[::-1]]


def _task_upper(rng):
    w = _word(rng, 3, 6)
    return [f"Uppercase '{w}'."], [w.upper()]


def _task_length(rng):
    w = _word(rng, 2, 9)
    return [f"How many letters in '{w}'?"], [str(len(w))]


def _task_max(rng):
    xs = rng.sample(range(100), 3)
    return [f"Largest of {xs[0]}, {xs[1]}, {xs[2]}?"], [str(max(xs))]


def _task_followup(rng):
    # Two user turns: the annotated (checked) answer is the last assistant turn only.
    a, b = rng.randint(0, 49), rng.randint(0, 49)
    return [f"What is {a}+{b}?", "Now double it."], [str(a + b), str(2 * (a + b))]


TASKS = {
    "add": _task_add,
    "sub": _task_sub,
    "mul": _task_mul,
    "reverse": _task_reverse,
    "upper": _task_upper,
    "length": _task_length,
    "max": _task_max,
    "followup": _task_followup,
}


def make_rows(rng: random.Random, n: int, split: str, seen: set) -> list:
    """n rows with questions never seen before (held-out prompts never occur in train)."""
    rows = []
    names = sorted(TASKS)
    while len(rows) < n:
        task = names[len(rows) % len(names)]
        users, answers = TASKS[task](rng)
        key = (task, tuple(users))
        if key in seen:
            continue
        seen.add(key)
        messages = [{"role": "system", "content": SYSTEM}] if len(rows) % 4 == 0 else []
        for u, a in zip(users, answers):
            messages += [{"role": "user", "content": u}, {"role": "assistant", "content": a}]
        rows.append({"id": f"{split}-{len(rows):05d}", "task": task, "answer": answers[-1], "messages": messages})
    return rows


def write_jsonl(path: Path, rows: list) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(row, sort_keys=True) + "\n")


def make_tokenizer(out_dir: Path) -> None:
    """A character-level WordLevel tokenizer with a chat template, saved for AutoTokenizer."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers

    chars = ["\t", "\n"] + [chr(c) for c in range(32, 127)]  # printable ASCII and the two usual controls
    vocab = {tok: i for i, tok in enumerate(SPECIAL_TOKENS + chars)}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    tok.decoder = decoders.Fuse()  # characters join back without separators
    tok.add_special_tokens(SPECIAL_TOKENS)
    out_dir.mkdir(parents=True, exist_ok=True)
    # Written by hand rather than with save_pretrained so the files do not depend on the
    # transformers version that made them (5.x renamed the fast tokenizer class).
    tok.save(str(out_dir / "tokenizer.json"), pretty=True)
    config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": None,
        "eos_token": "<|end|>",
        "pad_token": "<pad>",
        "unk_token": "<unk>",
        "model_max_length": 4096,
        "chat_template": CHAT_TEMPLATE,
    }
    (out_dir / "tokenizer_config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out_dir", default=str(HERE), help="folder receiving verifiable/ and tiny-tokenizer/")
    args = parser.parse_args(argv)
    out = Path(args.out_dir)
    rng = random.Random(SEED)
    seen: set = set()
    train = make_rows(rng, N_TRAIN, "train", seen)
    heldout = make_rows(rng, N_HELDOUT, "heldout", seen)
    write_jsonl(out / "verifiable" / "train.jsonl", train)
    write_jsonl(out / "verifiable" / "heldout.jsonl", heldout)
    make_tokenizer(out / "tiny-tokenizer")
    print(f"wrote {len(train)} train and {len(heldout)} held-out rows to {out / 'verifiable'}")


if __name__ == "__main__":
    main()
