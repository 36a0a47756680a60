"""Writes the lm-evaluation-harness documents of the harness's held-out data (deterministic):

    python train/lm_eval_tasks/make_tasks.py

from train/data/verifiable/heldout.jsonl (the rows with a checkable answer):
* iris_heldout_mc.jsonl   - multiple choice: the true answer against up to 3 distractors, other
  held-out answers of the same kind (numeric or not), drawn with a generator seeded by the row's
  index and shuffled the same way (``gold`` = the true answer's position);
* iris_heldout_gen.jsonl  - the same prompts for generate_until, scored by exact match.
A document's ``context`` is the conversation up to the last question as plain text
("System: …", "User: …", "Assistant: …" lines, ending with "Assistant:"), so the tasks need no chat
template; the task YAMLs beside this file read these files (dataset_path: json).
"""
import json
import random
from pathlib import Path

HERE = Path(__file__).resolve().parent
SOURCE = HERE.parent / "data" / "verifiable" / "heldout.jsonl"
ROLES = {"system": "System", "user": "User", "assistant": "Assistant"}
CHOICES = 4


def _kind(answer: str) -> str:
    return "number" if answer.lstrip("-").isdigit() else "text"


def context(messages) -> str:
    lines = [f"{ROLES[m['role']]}: {m['content']}" for m in messages[:-1]]
    return "\n".join(lines + ["Assistant:"])


def main() -> None:
    rows = [json.loads(line) for line in SOURCE.read_text().splitlines() if line.strip()]
    rows = [r for r in rows if r.get("answer", "").strip() and r["messages"][-1]["role"] == "assistant"]
    pools = {}
    for r in rows:
        pool = pools.setdefault(_kind(r["answer"].strip()), [])
        if r["answer"].strip() not in pool:
            pool.append(r["answer"].strip())
    mc, gen = [], []
    for i, r in enumerate(rows):
        answer = r["answer"].strip()
        others = sorted(a for a in pools[_kind(answer)] if a != answer)
        rng = random.Random(i)
        choices = [answer] + rng.sample(others, min(CHOICES - 1, len(others)))
        rng.shuffle(choices)
        doc = {"id": r["id"], "task": r["task"], "context": context(r["messages"]), "answer": answer}
        mc.append({**doc, "choices": choices, "gold": choices.index(answer)})
        gen.append(doc)
    for name, docs in (("iris_heldout_mc.jsonl", mc), ("iris_heldout_gen.jsonl", gen)):
        (HERE / name).write_text("".join(json.dumps(d, sort_keys=True) + "\n" for d in docs))
    print(f"{len(mc)} documents per task written to {HERE}")


if __name__ == "__main__":
    main()
