"""A PEFT adapter on the lm_head is applied by the fused head or refused, never dropped
(iris_kernels/integrations/adapters.py, issue 19 item 6)."""
import sys
from pathlib import Path

import pytest
import torch

peft = pytest.importorskip("peft")
from transformers import LlamaConfig, LlamaForCausalLM  # noqa: E402

import iris_kernels as ik  # noqa: E402
from iris_kernels.integrations.adapters import head_weight  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

V, H = 61, 16


def _peft_model(**lora):
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=V, hidden_size=H, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
                      num_key_value_heads=1, max_position_embeddings=64, tie_word_embeddings=False)
    model = LlamaForCausalLM(cfg)
    kw = dict(r=4, lora_alpha=8, target_modules=["q_proj", "lm_head"], lora_dropout=0.0)
    kw.update(lora)
    pm = peft.get_peft_model(model, peft.LoraConfig(**kw))
    with torch.no_grad():  # B = 0 at init: give the adapter a non-zero contribution
        for n, p in pm.named_parameters():
            if "lora_B" in n:
                p.copy_(torch.randn(p.shape) * 0.3)
    return pm


def test_effective_weight_reproduces_the_module_and_its_gradients():
    pm = _peft_model()
    head = pm.get_base_model().lm_head
    x = torch.randn(7, H, dtype=torch.float32)
    t = torch.randint(0, V, (7,))
    # The module's own log-probs and adapter gradients (fp32 logits, as the reference backend).
    ref = torch.log_softmax(head(x), -1).gather(1, t[:, None]).squeeze(1)
    lora = [p for n, p in head.named_parameters() if "lora_" in n]
    g_ref = torch.autograd.grad(ref.sum(), lora)
    weight, bias = head_weight(head)
    assert bias is None and not torch.equal(weight, head.base_layer.weight)
    for backend in ("reference", "torch", "triton"):
        out = ik.linear_logprobs(x, weight if backend == "reference" else head_weight(head)[0], t, backend=backend)
        torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
        g = torch.autograd.grad(out.sum(), lora)
        for a, e in zip(g, g_ref):
            assert bool(e.abs().sum() > 0)
            torch.testing.assert_close(a, e, rtol=1e-4, atol=1e-5)


def test_disabled_and_merged_adapters_use_the_base_weight():
    pm = _peft_model()
    head = pm.get_base_model().lm_head
    with pm.disable_adapter():  # the reference pass under PEFT
        assert head_weight(head)[0] is head.base_layer.weight
    effective = head_weight(head)[0].detach().clone()
    head.merge()
    assert head_weight(head)[0] is head.base_layer.weight
    torch.testing.assert_close(head.base_layer.weight, effective, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("lora, match", [
    ({"use_dora": True}, "LoRA variant"),
    ({"lora_dropout": 0.1}, "lora_dropout"),
])
def test_what_cannot_be_a_weight_is_refused_naming_the_module(lora, match):
    pm = _peft_model(**lora).train()
    with pytest.raises(ValueError, match=f"lm_head carries the PEFT adapter.*{match}"):
        head_weight(pm.get_base_model().lm_head)


def test_other_tuners_on_the_head_are_refused():
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=V, hidden_size=H, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
                      num_key_value_heads=1, max_position_embeddings=64, tie_word_embeddings=False)
    pm = peft.get_peft_model(LlamaForCausalLM(cfg), peft.LoHaConfig(r=2, target_modules=["lm_head"]))
    with pytest.raises(ValueError, match="lm_head carries the PEFT adapter.*cannot apply"):
        head_weight(pm.get_base_model().lm_head)


def test_harness_scoring_and_training_see_the_adapter():
    from train.modeling import SequenceLogprobs

    pm = _peft_model()
    model = pm.get_base_model()
    ids = torch.randint(0, V, (2, 12))
    mask = torch.ones_like(ids)
    labels = ids.clone()
    labels[:, :4] = -100
    s = SequenceLogprobs(model)(ids, mask, labels)
    logits = model(input_ids=ids, attention_mask=mask).logits.float()  # the adapted lm_head's own output
    logp = torch.log_softmax(logits[:, :-1], -1).gather(2, ids[:, 1:, None]).squeeze(2)
    want = (logp * (labels[:, 1:] != -100)).sum(1)
    torch.testing.assert_close(s, want, rtol=1e-5, atol=1e-4)
    s.sum().backward()
    g = model.lm_head.lora_B["default"].weight.grad
    assert g is not None and bool(g.abs().sum() > 0)
