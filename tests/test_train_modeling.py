"""train/modeling.py and train/evaluation.py helpers: model options, the pkg: source, attention choice."""
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from train.config import ModelConfig  # noqa: E402
from train.data import pair_batch  # noqa: E402
from train.evaluation import ess  # noqa: E402
from train.modeling import (SequenceLogprobs, assert_finite_parameters, build_initial_model,  # noqa: E402
                            load_tokenizer, resolve_attn_implementation, resolve_source, save_model)

TOK = str(ROOT / "train" / "data" / "tiny-tokenizer")
INIT = {"model_type": "llama", "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2,
        "num_attention_heads": 2, "num_key_value_heads": 1, "max_position_embeddings": 128}


def _model(**kw):
    cfg = ModelConfig(tokenizer=TOK, init_config=INIT, **kw)
    tok = load_tokenizer(cfg)
    return build_initial_model(cfg, tok, seed=0), tok


def test_random_init_is_seeded_and_leaves_the_global_rng_alone():
    torch.manual_seed(123)
    before = torch.rand(1)
    torch.manual_seed(123)
    a, _ = _model()
    after = torch.rand(1)
    b, _ = _model()
    assert torch.equal(before, after)
    for (n, p), (_, q) in zip(a.named_parameters(), b.named_parameters()):
        assert torch.equal(p, q), n


def test_attention_defaults_to_sdpa_without_flash_attn():
    assert resolve_attn_implementation("auto", torch.float32) == "sdpa"
    assert resolve_attn_implementation("auto", torch.bfloat16) in ("sdpa", "flash_attention_2")
    assert resolve_attn_implementation("eager", torch.bfloat16) == "eager"
    model, _ = _model()
    assert model.config._attn_implementation == "sdpa"


def test_gradient_checkpointing_changes_memory_not_gradients():
    plain, tok = _model()
    ckpt, _ = _model(gradient_checkpointing=True)
    on = [getattr(layer, "gradient_checkpointing", False) for layer in ckpt.model.layers]
    assert all(on) and not any(getattr(layer, "gradient_checkpointing", False) for layer in plain.model.layers)
    ids = tok(["<|user|>abc<|end|><|assistant|>cba<|end|>"], add_special_tokens=False)["input_ids"][0]
    batch = pair_batch([type("E", (), {"prompt_ids": ids[:12], "response_ids": ids[12:]})()], [ids[12:]], 0, 64)
    grads = []
    for m in (plain, ckpt):
        m.train()
        s = SequenceLogprobs(m)(**batch)
        s.sum().backward()
        grads.append({n: p.grad for n, p in m.named_parameters()})
    for n in grads[0]:
        torch.testing.assert_close(grads[1][n], grads[0][n], rtol=1e-5, atol=1e-7)


def test_liger_is_applied_to_the_layers_only_when_asked(monkeypatch):
    import liger_kernel.transformers as lt

    calls = []
    monkeypatch.setattr(lt, "_apply_liger_kernel_to_instance", lambda model, **kw: calls.append(kw))
    _model(use_liger=False)
    assert calls == []
    _model(use_liger=True)
    assert calls and calls[0]["rms_norm"] and calls[0]["swiglu"] and calls[0]["rope"]
    # The loss never goes through the model's lm_head: Liger's fused cross-entropy stays off.
    assert calls[0]["fused_linear_cross_entropy"] is False and calls[0]["cross_entropy"] is False


def test_liger_missing_warns_and_continues(monkeypatch):
    monkeypatch.setitem(sys.modules, "liger_kernel.transformers", None)
    with pytest.warns(UserWarning, match="liger-kernel is not importable"):
        _model(use_liger=True)


def test_pkg_source_resolves_to_the_installed_package_folder():
    assert resolve_source("pkg:json", "model.name_or_path") == str(Path(__import__("json").__file__).parent)
    assert resolve_source("org/model", "k") == "org/model"
    with pytest.raises(FileNotFoundError, match="model.name_or_path: Python package 'no_such_pkg_xyz'"):
        resolve_source("pkg:no_such_pkg_xyz", "model.name_or_path")


def test_non_finite_weights_are_never_saved(tmp_path):
    model, tok = _model()
    with torch.no_grad():
        model.model.layers[1].mlp.up_proj.weight[0, 0] = float("nan")
    with pytest.raises(FloatingPointError, match="up_proj"):
        save_model(model, tok, tmp_path / "model")
    assert not (tmp_path / "model").exists() and not (tmp_path / "model.tmp").exists()
    with pytest.raises(FloatingPointError):
        assert_finite_parameters(model)


def test_ess_bounds():
    assert ess(torch.zeros(7)) == pytest.approx(7.0)
    assert ess(torch.tensor([0.0, 1e4, 0.0])) == pytest.approx(1.0)
    w = torch.softmax(torch.tensor([0.3, -1.2, 2.0], dtype=torch.float64), 0)
    assert ess(torch.tensor([0.3, -1.2, 2.0])) == pytest.approx(float(1 / (w * w).sum()))


def test_auto_attention_picks_flash_attn_for_half_models_on_cuda_only(monkeypatch):
    import importlib.util as iu

    import train.modeling as modeling

    real_find_spec = iu.find_spec
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(modeling.importlib.util, "find_spec",
                        lambda name, *a: object() if name == "flash_attn" else real_find_spec(name, *a))
    assert resolve_attn_implementation("auto", torch.bfloat16) == "flash_attention_2"
    assert resolve_attn_implementation("auto", torch.float16) == "flash_attention_2"
    assert resolve_attn_implementation("auto", torch.float32) == "sdpa"  # flash-attn computes in half only
    # Without the package: sdpa, and said once.
    monkeypatch.setattr(modeling.importlib.util, "find_spec",
                        lambda name, *a: None if name == "flash_attn" else real_find_spec(name, *a))
    monkeypatch.setattr(modeling, "_SAID", set())
    with pytest.warns(UserWarning, match="flash-attn is not installed, using sdpa"):
        assert resolve_attn_implementation("auto", torch.bfloat16) == "sdpa"
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert resolve_attn_implementation("auto", torch.bfloat16) == "sdpa"  # not said twice


@pytest.mark.parametrize("preset", ["zephyr-7b.yaml", "qwen2.5-3b.yaml"])
def test_gpu_presets_load_in_bf16_so_auto_can_pick_flash_attn(preset):
    from train.config import load_config

    cfg = load_config(str(ROOT / "train" / "configs" / preset))
    assert cfg.model.torch_dtype == "bfloat16" and cfg.model.attn_implementation == "auto"
    assert cfg.train.mixed_precision == "bf16"


def test_explicit_flash_attention_2_without_the_package_is_a_one_line_config_error(tmp_path, capsys):
    import importlib.util as iu

    if iu.find_spec("flash_attn") is not None:
        pytest.skip("flash-attn is installed here")
    from train import selfplay

    rc = selfplay.cli(["--config", str(ROOT / "train" / "configs" / "tiny-cpu.yaml"), "--output_dir",
                       str(tmp_path / "run"), "--model.attn_implementation", "flash_attention_2"])
    err = capsys.readouterr().err
    assert rc == 2 and err.count("\n") == 1 and "Traceback" not in err
    assert err.startswith("selfplay: error: config key 'model.attn_implementation' is flash_attention_2 but the "
                          "flash-attn package is not installed")
