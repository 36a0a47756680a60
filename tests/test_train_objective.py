"""train/objective.py: the loss of a training step, from stored reference log-probs, on a tiny model."""
import math
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from train.config import LossConfig, ModelConfig  # noqa: E402
from train.data import build_examples, load_rows, stop_token_ids  # noqa: E402
from train.generation import generate_responses  # noqa: E402
from train.modeling import SequenceLogprobs, build_initial_model, load_tokenizer  # noqa: E402
from train.objective import Objective, build_alpha_schedule  # noqa: E402
from train.scoring import reference_logprobs  # noqa: E402

DATA = ROOT / "train" / "data"
MODEL = ModelConfig(tokenizer=str(DATA / "tiny-tokenizer"), init_config={
    "model_type": "llama", "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2,
    "num_attention_heads": 2, "num_key_value_heads": 1, "max_position_embeddings": 256,
    "tie_word_embeddings": True})


@pytest.fixture(scope="module")
def setup():
    from accelerate import Accelerator

    accelerator = Accelerator(cpu=True)
    tok = load_tokenizer(MODEL)
    model = build_initial_model(MODEL, tok, seed=0)
    stop = stop_token_ids(tok)
    rows = load_rows(str(DATA / "verifiable" / "train.jsonl"), split="train", key="data.train", limit=8)
    examples = build_examples(rows, tok, stop, messages_field="messages", answer_field="answer",
                              max_prompt_length=200, max_length=256, name="t")
    synthetic = generate_responses(model, tok, examples, stop_ids=stop, max_new_tokens=8, do_sample=True, seed=0)
    # Scored in a different batch composition (2 + 6 prompts) than the training batch (8): the stored
    # numbers must not depend on it.
    reference = []
    for lo, hi in ((0, 2), (2, 8)):
        reference += reference_logprobs(SequenceLogprobs(model), examples[lo:hi], synthetic[lo:hi],
                                        pad_id=tok.pad_token_id, max_length=256)
    return accelerator, tok, model, examples, synthetic, reference


def _step(setup, loss_cfg, micro_slices=((0, 8),)):
    accelerator, tok, model, examples, synthetic, reference = setup
    objective = Objective(loss_cfg, build_alpha_schedule(loss_cfg, total_steps=10), accelerator)
    micro = [objective.make_batch(examples[a:b], synthetic[a:b], reference[a:b], pad_id=tok.pad_token_id,
                                  max_length=256) for a, b in micro_slices]
    model.zero_grad(set_to_none=True)
    loss, metrics = objective.forward_backward(objective.training_module(model), micro, step=0)
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad(set_to_none=True)
    return loss, metrics, grads


def test_iris_is_zero_with_uniform_weights_at_the_first_step(setup):
    loss, metrics, grads = _step(setup, LossConfig(name="iris", alpha_schedule="constant", alpha=0.7))
    assert abs(float(loss)) < 1e-5
    assert float(metrics["real/ess"]) == pytest.approx(8.0, rel=1e-5)
    assert float(metrics["syn/ess"]) == pytest.approx(8.0, rel=1e-5)
    assert float(metrics["policy/real_logps"]) == pytest.approx(float(metrics["ref/real_logps"]), abs=1e-4)
    # At g = 0 the gradient is β·(mean ∇s over synthetic − mean ∇s over annotated): not zero.
    assert sum(float(g.abs().sum()) for g in grads.values()) > 0


@pytest.mark.parametrize("name, value", [("spin", math.log(2)), ("dpo", math.log(2)), ("space", 2 * math.log(2)),
                                         ("chi2", 0.0)])
def test_baselines_at_the_first_step(setup, name, value):
    loss, _, _ = _step(setup, LossConfig(name=name, beta=0.1))
    assert float(loss) == pytest.approx(value, abs=1e-5)


def test_sft_is_the_token_nll_of_the_annotated_responses(setup):
    _, _, _, _, _, reference = setup
    loss, _, _ = _step(setup, LossConfig(name="sft"))
    nll = -sum(r["ref_real"] for r in reference) / sum(r["n_real"] for r in reference)
    assert float(loss) == pytest.approx(nll, rel=1e-5)


@pytest.mark.parametrize("name", ["iris", "sft"])
def test_accumulation_reproduces_the_full_batch_gradient(setup, name):
    # sft: the statistics pass must record each micro-batch's token counts (it once multiplied
    # the loss and gradient by the mean response length).
    cfg = LossConfig(name=name, alpha_schedule="constant", alpha=0.5, scope="global")
    # Move away from g = 0 so the tilted weights are not uniform: one SGD step on the IRIS loss.
    accelerator, tok, model, *_ = setup
    state = {k: v.clone() for k, v in model.state_dict().items()}
    try:
        _, _, grads = _step(setup, cfg)
        with torch.no_grad():
            for n, p in model.named_parameters():
                p -= 0.5 * grads[n]
        full_loss, full_m, full = _step(setup, cfg)
        acc_loss, acc_m, acc = _step(setup, cfg, micro_slices=((0, 3), (3, 8)))
        micro_loss, _, micro = _step(setup, LossConfig(name=name, alpha_schedule="constant", alpha=0.5,
                                                       scope="micro"), micro_slices=((0, 3), (3, 8)))
    finally:
        model.load_state_dict(state)
    if name == "iris":
        assert float(full_m["real/ess"]) < 7.99  # the weights are really non-uniform now
    assert float(acc_loss) == pytest.approx(float(full_loss), rel=1e-5, abs=1e-6)
    for n in full:
        torch.testing.assert_close(acc[n], full[n], rtol=1e-4, atol=1e-6)
    # The per-micro-batch estimator is a different (biased) one: its gradient differs.
    assert max(float((micro[n] - full[n]).abs().max()) for n in full) > 1e-4


def test_the_tied_lm_head_receives_the_loss_gradient(setup):
    # Token rows that never occur in any input are reached only through the output projection.
    accelerator, tok, model, examples, synthetic, _ = setup
    used = {t for e in examples for t in e.prompt_ids + e.response_ids}
    used |= {t for s in synthetic for t in s["response_ids"]}
    unused = sorted(set(range(len(tok))) - used)
    _, _, grads = _step(setup, LossConfig(name="iris", alpha_schedule="constant", alpha=0.5))
    emb = grads["model.embed_tokens.weight"]
    assert model.get_output_embeddings().weight is model.get_input_embeddings().weight
    assert float(emb[unused].abs().sum()) > 0


def test_length_normalize_divides_policy_and_reference_alike(setup):
    loss, metrics, _ = _step(setup, LossConfig(name="spin", beta=0.1, length_normalize=True))
    assert float(loss) == pytest.approx(math.log(2), abs=1e-5)
    _, _, _, _, _, reference = setup
    mean_ref = sum(r["ref_real"] / r["n_real"] for r in reference) / len(reference)
    assert float(metrics["ref/real_logps"]) == pytest.approx(mean_ref, rel=1e-5)


def test_bad_loss_options_fail_at_start_up_naming_the_option(setup):
    accelerator = setup[0]
    with pytest.raises(ValueError, match="loss.options.*nonsense"):
        Objective(LossConfig(name="spin", options={"nonsense": 1}), build_alpha_schedule(LossConfig(), 1), accelerator)
    with pytest.raises(ValueError, match="alpha_max"):
        build_alpha_schedule(LossConfig(alpha_max=0.1, alpha_min=0.5), 1)


def test_micro_batch_keeps_host_labels_for_the_loss_to_count(monkeypatch):
    """Off the host the labels stay on the CPU (SelfPlayLoss counts them: num_valid, issue 16 item 5);
    on the CPU everything is moved as before. meta stands in for a GPU."""
    from iris_kernels.module import labels_for_op
    from train.objective import move_micro_batch

    mb = {"input_ids": torch.ones(2, 5, dtype=torch.long), "labels": torch.tensor([[-100, 3, 4, -100, -100]] * 2),
          "ref_logps": torch.zeros(2)}
    off = move_micro_batch(mb, torch.device("meta"))
    assert off["labels"].device.type == "cpu" and off["input_ids"].device.type == "meta"
    assert off["ref_logps"].device.type == "meta"
    # ... which the loss turns into the count: 2 scored positions per row after the shift.
    import iris_kernels.module as module
    monkeypatch.setattr(module, "_op_on_other_device", lambda device: True)
    assert labels_for_op(off["labels"], torch.device("cpu"), shift=True, ignore_index=-100)[1] == 4
    on = move_micro_batch(mb, torch.device("cpu"))
    assert all(v.device.type == "cpu" for v in on.values())
