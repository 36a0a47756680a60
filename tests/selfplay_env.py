"""The environment the train/selfplay.py subprocess tests run the script under.

Offline Hugging Face hub, quiet tokenizers, one OpenMP thread, and none of the fault-injection
variables (IRIS_SELFPLAY_KILL_AT, IRIS_SELFPLAY_NAN_STEPS) inherited from the caller; ``extra``
overrides or adds variables last. Also the readers of a finished run's files that the
multi-process comparisons (FSDP2, ZeRO-3 against one process) share.
"""
import json
import os
from pathlib import Path


def selfplay_env(**extra):
    env = dict(os.environ)
    env.update({"HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false", "OMP_NUM_THREADS": "1"})
    for k in ("IRIS_SELFPLAY_KILL_AT", "IRIS_SELFPLAY_NAN_STEPS"):
        env.pop(k, None)
    env.update(extra)
    return env


def run_metrics(out, kind):
    """The records of one kind ("train" / "eval") of a run's metrics.jsonl, in order."""
    rows = [json.loads(line) for line in (Path(out) / "metrics.jsonl").read_text().splitlines() if line.strip()]
    return [r for r in rows if r["kind"] == kind]


def generated_rows(out, t, split):
    """Every process's generated rows of iteration t's split, sorted by prompt id."""
    rows = []
    for p in sorted((Path(out) / f"iter_{t}").glob(f"generated-{split}-*.jsonl")):
        rows += [json.loads(line) for line in p.read_text().splitlines() if line.strip()]
    return sorted(rows, key=lambda r: r["prompt_id"])


def saved_weights(out, t):
    """The model saved at the end of iteration t (iter_t/model), as a state dict."""
    from safetensors.torch import load_file

    return load_file(str(Path(out) / f"iter_{t}" / "model" / "model.safetensors"))
