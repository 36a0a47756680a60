"""Phase d, optional: lm-evaluation-harness scores of each iteration's saved model (``eval.lm_eval``).

Needs the ``eval`` extra (``pip install -e ".[eval]"``, lm-eval 0.4.x). The main process starts
one evaluation process per iteration, which runs ``lm_eval.simple_evaluate(model="hf",
model_args={"pretrained": iter_t/model, ...})`` on the folder phase c saved (safetensors,
tokenizer included), the way SPIN scores its checkpoints; the other processes wait. The scores go to ``iter_t/lm_eval.json`` (atomic; a rerun after a
crash in evaluation reads it instead of evaluating again), into the iteration's eval record as
``lm_eval/<task>/<metric>`` (so metrics.jsonl and TensorBoard carry them), and into
``lm_eval.png``, one curve per score over the iterations.

Tasks: any the installed lm-eval knows (the Open LLM Leaderboard set of the 7B/3B presets
downloads its data sets: a machine with network, or a warm HF cache), plus the harness's own
held-out data as local tasks, offline: ``iris_heldout_mc`` (multiple choice, acc / acc_norm) and
``iris_heldout_gen`` (generate_until, exact_match), from train/lm_eval_tasks/. Their YAMLs name
their JSONL relative to that folder; lm-eval would resolve it against the working directory, so
the folder is copied into the run (``<output_dir>/lm_eval_tasks/``) with absolute paths.
"""
from __future__ import annotations

import dataclasses
import json
import math
import os
import subprocess
import sys
from pathlib import Path
from typing import Dict, List

if __package__ in (None, ""):  # run as the evaluation process: make the repository root importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import yaml

from train.config import LmEvalConfig
from train.io_utils import atomic_write_json, atomic_write_text

TASK_DIR = Path(__file__).resolve().parent / "lm_eval_tasks"
RESULT_FILE = "lm_eval.json"
PLOT_FILE = "lm_eval.png"


def local_task_dir(out_dir) -> Path:
    """train/lm_eval_tasks/*.yaml copied to ``<out_dir>/lm_eval_tasks`` with absolute data_files."""
    dest = Path(out_dir) / "lm_eval_tasks"
    dest.mkdir(parents=True, exist_ok=True)
    for src in sorted(TASK_DIR.glob("*.yaml")):
        spec = yaml.safe_load(src.read_text())
        files = spec.get("dataset_kwargs", {}).get("data_files", {})
        for split, name in files.items():
            files[split] = str((TASK_DIR / name).resolve())
        atomic_write_text(dest / src.name, yaml.safe_dump(spec, sort_keys=False))
    return dest


def flatten_results(results: dict) -> Dict[str, float]:
    """``{"results": {task: {"acc,none": 0.5, "acc_stderr,none": ...}}}`` -> ``{"lm_eval/task/acc": 0.5}``;
    standard errors and non-numbers dropped; a filter other than "none" is kept as a suffix
    (``exact_match_strip``)."""
    out = {}
    for task, metrics in results.get("results", {}).items():
        for key, value in metrics.items():
            if isinstance(value, bool) or not isinstance(value, (int, float)) or "stderr" in key:
                continue
            name, _, filt = key.partition(",")
            name = name if filt in ("", "none") else f"{name}_{filt}"
            out[f"lm_eval/{task}/{name}"] = float(value)
    return out


def run_lm_eval(model_dir, cfg: LmEvalConfig, *, out_dir, device: str, dtype: str, seed: int,
                trust_remote_code: bool = False) -> dict:
    """lm-eval's results for the saved model in ``model_dir`` (its ``results``, ``n-shot``, ``versions``)."""
    import lm_eval
    from lm_eval.tasks import TaskManager

    include = [str(local_task_dir(out_dir))] + ([str(Path(cfg.include_path).resolve())] if cfg.include_path else [])
    limit = cfg.limit
    if limit is not None and limit >= 1:
        limit = int(limit)
    results = lm_eval.simple_evaluate(
        model="hf",
        model_args={"pretrained": str(model_dir), "dtype": dtype, "trust_remote_code": trust_remote_code},
        tasks=list(cfg.tasks), num_fewshot=cfg.num_fewshot, limit=limit, batch_size=cfg.batch_size,
        device=device, task_manager=TaskManager(include_path=include), apply_chat_template=cfg.apply_chat_template,
        log_samples=False, random_seed=seed, numpy_random_seed=seed, torch_random_seed=seed,
        fewshot_random_seed=seed,
    )
    keep = ("results", "groups", "n-shot", "versions", "higher_is_better", "n-samples")
    return json.loads(json.dumps({k: results.get(k) for k in keep if k in results}, default=str))


# Variables of the launcher's process group: lm-eval's "hf" model would join it (and wait for the
# other processes, which are not evaluating), so the evaluation process starts without them.
_DISTRIBUTED_ENV = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "GROUP_RANK", "ROLE_RANK",
                    "MASTER_ADDR", "MASTER_PORT", "TORCHELASTIC_RUN_ID")


def iteration_scores(it_dir, cfg: LmEvalConfig, *, out_dir, device: str, dtype: str, seed: int,
                     trust_remote_code: bool = False) -> Dict[str, float]:
    """Scores of ``it_dir/model``: read from ``it_dir/lm_eval.json`` when a previous run wrote it,
    else evaluated first, in a separate process (outside the run's process group and its
    DeepSpeed / FSDP state, with its own memory), which writes that file atomically."""
    path = Path(it_dir) / RESULT_FILE
    if not path.exists():
        env = {k: v for k, v in os.environ.items() if k not in _DISTRIBUTED_ENV and not k.startswith("ACCELERATE_")}
        if device.startswith("cuda"):
            index = int(device.partition(":")[2] or 0)
            visible = os.environ.get("CUDA_VISIBLE_DEVICES")
            env["CUDA_VISIBLE_DEVICES"] = visible.split(",")[index] if visible else str(index)
            device = "cuda:0"
        job = {"model_dir": str(Path(it_dir) / "model"), "config": dataclasses.asdict(cfg), "out_dir": str(out_dir),
               "device": device, "dtype": dtype, "seed": seed, "trust_remote_code": trust_remote_code,
               "result": str(path)}
        proc = subprocess.run([sys.executable, str(Path(__file__).resolve()), json.dumps(job)], env=env,
                              capture_output=True, text=True)
        if proc.returncode != 0 or not path.exists():
            raise RuntimeError(f"lm-evaluation-harness failed on {job['model_dir']} (status {proc.returncode}):\n"
                               f"{(proc.stderr or proc.stdout)[-3000:]}")
    return flatten_results(json.loads(path.read_text()))


def _main(job_json: str) -> None:
    job = json.loads(job_json)
    results = run_lm_eval(job["model_dir"], LmEvalConfig(**job["config"]), out_dir=job["out_dir"], device=job["device"],
                          dtype=job["dtype"], seed=job["seed"], trust_remote_code=job["trust_remote_code"])
    atomic_write_json(job["result"], results)


def plot_scores(out_dir, records: List[dict]) -> Path | None:
    """``lm_eval.png``: each lm_eval/* score of the eval records against the iteration."""
    series: Dict[str, list] = {}
    for r in records:
        for k, v in r.items():
            if k.startswith("lm_eval/") and isinstance(v, (int, float)) and math.isfinite(v):
                series.setdefault(k, []).append((r["iteration"], v))
    if not series:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    for name, points in sorted(series.items()):
        xs, ys = zip(*sorted(points))
        ax.plot(xs, ys, marker="o", label=name[len("lm_eval/"):])
    ax.set_xlabel("iteration (θ_{t+1} after iteration t)")
    ax.set_ylabel("score")
    ax.set_title("lm-evaluation-harness")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    path = Path(out_dir) / PLOT_FILE
    tmp = path.with_name(path.name + ".tmp.png")
    fig.savefig(tmp, dpi=100)
    plt.close(fig)
    tmp.replace(path)
    return path


if __name__ == "__main__":
    _main(sys.argv[1])
