"""IRIS and the self-play baselines inside TRL: ``SelfPlayConfig`` and ``SelfPlayTrainer``.

``SelfPlayTrainer`` is a ``trl.DPOTrainer`` whose loss computation is replaced; everything else
(dataset preparation, the preference collator, reference handling, PEFT, checkpoints, logging)
is TRL's. The batch TRL builds is ``[chosen; rejected]``: here the first half are the annotated
responses ("real") and the second half the synthetic ones (the opponent's samples) of the same
prompts, in the same order, which is the row layout ``SelfPlayLoss`` takes with ``num_real=B``.

What changes against ``DPOTrainer``:

* Policy log-probs: per-sequence sums s_θ(x, y) = Σ_k log p_θ(y_k | x, y_<k) over the completion
  tokens, from the model body's final hidden states and the lm_head weight (the embedding, for
  tied models) through this library's ``sequence_logprobs``; the ``[tokens × vocab]`` logits are
  never formed and TRL's own fused op is not used. The op runs inside the model's forward (the
  forward is wrapped, as TRL's ``add_fused_lm_head`` does), so under DDP/FSDP the call goes
  through the wrapper and the weight is read where the wrapper has gathered it; under DeepSpeed
  ZeRO-3 the weight is gathered for the call with TRL's ``maybe_gather_lm_head_ctx``.
* Reference log-probs: TRL's ``precompute_ref_log_probs=True`` columns (one model in memory), or
  TRL's reference model (or the adapter-disabled base model under PEFT), in both cases computed
  with the same op, so at θ = θ_ref the policy and reference values are bit-identical. A dataset
  that already carries ``ref_chosen_logps`` / ``ref_rejected_logps`` (e.g. the harness export,
  ``train/trl_export.py``) keeps them: they are the opponent's stored values.
* The loss: the registry's (``iris``, ``spin``, ``space``, ``chi2``, ``dpo``) with the
  normalisation scope of ``SelfPlayConfig.scope``. With gradient accumulation and scope
  ``rank``/``global`` the trainer runs one no-grad pass over the optimizer step's micro-batches
  first (``StepNormalizer``), so the IRIS weights are normalised over the whole step on every
  process: the gradient equals that of one batch holding all of them.
* α: from ``SelfPlayConfig.alpha_schedule``, read at the optimizer step; the schedule's state is
  written to every TRL checkpoint (``iris_selfplay_state.pt``) and restored on resume.
* Logs: TRL's log gets ``iris/*`` (α, κ, ESS and max weight per term, mean log-ratios g) and the
  DPO-style ``rewards/*`` and ``logps/*`` keys.

Example::

    from iris_kernels.integrations.trl import SelfPlayConfig, SelfPlayTrainer

    args = SelfPlayConfig(output_dir="out", loss_name="iris", alpha_schedule="adaptive",
                          precompute_ref_log_probs=True, per_device_train_batch_size=8)
    SelfPlayTrainer(model, args=args, train_dataset=pairs, processing_class=tokenizer).train()

Importing this module needs TRL (``pip install "iris-kernels[trl]"``); ``import iris_kernels``
never imports it.
"""
from __future__ import annotations

import contextlib
import functools
import json
import math
import numbers
import os
import warnings
from dataclasses import dataclass, field
from typing import Any, Dict, Optional, Union

try:
    from trl import DPOConfig, DPOTrainer
    from trl.models.utils import disable_gradient_checkpointing
    from trl.trainer.utils import maybe_gather_lm_head_ctx, use_adapter
except ImportError as _err:  # pragma: no cover - exercised by a subprocess test without trl
    raise ImportError(
        'iris_kernels.integrations.trl needs TRL (tested with trl==1.16.0): pip install "iris-kernels[trl]"'
    ) from _err

import torch
from accelerate.utils import is_peft_model
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR

from ..logprobs import host_scored_count, sequence_logprobs, shift_labels
from ..module import SelfPlayLoss
from ..schedules import TemperatureScoreAlpha, make_schedule
from .adapters import head_weight
from .dropout import disable_dropout

__all__ = ["SelfPlayConfig", "SelfPlayTrainer", "SELFPLAY_LOSSES", "STATE_FILE"]

IGNORE_INDEX = -100
SELFPLAY_LOSSES = ("iris", "spin", "space", "chi2", "dpo")
ALPHA_SCHEDULES = ("constant", "linear", "cosine", "temperature_score", "adaptive")
SCOPES = ("micro", "rank", "global")
STATE_FILE = "iris_selfplay_state.pt"
# Config attributes that scale the logits before the softmax, which sequence_logprobs does not apply.
_LOGIT_SCALE_KEYS = ("logit_scale", "output_multiplier", "lm_head_multiplier", "logits_scaling")


@dataclass
class SelfPlayConfig(DPOConfig):
    r"""``trl.DPOConfig`` plus the self-play loss.

    Parameters (on top of ``DPOConfig``'s; its ``loss_type``, ``ld_alpha``, ``use_weighting``
    and ``f_divergence_type`` belong to DPO's own loss and must keep their defaults):
        loss_name: "iris" | "spin" | "space" | "chi2" | "dpo" (``iris_kernels.LOSSES``).
        beta: β > 0 of g = β·(s_θ − s_ref); None (default) keeps the loss's own default
            (IRIS, SPACE, χ² 1.0; SPIN, DPO 0.1). Not DPOConfig's 0.1 default, on purpose.
        alpha_schedule: "constant" (``alpha``), "linear" / "cosine" (``alpha_max`` → ``alpha_min``
            over ``alpha_num_steps``, default: the run's optimizer steps) or "temperature_score"
            (alias "adaptive": α from the opponent's per-token log-prob gap D̂ between synthetic
            and annotated responses, measured on the precomputed reference log-probs when
            ``train()`` starts; needs ``precompute_ref_log_probs=True`` or reference columns in the
            dataset). D̂ is a temperature score, not a distance (docs/math.md#alpha-schedule); the
            gap-adaptive schedule needs held-out synthetic responses, which train/selfplay.py
            has and this trainer does not. IRIS only.
        alpha, alpha_min, alpha_max: α ≥ 0 (dimensionless), alpha_min ≤ alpha_max.
        scope: normalisation of the IRIS weights and the baselines' means: "micro" (each
            micro-batch), "rank" (the optimizer step on this process) or "global" (the step on
            every process: equal to one process with the whole batch). Default "global".
        length_normalize: score responses by their mean token log-prob (policy and reference).
        loss_options: other keyword hyper-parameters of the loss, e.g. ``{"variant": "hinge"}``
            (SPIN/DPO) or ``{"mu": 0.5}`` (SPACE).
        iris_backend: log-prob backend, "auto" | "triton" | "torch" | "reference".
        disable_dropout: (DPOConfig's, default True) every dropout of the policy and of the
            reference model off, including the functional attention dropout that TRL's own
            ``disable_dropout_in_model`` misses (``iris_kernels.integrations.dropout``). False
            keeps dropout, which breaks g = 0 at θ = θ_t (the reference is scored without it).

    Errors: ValueError/TypeError naming the field, raised when the config is built.
    """

    _VALID_DICT_FIELDS = DPOConfig._VALID_DICT_FIELDS + ["loss_options"]

    loss_name: str = field(default="iris", metadata={"help": f"Self-play loss: one of {SELFPLAY_LOSSES}."})
    beta: Optional[float] = field(
        default=None, metadata={"help": "β > 0 of g = β·(log π_θ − log π_ref); None: the loss's default."}
    )
    alpha_schedule: str = field(default="constant", metadata={"help": f"IRIS α schedule: one of {ALPHA_SCHEDULES}."})
    alpha: float = field(default=1.0, metadata={"help": "IRIS α ≥ 0 of the constant schedule."})
    alpha_min: float = field(default=0.5, metadata={"help": "Smallest α (adaptive) / final α (linear, cosine)."})
    alpha_max: float = field(default=2.0, metadata={"help": "Largest α (adaptive) / initial α (linear, cosine)."})
    alpha_num_steps: Optional[int] = field(
        default=None, metadata={"help": "Steps of the linear/cosine schedule; default: the run's optimizer steps."}
    )
    scope: str = field(default="global", metadata={"help": f"Normalisation scope: one of {SCOPES}."})
    length_normalize: bool = field(default=False, metadata={"help": "Mean instead of summed token log-probs."})
    # Plain `dict`, not Dict[str, Any]: typing caches Unions regardless of order, so once another module
    # (deepspeed) has built Union[str, Dict[str, Any], None] this annotation resolves to that order, and
    # HfArgumentParser's isinstance(None, args[1]) fails on the subscripted Dict.
    loss_options: Optional[Union[dict, str]] = field(
        default=None, metadata={"help": "Other keyword hyper-parameters of the loss (e.g. variant, mu)."}
    )
    iris_backend: str = field(default="auto", metadata={"help": "Log-prob backend: auto | triton | torch | reference."})

    def __post_init__(self):
        if self.loss_name not in SELFPLAY_LOSSES:
            raise ValueError(f"SelfPlayConfig.loss_name must be one of {SELFPLAY_LOSSES}, got {self.loss_name!r}")
        if self.alpha_schedule not in ALPHA_SCHEDULES:
            raise ValueError(
                f"SelfPlayConfig.alpha_schedule must be one of {ALPHA_SCHEDULES}, got {self.alpha_schedule!r}"
            )
        for name in ("alpha", "alpha_min", "alpha_max"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, numbers.Real):
                raise TypeError(f"SelfPlayConfig.{name} must be a number, got {type(value).__name__}")
            if not (math.isfinite(value) and value >= 0):
                raise ValueError(
                    f"SelfPlayConfig.{name} must be a finite number >= 0 (alpha < 0 swaps the IRIS terms), got {value}"
                )
        if self.alpha_min > self.alpha_max:
            raise ValueError(
                f"SelfPlayConfig.alpha_min ({self.alpha_min}) must be <= SelfPlayConfig.alpha_max ({self.alpha_max})"
            )
        if self.alpha_num_steps is not None and (
            isinstance(self.alpha_num_steps, bool) or not isinstance(self.alpha_num_steps, int) or self.alpha_num_steps < 1
        ):
            raise ValueError(f"SelfPlayConfig.alpha_num_steps must be a positive int, got {self.alpha_num_steps!r}")
        if self.scope not in SCOPES:
            raise ValueError(f"SelfPlayConfig.scope must be one of {SCOPES}, got {self.scope!r}")
        if not isinstance(self.length_normalize, bool):
            raise TypeError(f"SelfPlayConfig.length_normalize must be a bool, got {type(self.length_normalize).__name__}")
        if self.loss_options is None:
            self.loss_options = {}
        if isinstance(self.loss_options, str):  # from the command line (HfArgumentParser): JSON
            try:
                self.loss_options = json.loads(self.loss_options)
            except json.JSONDecodeError as err:
                raise ValueError(f"SelfPlayConfig.loss_options: not a JSON object: {err}") from None
        if not isinstance(self.loss_options, dict):
            raise TypeError(f"SelfPlayConfig.loss_options must be a dict, got {type(self.loss_options).__name__}")
        if self.beta is not None:
            if isinstance(self.beta, bool) or not isinstance(self.beta, numbers.Real):
                raise TypeError(f"SelfPlayConfig.beta must be a number or None, got {type(self.beta).__name__}")
            if not (math.isfinite(self.beta) and self.beta > 0):
                raise ValueError(f"SelfPlayConfig.beta must be a finite number > 0, got {self.beta}")
        # DPO's own loss settings have no meaning here; a non-default value is a mistake, not a no-op.
        loss_type = [self.loss_type] if isinstance(self.loss_type, str) else list(self.loss_type)
        if loss_type != ["sigmoid"] or self.loss_weights is not None:
            raise ValueError("SelfPlayConfig.loss_type / loss_weights are DPOTrainer's; choose the loss with loss_name")
        for name, default in (("ld_alpha", None), ("use_weighting", False), ("f_divergence_type", "reverse_kl")):
            if getattr(self, name) != default:
                raise ValueError(f"SelfPlayConfig.{name} is not supported by the self-play losses; leave it at {default!r}")
        # Build the loss once now (num_steps=1 stands in for the run's length), so a bad option
        # fails here and names its field.
        try:
            build_selfplay_loss(self, num_steps=1)
        except (TypeError, ValueError) as err:
            raise type(err)(f"SelfPlayConfig.loss_options / loss_name={self.loss_name!r}: {err}") from None
        super().__post_init__()


def build_alpha_schedule(args: SelfPlayConfig, num_steps: int):
    """The config's α schedule (None for losses without α). ``num_steps``: linear/cosine length."""
    if args.loss_name != "iris":
        return None
    if args.alpha_schedule == "constant":
        return make_schedule("constant", alpha=args.alpha)
    if args.alpha_schedule in ("adaptive", "temperature_score"):
        # The trainer sees no held-out synthetic responses, which the gap-adaptive schedule's
        # classifier test needs (train/selfplay.py has them): "adaptive" here has always been, and
        # stays, the opponent's temperature score D̂ (not a distance; docs/math.md#alpha-schedule).
        return make_schedule("temperature_score", alpha_max=args.alpha_max, alpha_min=args.alpha_min)
    return make_schedule(args.alpha_schedule, alpha_start=args.alpha_max, alpha_end=args.alpha_min,
                         num_steps=max(int(args.alpha_num_steps or num_steps), 1))


def build_selfplay_loss(args: SelfPlayConfig, *, num_steps: int, softcap: Optional[float] = None) -> SelfPlayLoss:
    """The ``SelfPlayLoss`` a trainer with ``args`` computes (also what the tests compare with)."""
    return SelfPlayLoss(
        args.loss_name,
        alpha=build_alpha_schedule(args, num_steps),
        beta=args.beta,
        ignore_index=IGNORE_INDEX,
        softcap=softcap,
        length_normalize=args.length_normalize,
        backend=args.iris_backend,
        scope=args.scope,
        **dict(args.loss_options or {}),
    )


def _softcap(config) -> Optional[float]:
    text_config = config.get_text_config() if hasattr(config, "get_text_config") else config
    for key in _LOGIT_SCALE_KEYS:
        value = getattr(text_config, key, None)
        if value is not None and float(value) != 1.0:
            raise ValueError(
                f"the model's config sets {key}={value}: SelfPlayTrainer's log-prob op does not scale the logits"
            )
    cap = getattr(text_config, "final_logit_softcapping", None)
    return None if cap is None else float(cap)


def host_num_valid(labels: torch.Tensor, device: torch.device) -> Optional[int]:
    """Scored positions after the shift, counted on the host when the labels are still there and
    the op runs on another device (no sync); None otherwise (the kernels count on the device)."""
    if labels.device.type != "cpu" or torch.device(device).type == "cpu":
        return None
    return host_scored_count(shift_labels(labels.long(), IGNORE_INDEX), IGNORE_INDEX)


def install_iris_head(model, *, length_normalize: bool, backend: str) -> None:
    """Wrap ``model.forward`` so that ``model(..., iris_labels=labels)`` returns per-sequence
    log-probs fp32 [B] (``sequence_logprobs`` of the body's final hidden states and the lm_head
    weight; labels HF-style, -100 where not scored). Without ``iris_labels`` the forward is the
    previous one (TRL's fused head, or the model's own). Idempotent; ``model`` is the plain
    Hugging Face model (the base model under PEFT, as for TRL's ``add_fused_lm_head``).
    """
    if getattr(model, "_iris_head_installed", False):
        return
    softcap = _softcap(model.config)
    previous_forward = model.forward

    @functools.wraps(type(model).forward)
    def forward(*args, iris_labels=None, **kwargs):
        if iris_labels is None:
            return previous_forward(*args, **kwargs)
        kwargs["use_cache"] = False
        kwargs.pop("output_router_logits", None)
        # The body and the head are looked up on each call: FSDP and PEFT replace them after this.
        body_out = model.base_model(*args, **kwargs)
        hidden = body_out.last_hidden_state
        head = model.get_output_embeddings()
        weight, bias = head.weight, head.bias
        hidden = hidden.to(weight.device)  # a model split over devices may end the body elsewhere
        # Labels still on the host: count the scored positions there (no sync), so that the
        # kernels launch, and the backward's products run, over the scored rows only.
        num_valid = host_num_valid(iris_labels, weight.device)
        labels = iris_labels.to(weight.device)
        # ZeRO-3 keeps the head partitioned outside its own module's forward; gather it for the
        # op (a null context otherwise). DTensor (FSDP2) weights are the op's own business.
        with maybe_gather_lm_head_ctx(*[p for p in head.parameters() if p is not None]):
            # A PEFT (LoRA) adapter on the lm_head: its effective weight, or a ValueError naming it.
            weight, bias = head_weight(head, "lm_head")
            if weight.dtype != hidden.dtype:  # autocast: the body ran in the autocast dtype
                weight = weight.to(hidden.dtype)
                bias = None if bias is None else bias.to(hidden.dtype)
            return sequence_logprobs(
                hidden, weight, labels, shift=True, ignore_index=IGNORE_INDEX, bias=bias, softcap=softcap,
                length_normalize=length_normalize, backend=backend, num_valid=num_valid,
            )

    model.forward = forward
    model._iris_head_installed = True


class SelfPlayTrainer(DPOTrainer):
    """``trl.DPOTrainer`` with the self-play loss of ``SelfPlayConfig`` (see the module docstring).

    Arguments as ``DPOTrainer``'s; ``args`` must be a ``SelfPlayConfig``. ``train_dataset`` is a
    TRL preference dataset (``prompt`` / ``chosen`` / ``rejected``, standard or conversational):
    ``chosen`` is the annotated response, ``rejected`` the synthetic one. A dataset that already
    holds ``prompt_ids`` / ``chosen_ids`` / ``rejected_ids`` is used as tokenised (so stored
    reference log-probs stay valid for exactly those tokens). ``selfplay_loss`` is the
    ``SelfPlayLoss`` in use (its schedule is the one checkpointed).
    """

    _tag_names = ["trl", "iris-kernels", "self-play"]
    _name = "SelfPlay"

    def __init__(self, model, ref_model=None, args: Optional[SelfPlayConfig] = None, data_collator=None,
                 train_dataset=None, eval_dataset=None, processing_class=None, compute_metrics=None,
                 callbacks=None, optimizers=(None, None), quantization_config=None, peft_config=None):
        if args is None:
            args = SelfPlayConfig(output_dir="selfplay-trainer")
        if not isinstance(args, SelfPlayConfig):
            raise TypeError(f"args must be a SelfPlayConfig, got {type(args).__name__}")
        if train_dataset is not None:
            _check_pairs(train_dataset, args, "train_dataset")
        self._step_stats = None
        self._check_reference = False  # armed by train(): the first training batch is compared once
        self.selfplay_loss: Optional[SelfPlayLoss] = None
        super().__init__(
            model, ref_model=ref_model, args=args, data_collator=data_collator, train_dataset=train_dataset,
            eval_dataset=eval_dataset, processing_class=processing_class, compute_metrics=compute_metrics,
            callbacks=callbacks, optimizers=optimizers, quantization_config=quantization_config,
            peft_config=peft_config,
        )
        self._disable_dropout()
        self._ensure_heads()
        self.selfplay_loss = build_selfplay_loss(
            args, num_steps=self._run_steps(), softcap=_softcap(self._hf_model(self.model).config)
        )
        if isinstance(self.selfplay_loss.schedule, TemperatureScoreAlpha) and not _has_ref_columns(self.train_dataset):
            raise ValueError(
                "SelfPlayConfig.alpha_schedule='adaptive' reads the opponent's gap from the reference log-probs: "
                "set precompute_ref_log_probs=True, or give ref_chosen_logps / ref_rejected_logps columns"
            )

    # ------------------------------------------------------------------------- model plumbing

    def _hf_model(self, model):
        model = self.accelerator.unwrap_model(model)
        return model.get_base_model() if is_peft_model(model) else model

    def _ensure_heads(self) -> None:
        # Called before the first use too: TRL's precompute runs inside DPOTrainer.__init__.
        for m in (self.model, getattr(self, "ref_model", None)):
            if m is not None:
                install_iris_head(self._hf_model(m), length_normalize=self.args.length_normalize,
                                  backend=self.args.iris_backend)

    def _disable_dropout(self) -> None:
        # DPOTrainer zeroes nn.Dropout only; attention dropout is a float read at forward time.
        # Called before the reference is scored too (TRL's precompute runs inside its __init__).
        if self.args.disable_dropout:
            for m in (self.model, getattr(self, "ref_model", None)):
                if m is not None:
                    disable_dropout(m)

    def _run_steps(self) -> int:
        if self.args.max_steps and self.args.max_steps > 0:
            return int(self.args.max_steps)
        try:
            n = len(self.train_dataset)
        except TypeError:
            return 1
        per_step = self.args.per_device_train_batch_size * self.args.world_size * self.args.gradient_accumulation_steps
        return max(1, math.ceil(n / per_step) * math.ceil(self.args.num_train_epochs))

    @staticmethod
    def _labels(inputs) -> torch.Tensor:
        return inputs["input_ids"].masked_fill(inputs["completion_mask"] == 0, IGNORE_INDEX)

    @staticmethod
    def _model_kwargs(inputs) -> Dict[str, Any]:
        skip = {"completion_mask", "ref_chosen_logps", "ref_rejected_logps"}
        return {k: v for k, v in inputs.items() if k not in skip}

    def _reference_context(self):
        if self.ref_model is None and is_peft_model(self.model):
            unwrapped = self.accelerator.unwrap_model(self.model)
            return use_adapter(unwrapped, adapter_name="ref" if "ref" in unwrapped.peft_config else None)
        return contextlib.nullcontext()

    def compute_ref_log_probs(self, model, inputs):
        """Reference sequence log-probs (chosen [B], rejected [B]) with this library's op."""
        self._ensure_heads()
        with (torch.no_grad(), disable_gradient_checkpointing(self.model, self.args.gradient_checkpointing_kwargs),
              self._reference_context(), self.accelerator.autocast()):
            ref = model(**self._model_kwargs(inputs), iris_labels=self._labels(inputs))
        return ref.chunk(2, dim=0)

    def _reference(self, inputs) -> torch.Tensor:
        if "ref_chosen_logps" in inputs and "ref_rejected_logps" in inputs:
            device = inputs["input_ids"].device
            return torch.cat([inputs["ref_chosen_logps"], inputs["ref_rejected_logps"]]).to(device, torch.float32)
        if self.precompute_ref_logps:
            raise ValueError("precompute_ref_log_probs=True but the batch has no ref_chosen_logps / ref_rejected_logps")
        model = self.ref_model if self.ref_model is not None else self.model
        return torch.cat(self.compute_ref_log_probs(model, inputs)).float()

    # ------------------------------------------------------------------------- datasets

    def _prepare_dataset(self, dataset, processing_class, args, dataset_name):
        cols = _columns(dataset)
        if cols is not None and {"prompt_ids", "chosen_ids", "rejected_ids"} <= cols:
            return dataset  # already tokenised (e.g. the harness export): keep its tokens
        return super()._prepare_dataset(dataset, processing_class, args, dataset_name)

    def _precompute_ref_logps(self, dataset, name, batch_size):
        if _has_ref_columns(dataset):
            return dataset  # the opponent's stored values
        self._disable_dropout()
        self._ensure_heads()
        return super()._precompute_ref_logps(dataset, name, batch_size)

    # ------------------------------------------------------------------------- the step's normalisation

    def get_batch_samples(self, epoch_iterator, num_batches, device):
        batch_samples, num_items_in_batch = super().get_batch_samples(epoch_iterator, num_batches, device)
        self._step_stats = None
        crit = self.selfplay_loss
        if crit is None or crit.scope == "micro" or len(batch_samples) <= 1:
            # One micro-batch: the loss call itself normalises over it (and all-gathers for "global").
            return batch_samples, num_items_in_batch
        # Gradient accumulation: a no-grad pass over the step's micro-batches gives the step's
        # statistics (merged, and gathered over processes for "global") before any backward. θ
        # does not change within the step, so they are exactly those of the gradient pass.
        # accumulation_divisor undoes Trainer's division of each micro-batch loss by their number.
        norm = crit.make_step_normalizer(step=self.state.global_step, accumulation_divisor=len(batch_samples))
        model = self.model_wrapped
        with torch.no_grad(), disable_gradient_checkpointing(self.model, self.args.gradient_checkpointing_kwargs):
            for batch in batch_samples:
                inputs = self._prepare_inputs(batch)
                ref = self._reference(inputs)
                # Stored in the batch so the gradient pass does not recompute the reference.
                B = ref.shape[0] // 2
                batch["ref_chosen_logps"], batch["ref_rejected_logps"] = ref[:B], ref[B:]
                with self.accelerator.autocast():
                    policy = model(**self._model_kwargs(inputs), iris_labels=self._labels(inputs))
                norm.observe(policy[:B], policy[B:], ref[:B], ref[B:])
        self._step_stats = norm.finalize()
        return batch_samples, num_items_in_batch

    # ------------------------------------------------------------------------- the loss

    def _compute_loss(self, model, inputs, return_outputs):
        if return_outputs:
            raise ValueError("SelfPlayTrainer computes no logits: use prediction_loss_only=True (no compute_metrics)")
        self._ensure_heads()
        mode = "train" if self.model.training else "eval"
        policy = model(**self._model_kwargs(inputs), iris_labels=self._labels(inputs))
        ref = self._reference(inputs)
        B = policy.shape[0] // 2
        crit = self.selfplay_loss
        kw = crit._hparams(self.state.global_step)
        kw.update(scope=crit.scope, group=crit.group)
        stats = self._step_stats if mode == "train" else None
        loss, metrics = crit.loss_fn(
            policy[:B], policy[B:], ref[:B], ref[B:],
            return_metrics=True, stats=stats, backend=crit._loss_backend(), **kw,
        )
        if self._check_reference and mode == "train":
            self._check_reference = False
            self._warn_if_not_the_reference(model, inputs, policy, ref)
        metrics = dict(metrics)
        metrics["policy/real_logps"] = policy[:B].detach().mean()
        metrics["policy/syn_logps"] = policy[B:].detach().mean()
        self._log_selfplay_metrics(mode, metrics)
        return loss

    def _warn_if_not_the_reference(self, model, inputs, policy: torch.Tensor, ref: torch.Tensor) -> None:
        """Warn when the model being trained is not the one whose log-probs are the reference.

        Without a ``ref_model`` the reference is the starting policy: stored ``ref_*_logps``
        (e.g. the harness export) belong to the opponent θ_t, and a policy that starts elsewhere
        (another checkpoint, say θ_{t+1}) trains against the wrong reference; its first loss is
        then not the at-reference value (0 for IRIS). Checked once, on the first training batch
        of a fresh ``train()``: one host sync for the whole run. A mismatch is re-measured in
        eval mode before warning, so dropout alone never triggers it.
        """
        tol = 0.05 + 1e-3 * ref.detach().abs()  # nats per sequence: covers bf16/fp16 scoring, not another model
        diff = (policy.detach().float() - ref.float()).abs()
        if not bool((diff > tol).any()):
            return
        if self.model.training:
            self.model.eval()
            try:
                with torch.no_grad():
                    diff = (model(**self._model_kwargs(inputs), iris_labels=self._labels(inputs)).float()
                            - ref.float()).abs()
            finally:
                self.model.train()
            if not bool((diff > tol).any()):
                return
        warnings.warn(
            f"SelfPlayTrainer: on the first batch the policy's summed log-probs differ from the reference "
            f"log-probs (ref_chosen_logps / ref_rejected_logps) by up to {float(diff.max()):.4g} nats, so the first "
            f"loss is not the at-reference value (0 for IRIS): the model passed is not the one that scored the "
            f"pairs. Start from that model (θ_t; train/trl_export.py saves it to OUTPUT_DIR/opponent), or pass "
            f"ref_model= if a different reference is meant.",
            UserWarning, stacklevel=2,
        )

    def _log_selfplay_metrics(self, mode: str, metrics: Dict[str, torch.Tensor]) -> None:
        keys = sorted(metrics)
        values = torch.stack([metrics[k].detach().float().reshape(()) for k in keys])
        if self.selfplay_loss.scope != "global" and self.accelerator.num_processes > 1:
            values = self.accelerator.gather(values[None]).mean(0)
        # One host transfer for all of them, once per micro-batch (the metrics are logged as floats).
        out = dict(zip(keys, values.tolist()))
        log = self._metrics[mode]
        for k, v in out.items():
            if k not in ("loss", "estimate"):
                log[f"iris/{k}"].append(v)
        log["iris/estimate"].append(out.get("estimate", float("nan")))
        # DPO-style keys, so TRL dashboards keep working: rewards are the log-ratios g = β(s − s_ref).
        if "real/mean_g" in out and "syn/mean_g" in out:
            log["rewards/chosen"].append(out["real/mean_g"])
            log["rewards/rejected"].append(out["syn/mean_g"])
            log["rewards/margins"].append(out.get("margin", out["real/mean_g"] - out["syn/mean_g"]))
        if "accuracy" in out:
            log["rewards/accuracies"].append(out["accuracy"])
        log["logps/chosen"].append(out["policy/real_logps"])
        log["logps/rejected"].append(out["policy/syn_logps"])

    # ------------------------------------------------------------------------- α: adaptive gap, checkpoints

    def train(self, resume_from_checkpoint=None, *args, **kwargs):
        if isinstance(self.selfplay_loss.schedule, TemperatureScoreAlpha) and not resume_from_checkpoint:
            self._measure_gap()
        # A fresh run without ref_model starts at its own reference: check that on the first batch.
        self._check_reference = not resume_from_checkpoint and self.ref_model is None
        return super().train(resume_from_checkpoint, *args, **kwargs)

    def _measure_gap(self) -> None:
        """Set the adaptive α from the opponent's per-token mean log-probs of this dataset.

        Every process holds the whole dataset; update_gap all-reduces the sums, which scales
        numerators and counts alike, so the gap is the dataset's on every process.
        """
        ds = self.train_dataset
        max_length = self.args.max_length
        syn, real = [], []
        for p, c, r, rc, rr in zip(ds["prompt_ids"], ds["chosen_ids"], ds["rejected_ids"],
                                   ds["ref_chosen_logps"], ds["ref_rejected_logps"]):
            limit = None if max_length is None else max(max_length - len(p), 0)
            n_c = len(c) if limit is None else min(len(c), limit)
            n_r = len(r) if limit is None else min(len(r), limit)
            real.append(rc / max(n_c, 1))
            syn.append(rr / max(n_r, 1))
        schedule = self.selfplay_loss.schedule
        schedule.accumulate_gap(torch.tensor(syn, dtype=torch.float64), torch.tensor(real, dtype=torch.float64))
        group = None
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            group = self.selfplay_loss.group
        schedule.update_gap(group=group)

    def _save_checkpoint(self, model, trial):
        super()._save_checkpoint(model, trial)
        if self.args.should_save:
            folder = os.path.join(self._get_output_dir(trial=trial), f"{PREFIX_CHECKPOINT_DIR}-{self.state.global_step}")
            state = {"loss_name": self.args.loss_name, "selfplay_loss": self.selfplay_loss.get_extra_state()}
            torch.save(state, os.path.join(folder, STATE_FILE))

    def _load_from_checkpoint(self, resume_from_checkpoint, model=None):
        super()._load_from_checkpoint(resume_from_checkpoint, model)
        path = os.path.join(resume_from_checkpoint, STATE_FILE)
        if not os.path.isfile(path):
            if self.selfplay_loss.schedule is not None:
                warnings.warn(f"{resume_from_checkpoint} has no {STATE_FILE}: the α schedule starts afresh")
            return
        state = torch.load(path, map_location="cpu", weights_only=True)
        if state.get("loss_name") != self.args.loss_name:
            raise ValueError(
                f"SelfPlayConfig.loss_name={self.args.loss_name!r} but the checkpoint was trained with "
                f"{state.get('loss_name')!r}"
            )
        self.selfplay_loss.set_extra_state(state["selfplay_loss"])


def _columns(dataset):
    names = getattr(dataset, "column_names", None)
    return None if names is None else set(names)


def _has_ref_columns(dataset) -> bool:
    cols = _columns(dataset)
    return cols is not None and {"ref_chosen_logps", "ref_rejected_logps"} <= cols


def _check_pairs(dataset, args: SelfPlayConfig, name: str) -> None:
    cols = _columns(dataset)
    if cols is None:
        return
    if not ({"rejected", "rejected_ids"} & cols):
        raise ValueError(
            f"{name}: loss_name={args.loss_name!r} needs a synthetic response per prompt (the 'rejected' column, "
            f"paired with the annotated 'chosen'); the dataset has columns {sorted(cols)}"
        )
    if not ({"chosen", "chosen_ids"} & cols):
        raise ValueError(f"{name}: the annotated responses ('chosen' column) are missing; columns {sorted(cols)}")
