"""``SelfPlayLoss``: the end-to-end self-play loss a trainer imports.

hidden states + lm_head weight + labels  →  per-sequence summed log-probs (fused, no [N × V])
→ split into annotated / synthetic rows  →  the registry loss (IRIS tilted risk, SPIN, …)
→ backward: per-sequence weights → per-token upstream gradients → the log-prob backward.

Row layout, and why it is host-side. The losses take the annotated ("real", n) and synthetic (m)
rows as separate tensors, so n and m decide tensor shapes and must be known on the host. A
boolean device mask (``s[mask]``, ``nonzero``) would make every step wait for the GPU. So the
row layout is given in one of two host-resident forms:

* ``num_real=n`` (fastest; plain slicing): rows ``[0, n)`` are annotated and ``[n, B)`` synthetic.
* ``is_real``: a Python sequence of bools (or 0/1), or a CPU tensor, of length B. A layout whose
  real rows form a prefix is sliced as above; any other layout is gathered with index tensors
  that are built on the host and copied from pinned memory without blocking.
  A CUDA ``is_real`` is refused: reading it would sync. Keep the collator's CPU copy.

Pairing (SPIN, DPO). The i-th annotated row, in batch order, is paired with the i-th synthetic
row, in batch order. With ``num_real=n`` that is row i with row n + i, so the batch
[y_1 … y_n, y'_1 … y'_n] pairs each prompt's annotated response with its synthetic one. Paired
losses require n = m.

Reference. Either ``ref_logps`` [B] (precomputed, e.g. in a no-grad pass at the start of the
self-play iteration; same row order as the batch, same ``length_normalize``/``temperature``
settings) or ``ref_hidden`` [B, T, H'] + ``ref_weight`` [V, H'] (a live reference model's final
hidden states and lm_head, evaluated here under ``torch.no_grad``). The reference is a constant:
no gradient reaches it in either mode.
"""
from __future__ import annotations

import inspect
import numbers
from typing import Any, Dict, Optional, Sequence, Tuple, Union

import torch
from torch import nn

from .distributed import StepNormalizer, StepStats, check_scope
from .logprobs import _check_cuda_options, host_scored_count, packed_sums, sequence_logprobs, shift_labels
from .losses import check_loss_hparams, get_loss
from .schedules import AlphaSchedule, make_schedule
from .sharding import full_weights
from .types import Backend

__all__ = ["SelfPlayLoss"]

# Losses that pair annotated row i with synthetic row i (n = m required).
PAIRED_LOSSES = frozenset({"spin", "dpo"})
# Keywords SelfPlayLoss itself supplies to the loss; a user may not pass them via **loss_kwargs.
_MODULE_OWNED = frozenset({"alpha", "beta", "return_metrics", "scope", "group", "stats", "backend", "num_tokens_real",
                           "bwd", "compact", "workspace_bytes", "fwd"})

RowSelection = Union[slice, torch.Tensor]


def _loss_keywords(fn) -> Dict[str, inspect.Parameter]:
    return {
        name: p
        for name, p in inspect.signature(fn).parameters.items()
        if p.kind is inspect.Parameter.KEYWORD_ONLY
    }


def _select(x: torch.Tensor, rows: RowSelection) -> torch.Tensor:
    # Slicing is a view; index_select is one gather kernel. Both are differentiable.
    return x[rows] if isinstance(rows, slice) else x.index_select(0, rows)


def _index_tensor(indices: Sequence[int], device: torch.device) -> torch.Tensor:
    """Host indices → device index tensor without stalling the stream.

    A copy from pageable memory makes the CUDA stream synchronise first; from pinned memory with
    ``non_blocking`` it is queued like a kernel (the caching host allocator keeps the buffer alive
    until the copy has run).
    """
    cpu = torch.tensor(list(indices), dtype=torch.long)
    if device.type == "cuda":
        return cpu.pin_memory().to(device, non_blocking=True)
    return cpu.to(device)


def split_rows(
    batch_size: int,
    device: torch.device,
    *,
    is_real: Optional[Union[Sequence[Any], torch.Tensor]] = None,
    num_real: Optional[int] = None,
) -> Tuple[RowSelection, RowSelection, int, int]:
    """(real rows, synthetic rows, n, m) for a batch of ``batch_size`` rows; see the module docstring.

    Exactly one of ``is_real`` / ``num_real``. Never reads device memory.
    """
    if (is_real is None) == (num_real is None):
        raise ValueError("give exactly one of is_real (one flag per row) or num_real (real rows first)")
    if num_real is not None:
        if isinstance(num_real, bool) or not isinstance(num_real, numbers.Integral):
            raise TypeError(f"num_real must be a Python int, got {type(num_real).__name__}")
        n = int(num_real)
        if not 0 <= n <= batch_size:
            raise ValueError(f"num_real must be in [0, {batch_size}] (the batch size), got {n}")
        return slice(0, n), slice(n, batch_size), n, batch_size - n

    if isinstance(is_real, torch.Tensor):
        if is_real.device.type != "cpu":
            raise ValueError(
                f"is_real must be host-resident (a list or a CPU tensor), got a tensor on {is_real.device}: "
                "reading a device mask forces a host sync every step. Pass the collator's CPU copy, or num_real"
            )
        if is_real.dim() != 1:
            raise ValueError(f"is_real must be 1-D [B], got shape {tuple(is_real.shape)}")
        if is_real.dtype.is_floating_point or is_real.dtype.is_complex:
            raise TypeError(f"is_real must be a bool or integer tensor, got {is_real.dtype}")
        flags = is_real.tolist()  # CPU tensor: no device involved
    elif isinstance(is_real, (list, tuple)):
        flags = list(is_real)
    else:
        raise TypeError(f"is_real must be a list/tuple of bools or a CPU tensor, got {type(is_real).__name__}")
    if len(flags) != batch_size:
        raise ValueError(f"is_real has {len(flags)} entries but the batch has {batch_size} rows")
    for f in flags:
        if isinstance(f, bool) or (isinstance(f, numbers.Integral) and f in (0, 1)):
            continue
        raise ValueError(f"is_real entries must be bools (or 0/1), got {f!r}")
    real = [i for i, f in enumerate(flags) if f]
    syn = [i for i, f in enumerate(flags) if not f]
    n, m = len(real), len(syn)
    if real == list(range(n)):  # real rows first: the slicing fast path
        return slice(0, n), slice(n, batch_size), n, m
    return _index_tensor(real, device), _index_tensor(syn, device), n, m


def token_counts(
    labels: torch.Tensor, *, shift: bool, ignore_index: int, cu_seqlens: Optional[torch.Tensor] = None
) -> torch.Tensor:
    """Scored (non-ignored, after the shift) tokens per sequence, fp32 [B]; device ops only."""
    if cu_seqlens is not None and labels.dim() == 2:
        labels = labels[0]
    targets = shift_labels(labels, ignore_index, cu_seqlens) if shift else labels
    scored = (targets != ignore_index).float()
    if cu_seqlens is None:
        return scored.sum(-1)
    return packed_sums(scored, cu_seqlens)


def _op_on_other_device(device: torch.device) -> bool:
    """True when the op runs off the host (so that CPU labels must move and can be counted free)."""
    return torch.device(device).type != "cpu"


def labels_for_op(
    labels: torch.Tensor, device: torch.device, *, shift: bool, ignore_index: int,
    cu_seqlens: Optional[torch.Tensor] = None,
) -> Tuple[torch.Tensor, Optional[int]]:
    """(labels on ``device``, host count of scored positions | None).

    Labels still on the host while the op runs on a GPU are counted there (no device read-back;
    ``host_scored_count`` after the same shift as ``sequence_logprobs``) and moved; the count,
    given as ``num_valid``, shrinks the compacted launches and both cuBLAS products to the scored
    rows (issue 16, item 5; as ``integrations.trl.host_num_valid``). Device labels, or an op on
    the CPU, give (labels, None): the kernels keep their device-resident count. With packed
    labels the count needs ``cu_seqlens`` on the host too (else None).
    """
    if not isinstance(labels, torch.Tensor) or labels.device.type != "cpu" or not _op_on_other_device(device):
        return labels, None
    count = None
    if cu_seqlens is None or cu_seqlens.device.type == "cpu":
        flat = labels[0] if (cu_seqlens is not None and labels.dim() == 2) else labels
        targets = shift_labels(flat.long(), ignore_index, cu_seqlens) if shift else flat.long()
        count = host_scored_count(targets, ignore_index)
    return labels.to(device), count


class SelfPlayLoss(nn.Module):
    """Self-play loss from hidden states: fused sequence log-probs + a registry loss.

    Args:
        loss_type: a name in ``iris_kernels.LOSSES``: "iris", "spin", "dpo", "space", "chi2", "sft".
        alpha: IRIS only (required for it): a float ≥ 0, an ``AlphaSchedule``, or anything
            ``make_schedule`` accepts (a name or config dict). α is read once per call as
            ``schedule.alpha(step)``; per-step schedules need ``step=`` in ``forward``.
        beta: β > 0; None keeps the loss's default (IRIS 1.0, SPIN/DPO 0.1, SPACE/χ² 1.0).
            SFT has no β.
        ignore_index, temperature, softcap, shift, length_normalize: as in ``sequence_logprobs``.
            ``length_normalize`` scores sequences by their mean token log-prob (policy and live
            reference alike; a precomputed ``ref_logps`` must use the same setting).
        backend: log-prob backend, "auto" | "triton" | "torch" | "reference". The tilted-risk
            terms use "triton" when the log-probs do (and for "auto"), "torch" otherwise.
        bwd, compact, workspace_bytes, fwd: backend="triton" backward variant, ignored-row
            compaction, workspace budget and forward variant, as in ``linear_logprobs``
            (defaults from the autotuner on CUDA, else iris_kernels.tuning).
        scope, group: normalisation scope "micro" | "rank" | "global" and process group
            (``iris_kernels.distributed``); None keeps the loss's default ("rank").
        **loss_kwargs: other keyword hyper-parameters of the loss (e.g. ``variant="hinge"`` for
            SPIN/DPO, ``mu=`` for SPACE), checked against its signature here.

    ``forward`` returns ``(loss, metrics)``: the 0-dim fp32 loss and a dict of detached 0-dim
    tensors (the loss's metrics plus mean policy/reference log-probs per term). Nothing in it
    syncs with the host.

    Example::

        crit = SelfPlayLoss("iris", alpha=make_schedule("cosine", alpha_start=2, alpha_end=0.5, num_steps=1000))
        hidden = model.model(input_ids, attention_mask=mask).last_hidden_state
        loss, metrics = crit(hidden, model.lm_head.weight, labels, num_real=B // 2,
                             ref_logps=batch["ref_logps"], step=optimizer_step)
        loss.backward()
    """

    def __init__(
        self,
        loss_type: str = "iris",
        alpha: Any = None,
        beta: Optional[float] = None,
        *,
        ignore_index: int = -100,
        temperature: float = 1.0,
        softcap: Optional[float] = None,
        shift: bool = True,
        length_normalize: bool = False,
        backend: str = "auto",
        scope: Optional[str] = None,
        group: Any = None,
        bwd: str = "auto",
        compact: Any = "auto",
        workspace_bytes: Optional[int] = None,
        fwd: str = "auto",
        **loss_kwargs: Any,
    ):
        super().__init__()
        self.loss_type = loss_type
        self.loss_fn = get_loss(loss_type)  # ValueError listing the valid names
        keywords = _loss_keywords(self.loss_fn)

        if "alpha" in keywords:
            if alpha is None:
                raise ValueError(f"alpha is required for loss_type={loss_type!r} (a float >= 0 or a schedule)")
            if isinstance(alpha, torch.Tensor):
                # A tensor α could only be range-checked with a host sync; schedules hand out floats.
                raise TypeError("alpha must be a Python float, an AlphaSchedule or a schedule config, not a tensor")
            try:  # make_schedule validates (α < 0 → ValueError naming the offending argument)
                self.schedule: Optional[AlphaSchedule] = make_schedule(alpha)
            except (TypeError, ValueError) as err:
                raise type(err)(f"alpha: {err}") from None
        else:
            if alpha is not None:
                raise ValueError(f"alpha applies to the IRIS loss only, not loss_type={loss_type!r}")
            self.schedule = None

        if beta is not None and "beta" not in keywords:
            raise ValueError(f"loss_type={loss_type!r} has no beta")
        if beta is not None:
            if isinstance(beta, bool) or not isinstance(beta, numbers.Real):
                raise TypeError(f"beta must be a Python float, got {type(beta).__name__}")
            if not (float(beta) > 0 and float(beta) < float("inf")):
                raise ValueError(f"beta must be a finite number > 0, got {beta}")
            beta = float(beta)
        self.beta = beta

        for name in loss_kwargs:
            if name in _MODULE_OWNED:
                raise ValueError(f"{name!r} is set by SelfPlayLoss itself, not through loss_kwargs")
            if name not in keywords:
                valid = sorted(set(keywords) - _MODULE_OWNED)
                raise ValueError(f"unknown keyword {name!r} for loss_type={loss_type!r}; it accepts {valid}")
        check_loss_hparams(loss_type, loss_kwargs, partial=True)  # values too (mu > 0, variant, ...), up front
        self.loss_kwargs = dict(loss_kwargs)

        if isinstance(ignore_index, bool) or not isinstance(ignore_index, numbers.Integral):
            raise TypeError(f"ignore_index must be an int, got {type(ignore_index).__name__}")
        for name, value in (("temperature", temperature), ("softcap", softcap)):
            if value is None and name == "softcap":
                continue
            if isinstance(value, bool) or not isinstance(value, numbers.Real):
                raise TypeError(f"{name} must be a Python float, got {type(value).__name__}")
            if not (0 < float(value) < float("inf")):
                raise ValueError(f"{name} must be a finite number > 0, got {value}")
        for name, value in (("shift", shift), ("length_normalize", length_normalize)):
            if not isinstance(value, bool):
                raise TypeError(f"{name} must be a bool, got {type(value).__name__}")
        if loss_type == "sft" and length_normalize:
            raise ValueError("length_normalize does not apply to sft: its loss is already a per-token mean")
        try:
            self.backend = Backend(backend)
        except ValueError:
            raise ValueError(f"backend must be one of {[b.value for b in Backend]}, got {backend!r}") from None
        if scope is not None:
            check_scope(scope)
        _check_cuda_options(bwd, compact, workspace_bytes, None, fwd)
        self.cuda_options = dict(bwd=bwd, compact=compact, workspace_bytes=workspace_bytes, fwd=fwd)
        self.scope, self.group = scope, group
        self.ignore_index = int(ignore_index)
        self.temperature = float(temperature)
        self.softcap = None if softcap is None else float(softcap)
        self.shift = shift
        self.length_normalize = length_normalize

    # ------------------------------------------------------------------------------- helpers

    @property
    def paired(self) -> bool:
        return self.loss_type in PAIRED_LOSSES

    @property
    def needs_reference(self) -> bool:
        return self.loss_type != "sft"

    def alpha(self, step: Optional[int] = None) -> Optional[float]:
        """α for optimizer step ``step`` (None for losses without α)."""
        return None if self.schedule is None else self.schedule.alpha(step)

    def _loss_backend(self) -> str:
        # The tilted-risk kernel follows the log-prob backend; "reference" means plain PyTorch.
        return {Backend.AUTO: "auto", Backend.TRITON: "triton"}.get(self.backend, "torch")

    def _seq_logps(self, hidden, weight, labels, bias, cu_seqlens, num_valid=None):
        return sequence_logprobs(
            hidden, weight, labels,
            shift=self.shift, ignore_index=self.ignore_index, bias=bias, temperature=self.temperature,
            softcap=self.softcap, length_normalize=self.length_normalize, cu_seqlens=cu_seqlens,
            backend=self.backend.value, num_valid=num_valid, **self.cuda_options,
        )

    def _hparams(self, step: Optional[int]) -> Dict[str, Any]:
        kw = dict(self.loss_kwargs)
        if self.schedule is not None:
            kw["alpha"] = self.schedule.alpha(step)
        if self.beta is not None:
            kw["beta"] = self.beta
        return kw

    def make_step_normalizer(self, *, step: Optional[int] = None, accumulation_divisor: int = 1) -> StepNormalizer:
        """A ``StepNormalizer`` with this module's loss, α(step), β, scope (default "rank") and group.

        Gradient accumulation under the "rank"/"global" scope, in a few lines::

            norm = crit.make_step_normalizer(step=k)
            for mb in micro_batches:                      # no-grad pass: the step's statistics
                crit.observe(norm, **inputs(mb))
            for mb in micro_batches:                      # gradient pass with those weights
                loss, metrics = crit(**inputs(mb), step=k, stats=norm.stats)
                loss.backward()

        ``accumulation_divisor``: pass the number the loop divides each loss by (e.g.
        accelerate's ``gradient_accumulation_steps``), so the gradient is scaled back.
        """
        return StepNormalizer(
            self.loss_type, scope=self.scope or "rank", group=self.group,
            accumulation_divisor=accumulation_divisor, **self._hparams(step),
        )

    # ------------------------------------------------------------------------------- forward

    def split_logps(
        self,
        hidden: torch.Tensor,
        weight: torch.Tensor,
        labels: torch.Tensor,
        is_real: Optional[Union[Sequence[Any], torch.Tensor]] = None,
        *,
        num_real: Optional[int] = None,
        ref_logps: Optional[torch.Tensor] = None,
        ref_hidden: Optional[torch.Tensor] = None,
        ref_weight: Optional[torch.Tensor] = None,
        bias: Optional[torch.Tensor] = None,
        ref_bias: Optional[torch.Tensor] = None,
        cu_seqlens: Optional[torch.Tensor] = None,
    ) -> Tuple[torch.Tensor, Optional[torch.Tensor], Optional[torch.Tensor], Optional[torch.Tensor]]:
        """(policy_real, policy_syn, ref_real, ref_syn): the loss's four inputs, validated.

        Arguments as :meth:`forward`. For SFT without a reference the last two are None, and so
        is policy_syn when the batch has no synthetic row. For the statistics pass of gradient
        accumulation use :meth:`observe`, not ``StepNormalizer.observe(*split_logps(...))``: it also
        records the per-batch keywords the loss call uses (SFT's token counts).
        """
        return self._split(
            hidden, weight, labels, is_real, num_real, ref_logps, ref_hidden, ref_weight, bias, ref_bias, cu_seqlens
        )[:4]

    @torch.no_grad()
    def observe(self, normalizer: StepNormalizer, hidden, weight, labels, is_real=None, **kwargs) -> None:
        """Record one micro-batch in ``normalizer`` (no graph is built). Arguments as :meth:`forward`
        without ``step``/``stats``."""
        if not isinstance(normalizer, StepNormalizer):
            raise TypeError(f"normalizer must be a StepNormalizer, got {type(normalizer).__name__}")
        policy_real, policy_syn, ref_real, ref_syn, real_rows = self._split(
            hidden, weight, labels, is_real, *self._split_kwargs(**kwargs)
        )
        normalizer.observe(policy_real, policy_syn, ref_real, ref_syn, **self._batch_kwargs(labels, real_rows, kwargs, hidden.device))

    @staticmethod
    def _split_kwargs(
        num_real=None, ref_logps=None, ref_hidden=None, ref_weight=None, bias=None, ref_bias=None, cu_seqlens=None
    ):
        return num_real, ref_logps, ref_hidden, ref_weight, bias, ref_bias, cu_seqlens

    def _batch_kwargs(self, labels, real_rows, kwargs, device=None) -> Dict[str, Any]:
        """Per-micro-batch loss keywords: SFT's token counts of the annotated rows."""
        if self.loss_type != "sft":
            return {}
        if device is not None and labels.device != torch.device(device):
            labels = labels.to(device)  # host labels (labels_for_op moved _split's copy, not this one)
        counts = token_counts(labels, shift=self.shift, ignore_index=self.ignore_index, cu_seqlens=kwargs.get("cu_seqlens"))
        return {"num_tokens_real": _select(counts, real_rows)}

    def _split(self, hidden, weight, labels, is_real, num_real, ref_logps, ref_hidden, ref_weight, bias, ref_bias, cu_seqlens):
        weight, bias, ref_weight, ref_bias = full_weights(hidden, weight=weight, bias=bias, ref_weight=ref_weight, ref_bias=ref_bias)
        B = self._check_inputs(hidden, weight, labels, ref_logps, ref_hidden, ref_weight, bias, ref_bias, cu_seqlens)
        # Labels held on the host: counted there and moved (see labels_for_op).
        labels, num_valid = labels_for_op(labels, hidden.device, shift=self.shift, ignore_index=self.ignore_index,
                                          cu_seqlens=cu_seqlens)
        real_rows, syn_rows, n, m = split_rows(B, hidden.device, is_real=is_real, num_real=num_real)
        if n == 0:
            raise ValueError("is_real/num_real select no annotated row: every loss needs at least one")
        if m == 0 and self.loss_type != "sft":
            raise ValueError(f"is_real/num_real select no synthetic row: loss_type={self.loss_type!r} needs at least one")
        if self.paired and n != m:
            raise ValueError(
                f"loss_type={self.loss_type!r} pairs the i-th annotated row with the i-th synthetic row, so it needs "
                f"as many of each; is_real/num_real give {n} annotated and {m} synthetic"
            )

        # One call over the whole batch (one kernel launch), then a split of B scalars; the
        # backward of the split scatters each term's per-sequence gradient back to its rows.
        policy = self._seq_logps(hidden, weight, labels, bias, cu_seqlens, num_valid)
        if ref_logps is not None:
            ref = ref_logps.detach()
        elif ref_hidden is not None:
            with torch.no_grad():
                ref = self._seq_logps(ref_hidden, ref_weight, labels, ref_bias, cu_seqlens, num_valid)
        else:
            ref = None
        policy_real = _select(policy, real_rows)
        policy_syn = _select(policy, syn_rows) if m > 0 else None
        ref_real = None if ref is None else _select(ref, real_rows)
        ref_syn = None if (ref is None or m == 0) else _select(ref, syn_rows)
        return policy_real, policy_syn, ref_real, ref_syn, real_rows

    def forward(
        self,
        hidden: torch.Tensor,
        weight: torch.Tensor,
        labels: torch.Tensor,
        is_real: Optional[Union[Sequence[Any], torch.Tensor]] = None,
        *,
        num_real: Optional[int] = None,
        ref_logps: Optional[torch.Tensor] = None,
        ref_hidden: Optional[torch.Tensor] = None,
        ref_weight: Optional[torch.Tensor] = None,
        bias: Optional[torch.Tensor] = None,
        ref_bias: Optional[torch.Tensor] = None,
        cu_seqlens: Optional[torch.Tensor] = None,
        step: Optional[int] = None,
        stats: Optional[StepStats] = None,
    ) -> Tuple[torch.Tensor, Dict[str, torch.Tensor]]:
        """Loss and metrics of one (micro-)batch.

        Args:
            hidden: [B, T, H] policy final hidden states (or packed [total, H] / [1, total, H]
                with ``cu_seqlens``); fp32/bf16/fp16.
            weight: [V, H] policy lm_head weight (same dtype); bias: optional [V].
            labels: [B, T] int, HF convention; prompt and padding positions = ``ignore_index``.
                On the CPU with hidden on a GPU they are counted on the host and moved, and the
                count goes to the kernels as ``num_valid`` (``labels_for_op``; no sync).
            is_real / num_real: which rows are annotated (exactly one; see the module docstring).
            ref_logps: [B] precomputed reference sequence log-probs, in batch row order; OR
            ref_hidden, ref_weight (, ref_bias): the live reference's [B, T, H'] hidden states
                and [V, H'] lm_head, evaluated under no_grad. SFT needs neither.
            cu_seqlens: int [B + 1] offsets of a packed batch (policy and live reference alike).
            step: the optimizer step, for α schedules (the same for every micro-batch of a step).
            stats: a ``StepStats`` from :meth:`make_step_normalizer` (gradient accumulation).

        Returns:
            (loss, metrics): 0-dim fp32 loss; dict of detached 0-dim tensors.
        """
        policy_real, policy_syn, ref_real, ref_syn, real_rows = self._split(
            hidden, weight, labels, is_real, num_real, ref_logps, ref_hidden, ref_weight, bias, ref_bias, cu_seqlens
        )
        kw = self._hparams(step)
        if self.scope is not None:
            kw.update(scope=self.scope, group=self.group)
        kw.update(self._batch_kwargs(labels, real_rows, {"cu_seqlens": cu_seqlens}, hidden.device))
        loss, metrics = self.loss_fn(
            policy_real, policy_syn, ref_real, ref_syn,
            return_metrics=True, stats=stats, backend=self._loss_backend(), **kw,
        )
        metrics = dict(metrics)
        # Logged per term: mean sequence log-probs, to watch the policy drift from the reference.
        for name, x in (("policy/real_logps", policy_real), ("policy/syn_logps", policy_syn),
                        ("ref/real_logps", ref_real), ("ref/syn_logps", ref_syn)):
            if x is not None:
                metrics[name] = x.detach().float().mean()
        return loss, metrics

    # ------------------------------------------------------------------------------- validation

    def _check_inputs(self, hidden, weight, labels, ref_logps, ref_hidden, ref_weight, bias, ref_bias, cu_seqlens) -> int:
        """Module-level checks; ``sequence_logprobs`` checks dtypes, devices and H/V agreement."""
        for name, x in (("hidden", hidden), ("weight", weight), ("labels", labels)):
            if not isinstance(x, torch.Tensor):
                raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
        if labels.dtype.is_floating_point or labels.dtype.is_complex or labels.dtype == torch.bool:
            raise TypeError(f"labels must be an integer tensor, got {labels.dtype}")
        if cu_seqlens is None:
            if hidden.dim() != 3:
                raise ValueError(f"hidden must be [B, T, H], got shape {tuple(hidden.shape)}")
            B = hidden.shape[0]
        else:
            if not isinstance(cu_seqlens, torch.Tensor) or cu_seqlens.dim() != 1:
                raise ValueError("cu_seqlens must be a 1-D integer tensor [B + 1]")
            B = cu_seqlens.shape[0] - 1
        if B < 1:
            raise ValueError("the batch is empty (B = 0)")

        has_live = ref_hidden is not None or ref_weight is not None
        if ref_logps is not None and has_live:
            raise ValueError("give either ref_logps (precomputed) or ref_hidden + ref_weight (live), not both")
        if has_live and (ref_hidden is None or ref_weight is None):
            raise ValueError("a live reference needs both ref_hidden and ref_weight")
        if ref_bias is not None and not has_live:
            raise ValueError("ref_bias only applies with a live reference (ref_hidden + ref_weight)")
        if self.needs_reference and ref_logps is None and not has_live:
            raise ValueError(
                f"loss_type={self.loss_type!r} needs the reference: pass ref_logps [B] or ref_hidden + ref_weight"
            )
        if ref_logps is not None:
            if not isinstance(ref_logps, torch.Tensor):
                raise TypeError(f"ref_logps must be a torch.Tensor, got {type(ref_logps).__name__}")
            if not ref_logps.dtype.is_floating_point:
                raise TypeError(f"ref_logps must be a floating-point tensor, got {ref_logps.dtype}")
            if tuple(ref_logps.shape) != (B,):
                raise ValueError(f"ref_logps must be [B] = [{B}] (one value per row), got shape {tuple(ref_logps.shape)}")
            if ref_logps.device != hidden.device:
                raise ValueError(f"ref_logps is on {ref_logps.device} but hidden is on {hidden.device}")
        if has_live:
            for name, x in (("ref_hidden", ref_hidden), ("ref_weight", ref_weight)):
                if not isinstance(x, torch.Tensor):
                    raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
            if tuple(ref_hidden.shape[:-1]) != tuple(hidden.shape[:-1]):
                raise ValueError(
                    f"ref_hidden must have hidden's leading shape {tuple(hidden.shape[:-1])}, got {tuple(ref_hidden.shape)}"
                )
            if weight.dim() != 2:
                raise ValueError(f"weight must be [V, H], got shape {tuple(weight.shape)}")
            if ref_weight.dim() != 2 or ref_weight.shape[0] != weight.shape[0]:
                raise ValueError(
                    f"ref_weight must be [V, H'] with the policy's vocabulary V = {weight.shape[0]}, "
                    f"got shape {tuple(ref_weight.shape)}"
                )
        return B

    # ------------------------------------------------------------------------------- checkpointing

    def get_extra_state(self) -> Dict[str, Any]:
        # The schedule's state travels with the module's state_dict, so resuming restores α.
        return {} if self.schedule is None else {"schedule": self.schedule.state_dict()}

    def set_extra_state(self, state: Dict[str, Any]) -> None:
        if self.schedule is not None and "schedule" in state:
            self.schedule.load_state_dict(state["schedule"])
        elif (self.schedule is None) != ("schedule" not in state):
            raise ValueError("the saved SelfPlayLoss and this one disagree on having an α schedule")

    def extra_repr(self) -> str:
        parts = [f"loss_type={self.loss_type!r}"]
        if self.schedule is not None:
            parts.append(f"alpha={self.schedule!r}")
        if self.beta is not None:
            parts.append(f"beta={self.beta}")
        parts.append(f"backend={self.backend.value!r}")
        if self.scope is not None:
            parts.append(f"scope={self.scope!r}")
        if self.length_normalize:
            parts.append("length_normalize=True")
        return ", ".join(parts)
