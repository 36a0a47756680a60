"""Every dropout of a policy off for self-play training (iris_kernels/integrations/dropout.py, issue 19)."""
import pytest
import torch
from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

from iris_kernels.integrations.dropout import disable_dropout


def _llama():
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=97, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, max_position_embeddings=64, attention_dropout=0.1,
                      attn_implementation="eager")
    return LlamaForCausalLM(cfg)


def _gpt2():
    torch.manual_seed(0)
    cfg = GPT2Config(vocab_size=97, n_positions=64, n_embd=32, n_layer=2, n_head=4)  # dropouts 0.1 by default
    return GPT2LMHeadModel(cfg)


@pytest.mark.parametrize("build", [_llama, _gpt2])
def test_two_train_mode_forwards_agree_once_dropout_is_off(build):
    model = build().train()
    ids = torch.randint(0, 97, (2, 16), generator=torch.Generator().manual_seed(1))
    before = [model(ids).logits for _ in range(2)]
    assert not torch.equal(before[0], before[1])  # the config really has dropout (Llama: attention only)
    changed = disable_dropout(model)
    assert changed
    assert model.training  # train mode kept (gradient checkpointing etc. depend on it)
    a, b = model(ids).logits, model(ids).logits
    torch.testing.assert_close(a, b, rtol=0, atol=0)
    torch.testing.assert_close(a, model.eval()(ids).logits, rtol=0, atol=0)  # = the eval-mode scoring
    # The saved config keeps its dropout: only the live modules are changed.
    assert getattr(model.config, "attention_dropout", getattr(model.config, "attn_pdrop", None)) == 0.1


def test_llama_attention_dropout_is_missed_by_trls_helper():
    # Why not trl's disable_dropout_in_model: it zeroes nn.Dropout modules only.
    trl_utils = pytest.importorskip("trl.trainer.utils")
    model = _llama().train()
    trl_utils.disable_dropout_in_model(model)
    ids = torch.randint(0, 97, (2, 16), generator=torch.Generator().manual_seed(1))
    assert not torch.equal(model(ids).logits, model(ids).logits)
    assert disable_dropout(model) == [f"model.layers.{i}.self_attn.attention_dropout" for i in range(2)]


def test_bad_model_is_named():
    with pytest.raises(TypeError, match="model must be a torch.nn.Module"):
        disable_dropout("gpt2")
