"""iris_kernels.integrations.trl on CPU: SelfPlayTrainer against SelfPlayLoss called directly, the
first step at θ = θ_ref, gradient accumulation and two gloo processes against one big batch, a
save/resume of the α schedule, LoRA with a frozen lm_head, and bad configurations.

Models: a tiny random Llama with an untied lm_head and one with tied embeddings (the lm_head
weight is the embedding matrix), on the bundled character tokenizer with its chat template.
"""
import copy
import math
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("trl", reason='needs trl (pip install "iris-kernels[trl]")')
datasets = pytest.importorskip("datasets")

from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM  # noqa: E402

from iris_kernels import SelfPlayLoss  # noqa: E402
from iris_kernels.integrations.trl import STATE_FILE, SelfPlayConfig, SelfPlayTrainer  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
TOKENIZER = ROOT / "train" / "data" / "tiny-tokenizer"
pytestmark = pytest.mark.timeout(600)
os.environ.setdefault("HF_HUB_OFFLINE", "1")


def _tokenizer():
    return AutoTokenizer.from_pretrained(str(TOKENIZER))


def _model(tok, *, tied: bool, seed: int = 0, **config):
    cfg = LlamaConfig(
        vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
        num_key_value_heads=1, max_position_embeddings=128, pad_token_id=tok.pad_token_id,
        eos_token_id=tok.eos_token_id, bos_token_id=None, tie_word_embeddings=tied, **config,
    )
    torch.manual_seed(seed)
    return LlamaForCausalLM(cfg)


def _rows(n=8, *, ref=False, seed=0):
    g = torch.Generator().manual_seed(seed)
    rows = []
    for i in range(n):
        row = {
            "prompt": [{"role": "user", "content": f"What is {i}+{2 * i}?"}],
            "chosen": [{"role": "assistant", "content": str(3 * i)}],
            # synthetic responses of different lengths (padding inside the batch)
            "rejected": [{"role": "assistant", "content": str(7 * i + 1) + "?" * (i % 4)}],
        }
        if ref:  # stored opponent log-probs, away from the policy's so that g != 0
            row["ref_chosen_logps"] = float(-5.0 - 5.0 * torch.rand((), generator=g))
            row["ref_rejected_logps"] = float(-8.0 - 8.0 * torch.rand((), generator=g))
        rows.append(row)
    return datasets.Dataset.from_list(rows)


def _args(tmp_path, **kw):
    base = dict(
        output_dir=str(tmp_path / "out"), per_device_train_batch_size=4, max_steps=1, report_to=[], use_cpu=True,
        bf16=False, gradient_checkpointing=False, save_strategy="no", logging_steps=1, disable_tqdm=True,
        learning_rate=1e-3, train_sampling_strategy="sequential", seed=0, max_length=64,
    )
    base.update(kw)
    return SelfPlayConfig(**base)


def _perturb(model, seed=1, scale=0.05):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(scale * torch.randn(p.shape, generator=g))


def _batch(trainer, n=4):
    return trainer.data_collator([trainer.train_dataset[i] for i in range(n)])


def _grads(model):
    return {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}


# ----------------------------------------------------------------------------------------------
# Loss and gradients equal SelfPlayLoss on the same batch
# ----------------------------------------------------------------------------------------------

CASES = [(loss, pre, False) for loss in ("iris", "spin", "space", "chi2", "dpo") for pre in (True, False)]
CASES += [("iris", True, True), ("iris", False, True), ("spin", False, True)]


@pytest.mark.parametrize("loss_name,precompute,tied", CASES)
def test_trainer_loss_and_grads_equal_selfplay_loss(tmp_path, loss_name, precompute, tied):
    tok = _tokenizer()
    model = _model(tok, tied=tied)
    ref_model = None if precompute else copy.deepcopy(model)
    args = _args(tmp_path, loss_name=loss_name, precompute_ref_log_probs=precompute,
                 alpha=0.7 if loss_name == "iris" else 1.0)
    trainer = SelfPlayTrainer(model, ref_model=ref_model, args=args, train_dataset=_rows(),
                              processing_class=tok)
    _perturb(model)  # θ != θ_ref, so the loss weights are not uniform
    batch = _batch(trainer)
    model.train()
    loss = trainer.compute_loss(model, batch)
    loss.backward()
    got = _grads(model)
    model.zero_grad(set_to_none=True)

    labels = batch["input_ids"].masked_fill(batch["completion_mask"] == 0, -100)
    crit = SelfPlayLoss(loss_name, alpha=0.7 if loss_name == "iris" else None, scope="global")
    hidden = model.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).last_hidden_state
    weight = model.get_output_embeddings().weight
    if tied:
        assert weight is model.get_input_embeddings().weight
    B = batch["input_ids"].shape[0] // 2
    if precompute:
        kw = dict(ref_logps=torch.cat([batch["ref_chosen_logps"], batch["ref_rejected_logps"]]).float())
    else:
        with torch.no_grad():
            ref_hidden = ref_model.model(input_ids=batch["input_ids"],
                                         attention_mask=batch["attention_mask"]).last_hidden_state
        kw = dict(ref_hidden=ref_hidden, ref_weight=ref_model.get_output_embeddings().weight)
    want, _ = crit(hidden, weight, labels, num_real=B, **kw)
    want.backward()
    expected = _grads(model)

    assert torch.isfinite(loss) and abs(float(want.detach())) > 1e-4  # a loss that is not trivially 0
    torch.testing.assert_close(loss.detach(), want.detach(), rtol=1e-5, atol=1e-6)
    assert set(got) == set(expected)
    for name in expected:
        torch.testing.assert_close(got[name], expected[name], rtol=1e-4, atol=1e-6, msg=name)


# ----------------------------------------------------------------------------------------------
# θ = θ_ref at the first step
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("loss_name,expected", [("iris", 0.0), ("spin", math.log(2)), ("dpo", math.log(2))])
def test_first_step_at_reference(tmp_path, loss_name, expected):
    tok = _tokenizer()
    trainer = SelfPlayTrainer(_model(tok, tied=False), args=_args(tmp_path, loss_name=loss_name,
                              precompute_ref_log_probs=True, per_device_eval_batch_size=4),
                              train_dataset=_rows(), eval_dataset=_rows(4, seed=3), processing_class=tok)
    trainer.train()
    first = trainer.state.log_history[0]
    evaluated = trainer.evaluate()  # after one step θ != θ_ref: a finite loss and the same metric keys
    assert math.isfinite(evaluated["eval_loss"]) and "eval_logps/chosen" in evaluated
    assert first["loss"] == pytest.approx(expected, abs=1e-6)
    if loss_name == "iris":
        assert first["iris/alpha"] == 1.0 and first["iris/real/ess"] == pytest.approx(4.0)
        for key in ("iris/real/kappa", "iris/syn/kappa", "iris/real/max_weight", "iris/syn/ess", "rewards/margins"):
            assert key in first


@pytest.mark.parametrize("disable_dropout", [True, False])
def test_first_step_with_attention_dropout_in_the_config(tmp_path, disable_dropout):
    # A Llama with attention_dropout 0.1 (a functional dropout TRL's own helper leaves on): the
    # reference is scored without dropout, so only a dropout-free policy gives g = 0 exactly.
    tok = _tokenizer()
    model = _model(tok, tied=False, attention_dropout=0.1, attn_implementation="eager")
    trainer = SelfPlayTrainer(model, args=_args(tmp_path, loss_name="iris", precompute_ref_log_probs=True,
                                                disable_dropout=disable_dropout),
                              train_dataset=_rows(), processing_class=tok)
    trainer.train()
    first = trainer.state.log_history[0]
    if disable_dropout:
        assert first["loss"] == 0.0
    else:  # dropout kept, as asked: the documented cost
        assert abs(first["loss"]) > 1e-4


def _reference_warnings(trainer):
    import warnings

    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        trainer.train()
    return [w for w in seen if "differ from the reference log-probs" in str(w.message)]


def test_first_batch_warns_when_the_model_is_not_the_reference(tmp_path):
    """Stored ref_*_logps belong to the opponent θ_t: a run that starts from θ_t is silent and
    starts at loss 0; one that starts from another model warns once (and its first loss is not 0)."""
    tok = _tokenizer()
    opponent = _model(tok, tied=False)
    scored = SelfPlayTrainer(copy.deepcopy(opponent), args=_args(tmp_path / "score", precompute_ref_log_probs=True),
                             train_dataset=_rows(), processing_class=tok).train_dataset
    assert {"ref_chosen_logps", "ref_rejected_logps"} <= set(scored.column_names)  # the opponent's values

    right = SelfPlayTrainer(copy.deepcopy(opponent), args=_args(tmp_path / "right", precompute_ref_log_probs=True),
                            train_dataset=scored, processing_class=tok)
    assert _reference_warnings(right) == []
    assert right.state.log_history[0]["loss"] == pytest.approx(0.0, abs=1e-6)

    other = copy.deepcopy(opponent)
    _perturb(other, seed=5, scale=0.2)  # e.g. θ_{t+1}, the model saved beside the pairs
    wrong = SelfPlayTrainer(other, args=_args(tmp_path / "wrong", precompute_ref_log_probs=True, max_steps=2),
                            train_dataset=scored, processing_class=tok)
    seen = _reference_warnings(wrong)
    assert len(seen) == 1 and "trl_export.py saves it" in str(seen[0].message)  # once, not every step
    assert abs(wrong.state.log_history[0]["loss"]) > 1e-3


# ----------------------------------------------------------------------------------------------
# Gradient accumulation, two processes: the step's batch, whatever its split
# ----------------------------------------------------------------------------------------------


def _sgd_args(tmp_path, **kw):
    # Plain SGD without clipping: θ_1 − θ_0 = −lr · the step's gradient, compared exactly.
    return _args(tmp_path, optim="sgd", learning_rate=1.0, max_grad_norm=0.0, weight_decay=0.0,
                 lr_scheduler_type="constant", **kw)


def _step_delta(tmp_path, tok, *, precompute, per_device, accumulation, scope="global", tied=False):
    model = _model(tok, tied=tied)
    ref_model = None
    if not precompute:
        ref_model = copy.deepcopy(model)
        _perturb(ref_model, seed=3)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    args = _sgd_args(tmp_path / f"run{per_device}x{accumulation}{scope}", loss_name="iris", alpha=1.5, scope=scope,
                     precompute_ref_log_probs=precompute, per_device_train_batch_size=per_device,
                     gradient_accumulation_steps=accumulation)
    trainer = SelfPlayTrainer(model, ref_model=ref_model, args=args, train_dataset=_rows(ref=precompute),
                              processing_class=tok)
    trainer.train()
    return {n: p.detach() - before[n] for n, p in model.named_parameters()}, trainer


@pytest.mark.parametrize("precompute", [True, False])
def test_gradient_accumulation_equals_one_big_batch(tmp_path, precompute):
    tok = _tokenizer()
    big, _ = _step_delta(tmp_path, tok, precompute=precompute, per_device=4, accumulation=1)
    acc, trainer = _step_delta(tmp_path, tok, precompute=precompute, per_device=2, accumulation=2)
    assert trainer._step_stats is not None and trainer._step_stats.num_micro_batches == 2
    assert max(float(d.abs().max()) for d in big.values()) > 1e-4  # the step moved θ
    for n in big:
        torch.testing.assert_close(acc[n], big[n], rtol=1e-4, atol=1e-6, msg=n)
    # Control: per-micro-batch normalisation is another estimator, so the comparison can fail.
    micro, _ = _step_delta(tmp_path, tok, precompute=precompute, per_device=2, accumulation=2, scope="micro")
    assert any(not torch.allclose(micro[n], big[n], rtol=1e-3, atol=1e-5) for n in big)


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _ddp_worker(rank, world, port, out_dir, accumulation):
    os.environ.update({"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "RANK": str(rank),
                       "WORLD_SIZE": str(world), "LOCAL_RANK": str(rank), "LOCAL_WORLD_SIZE": str(world),
                       "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"})
    torch.set_num_threads(1)
    tok = _tokenizer()
    delta, trainer = _step_delta(Path(out_dir) / f"rank{rank}", tok, precompute=True,
                                 per_device=4 // (world * accumulation), accumulation=accumulation)
    assert trainer.accelerator.num_processes == world
    if rank == 0:
        torch.save({"delta": delta, "log": trainer.state.log_history[0]}, Path(out_dir) / "ddp.pt")
    torch.distributed.barrier()


@pytest.mark.distributed
@pytest.mark.parametrize("accumulation", [1, 2])
def test_two_processes_equal_one_process(tmp_path, accumulation):
    import torch.multiprocessing as mp

    tok = _tokenizer()
    big, single = _step_delta(tmp_path / "single", tok, precompute=True, per_device=4, accumulation=1)
    mp.spawn(_ddp_worker, args=(2, _free_port(), str(tmp_path), accumulation), nprocs=2, join=True)
    saved = torch.load(tmp_path / "ddp.pt", weights_only=False)
    for n in big:
        torch.testing.assert_close(saved["delta"][n], big[n], rtol=1e-4, atol=1e-6, msg=n)
    # The logged step metrics are those of the whole batch (global scope), not of one rank's half.
    want = single.state.log_history[0]
    for key in ("loss", "iris/real/ess", "iris/syn/ess", "iris/syn/kappa"):
        assert saved["log"][key] == pytest.approx(want[key], rel=1e-5, abs=1e-6), key


# ----------------------------------------------------------------------------------------------
# Save and resume: the α schedule's state travels with TRL's checkpoints
# ----------------------------------------------------------------------------------------------


def test_save_and_resume_keep_alpha_schedule(tmp_path):
    tok = _tokenizer()
    kw = dict(loss_name="iris", alpha_schedule="adaptive", alpha_max=3.0, alpha_min=0.25,
              precompute_ref_log_probs=True, per_device_train_batch_size=2, max_steps=2,
              save_strategy="steps", save_steps=1)
    model = _model(tok, tied=True)
    init = copy.deepcopy(model.state_dict())
    first = SelfPlayTrainer(model, args=_args(tmp_path, **kw), train_dataset=_rows(ref=True), processing_class=tok)
    first.train()
    assert any(not torch.equal(p, init[n]) for n, p in model.state_dict().items())  # it trained
    ckpt = tmp_path / "out" / "checkpoint-1"
    assert (ckpt / STATE_FILE).is_file() and (tmp_path / "out" / "checkpoint-2" / STATE_FILE).is_file()
    saved = torch.load(ckpt / STATE_FILE, weights_only=True)["selfplay_loss"]["schedule"]
    assert saved["num_updates"] == 1 and saved["measured_reference_gap"] is not None

    fresh = _model(tok, tied=True)
    fresh.load_state_dict(init)
    second = SelfPlayTrainer(fresh, args=_args(tmp_path, **kw), train_dataset=_rows(ref=True), processing_class=tok)
    assert second.selfplay_loss.schedule.num_updates == 0  # nothing measured yet
    second.train(resume_from_checkpoint=str(ckpt))
    state = second.selfplay_loss.schedule.state_dict()
    assert state["num_updates"] == 1  # restored, not re-measured on resume
    assert state["measured_reference_gap"] == saved["measured_reference_gap"] and state["alpha"] == saved["alpha"]
    assert second.state.log_history[-2]["iris/alpha"] == first.state.log_history[1]["iris/alpha"]
    for n, p in fresh.state_dict().items():
        torch.testing.assert_close(p, model.state_dict()[n], rtol=1e-5, atol=1e-6, msg=n)


# ----------------------------------------------------------------------------------------------
# LoRA with a frozen lm_head
# ----------------------------------------------------------------------------------------------


def test_lora_trains_without_weight_gradient(tmp_path):
    peft = pytest.importorskip("peft")
    tok = _tokenizer()
    model = _model(tok, tied=False)
    lora = peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], lora_dropout=0.0,
                           task_type="CAUSAL_LM")
    trainer = SelfPlayTrainer(model, args=_args(tmp_path, loss_name="iris", max_steps=2, learning_rate=1e-2,
                                                precompute_ref_log_probs=False),
                              train_dataset=_rows(ref=True), processing_class=tok, peft_config=lora)
    peft_model = trainer.model
    head = peft_model.get_base_model().lm_head.weight
    assert not head.requires_grad
    batch = _batch(trainer)
    loss = trainer.compute_loss(peft_model, batch)
    loss.backward()
    assert head.grad is None
    lora_grads = [p.grad for n, p in peft_model.named_parameters() if "lora_A" in n]
    assert lora_grads and all(g is not None and torch.isfinite(g).all() for g in lora_grads)
    peft_model.zero_grad(set_to_none=True)
    b_before = {n: p.detach().clone() for n, p in peft_model.named_parameters() if "lora_B" in n}
    head_before = head.detach().clone()
    trainer.train()
    assert torch.equal(head, head_before)
    assert any(not torch.equal(p, b_before[n]) for n, p in peft_model.named_parameters() if n in b_before)


def test_lora_on_the_lm_head_is_refused_by_the_trainer(tmp_path):
    # TRL's DPOTrainer (which SelfPlayTrainer builds on) refuses it, naming the module, for a
    # peft_config and for a model wrapped beforehand alike.
    peft = pytest.importorskip("peft")
    tok = _tokenizer()
    lora = peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "lm_head"], lora_dropout=0.0,
                           task_type="CAUSAL_LM")
    args = _args(tmp_path, loss_name="iris", precompute_ref_log_probs=False)
    with pytest.raises(ValueError, match="lm_head"):
        SelfPlayTrainer(_model(tok, tied=False), args=args, train_dataset=_rows(ref=True), processing_class=tok,
                        peft_config=lora)
    with pytest.raises(ValueError, match="lm_head"):
        SelfPlayTrainer(peft.get_peft_model(_model(tok, tied=False), lora), args=args,
                        train_dataset=_rows(ref=True), processing_class=tok)


def test_iris_head_applies_a_lora_on_the_lm_head():
    # The head SelfPlayTrainer installs (also reached where TRL does not refuse the adapter):
    # the adapter reaches the log-probs and gets its gradient (it was silently ignored).
    peft = pytest.importorskip("peft")
    from iris_kernels.integrations.trl import install_iris_head

    tok = _tokenizer()
    lora = peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "lm_head"], lora_dropout=0.0)
    peft_model = peft.get_peft_model(_model(tok, tied=False), lora)
    model = peft_model.get_base_model()
    head = model.lm_head
    with torch.no_grad():
        for n, p in head.named_parameters():
            if "lora_B" in n:
                p.copy_(0.5 * torch.randn(p.shape, generator=torch.Generator().manual_seed(0)))
    install_iris_head(model, length_normalize=False, backend="torch")
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(3, len(tok), (3, 10), generator=g)
    mask = torch.ones_like(ids)
    labels = ids.masked_fill(torch.arange(10) < 4, -100)
    got = model(input_ids=ids, attention_mask=mask, iris_labels=labels)
    with torch.no_grad():
        logits = model(input_ids=ids, attention_mask=mask).logits.float()  # the adapted module's own output
        logp = torch.log_softmax(logits[:, :-1], -1).gather(2, ids[:, 1:, None]).squeeze(2)
        want = (logp * (labels[:, 1:] != -100)).sum(1)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-4)
    got.sum().backward()
    grads = {n: p.grad for n, p in head.named_parameters() if "lora_" in n}
    assert grads and all(g is not None and bool(g.abs().sum() > 0) for g in grads.values())


# ----------------------------------------------------------------------------------------------
# Bad configuration, and the import guard
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("kw,field", [
    (dict(loss_name="kto"), "loss_name"),
    (dict(alpha=-0.5), "SelfPlayConfig.alpha"),
    (dict(alpha_min=-1.0), "SelfPlayConfig.alpha_min"),
    (dict(alpha_min=3.0, alpha_max=1.0), "alpha_min"),
    (dict(alpha_schedule="exponential"), "alpha_schedule"),
    (dict(scope="world"), "scope"),
    (dict(loss_name="spin", loss_options={"variant": "square"}), "loss_options"),
    (dict(loss_name="space", loss_options={"mu": -1.0}), "loss_options"),
    (dict(beta=0.0), "SelfPlayConfig.beta"),
    (dict(loss_type=["ipo"]), "loss_type"),
])
def test_bad_config_names_the_field(tmp_path, kw, field):
    with pytest.raises(ValueError, match=field):
        _args(tmp_path, **kw)


def test_config_from_the_command_line(tmp_path):
    from transformers import HfArgumentParser

    (args,) = HfArgumentParser(SelfPlayConfig).parse_args_into_dataclasses([
        "--output_dir", str(tmp_path), "--use_cpu", "true", "--loss_name", "spin", "--beta", "0.2",
        "--loss_options", '{"variant": "hinge"}', "--scope", "rank"])
    assert (args.loss_name, args.beta, args.loss_options, args.scope) == ("spin", 0.2, {"variant": "hinge"}, "rank")
    with pytest.raises(ValueError, match="loss_options"):
        SelfPlayConfig(output_dir=str(tmp_path), use_cpu=True, loss_options="{not json")


def test_spin_without_pairs_names_the_column(tmp_path):
    tok = _tokenizer()
    unpaired = _rows().remove_columns(["rejected"])
    with pytest.raises(ValueError, match="rejected"):
        SelfPlayTrainer(_model(tok, tied=False), args=_args(tmp_path, loss_name="spin"), train_dataset=unpaired,
                        processing_class=tok)


def test_adaptive_alpha_needs_reference_columns(tmp_path):
    tok = _tokenizer()
    model = _model(tok, tied=False)
    with pytest.raises(ValueError, match="alpha_schedule='adaptive'"):
        SelfPlayTrainer(model, ref_model=copy.deepcopy(model), args=_args(tmp_path, alpha_schedule="adaptive"),
                        train_dataset=_rows(), processing_class=tok)


def test_import_is_lazy_and_guarded():
    code = (
        "import sys\n"
        "import iris_kernels\n"
        "assert 'trl' not in sys.modules and 'iris_kernels.integrations.trl' not in sys.modules\n"
        "sys.modules['trl'] = None  # as if TRL were not installed\n"
        "try:\n"
        "    import iris_kernels.integrations.trl\n"
        "except ImportError as e:\n"
        "    assert 'pip install \"iris-kernels[trl]\"' in str(e), str(e)\n"
        "else:\n"
        "    raise SystemExit('imported without trl')\n"
    )
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]


# ----------------------------------------------------------------------------------------------
# Harness -> TRL: one iteration's pairs, trained with SelfPlayTrainer
# ----------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_harness_pairs_train_in_trl(tmp_path):
    """train/selfplay.py writes its pairs in TRL's format; SelfPlayTrainer starting from the
    opponent θ_0 reads them with the stored reference log-probs, so its first IRIS loss is 0."""
    if str(ROOT) not in sys.path:
        sys.path.insert(0, str(ROOT))
    from train import selfplay, trl_export
    from train.io_utils import read_jsonl

    run = tmp_path / "run"
    selfplay.main(["--config", str(ROOT / "train" / "configs" / "tiny-cpu.yaml"), "--output_dir", str(run),
                   "--train.iterations", "1", "--train.epochs", "1", "--train.max_steps", "1",
                   "--data.max_train_prompts", "8", "--data.max_eval_prompts", "4",
                   "--generation.max_new_tokens", "6", "--eval.max_new_tokens", "2"])
    rows = read_jsonl(run / "iter_0" / "trl_pairs-train.jsonl")
    assert len(rows) == 8 and (run / "iter_0" / "trl_pairs-heldout.jsonl").is_file()
    generated = {r["prompt_id"]: r for r in read_jsonl(next((run / "iter_0").glob("generated-train-*.jsonl")))}
    scored = {r["prompt_id"]: r for r in read_jsonl(next((run / "iter_0").glob("reference-train-*.jsonl")))}
    for k, row in enumerate(rows):
        assert row["prompt"][-1]["role"] == "user"
        assert row["chosen"][0]["role"] == row["rejected"][0]["role"] == "assistant"
        assert row["rejected"][0]["content"] == generated[k]["response"]
        assert row["rejected_ids"] == generated[k]["response_ids"]
        assert (row["ref_chosen_logps"], row["ref_rejected_logps"]) == (scored[k]["ref_real"], scored[k]["ref_syn"])
        assert len(row["chosen_ids"]) == scored[k]["n_real"] and len(row["rejected_ids"]) == scored[k]["n_syn"]

    log = trl_export.main(["--run", str(run), "--iteration", "0", "--output_dir", str(tmp_path / "trl"),
                           "--max_steps", "1"])
    first = next(r for r in log if "loss" in r)
    assert first["loss"] == pytest.approx(0.0, abs=1e-5)  # θ = the opponent whose log-probs are stored
    assert first["iris/real/ess"] == pytest.approx(8.0, rel=1e-4)
    # The harness's gap-adaptive α (measured on held-out rows TRL does not have) crosses as a constant.
    harness_alpha = next(r["alpha"] for r in read_jsonl(run / "metrics.jsonl") if r.get("kind") == "train")
    assert first["iris/alpha"] == pytest.approx(harness_alpha)
    assert (tmp_path / "trl" / "model" / "model.safetensors").is_file()
    # θ_0 is saved with its tokenizer, for a script of one's own (train/README.md's walk-through).
    assert (tmp_path / "trl" / "opponent" / "model.safetensors").is_file()
    assert (tmp_path / "trl" / "opponent" / "tokenizer_config.json").is_file()


# ----------------------------------------------------------------------------------------------
# The trl-chunked benchmark peer
# ----------------------------------------------------------------------------------------------


def test_trl_chunked_provider_matches_the_library(monkeypatch):
    monkeypatch.syspath_prepend(str(ROOT / "benchmarks"))
    import providers as P

    import iris_kernels

    prov = P.TrlChunked()  # a fresh instance: the tile width is changed below
    assert P.get("trl-chunked").name == prov.name
    assert prov.skip_reason(torch.device("cpu"), torch.float32, "logprobs") is None
    g = torch.Generator().manual_seed(0)
    N, H, V = 37, 16, 1003  # odd sizes; V spans no whole tile
    hidden = torch.randn(N, H, generator=g).requires_grad_()
    weight = (torch.randn(V, H, generator=g) * 0.5).requires_grad_()
    targets = torch.randint(0, V, (N,), generator=g)
    targets[::5] = P.IGNORE_INDEX
    prov.setup(type("Case", (), {"hidden": hidden})())  # setup reads only the device
    prov._chunk = 256  # several vocabulary tiles
    up = torch.randn(N, generator=g)
    got = prov.logprobs(hidden, weight, targets)
    gh, gw = torch.autograd.grad((got * up).sum(), (hidden, weight))
    want = iris_kernels.linear_logprobs(hidden, weight, targets, backend="reference")
    wh, ww = torch.autograd.grad((want * up).sum(), (hidden, weight))
    assert torch.all(got[targets == P.IGNORE_INDEX] == 0)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(gh, wh, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(gw, ww, rtol=1e-4, atol=1e-5)

    monkeypatch.setattr(P, "_installed", lambda module: module != "trl")
    assert "not installed" in prov.skip_reason(torch.device("cpu"), torch.float32, "selfplay")


def test_host_labels_give_a_host_count_without_a_sync():
    """Issue 16, item 5: the TRL head counts scored positions (after the shift) on the host when
    its labels are still there and the op runs on another device; never for device labels."""
    from iris_kernels.integrations.trl import host_num_valid

    labels = torch.tensor([[-100, -100, 5, 7, -100], [-100, 3, 4, 9, 2]])
    assert host_num_valid(labels, torch.device("cuda")) == 6  # labels[:, 1:]: 2 + 4 scored
    assert host_num_valid(labels, torch.device("cpu")) is None  # nothing to save: no device
    assert host_num_valid(labels.to("meta"), torch.device("cuda")) is None
