"""IRIS self-play fine-tuning, one iteration after another, resumable at every point.

    python train/selfplay.py --config train/configs/tiny-cpu.yaml --output_dir runs/tiny
    python train/selfplay.py --config train/configs/tiny-cpu.yaml --output_dir runs/tiny --train.iterations 3
    accelerate launch --multi_gpu --num_processes 2 train/selfplay.py --config ... --output_dir ...  # DDP (gloo on CPU)

Iteration t, with θ_t the current model (θ_0 from the config):
  a. generate  one sampled response per prompt (train and held-out) with θ_t  -> iter_t/generated-*.jsonl
  b. score     s_θt of every annotated and synthetic response, once (training rows in their training
               micro-batches, through the training forward)  -> iter_t/reference-train-layout-*, reference-heldout-*
  c. train     θ_{t+1} from θ_t with the self-play loss, the opponent being the numbers of b
               (one model in memory)                                          -> iter_t/model/, iter_t/TRAINED
  d. evaluate  θ_{t+1} on the held-out split                                   -> metrics.jsonl, TensorBoard
  e. mark      iter_t/DONE, written last.
Running the same command again continues where it stopped: inside a generation or scoring shard,
from the last training checkpoint (iter_t/checkpoint/, every train.save_steps steps), after
training, or at the next iteration. See train/README.md for the layout and every option.
"""
from __future__ import annotations

import math
import sys
import time
from pathlib import Path

if __package__ in (None, ""):  # run as a script: make the repository root importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch
from accelerate.utils import set_seed
from tqdm.auto import tqdm

from iris_kernels.integrations.dropout import disable_dropout
from train.checkpoint import (Progress, load_iteration_state, load_training_checkpoint, read_training_progress,
                              remove_training_checkpoint, save_iteration_state, save_training_checkpoint)
from train.config import ConfigError, dump_config, flatten, parse_cli, usage_text, wants_help
from train.deepspeed_support import fill_micro_batch_size, grad_norm_tensor, make_accelerator, whole_model_loading
from train.data import build_examples, load_rows, step_micro_batches, stop_token_ids, with_previous_synthetic
from train.evaluation import evaluate
from train.faults import maybe_kill
from train.generation import make_sampler
from train.generation_requests import engine_env, engine_model_folder, make_engine_sampler
from train.io_utils import atomic_write_json, atomic_write_text
from train.lm_eval_support import iteration_scores, plot_scores
from train.metrics import MetricsLog
from train.modeling import (SequenceLogprobs, build_initial_model, load_checkpoint_model, load_tokenizer,
                            save_model)
from train.objective import Objective, build_alpha_schedule
from train.optim import lr_for_iteration, make_optimizer, step_or_skip, warmup_linear_decay
from train.scoring import (heldout_gap_features, load_training_layout, reference_logprobs, score_in_training_layout,
                           training_layout)
from iris_kernels.schedules import GapAdaptiveAlpha, TemperatureScoreAlpha
from train.shards import load_sharded, run_sharded
from train.trl_export import write_trl_pairs


def changed_config_keys(out: Path, cfg) -> list:
    """The keys whose values differ from the run's recorded config.yaml (none without one)."""
    path = out / "config.yaml"
    if not path.exists():
        return []
    import yaml

    old = flatten(yaml.safe_load(path.read_text()) or {})
    new = flatten(cfg.to_dict())
    return sorted(k for k in set(old) | set(new) if old.get(k) != new.get(k))


def record_config(out: Path, cfg, log) -> None:
    """Keep the resolved config beside the run; on resume, say which keys changed."""
    changed = changed_config_keys(out, cfg)
    if changed:
        log(f"warning: resuming with changed config keys: {', '.join(changed)}")
    atomic_write_text(out / "config.yaml", dump_config(cfg))


INTERRUPTED = "interrupted; run the same command to resume"


def main(argv=None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    if wants_help(argv):
        print(usage_text())
        return
    cfg, output_dir = parse_cli(argv)
    out = Path(output_dir)
    accelerator = make_accelerator(cfg.train.mixed_precision)  # train/deepspeed_support.py
    rank, world, is_main = accelerator.process_index, accelerator.num_processes, accelerator.is_main_process
    deepspeed = accelerator.distributed_type.name == "DEEPSPEED"
    sharded = accelerator.distributed_type.name == "FSDP" or deepspeed
    if deepspeed and cfg.train.gradient_accumulation_steps > 1:
        # accelerate's DeepSpeed wrapper steps the optimizer inside every backward call.
        raise ConfigError("train.gradient_accumulation_steps > 1 is not supported under DeepSpeed; "
                          "raise train.per_device_batch_size or use FSDP")
    if deepspeed:
        fill_micro_batch_size(accelerator, cfg.train.per_device_batch_size)
    t_start = time.time()

    def log(msg: str) -> None:
        if is_main:
            tqdm.write(f"[selfplay {time.time() - t_start:7.1f}s] {msg}")

    set_seed(cfg.seed)
    # The output folder is created only once start-up has succeeded (below): a run that fails to
    # start (a missing file, a bad key) leaves nothing behind.

    # ---------------------------------------------------------------- where to start
    iterations = cfg.train.iterations
    start = next((t for t in range(iterations) if not (out / f"iter_{t}" / "DONE").exists()), iterations)
    if start == iterations:
        log(f"all {iterations} iterations are done in {out}; raise --train.iterations to continue")
        later = sorted(int(d.name[5:]) for d in out.glob("iter_*") if d.name[5:].isdigit() and int(d.name[5:]) >= iterations)
        if later:  # a reused folder: its contents are more than this command asked for
            log(f"note: {out} also holds iteration(s) {', '.join(map(str, later))} of an earlier, longer run; "
                f"use a new --output_dir for a separate run")
        changed = changed_config_keys(out, cfg)
        if changed:
            # Nothing runs, so nothing of the new settings takes effect: say so rather than stay silent.
            log(f"warning: the run was made with other values of {', '.join(changed)}; they were not applied "
                f"(use a new --output_dir to run with them)")
        return
    tokenizer = load_tokenizer(cfg.model)
    if deepspeed:
        clip = accelerator.state.deepspeed_plugin.deepspeed_config.get("gradient_clipping")
        log(f"DeepSpeed ZeRO-{accelerator.state.deepspeed_plugin.zero_stage}: gradient clipping is the DeepSpeed "
            f"config's gradient_clipping ({clip}); optim.max_grad_norm is not used")
    elif cfg.model.torch_dtype in ("bfloat16", "float16"):
        # DeepSpeed's bf16/fp16 modes keep fp32 master weights; a plain torch optimizer does not.
        log(f"warning: model.torch_dtype {cfg.model.torch_dtype} without DeepSpeed: the optimizer updates "
            f"{cfg.model.torch_dtype} weights directly (no fp32 master copy), so updates much smaller than a weight "
            f"round away; use train/configs/accelerate/deepspeed-zero3.yaml, or model.torch_dtype float32 with "
            f"train.mixed_precision bf16")
    trained_already = (out / f"iter_{start}" / "TRAINED").exists()
    # Whole on every process even under ZeRO-3 (train/deepspeed_support.py); prepare() partitions it.
    with whole_model_loading():
        if trained_already:  # crashed during evaluation: θ_{start+1} is on disk already
            log(f"resuming at iteration {start}'s evaluation: θ_{start + 1} is trained and saved already")
            model = load_checkpoint_model(out / f"iter_{start}" / "model", cfg.model)
        elif start > 0:
            log(f"resuming at iteration {start}: iterations 0-{start - 1} are done")
            model = load_checkpoint_model(out / f"iter_{start - 1}" / "model", cfg.model)
        else:
            if (out / "config.yaml").exists():  # written only once a start-up succeeded
                log("resuming iteration 0")
            model = build_initial_model(cfg.model, tokenizer, cfg.seed)
    model.to(accelerator.device)
    autocast = accelerator.autocast
    seq_model = SequenceLogprobs(model)  # scoring and evaluation; shares every parameter with training

    # ---------------------------------------------------------------- data, rendered once for every phase
    stop_ids = stop_token_ids(tokenizer, model.generation_config)
    render = dict(messages_field=cfg.data.messages_field, answer_field=cfg.data.answer_field,
                  max_prompt_length=cfg.data.max_prompt_length, max_length=cfg.data.max_length,
                  first_turn_only=cfg.data.first_turn_only)
    splits = {"train": build_examples(
        load_rows(cfg.data.train, split=cfg.data.train_split, key="data.train", limit=cfg.data.max_train_prompts),
        tokenizer, stop_ids, name="data.train", **render)}
    if cfg.data.eval is not None:
        splits["heldout"] = build_examples(
            load_rows(cfg.data.eval, split=cfg.data.eval_split, key="data.eval", limit=cfg.data.max_eval_prompts),
            tokenizer, stop_ids, name="data.eval", **render)
    train_ex = splits["train"]
    global_batch = world * cfg.train.per_device_batch_size * cfg.train.gradient_accumulation_steps
    if len(train_ex) // global_batch < 1:
        raise ValueError(
            f"train.per_device_batch_size: {len(train_ex)} training prompts cannot fill one global batch of "
            f"{global_batch} (= {world} processes x {cfg.train.per_device_batch_size} x "
            f"{cfg.train.gradient_accumulation_steps} accumulation steps)")

    def rows_of(t: int) -> int:  # training rows of iteration t: 2n from iteration 1 on under SPIN's mixing
        return len(train_ex) * (2 if cfg.train.mix_previous_synthetic and t > 0 else 1)

    def steps_of(t: int) -> int:
        steps = cfg.train.epochs * (rows_of(t) // global_batch)
        return steps if cfg.train.max_steps is None else min(steps, cfg.train.max_steps)

    log(f"{len(train_ex)} train / {len(splits.get('heldout', []))} held-out prompts, {world} process(es), "
        f"global batch {global_batch}, {steps_of(0)} steps per iteration"
        + (f" ({steps_of(1)} from iteration 1 on: the previous synthetic responses are mixed in)"
           if cfg.train.mix_previous_synthetic else "") + f", starting at iteration {start}")
    log(f"parallelism: {describe_parallelism(accelerator)}")
    # Only now, with the model and the data loaded: a run that fails at start-up leaves no
    # output folder (or, when resuming, no new config.yaml) behind, so its corrected rerun is a
    # fresh start and not a "resume".
    if is_main:
        out.mkdir(parents=True, exist_ok=True)
        record_config(out, cfg, log)
    accelerator.wait_for_everyone()

    # ---------------------------------------------------------------- run state carried across iterations
    alpha_schedule = build_alpha_schedule(cfg.loss, total_steps=sum(steps_of(t) for t in range(iterations)))
    global_step = 0
    if start > 0:
        state = load_iteration_state(out / f"iter_{start - 1}" / "state.pt")
        global_step = state["global_step"]
        alpha_schedule.load_state_dict(state["alpha_schedule"])
    ckpt_progress = read_training_progress(out / f"iter_{start}" / "checkpoint")
    initial_eval_due = start == 0 and not trained_already and cfg.eval.at_start and "heldout" in splits \
        and not (out / "eval_initial.json").exists()
    # Drop what the interrupted run logged past the point this one resumes from (-1: θ_0's evaluation too).
    metrics = MetricsLog(out, enabled=is_main, resume_iteration=-1 if initial_eval_due else start,
                         resume_step=ckpt_progress.global_step if ckpt_progress else global_step)
    objective = Objective(cfg.loss, alpha_schedule, accelerator,
                          softcap=getattr(model.config, "final_logit_softcapping", None))

    def run_eval(iteration: int, synthetic=None, reference=None, alpha=None) -> dict:
        if "heldout" not in splits:
            return {}
        return evaluate(seq_model, model, tokenizer, splits["heldout"], synthetic=synthetic, reference=reference,
                        beta=cfg.loss.beta, alpha=alpha, stop_ids=stop_ids, pad_id=tokenizer.pad_token_id,
                        max_length=cfg.data.max_length, batch_size=cfg.eval.batch_size,
                        max_new_tokens=cfg.eval.max_new_tokens, accuracy=cfg.eval.accuracy,
                        accelerator=accelerator, autocast=autocast)

    uses_alpha = cfg.loss.name == "iris"  # the other losses have no α: it is neither shown nor logged
    legend_shown = False
    if initial_eval_due:
        result = run_eval(-1)
        record = {"kind": "eval", "iteration": -1, "step": 0, **result}
        metrics.log(record)
        if is_main:
            atomic_write_json(out / "eval_initial.json", record)
        accelerator.wait_for_everyone()
        log(metrics_legend(cfg))
        log(f"θ_0: {format_metrics(result)}")
        legend_shown = True

    for t in range(start, iterations):
        it = out / f"iter_{t}"
        if is_main:
            it.mkdir(parents=True, exist_ok=True)
        accelerator.wait_for_everyone()
        trained = (it / "TRAINED").exists()
        if trained:
            log(f"iteration {t}: generation, scoring and training are done already (iter_{t}/TRAINED)")

        # ------------------------------------------------------------ a. generate with θ_t
        synthetic = {}
        engine_model = None
        if cfg.generation.backend == "vllm" and not trained:  # a separate engine on θ_t's folder
            engine_model = engine_model_folder(out, t, cfg.model, model, tokenizer, accelerator)
        for split, examples in splits.items():
            if not trained:
                if engine_model is not None:
                    sampler = make_engine_sampler(tokenizer, cfg.generation, model=engine_model,
                                                  dtype=cfg.model.torch_dtype, stop_ids=stop_ids,
                                                  seed_parts=(cfg.seed, t, split), work_dir=it / "engine",
                                                  prefix=split, env_extra=engine_env(accelerator))
                else:
                    sampler = make_sampler(model, tokenizer, cfg.generation, stop_ids=stop_ids,
                                           seed_parts=(cfg.seed, t, split))
                # The engine answers a whole shard per run: a crash loses at most that shard.
                batch = cfg.generation.shard_size if engine_model is not None else cfg.generation.batch_size
                run_sharded(examples, sampler, out_dir=it, prefix=f"generated-{split}",
                            shard_size=cfg.generation.shard_size, batch_size=batch,
                            rank=rank, world_size=world, desc=f"iter {t} generate {split}",
                            fault_phase="generate", show_progress=is_main, log=log)
                accelerator.wait_for_everyone()
            synthetic[split] = load_sharded(examples, out_dir=it, prefix=f"generated-{split}",
                                            shard_size=cfg.generation.shard_size)
        rows = dict(splits)  # the rows this iteration scores and trains on
        if cfg.train.mix_previous_synthetic and t > 0:
            previous = load_sharded(train_ex, out_dir=out / f"iter_{t - 1}", prefix="generated-train",
                                    shard_size=cfg.generation.shard_size)
            rows["train"], synthetic["train"] = with_previous_synthetic(train_ex, synthetic["train"], previous)
        steps_per_iteration = steps_of(t)

        # ------------------------------------------------------------ b. score both responses under θ_t, once
        reference = {}
        for split, examples in rows.items():
            if split == "train":
                # In the training micro-batches, through the training forward: g = 0 exactly at θ = θ_t.
                if not trained:
                    layout = training_layout(len(examples), per_device=cfg.train.per_device_batch_size,
                                             accumulation=cfg.train.gradient_accumulation_steps, world=world,
                                             seed=cfg.seed, iteration=t)
                    score_in_training_layout(objective.training_module(model), examples, synthetic[split],
                                             batches=layout[rank], out_dir=it, rank=rank, world=world,
                                             pad_id=tokenizer.pad_token_id, max_length=cfg.data.max_length,
                                             autocast=autocast, length_normalize=objective.criterion.length_normalize,
                                             log=log)
                    accelerator.wait_for_everyone()
                reference[split] = load_training_layout(examples, out_dir=it, world=world)
                continue
            if not trained:
                def score(batch, _syn=synthetic[split]):
                    return reference_logprobs(seq_model, batch, [_syn[e.prompt_id] for e in batch],
                                              pad_id=tokenizer.pad_token_id, max_length=cfg.data.max_length,
                                              autocast=autocast)

                run_sharded(examples, score, out_dir=it, prefix=f"reference-{split}",
                            shard_size=cfg.generation.shard_size, batch_size=cfg.eval.batch_size,
                            rank=rank, world_size=world, desc=f"iter {t} score {split}",
                            fault_phase="score", show_progress=is_main, log=log)
                accelerator.wait_for_everyone()
            reference[split] = load_sharded(examples, out_dir=it, prefix=f"reference-{split}",
                                            shard_size=cfg.generation.shard_size)
        if is_main and not trained:  # the same pairs as a TRL preference dataset (train/trl_export.py)
            # This iteration's own pairs (under SPIN's mixing, the first n rows; the rest are in iter_{t-1}'s file).
            n = len(train_ex)
            write_trl_pairs(it, cfg, tokenizer, splits, {**synthetic, "train": synthetic["train"][:n]},
                            {**reference, "train": reference["train"][:n]})

        # ------------------------------------------------------------ c. train θ_{t+1}
        if trained:
            state = load_iteration_state(it / "state.pt")
            global_step, alpha = state["global_step"], state["alpha"]
            alpha_schedule.load_state_dict(state["alpha_schedule"])
        else:
            feed_alpha_schedule(alpha_schedule, splits, synthetic, reference, stop_ids=stop_ids,
                                vocab_size=model.config.vocab_size, seed=cfg.seed, iteration=t, rank=rank,
                                world=world)

            optimizer = make_optimizer(model.parameters(), cfg.optim, lr_for_iteration(cfg.optim, t))
            warmup = int(cfg.optim.warmup_ratio * steps_per_iteration)
            lr_scheduler = warmup_linear_decay(optimizer, steps_per_iteration, warmup)
            train_module = objective.training_module(model)
            wrapped, optimizer = accelerator.prepare(train_module, optimizer)
            progress = load_training_checkpoint(accelerator, it / "checkpoint", lr_scheduler, alpha_schedule)
            if progress is None:
                progress = Progress(iteration=t, global_step=global_step)
            else:
                log(f"iteration {t}: resuming training at step {progress.step_in_iteration}/{steps_per_iteration} "
                    f"from the checkpoint in {it / 'checkpoint'}")
            model.train()
            if not cfg.train.keep_dropout:
                # The reference was scored without dropout: with it, g != 0 at θ = θ_t.
                disable_dropout(model)
            bar = tqdm(total=steps_per_iteration, initial=progress.step_in_iteration, desc=f"iter {t} train",
                       disable=not is_main, dynamic_ncols=True)
            while progress.step_in_iteration < steps_per_iteration:
                micro = [
                    objective.make_batch([rows["train"][i] for i in idx], [synthetic["train"][i] for i in idx],
                                         [reference["train"][i] for i in idx], pad_id=tokenizer.pad_token_id,
                                         max_length=cfg.data.max_length)
                    for idx in step_micro_batches(len(rows["train"]), progress.step_in_iteration,
                                                  per_device=cfg.train.per_device_batch_size,
                                                  accumulation=cfg.train.gradient_accumulation_steps,
                                                  rank=rank, world=world, seed=cfg.seed, iteration=t)
                ]
                alpha = alpha_schedule.alpha(progress.global_step)
                first_abs_g = None
                if progress.step_in_iteration == 0 and cfg.loss.name != "sft":
                    # θ = θ_t: g should be exactly 0. Mean |g| over every rank's rows of this step
                    # measures the reference pass's disagreement with the training pass (logged).
                    sums = objective.abs_g_sums(wrapped, [{k: v.to(accelerator.device) for k, v in mb.items()}
                                                               for mb in micro], autocast=autocast)
                    sums = accelerator.reduce(sums, "sum")
                    first_abs_g = float(sums[0] / sums[1])
                loss, step_metrics = objective.forward_backward(wrapped, micro, step=progress.global_step,
                                                                autocast=autocast)
                grad_norm = accelerator.clip_grad_norm_(
                    wrapped.parameters(), cfg.optim.max_grad_norm if cfg.optim.max_grad_norm else math.inf)
                grad_norm = grad_norm_tensor(grad_norm)  # DeepSpeed: a float; FSDP2: a DTensor
                # Every rank takes the same decision (all-reduced), or the processes would diverge;
                # a skipped step still lets an fp16 loss scaler back off (optim.step_or_skip). Under
                # DeepSpeed its optimizer.step() is a no-op: the engine stepped inside
                # accelerator.backward (and skipped a non-finite step itself; tests/test_train_zero3.py).
                skipped = step_or_skip(accelerator, optimizer, loss, grad_norm)
                progress.nan_streak = progress.nan_streak + 1 if skipped else 0
                optimizer.zero_grad(set_to_none=True)
                lr = lr_scheduler.get_last_lr()[0]
                lr_scheduler.step()
                progress.step_in_iteration += 1
                progress.global_step += 1
                bar.update(1)
                k = progress.step_in_iteration
                if skipped or k == 1 or k % cfg.train.log_steps == 0:
                    record = {"kind": "train", "iteration": t, "step": progress.global_step,
                              "step_in_iteration": progress.step_in_iteration, "loss": float(loss),
                              **({"alpha": alpha} if uses_alpha else {}),
                              "lr": lr, "grad_norm": float(grad_norm), "skipped": skipped}
                    record.update({k: float(v) for k, v in step_metrics.items()})
                    if first_abs_g is not None:
                        record["first_step_mean_abs_g"] = first_abs_g
                    metrics.log(record)
                    bar.set_postfix(loss=f"{float(loss):.4f}", **({"alpha": f"{alpha:.3g}"} if uses_alpha else {}))
                if skipped:
                    log(f"step {progress.global_step}: non-finite loss or gradient, step skipped "
                        f"({progress.nan_streak} in a row)")
                    if progress.nan_streak >= cfg.train.max_consecutive_nan:
                        raise FloatingPointError(
                            f"{progress.nan_streak} consecutive non-finite steps (train.max_consecutive_nan); "
                            f"stopping. The last good checkpoint is in {it / 'checkpoint'} or {out}")
                done = progress.step_in_iteration == steps_per_iteration
                if cfg.train.save_steps and progress.step_in_iteration % cfg.train.save_steps == 0 and not done:
                    save_training_checkpoint(accelerator, it / "checkpoint", progress, lr_scheduler, alpha_schedule)
                maybe_kill("train", progress.global_step)
            bar.close()
            global_step, alpha = progress.global_step, alpha_schedule.alpha(max(progress.global_step - 1, 0))

            # θ_{t+1} to disk (atomic), then the marker that lets a crash in evaluation skip training.
            state_dict = None
            if sharded:
                # Collective: every process takes part; under DeepSpeed only the main one gets the dict.
                full = accelerator.get_state_dict(wrapped)
                if full is not None:
                    state_dict = {k[len("model."):]: v for k, v in full.items() if k.startswith("model.")}
            with whole_model_loading():
                save_model(model, tokenizer, it / "model", state_dict=state_dict, is_main=is_main)
            if is_main:
                save_iteration_state(it / "state.pt", global_step=global_step, alpha=alpha,
                                     alpha_schedule=alpha_schedule)
                atomic_write_text(it / "TRAINED", "")
            accelerator.wait_for_everyone()
            remove_training_checkpoint(accelerator, it / "checkpoint")
            del wrapped, optimizer, lr_scheduler, train_module
            accelerator.free_memory()
            if sharded:
                # The trained parameters are shards spread over the ranks; generation, scoring and
                # evaluation need whole models, so every rank reloads θ_{t+1} from what was just saved.
                with whole_model_loading():
                    model = load_checkpoint_model(it / "model", cfg.model).to(accelerator.device)
                seq_model = SequenceLogprobs(model)
            model.eval()

        # ------------------------------------------------------------ d. evaluate θ_{t+1} against θ_t
        # ESS of the IRIS weights over the held-out set needs α; the other losses have none.
        result = run_eval(t, synthetic.get("heldout"), reference.get("heldout"), alpha if uses_alpha else None)
        result.update(alpha_schedule_metrics(alpha_schedule))
        if cfg.eval.lm_eval.tasks:  # train/lm_eval_support.py: the saved θ_{t+1}, main process only
            if is_main:
                result.update(iteration_scores(it, cfg.eval.lm_eval, out_dir=out, device=str(accelerator.device),
                                               dtype=cfg.model.torch_dtype, seed=cfg.seed,
                                               trust_remote_code=cfg.model.trust_remote_code))
            accelerator.wait_for_everyone()
        record = {"kind": "eval", "iteration": t, "step": global_step, **({"alpha": alpha} if uses_alpha else {}),
                  **result}
        metrics.log(record)
        if cfg.eval.lm_eval.tasks and is_main:
            plot_scores(out, metrics.records("eval"))
        if not legend_shown:
            log(metrics_legend(cfg))
            legend_shown = True
        log(f"iteration {t} done: {format_metrics(record)}")

        # ------------------------------------------------------------ e. DONE, last
        if is_main:
            atomic_write_json(it / "eval.json", record)
            atomic_write_text(it / "DONE", "")
        accelerator.wait_for_everyone()

    metrics.close()
    log(f"finished {iterations} iterations in {out}")


def feed_alpha_schedule(schedule, splits, synthetic, reference, *, stop_ids, vocab_size: int, seed: int,
                        iteration: int, rank: int, world: int) -> None:
    """Set α_t of an adaptive schedule, once per iteration before its first step (others: nothing).

    gap_adaptive: the classifier two-sample test on the HELD-OUT split's annotated and synthetic
    responses (each rank passes its strided rows; the schedule gathers, tests on one rank and
    broadcasts). temperature_score (the first rule, to reproduce old runs): the opponent's per-token
    log-prob gap on the training rows, all-reduced, as it always was.
    """
    if isinstance(schedule, GapAdaptiveAlpha):
        real, syn = heldout_gap_features(splits["heldout"], synthetic["heldout"], reference["heldout"],
                                         stop_ids=stop_ids, vocab_size=vocab_size, rank=rank, world=world)
        mine = list(range(rank, len(splits["heldout"]), world))  # heldout_gap_features' rows: the prompt ids
        schedule.update_gap(real, syn, seed=(seed, iteration), real_keys=mine, syn_keys=mine)
    elif isinstance(schedule, TemperatureScoreAlpha):
        mine = reference["train"][rank::world]
        schedule.accumulate_gap(
            torch.tensor([r["ref_syn"] / max(r["n_syn"], 1) for r in mine], dtype=torch.float64),
            torch.tensor([r["ref_real"] / max(r["n_real"], 1) for r in mine], dtype=torch.float64))
        schedule.update_gap()


def alpha_schedule_metrics(schedule) -> dict:
    """What the adaptive schedule measured this iteration, for the eval record (empty otherwise).

    temperature_score = mean s̄_θt(synthetic) − mean s̄_θt(annotated), per-token opponent
    log-probs: < 0 the opponent is too flat, > 0 too sharp; not a distance (docs/math.md#alpha-schedule).
    """
    if isinstance(schedule, GapAdaptiveAlpha):
        return dict(schedule.last_metrics)
    if isinstance(schedule, TemperatureScoreAlpha):
        return {"temperature_score_train": schedule.last_gap}
    return {}


def describe_parallelism(accelerator) -> str:
    """Which data parallelism this run uses, in words: FSDP's version, DDP's backend, or one
    process; and a warning when the launch asked for FSDP but accelerate did not enable it."""
    import os

    kind, world = accelerator.distributed_type.name, accelerator.num_processes
    backend = getattr(accelerator.state, "backend", None) or "none"
    if kind == "FSDP":
        plugin = getattr(accelerator.state, "fsdp_plugin", None)
        version = getattr(plugin, "fsdp_version", 1)
        return f"FSDP{version if version and version > 1 else ''} over {world} processes ({backend}): each holds a shard"
    if kind == "DEEPSPEED":
        return f"DeepSpeed over {world} processes ({backend})"
    text = (f"DDP over {world} processes ({backend}): each holds the whole model" if world > 1
            else "one process, no data parallelism")
    if os.environ.get("ACCELERATE_USE_FSDP", "").lower() in ("1", "true"):
        text += ("; warning: the launch asked for FSDP but accelerate did not enable it here "
                 "(accelerate does not enable FSDP without CUDA), so this is not FSDP")
    return text


# Every key of an eval record (metrics.jsonl "kind": "eval", iter_t/eval.json) and what it means;
# metrics_legend prints the ones this run logs. tests/test_train_ux.py checks that a run's records
# hold no key missing here.
EVAL_KEYS = {
    "kind": "\"eval\"", "iteration": "t; -1 is θ_0 before any training", "step": "optimizer steps so far",
    "eval_prompts": "held-out prompts evaluated",
    "nll": "per-token negative log-likelihood of the annotated responses (lower is better)",
    "accuracy": None,  # filled in by metrics_legend (it depends on the config)
    "choice_accuracy": "fraction of held-out prompts whose annotated answer scores a strictly higher summed "
                       "log-prob than each of its distractors (other held-out answers of the same kind), as "
                       "lm-evaluation-harness scores multiple choice; chance = 1/choices",
    "choice_prompts": "prompts that got distractors", "choices": "options per question (answer + distractors)",
    "reward_margin": "mean g(annotated) - g(synthetic), g = beta (log p_new - log p_opponent) of a response",
    "win_rate": "fraction of prompts where the annotated response gains more than the synthetic one "
                "(higher is better)",
    "alpha": "the IRIS alpha of the iteration (IRIS only)",
    "ess_real": "effective sample size 1/sum(w^2) of the IRIS weights of the annotated responses, "
                "w = softmax((alpha-1) g) (IRIS only)",
    "ess_syn": "the same for the synthetic responses, w = softmax(alpha g) (IRIS only)",
    "ess_real_frac": "ess_real / prompts: 1 = uniform weights, 1/prompts = one response takes all (IRIS only)",
    "ess_syn_frac": "ess_syn / prompts (IRIS only)",
    # The adaptive alpha's measurements (IRIS with alpha_schedule gap_adaptive / temperature_score):
    "gap_u": "debiased lower bound on TV(p_data, p_opponent) from a classifier two-sample test on the held-out "
             "annotated vs synthetic responses, u = clip(2 acc - 1 - 0.4/sqrt(N), 0, 1); sets alpha (gap_adaptive)",
    "gap_acc": "that classifier's 2-fold held-out accuracy (0.5 = the two sides look alike)",
    "gap_ce": "that classifier's held-out cross-entropy in nats (log 2 = chance)",
    "gap_N": "rows in the two-sample test (annotated + synthetic)",
    "temperature_score": "mean per-token opponent log-prob of its own samples minus that of the data, on the "
                         "held-out split: < 0 too flat, > 0 too sharp; not a distance (docs/math.md#alpha-schedule)",
    "temperature_score_train": "the same on the training rows: what alpha_schedule temperature_score (the first "
                               "rule, kept to reproduce old runs) uses",
}


def metrics_legend(cfg) -> str:
    """What the numbers of the eval lines (and eval.json) mean, printed once per run before the first of them."""
    legend = dict(EVAL_KEYS)
    legend["accuracy"] = (
        f"fraction of prompts whose greedy answer (up to {cfg.eval.max_new_tokens} tokens) equals the row's "
        f"'{cfg.data.answer_field}' field (whitespace-normalised); rows without one are not counted, and a model "
        "that answers none exactly scores 0 (the tiny random preset always does)")
    skip = {"kind", "iteration", "step"}
    if not cfg.eval.accuracy:
        skip.add("accuracy")
    if cfg.loss.name != "iris":
        skip |= {k for k, v in legend.items() if v and v.endswith("(IRIS only)")}
    # Only IRIS builds a gap-reading schedule (train/objective.py); the others never log these keys.
    gap_adaptive = cfg.loss.name == "iris" and cfg.loss.alpha_schedule in ("adaptive", "gap_adaptive")
    if not gap_adaptive:
        skip |= {"gap_u", "gap_acc", "gap_ce", "gap_N", "temperature_score"}
    if not (cfg.loss.name == "iris" and cfg.loss.alpha_schedule == "temperature_score"):
        skip.add("temperature_score_train")
    lines = ["eval metrics (held-out prompts; also in DIR/metrics.jsonl and iter_t/eval.json):"]
    lines += [f"{k} = {v}" for k, v in legend.items() if k not in skip]
    if cfg.loss.name == "iris":
        lines.append("the training loss shown in the progress bar is the IRIS loss -J_alpha, the negated estimate of "
                     "a lower bound on the Renyi divergence between the data and the opponent (docs/math.md#objective): "
                     "negative values are normal, and lower is better")
    bounds = {"space": "js_bound = -loss, a lower bound on 2 JS(data, opponent) - log 4",
              "chi2": "chi2_bound = -loss, a lower bound on the chi-square divergence of the data from the opponent",
              "chi2_logratio": "chi2_bound = -loss, a (loose) lower bound on the chi-square divergence",
              "spin": "SPIN's loss estimates no divergence (a logistic loss of the reward margin)",
              "dpo": "DPO's loss estimates no divergence (a logistic loss of the reward margin)"}
    if cfg.loss.name in bounds:
        lines.append(bounds[cfg.loss.name] + " (docs/math.md#divergence-estimates)")
    if gap_adaptive:
        lines.append("alpha = alpha_min + (alpha_max - alpha_min) min(gap_u / u_ref, 1): gap_u and alpha are measured "
                     "on the opponent theta_t's held-out samples BEFORE the iteration trains; nll and the rest of the "
                     "line are measured on theta_{t+1} after it (docs/math.md#alpha-schedule)")
    lines.append("first_step_mean_abs_g (train records) = mean |g| at an iteration's first step, where theta = "
                 "theta_t: 0 exactly unless the reference pass disagrees with the training pass")
    return "\n    ".join(lines)


def format_metrics(m: dict) -> str:
    keys = ("nll", "accuracy", "choice_accuracy", "reward_margin", "win_rate", "alpha", "gap_u", "gap_acc",
            "temperature_score", "ess_real_frac", "ess_syn_frac", "first_step_mean_abs_g")
    return ", ".join(f"{k} {m[k]:.4g}" for k in keys if isinstance(m.get(k), (int, float)))


def cli(argv=None) -> int:
    """The command-line entry: Ctrl-C ends the run with one line (the run resumes from where it
    stopped, so a traceback would only hide that) and the shell's usual status for SIGINT, 130;
    a mistake in the config or the command line is one line too, with status 2 (as argparse)."""
    try:
        main(argv)
    except KeyboardInterrupt:
        # A progress bar left open by the unwound frames would be closed (and redrawn) when it is
        # collected, after this line: close them first so that the message stays the last line.
        for bar in list(getattr(tqdm, "_instances", ())):
            bar.close()
        print(f"\n{INTERRUPTED}", file=sys.stderr, flush=True)
        return 130
    except (ConfigError, FileNotFoundError) as err:
        # A bad key, or a missing / malformed config, data, model or tokenizer file: the message
        # names the file and the key that named it; a traceback would only bury it.
        print(f"selfplay: error: {err}", file=sys.stderr, flush=True)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(cli())
