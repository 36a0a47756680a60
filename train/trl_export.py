"""The harness's self-play pairs as a TRL preference dataset, and one iteration trained on them
with ``iris_kernels.integrations.trl.SelfPlayTrainer``.

``write_trl_pairs`` (called by train/selfplay.py once per iteration, after scoring) writes
``iter_<t>/trl_pairs-<split>.jsonl``: one row per prompt in TRL's conversational preference
format,

    prompt:   the prompt messages (system / user / assistant turns up to the last user turn)
    chosen:   [{"role": "assistant", "content": <annotated response>}]
    rejected: [{"role": "assistant", "content": <the opponent θ_t's sample>}]
    ref_chosen_logps / ref_rejected_logps: the opponent's summed log-probs of those responses,
        as stored by the scoring phase (this library's op; the same numbers the harness trains on)

plus the exact tokens they were scored on (``prompt_ids`` / ``chosen_ids`` / ``rejected_ids``,
already cut to ``data.max_length``) and ``id``. ``SelfPlayTrainer`` uses those tokens as they
are, so the stored reference log-probs match the policy's token for token; a plain TRL trainer
re-tokenises the messages with the chat template, which may add or drop a trailing token
(the harness cuts a response after its first stop token).

Run one IRIS iteration on them (the opponent is the iteration's starting model θ_t)::

    python train/trl_export.py --run RUN_DIR --iteration T --output_dir OUT [--max_steps N] [--opponent_only]

It first saves θ_t, the model whose log-probs the pairs store, with its tokenizer to
``OUT/opponent/`` (θ_0 of a run from ``model.init_config`` exists nowhere else: the run folder
keeps the models it trained, ``iter_t/model`` = θ_{t+1}); a script of one's own starts from that
folder. ``--opponent_only`` stops there.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Dict, List, Mapping, Sequence

if __package__ in (None, ""):  # run as a script: make the repository root importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from train.data import Example, first_turn, load_rows, prompt_sha, render, split_messages
from train.io_utils import atomic_write_jsonl, read_jsonl

PAIRS_FILE = "trl_pairs-{split}.jsonl"


def _sources(cfg) -> Dict[str, tuple]:
    d = cfg.data
    out = {"train": (d.train, d.train_split, "data.train", d.max_train_prompts)}
    if d.eval is not None:
        out["heldout"] = (d.eval, d.eval_split, "data.eval", d.max_eval_prompts)
    return out


def _prompt_messages(cfg, tokenizer, split: str, examples: Sequence[Example]) -> List[tuple]:
    """(prompt messages, annotated response text) of every Example, in order.

    Re-reads the split and renders it the way build_examples does (same row filter), then checks
    each prompt's hash against the Example's, so a row can never be paired with another prompt.
    """
    source, hf_split, key, limit = _sources(cfg)[split]
    rows = load_rows(source, split=hf_split, key=key, limit=limit)
    out = []
    for i, row in enumerate(rows):
        messages = row[cfg.data.messages_field]
        if cfg.data.first_turn_only and isinstance(messages, list):
            messages = first_turn(messages)
        prompt, response = split_messages(messages, f"{key} row {i}")
        # Only the prompt's tokens are compared; the stop ids affect the response part alone.
        prompt_ids, _ = render(tokenizer, prompt, response, [0])
        if len(prompt_ids) > cfg.data.max_prompt_length:
            continue  # dropped by build_examples too
        out.append((prompt, response, prompt_sha(prompt_ids)))
    if len(out) != len(examples):
        raise ValueError(f"{key}: {len(out)} usable rows on re-reading but {len(examples)} examples")
    for ex, (_, _, sha) in zip(examples, out):
        if sha != ex.prompt_sha:
            raise ValueError(f"{key}: prompt {ex.prompt_id} renders differently on re-reading (prompt_sha mismatch)")
    return [(p, r) for p, r, _ in out]


def trl_pair_rows(cfg, tokenizer, split: str, examples: Sequence[Example], synthetic: Sequence[Mapping],
                  reference: Sequence[Mapping]) -> List[dict]:
    """The rows of ``trl_pairs-<split>.jsonl`` (see the module docstring)."""
    if not (len(examples) == len(synthetic) == len(reference)):
        raise ValueError(f"{split}: {len(examples)} examples, {len(synthetic)} synthetic, {len(reference)} scored rows")
    messages = _prompt_messages(cfg, tokenizer, split, examples)
    rows = []
    for ex, syn, ref, (prompt, response) in zip(examples, synthetic, reference, messages):
        for name, r in (("synthetic", syn), ("reference", ref)):
            if r["prompt_id"] != ex.prompt_id or r["prompt_sha"] != ex.prompt_sha:
                raise ValueError(f"{split}: {name} row {r['prompt_id']} does not belong to prompt {ex.prompt_id}")
        room = max(cfg.data.max_length - len(ex.prompt_ids), 0)  # pair_batch cuts prompt + response here
        rows.append({
            "id": ex.id,
            "prompt": list(prompt),
            "chosen": [{"role": "assistant", "content": response}],
            "rejected": [{"role": "assistant", "content": syn["response"]}],
            "ref_chosen_logps": float(ref["ref_real"]),
            "ref_rejected_logps": float(ref["ref_syn"]),
            "prompt_ids": list(ex.prompt_ids),
            "chosen_ids": list(ex.response_ids)[:room],
            "rejected_ids": list(syn["response_ids"])[:room],
        })
    return rows


def write_trl_pairs(it_dir, cfg, tokenizer, splits: Mapping[str, Sequence[Example]], synthetic: Mapping,
                    reference: Mapping) -> List[Path]:
    """Write ``trl_pairs-<split>.jsonl`` into the iteration folder for every split; returns the paths."""
    paths = []
    for split, examples in splits.items():
        path = Path(it_dir) / PAIRS_FILE.format(split=split)
        atomic_write_jsonl(path, trl_pair_rows(cfg, tokenizer, split, examples, synthetic[split], reference[split]))
        paths.append(path)
    return paths


# ----------------------------------------------------------------------------- one iteration in TRL


def measured_alpha(run: Path, iteration: int):
    """The α the harness trained iteration ``iteration`` with (its first logged train step), or None."""
    path = run / "metrics.jsonl"
    if not path.is_file():
        return None
    for r in read_jsonl(path, tolerate_torn_tail=True):
        if r.get("kind") == "train" and r.get("iteration") == iteration and isinstance(r.get("alpha"), (int, float)):
            return float(r["alpha"])
    return None


def selfplay_config_kwargs(cfg, alpha_measured=None) -> dict:
    """SelfPlayConfig keywords equivalent to the harness config's loss / optimiser / batch keys.

    The gap-adaptive α is measured by the harness on held-out synthetic responses, which the TRL
    trainer does not have (its "adaptive" is the temperature-score rule): the export passes the α
    the harness measured for the iteration (``alpha_measured``) as a constant instead.
    """
    if cfg.loss.name == "sft":
        raise ValueError("loss.name='sft' has no TRL self-play counterpart; use trl.SFTTrainer")
    schedule, alpha = cfg.loss.alpha_schedule, cfg.loss.alpha
    if cfg.loss.name == "iris" and schedule in ("adaptive", "gap_adaptive"):
        if alpha_measured is None:
            raise ValueError("loss.alpha_schedule is gap-adaptive, but the run logged no α for this iteration "
                             "(metrics.jsonl); train it in the harness first or set loss.alpha_schedule constant")
        schedule, alpha = "constant", float(alpha_measured)
    return dict(
        loss_name=cfg.loss.name, beta=cfg.loss.beta, alpha_schedule=schedule, alpha=alpha,
        alpha_min=cfg.loss.alpha_min, alpha_max=cfg.loss.alpha_max, scope=cfg.loss.scope,
        length_normalize=cfg.loss.length_normalize, loss_options=dict(cfg.loss.options),
        per_device_train_batch_size=cfg.train.per_device_batch_size,
        gradient_accumulation_steps=cfg.train.gradient_accumulation_steps, num_train_epochs=cfg.train.epochs,
        learning_rate=cfg.optim.lr, warmup_steps=float(cfg.optim.warmup_ratio),  # a float < 1: a ratio
        max_grad_norm=cfg.optim.max_grad_norm or 0.0, max_length=cfg.data.max_length, seed=cfg.seed,
        # The stored opponent log-probs are the reference: no second model in memory.
        precompute_ref_log_probs=True,
    )


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--run", required=True, help="output_dir of a train/selfplay.py run")
    ap.add_argument("--iteration", type=int, default=0, help="iteration t whose pairs to train on (θ_t is the start)")
    ap.add_argument("--output_dir", required=True, help="where SelfPlayTrainer writes its checkpoints and θ_{t+1}")
    ap.add_argument("--max_steps", type=int, default=-1, help="cap on optimizer steps (default: the config's epochs)")
    ap.add_argument("--opponent_only", action="store_true",
                    help="only save θ_t (model + tokenizer) to OUTPUT_DIR/opponent, do not train")
    return ap


def main(argv=None) -> list:
    args = build_parser().parse_args(argv)

    import datasets
    import torch

    from iris_kernels.integrations.trl import SelfPlayConfig, SelfPlayTrainer
    from train.config import load_config
    from train.modeling import build_initial_model, load_checkpoint_model, load_tokenizer, save_model

    run, t = Path(args.run), args.iteration
    pairs = run / f"iter_{t}" / PAIRS_FILE.format(split="train")
    if not pairs.is_file():
        raise FileNotFoundError(f"--run/--iteration: {pairs} not found (has iteration {t} been scored?)")
    cfg = load_config(str(run / "config.yaml"))  # a ConfigError naming the file if it is missing or malformed
    tokenizer = load_tokenizer(cfg.model)
    if t == 0:
        model, source = build_initial_model(cfg.model, tokenizer, cfg.seed), "θ_0 from the run's config"
    else:
        model = load_checkpoint_model(run / f"iter_{t - 1}" / "model", cfg.model)
        source = f"θ_{t} = {run / f'iter_{t - 1}' / 'model'}"
    rows = read_jsonl(pairs)
    # Say what is used: a reused run folder may hold another run's pairs than the one just asked for.
    opponent = Path(args.output_dir) / "opponent"
    save_model(model, tokenizer, opponent)
    print(f"[trl_export] {len(rows)} pairs from {pairs}; opponent {source}, saved to {opponent}", flush=True)
    if args.opponent_only:
        return []
    train_dataset = datasets.Dataset.from_list(rows)
    sp_args = SelfPlayConfig(
        output_dir=args.output_dir, max_steps=args.max_steps, report_to=[], logging_steps=1, save_strategy="no",
        use_cpu=not torch.cuda.is_available(), bf16=False, gradient_checkpointing=False,
        **selfplay_config_kwargs(cfg, measured_alpha(run, t)),
    )
    trainer = SelfPlayTrainer(model, args=sp_args, train_dataset=train_dataset, processing_class=tokenizer)
    trainer.train()
    trainer.save_model(str(Path(args.output_dir) / "model"))
    for record in trainer.state.log_history:
        if "loss" in record:
            keys = ("step", "loss", "iris/alpha", "iris/real/ess", "iris/syn/ess", "rewards/margins")
            print(" ".join(f"{k}={record[k]:.4g}" for k in keys if k in record), flush=True)
    return trainer.state.log_history


def cli(argv=None) -> int:
    """The command line: a missing or malformed run folder, pairs file or config is one line on
    stderr and status 2 (as argparse's own errors), not a traceback."""
    from train.config import ConfigError

    try:
        main(argv)
    except (ConfigError, FileNotFoundError) as err:
        print(f"trl_export: error: {err}", file=sys.stderr, flush=True)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(cli())
