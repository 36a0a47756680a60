"""Public entry points: per-token and per-sequence log-probs straight from hidden states.

All validation happens here, up front; the backends assume validated, flattened inputs.
"""
from __future__ import annotations

import math
from typing import Optional, Union

import torch

from .autograd import TritonLinearLogprobs, interpreting
from .chunked import ChunkedLinearLogprobs
from .reference import reference_linear_logprobs
from .custom_ops import apply_backend
from .sharding import full_weights, guard_zero3_backward
from .tuning import BACKWARDS, FORWARDS, auto_choice
from .types import Backend, LinearLogprobsOutput, LogprobsParams, accumulation_dtype

_FLOAT_DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float64)
_TRITON_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def _check_tensor(name: str, x, *, dims: Optional[int] = None) -> None:
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if dims is not None and x.dim() != dims:
        raise ValueError(f"{name} must be {dims}-D, got shape {tuple(x.shape)}")


def _check_positive_float(name: str, value) -> float:
    if isinstance(value, torch.Tensor) or not isinstance(value, (int, float)) or isinstance(value, bool):
        raise TypeError(f"{name} must be a Python float, got {type(value).__name__}")
    value = float(value)
    # Under torch.compile a float that changes between calls is symbolic: math.isfinite on it is
    # a graph break (an error with fullgraph=True). The fused backends check the value in their
    # custom op's body (custom_ops.py), which runs on concrete values; see linear_logprobs.
    if torch.compiler.is_compiling():
        return value
    if not math.isfinite(value) or value <= 0:
        raise ValueError(f"{name} must be a finite number > 0, got {value}")
    return value


def resolve_backend(backend: Union[str, Backend], device: torch.device) -> Backend:
    try:
        backend = Backend(backend)
    except ValueError:
        valid = ", ".join(repr(b.value) for b in Backend)
        raise ValueError(f"backend must be one of {valid}, got {backend!r}") from None
    if backend is Backend.AUTO:
        return Backend.TRITON if device.type == "cuda" else Backend.TORCH
    return backend


def _validate(hidden, weight, targets, bias, temperature, softcap):
    _check_tensor("hidden", hidden)
    _check_tensor("weight", weight, dims=2)
    _check_tensor("targets", targets)
    if hidden.dim() < 1:
        raise ValueError("hidden must have at least one dimension (the hidden size H)")
    if hidden.dtype not in _FLOAT_DTYPES:
        raise TypeError(f"hidden must be float32, bfloat16, float16 (or float64), got {hidden.dtype}")
    if weight.dtype != hidden.dtype:
        raise TypeError(f"weight dtype {weight.dtype} must match hidden dtype {hidden.dtype}")
    if weight.shape[1] != hidden.shape[-1]:
        raise ValueError(
            f"weight must be [V, H] with H = hidden.shape[-1] = {hidden.shape[-1]}, "
            f"got weight shape {tuple(weight.shape)}"
        )
    if weight.shape[0] == 0:
        raise ValueError("weight must have at least one row (vocabulary size V > 0)")
    if hidden.shape[-1] == 0:
        raise ValueError("hidden must have a hidden size H > 0 (its last dimension is 0)")
    if targets.dtype.is_floating_point or targets.dtype.is_complex or targets.dtype == torch.bool:
        raise TypeError(f"targets must be an integer tensor, got {targets.dtype}")
    if tuple(targets.shape) != tuple(hidden.shape[:-1]):
        raise ValueError(
            f"targets shape {tuple(targets.shape)} must equal hidden's leading shape "
            f"{tuple(hidden.shape[:-1])}"
        )
    for name, t in (("weight", weight), ("targets", targets)):
        if t.device != hidden.device:
            raise ValueError(f"{name} is on {t.device} but hidden is on {hidden.device}")
    if bias is not None:
        _check_tensor("bias", bias, dims=1)
        if bias.shape[0] != weight.shape[0]:
            raise ValueError(f"bias must be [V] = [{weight.shape[0]}], got {tuple(bias.shape)}")
        if bias.dtype != hidden.dtype:
            raise TypeError(f"bias dtype {bias.dtype} must match hidden dtype {hidden.dtype}")
        if bias.device != hidden.device:
            raise ValueError(f"bias is on {bias.device} but hidden is on {hidden.device}")
    temperature = _check_positive_float("temperature", temperature)
    if softcap is not None:
        softcap = _check_positive_float("softcap", softcap)
    return temperature, softcap


def check_targets_in_range(targets: torch.Tensor, vocab_size: int, ignore_index: int) -> None:
    """Raise ValueError if a non-ignored target is outside [0, V). Synchronises with the device."""
    bad = (targets != ignore_index) & ((targets < 0) | (targets >= vocab_size))
    if bool(bad.any()):
        first = targets[bad][0].item()
        raise ValueError(
            f"targets contains {int(bad.sum())} value(s) outside [0, {vocab_size}) that are not "
            f"ignore_index={ignore_index} (first: {first})"
        )


def _check_cuda_options(bwd, compact, workspace_bytes, num_valid, fwd="auto"):
    """Type/range checks of the backend="triton" keywords (issues 8, 17), before any work."""
    if bwd != "auto" and bwd not in BACKWARDS:
        raise ValueError(f"bwd must be 'auto', 'workspace' or 'atomic', got {bwd!r}")
    if fwd != "auto" and fwd not in FORWARDS:
        raise ValueError(f"fwd must be 'auto', 'fused' or 'split', got {fwd!r}")
    if compact != "auto" and not isinstance(compact, bool):
        raise TypeError(f"compact must be True, False or 'auto', got {compact!r}")
    if workspace_bytes is not None and (
        isinstance(workspace_bytes, bool) or not isinstance(workspace_bytes, int) or workspace_bytes < 1
    ):
        raise ValueError(f"workspace_bytes must be a positive int (bytes), got {workspace_bytes!r}")
    if num_valid is not None and (isinstance(num_valid, bool) or not isinstance(num_valid, int) or num_valid < 0):
        raise ValueError(f"num_valid must be a non-negative int, got {num_valid!r}")


def _tuned_variant(hidden, weight, bias, fwd, bwd, temperature, softcap, return_entropy):
    """(fwd, bwd) with "auto" replaced by the first-use autotuner's choice (CUDA only; see
    iris_kernels.autotune). Off the GPU, with tuning off, or while torch.compile traces (measuring
    is host work that must not enter a graph), both stay "auto" (then tuning.AUTO decides)."""
    if hidden.device.type != "cuda" or torch.compiler.is_compiling():
        return fwd, bwd
    from .autotune import tuned_choice  # imported lazily: it reads the environment once per call

    choice = tuned_choice(hidden, weight, bias, temperature=temperature, softcap=softcap,
                          with_entropy=return_entropy)
    if choice is None:
        return fwd, bwd
    return (choice["fwd"] if fwd == "auto" else fwd), (choice["bwd"] if bwd == "auto" else bwd)


def linear_logprobs(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    *,
    bias: Optional[torch.Tensor] = None,
    temperature: float = 1.0,
    softcap: Optional[float] = None,
    ignore_index: int = -100,
    return_lse: bool = False,
    return_entropy: bool = False,
    backend: Union[str, Backend] = "auto",
    chunk_size: Optional[int] = None,
    validate: bool = False,
    bwd: str = "auto",
    compact: Union[bool, str] = "auto",
    workspace_bytes: Optional[int] = None,
    num_valid: Optional[int] = None,
    fwd: str = "auto",
):
    """log p(targets | hidden) under the output projection ``weight``, without the [N, V] logits.

    z = softcap(hidden @ weight.T + bias) / temperature, log p(y) = z[y] - logsumexp(z), with
    softcap(r) = softcap * tanh(r / softcap) when ``softcap`` is given (Gemma-style).

    Args:
        hidden: [..., H] float32, bfloat16 or float16 (float64 on the torch/reference backends);
            any strides.
        weight: [V, H], same dtype and device (the lm_head weight, tied or not). An FSDP2
            ``DTensor`` shard is gathered here (differentiably; see ``iris_kernels.sharding``);
            an ungathered DeepSpeed ZeRO-3 placeholder raises ValueError. Vocabulary-parallel
            (tensor-parallel) heads are out of scope: the whole vocabulary is computed per rank.
        targets: integer tensor with hidden's leading shape.
        bias: optional [V].
        temperature: > 0; divides the (soft-capped) logits.
        softcap: optional > 0 logit soft-cap. Under ``torch.compile`` both are checked by the
            fused op's body at run time, not while tracing (a float that changes between calls
            is symbolic there; no graph break); a new value of either recompiles (they are
            scalar arguments of the custom op). ``backend="reference"`` is not checked there.
        ignore_index: positions with this target give exactly 0.0 and no gradient.
        return_lse / return_entropy: also return the log-sum-exp / the entropy per position
            (both differentiable); the result is then a ``LinearLogprobsOutput``.
        backend: "auto" (Triton on CUDA, torch elsewhere), "triton", "torch" or "reference".
        chunk_size: tokens per chunk for the torch backend (default: from V; ~16 MiB of fp32
            logits on CPU, ``workspace_bytes`` of them on CUDA: 1664 tokens at V = 151936).
        validate: also check that targets lie in [0, V) (synchronises with the device; off by
            default). Without it an out-of-range target never reads out of bounds and yields NaN.
            With ``num_valid`` it also checks that count against the targets.
        bwd: backend="triton" backward: "workspace" (a recompute kernel writes the logits'
            gradient into a [C, V] workspace in the input dtype, then cuBLAS products, fp32
            weight-gradient accumulation), "atomic" (one fused kernel adding fp32 partial
            products with atomics), or "auto" (iris_kernels.tuning.AUTO; "workspace" until a
            GPU measurement says otherwise).
        compact: backend="triton": skip ignored positions in forward and backward by a
            device-side stable compaction (no host synchronisation). "auto" compacts unless
            ``return_lse`` is set; True with ``return_lse`` is a ValueError (the lse of an
            ignored position is not computed). Ignored by the other backends.
        workspace_bytes: byte budget of the workspace (default 1 GiB); C = budget / (V x itemsize)
            rows, a multiple of 128, at least 128. Also sizes the torch backend's CUDA chunks.
        num_valid: optional host count of non-ignored positions (targets != ignore_index). With
            compaction, only that many rows are gathered and launched (without it, the kernels
            read a device-resident count and the cuBLAS products run over all N rows). It must be
            exact: rows beyond it are treated as ignored; ``validate=True`` checks it.
        fwd: backend="triton" forward: "fused" (one Triton kernel, the logits never leave
            registers), "split" (per chunk of rows, a cuBLAS product writes fp32 logits, at most
            ``workspace_bytes`` of them, and a Triton row kernel folds them into lse, target
            logit and entropy: the robust variant where Triton's product is slow), or "auto"
            (the first-use autotuner's choice on CUDA, iris_kernels.autotune; else
            iris_kernels.tuning.AUTO). Same outputs and gradients either way.

    Returns:
        fp32 log-probs with targets' shape (fp64 for fp64 inputs; or a ``LinearLogprobsOutput``). Differentiable
        w.r.t. hidden, weight and bias for any upstream gradient.

    Numerics (every backend): logits from bf16/fp16 inputs are accumulated and kept in fp32; log p
    and the entropy are computed from logits shifted per row, so a common logit offset costs no
    accuracy. NaN in a row's inputs gives NaN; so does a +inf logit (an inf in the hidden state,
    weight or bias without a soft-cap): log p = z - lse is inf - inf there (NaN for log p, lse
    and the entropy on every backend). With a soft-cap such logits are finite (+-cap). Inside
    ``torch.autocast`` the results are the same as outside (the op fixes its own dtypes). Second derivatives (create_graph=True, then differentiating again): exact on
    ``backend="reference"``; "torch" and "triton" raise a RuntimeError at the second
    differentiation (their first backward is unaffected).
    """
    weight, bias = full_weights(hidden, weight=weight, bias=bias)  # FSDP2 DTensor / ZeRO-3: sharding.py
    zero3_weights = {"weight": weight, "bias": bias}
    temperature, softcap = _validate(hidden, weight, targets, bias, temperature, softcap)
    if isinstance(ignore_index, bool) or not isinstance(ignore_index, int):
        raise TypeError(f"ignore_index must be an int, got {type(ignore_index).__name__}")
    if chunk_size is not None and (isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1):
        raise ValueError(f"chunk_size must be a positive int, got {chunk_size!r}")
    _check_cuda_options(bwd, compact, workspace_bytes, num_valid, fwd)
    which = resolve_backend(backend, hidden.device)
    if compact is True and return_lse and which is Backend.TRITON:
        raise ValueError("compact=True cannot be combined with return_lse=True (ignored positions get no lse)")
    if num_valid is not None and num_valid > targets.numel():
        raise ValueError(f"num_valid = {num_valid} exceeds the number of positions {targets.numel()}")
    if which is Backend.TRITON and (fwd == "auto" or bwd == "auto"):
        fwd, bwd = _tuned_variant(hidden, weight, bias, fwd, bwd, temperature, softcap, return_entropy)
    if fwd == "auto":
        fwd = auto_choice(hidden.device, "fwd")
    if bwd == "auto":
        bwd = auto_choice(hidden.device, "bwd")
    if compact == "auto":
        compact = bool(auto_choice(hidden.device, "compact")) and not return_lse
    if workspace_bytes is None:
        workspace_bytes = auto_choice(hidden.device, "workspace_bytes")
    if which is Backend.TRITON:
        if hidden.dtype not in _TRITON_DTYPES:
            raise TypeError(f"backend='triton' supports float32, bfloat16 and float16, got {hidden.dtype}")
        if hidden.device.type != "cuda" and not interpreting():
            raise ValueError(
                "backend='triton' needs CUDA tensors (or TRITON_INTERPRET=1 for the CPU interpreter); "
                f"hidden is on {hidden.device}"
            )
    V, H = weight.shape
    if validate:
        check_targets_in_range(targets, V, ignore_index)
        if num_valid is not None:
            actual = int((targets != ignore_index).sum())
            if actual != num_valid:
                raise ValueError(f"num_valid = {num_valid} but targets hold {actual} non-ignored positions")

    params = LogprobsParams(
        ignore_index=ignore_index,
        temperature=temperature,
        softcap=softcap,
        return_entropy=return_entropy,
        chunk_size=chunk_size,
        bwd=bwd,
        compact=compact and which is Backend.TRITON,
        workspace_bytes=workspace_bytes,
        num_valid=num_valid,
        fwd=fwd,
    )
    lead_shape = targets.shape
    flat_hidden = hidden.reshape(-1, H)
    # int64 so that ignore_index compares exactly: for uint8 or int32 targets, -100 or 2**32 + 5
    # would wrap onto a real token id. N x 8 bytes, negligible next to the hidden states.
    flat_targets = targets.reshape(-1).long()
    if flat_hidden.shape[0] == 0:
        # Nothing to compute; keep the graph connected to every input so backward still works.
        empty = flat_hidden.sum(-1).to(accumulation_dtype(hidden.dtype)) * 0.0
        for t in (weight, bias):
            if t is not None:
                empty = empty + t.sum().to(empty.dtype) * 0.0
        logp, lse, entropy = empty, empty.detach(), empty if return_entropy else None
    elif which is Backend.REFERENCE:
        if not return_lse:
            # An ignored row's outputs are constants (log p = 0, entropy = 0) unless its lse is
            # asked for: keep its hidden state out of the product, so that a NaN there (a fully
            # masked padding row) cannot reach the gradients through 0 * NaN, as in the fused
            # backends, which skip rows without an upstream gradient.
            scored = (flat_targets != ignore_index)[:, None]
            flat_hidden = torch.where(scored, flat_hidden, torch.zeros((), dtype=flat_hidden.dtype, device=flat_hidden.device))
        logp, lse, entropy = reference_linear_logprobs(flat_hidden, weight, flat_targets, bias, params)
    else:
        if which is Backend.TRITON:
            # The kernels index rows with one stride and assume a unit last-dim stride.
            flat_hidden = flat_hidden if flat_hidden.stride(-1) == 1 else flat_hidden.contiguous()
            weight = weight if weight.stride(-1) == 1 else weight.contiguous()
            if bias is not None and bias.stride(0) != 1:
                bias = bias.contiguous()  # the kernels read the bias with unit stride
            flat_targets = flat_targets.contiguous()
        logp, lse, entropy = apply_backend(which.value, flat_hidden, weight, flat_targets, bias, params)  # custom op under torch.compile
        if not return_entropy:
            entropy = None

    logp = logp.reshape(lead_shape)
    logp, lse, entropy = guard_zero3_backward(zero3_weights, logp, lse, entropy)  # sharding.py
    if not (return_lse or return_entropy):
        return logp
    return LinearLogprobsOutput(
        logprobs=logp,
        lse=lse.reshape(lead_shape) if return_lse else None,
        entropy=entropy.reshape(lead_shape) if return_entropy else None,
    )


def shift_labels(labels: torch.Tensor, ignore_index: int, cu_seqlens: Optional[torch.Tensor] = None):
    """Hugging Face convention: position t predicts label t + 1; the last position predicts nothing.

    Shifting the labels (not the hidden states) avoids copying hidden [B, T-1, H]. For a packed
    batch the shift stays inside each sequence: each sequence's last position is ignored.
    """
    if cu_seqlens is None:
        shifted = torch.full_like(labels, ignore_index)
        shifted[..., :-1] = labels[..., 1:]
        return shifted
    total = labels.shape[0]
    # One spare slot at the end absorbs the "last position" of empty sequences (and of offsets
    # past the end), so no host-side check of cu_seqlens is needed.
    shifted = torch.full((total + 1,), ignore_index, dtype=labels.dtype, device=labels.device)
    shifted[: total - 1] = labels[1:]
    starts, ends = cu_seqlens[:-1].long(), cu_seqlens[1:].long()
    last = torch.where(ends > starts, ends - 1, torch.full_like(ends, total)).clamp(0, total)
    shifted[last] = ignore_index
    return shifted[:total]


def host_scored_count(targets: torch.Tensor, ignore_index: int) -> Optional[int]:
    """The number of scored positions (targets != ignore_index) when ``targets`` lives on the CPU,
    else None: counting device labels would read the device back (a sync), so device callers keep
    the kernels' device-resident count. Meant for callers that hold the labels on the host while
    the op runs on a GPU (the TRL head before it moves its labels): given as ``num_valid``, the
    count shrinks the compacted launches to the scored rows, the two cuBLAS products of the
    workspace backward included."""
    if targets.device.type != "cpu" or torch.compiler.is_compiling():
        # Under torch.compile the count would be a data-dependent scalar (a graph break).
        return None
    return int((targets != ignore_index).sum())


def packed_sums(values: torch.Tensor, cu_seqlens: torch.Tensor) -> torch.Tensor:
    """Per-sequence sums [B] of a packed [total] tensor; device ops only, no host sync.

    Positions past cu_seqlens[-1] (padding at the end of a pack) land in a spare slot and are
    dropped.
    """
    num_seqs = cu_seqlens.shape[0] - 1
    positions = torch.arange(values.shape[0], device=values.device)
    seq_id = torch.searchsorted(cu_seqlens[1:].to(positions.dtype), positions, right=True)
    return values.new_zeros(num_seqs + 1).index_add(0, seq_id.clamp(max=num_seqs), values)[:num_seqs]


def check_cu_seqlens(cu_seqlens: torch.Tensor, total: int) -> None:
    """Offsets must start at 0, never decrease and not pass the packed length (synchronises)."""
    if int(cu_seqlens[0]) != 0:
        raise ValueError(f"cu_seqlens must start at 0, got {int(cu_seqlens[0])}")
    if bool((cu_seqlens[1:] < cu_seqlens[:-1]).any()):
        raise ValueError(f"cu_seqlens must be non-decreasing, got {cu_seqlens.tolist()}")
    if int(cu_seqlens[-1]) > total:
        raise ValueError(f"cu_seqlens[-1] = {int(cu_seqlens[-1])} exceeds the packed length {total}")


def sequence_logprobs(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    *,
    shift: bool = True,
    ignore_index: int = -100,
    bias: Optional[torch.Tensor] = None,
    temperature: float = 1.0,
    softcap: Optional[float] = None,
    length_normalize: bool = False,
    cu_seqlens: Optional[torch.Tensor] = None,
    backend: Union[str, Backend] = "auto",
    validate: bool = False,
    bwd: str = "auto",
    compact: Union[bool, str] = "auto",
    workspace_bytes: Optional[int] = None,
    num_valid: Optional[int] = None,
    fwd: str = "auto",
) -> torch.Tensor:
    """Per-sequence summed log-probs s(x, y) = sum_k log p(y_k | ...) over non-ignored labels.

    Args:
        hidden: [B, T, H] (final-norm output of the model body), or, with ``cu_seqlens``, a packed
            [total, H] or [1, total, H].
        labels: [B, T] (or packed [total] / [1, total]); prompt and padding positions hold
            ``ignore_index``.
        shift: position t predicts label t + 1 (Hugging Face causal-LM convention).
        length_normalize: divide each sum by its number of scored tokens (mean log-prob).
        cu_seqlens: int [B + 1] cumulative sequence lengths of a packed (padding-free) batch.
            Bad offsets never index out of bounds (positions past cu_seqlens[-1] are dropped).
        validate: also check that cu_seqlens starts at 0, never decreases and stays within the
            packed length, and that labels lie in [0, V) (synchronises; off by default).
        num_valid: the caller's host count of scored positions after the shift (non-ignored
            targets), as in ``linear_logprobs``. Never counted here (labels and hidden share a
            device, so a count would read the device back); a caller that still holds the labels
            on the host gets it without a sync as
            ``host_scored_count(shift_labels(labels_cpu, ignore_index), ignore_index)``.
        Other arguments as in ``linear_logprobs``.

    Returns:
        fp32 [B]. A sequence with no scored token gives 0.0.
    """
    _check_tensor("hidden", hidden)
    _check_tensor("labels", labels)
    _check_cuda_options(bwd, compact, workspace_bytes, num_valid, fwd)
    if labels.dtype.is_floating_point or labels.dtype.is_complex or labels.dtype == torch.bool:
        raise TypeError(f"labels must be an integer tensor, got {labels.dtype}")
    if labels.device != hidden.device:
        raise ValueError(f"labels is on {labels.device} but hidden is on {hidden.device}")
    if cu_seqlens is None:
        if hidden.dim() != 3:
            raise ValueError(f"hidden must be [B, T, H], got shape {tuple(hidden.shape)}")
        if tuple(labels.shape) != tuple(hidden.shape[:2]):
            raise ValueError(f"labels shape {tuple(labels.shape)} must be [B, T] = {tuple(hidden.shape[:2])}")
    else:
        _check_tensor("cu_seqlens", cu_seqlens, dims=1)
        if cu_seqlens.dtype not in (torch.int32, torch.int64):
            raise TypeError(f"cu_seqlens must be int32 or int64, got {cu_seqlens.dtype}")
        if cu_seqlens.numel() < 2:
            raise ValueError("cu_seqlens must hold at least two offsets ([B + 1] with B >= 1)")
        if hidden.dim() == 3:
            if hidden.shape[0] != 1:
                raise ValueError(f"a packed hidden must be [total, H] or [1, total, H], got {tuple(hidden.shape)}")
            hidden = hidden[0]
        if labels.dim() == 2:
            if labels.shape[0] != 1:
                raise ValueError(f"packed labels must be [total] or [1, total], got {tuple(labels.shape)}")
            labels = labels[0]
        if hidden.dim() != 2 or labels.dim() != 1 or labels.shape[0] != hidden.shape[0]:
            raise ValueError(
                f"packed hidden [total, H] and labels [total] must agree, got {tuple(hidden.shape)} "
                f"and {tuple(labels.shape)}"
            )
        if cu_seqlens.device != hidden.device:
            raise ValueError(f"cu_seqlens is on {cu_seqlens.device} but hidden is on {hidden.device}")
        if validate:
            check_cu_seqlens(cu_seqlens, labels.shape[0])
    labels = labels.long()  # exact comparison with ignore_index whatever the labels' dtype
    targets = shift_labels(labels, ignore_index, cu_seqlens) if shift else labels
    token_logp = linear_logprobs(
        hidden, weight, targets, bias=bias, temperature=temperature, softcap=softcap,
        ignore_index=ignore_index, backend=backend, validate=validate,
        bwd=bwd, compact=compact, workspace_bytes=workspace_bytes, num_valid=num_valid, fwd=fwd,
    )
    # Summed in fp64 (N values: free next to the per-token work) and rounded once: an fp32 sum of
    # 300 log-probs drifts by ~6e-4, most of the 1e-3 budget of a log-ratio s_theta - s_ref.
    acc = torch.float32 if token_logp.device.type == "mps" else torch.float64  # MPS has no fp64
    token_acc = token_logp.to(acc)
    scored = (targets != ignore_index).to(acc)
    if cu_seqlens is None:
        sums, counts = token_acc.sum(-1), scored.sum(-1)
    else:
        sums, counts = packed_sums(token_acc, cu_seqlens), packed_sums(scored, cu_seqlens)
    if length_normalize:
        sums = sums / counts.clamp(min=1.0)
    return sums.to(token_logp.dtype)
