"""One small adapter per implementation that bench_loss.py compares, all on the same inputs.

Every provider answers the same two questions:

* ``logprobs`` (workload "logprobs"): fp32 log p(target) per token for hidden [N, H],
  weight [V, H], targets [N], exactly 0 at ignored positions, differentiable for any upstream
  gradient. Peers that return a cross-entropy give log p = -loss.
* ``selfplay`` (workload "selfplay"): the IRIS loss of a self-play batch. For a peer this is the
  best a user can do with it: the peer's per-token output, summed per sequence, fed to this
  library's ``iris_loss`` ("IRIS composed"). The library's own providers use its fused
  sequence-level path instead. ``liger-dpo`` is the exception: Liger has no IRIS loss, so it runs
  its chunked DPO loss on the same batch (annotated = chosen, synthetic = rejected) as a
  SPIN-shaped reference point, checked against its own fp64 objective.

A provider that cannot run here says why in one line (``skip_reason``); the benchmark prints
that reason in the table and stores it in the JSON, never silently dropping a row.
"""
from __future__ import annotations

import importlib
import importlib.util
from dataclasses import dataclass
from typing import Callable, Dict, List, Optional

import torch
import torch.nn.functional as F

import iris_kernels

IGNORE_INDEX = -100

# Which fp64 objective a provider's "selfplay" output is checked against (bench_loss computes them).
OBJECTIVE_LOGPROBS = "logprobs"
OBJECTIVE_IRIS = "iris"
OBJECTIVE_SPIN = "spin"


@dataclass
class Case:
    """One benchmark input set. Every provider sees exactly these tensors (fresh .grad each call).

    hidden [B, T, H] and weight [V, H] are leaves that require grad. ``labels`` follow the
    Hugging Face convention (position t predicts labels[t + 1]); ``targets`` are the same labels
    already shifted, which is what per-token peers take. The first half of the batch is annotated
    ("real"), the second half synthetic; prompt and padding positions hold IGNORE_INDEX.
    """

    hidden: torch.Tensor
    weight: torch.Tensor
    labels: torch.Tensor
    targets: torch.Tensor
    grad_logprobs: torch.Tensor  # [B, T] fp32: the random upstream gradient of workload "logprobs"
    ref_logps: torch.Tensor  # [B] fp32: frozen opponent's sequence log-probs s_theta_t
    is_real: torch.Tensor  # [B] bool
    alpha: float
    beta: float
    spin_beta: float

    @property
    def B(self) -> int:
        return self.hidden.shape[0]

    @property
    def T(self) -> int:
        return self.hidden.shape[1]

    @property
    def n_real(self) -> int:
        """Annotated sequences come first: is_real is True exactly for the first B // 2."""
        return self.hidden.shape[0] // 2

    @property
    def N(self) -> int:
        return self.hidden.shape[0] * self.hidden.shape[1]

    @property
    def H(self) -> int:
        return self.hidden.shape[2]

    @property
    def V(self) -> int:
        return self.weight.shape[0]

    def flat(self):
        return self.hidden.view(self.N, self.H), self.targets.reshape(self.N)


def _installed(module: str) -> bool:
    try:
        return importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):
        return False


def library_iris_objective() -> Optional[Callable]:
    """The library's IRIS loss on sequence log-probs, or None while iris_kernels.losses is absent.

    Returned as f(policy_logps [B], case) -> scalar, so the composed and fused rows share it and
    differ only in how the per-sequence log-probs are produced.
    """
    try:
        losses = importlib.import_module("iris_kernels.losses")
    except ImportError:
        return None
    iris_loss = getattr(losses, "iris_loss", None)
    if iris_loss is None:
        return None

    def objective(policy_logps: torch.Tensor, case: Case) -> torch.Tensor:
        # The batch is [annotated half; synthetic half]: slicing, not boolean indexing, which
        # would synchronise with the device.
        n = case.n_real
        ref = case.ref_logps
        return iris_loss(
            policy_logps[:n], policy_logps[n:], ref[:n], ref[n:], alpha=case.alpha, beta=case.beta
        )

    return objective


class Provider:
    """Base adapter. Subclasses override ``logprobs`` (and ``selfplay`` when they fuse it)."""

    name: str = ""
    family: str = "peer"  # "peer" | "library" | "floor"
    workloads = ("logprobs", "selfplay")
    uses_triton = False  # needs CUDA, or TRITON_INTERPRET=1 at a tiny size on CPU
    objective = {"logprobs": OBJECTIVE_LOGPROBS, "selfplay": OBJECTIVE_IRIS}
    # Peers whose forward also does the backward work (gradients computed in forward, as Liger's
    # FLCE does) are flagged so that the fwd/bwd split is read correctly.
    grads_in_forward = False
    # Untimed calls this provider needs before its memory call whatever --warmup says
    # (torch.compile compiles on the first call).
    min_warmup = 0

    # liger-dpo optimises another objective: it is shown, but never "the best peer" of an IRIS row.
    comparable = True
    # Vocabulary-sized products this provider does (None: the floor's four). Keeping the [N, V]
    # logits saves the recompute (three), a frozen head needs no weight gradient (two): such rows
    # may legitimately run below the four-product floor, so the report does not flag them for it.
    products: Optional[int] = None
    # A frozen head (lm_head.weight.requires_grad = False): no weight gradient is due, and one
    # produced anyway is an error.
    frozen_head = False

    def skip_reason(
        self, device: torch.device, dtype: torch.dtype, workload: str, interpreter: bool = False
    ) -> Optional[str]:
        """One line saying why this provider cannot run here, or None.

        ``interpreter``: the case is the tiny CPU shape run under TRITON_INTERPRET=1 (set in the
        provider's own process by the benchmark), where only Triton providers run.
        """
        if workload not in self.workloads:
            return f"{self.name} does not implement workload {workload!r}"
        if self.uses_triton and device.type != "cuda" and not interpreter:
            return "Triton kernels need a CUDA device; on CPU they run only under TRITON_INTERPRET=1 at the interpreter shape"
        if workload == "selfplay" and self.objective["selfplay"] == OBJECTIVE_IRIS:
            if library_iris_objective() is None:
                return "iris_kernels.losses.iris_loss is not importable (the IRIS rows need it)"
        return None

    def setup(self, case: Case) -> None:
        """One-time preparation outside the timed region (imports, modules, compile wrappers).

        Subclasses that override it call super().setup(case) so the IRIS objective is resolved
        here, not (with its imports) inside the first measured call.
        """
        self._objective = library_iris_objective()

    def logprobs(self, hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def selfplay(self, case: Case) -> torch.Tensor:
        """IRIS composed: peer per-token log-probs -> per-sequence sums -> the library's iris_loss."""
        hidden, targets = case.flat()
        logp = self.logprobs(hidden, case.weight, targets).view(case.B, case.T)
        scored = case.targets != IGNORE_INDEX
        # torch.where, not a multiply: a NaN at an ignored position must not leak, a NaN at a
        # scored one must.
        seq = torch.where(scored, logp, torch.zeros_like(logp)).sum(-1)
        return self._objective(seq, case)

    # The runner calls these two; the floor overrides them because it is not an autograd op.
    def forward(self, case: Case, workload: str):
        if workload == "logprobs":
            hidden, targets = case.flat()
            return self.logprobs(hidden, case.weight, targets)
        return self.selfplay(case)

    def backward(self, out: torch.Tensor, case: Case, workload: str) -> None:
        if workload == "logprobs":
            out.backward(case.grad_logprobs.reshape(-1))
        else:
            out.backward()


# --------------------------------------------------------------------------------------------
# Peers
# --------------------------------------------------------------------------------------------


def naive_logprobs(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """What TRL's old DPOTrainer and the SPIN code do: full logits, fp32 upcast, log_softmax, gather."""
    logits = hidden @ weight.t()
    logp_all = logits.float().log_softmax(-1)
    scored = targets != IGNORE_INDEX
    safe = torch.where(scored, targets, torch.zeros_like(targets))
    logp = logp_all.gather(-1, safe.unsqueeze(-1)).squeeze(-1)
    return logp * scored


class Naive(Provider):
    name = "naive"
    products = 3  # the logits are kept: no recompute

    def logprobs(self, hidden, weight, targets):
        return naive_logprobs(hidden, weight, targets)


class NaiveCompile(Provider):
    name = "naive-compile"
    products = 3  # the logits are kept: no recompute
    min_warmup = 1

    def setup(self, case):
        super().setup(case)
        # dynamic=False: one static graph per shape, the fastest thing torch.compile offers here;
        # the compile itself happens in the untimed warm-up.
        self._fn = torch.compile(naive_logprobs, dynamic=False)

    def logprobs(self, hidden, weight, targets):
        return self._fn(hidden, weight, targets)


class TorchLinearCrossEntropy(Provider):
    name = "torch-linear_cross_entropy"

    def skip_reason(self, device, dtype, workload, interpreter=False):
        if not hasattr(F, "linear_cross_entropy") or not hasattr(torch.nn, "LinearCrossEntropyOptions"):
            return f"needs torch >= 2.13 for F.linear_cross_entropy (installed {torch.__version__})"
        return super().skip_reason(device, dtype, workload, interpreter)

    def setup(self, case):
        super().setup(case)
        # The chunked path with torch's own per-(device, dtype) defaults ("auto"): what a user who
        # asks for the memory-saving option gets without tuning.
        self._options = torch.nn.LinearCrossEntropyOptions()

    def logprobs(self, hidden, weight, targets):
        loss = F.linear_cross_entropy(
            hidden, weight, targets, reduction="none", ignore_index=IGNORE_INDEX, options=self._options
        )
        return -loss.float()


class LigerFLCE(Provider):
    name = "liger-flce"
    uses_triton = True
    grads_in_forward = True

    def skip_reason(self, device, dtype, workload, interpreter=False):
        if not _installed("liger_kernel"):
            return "liger-kernel is not installed"
        return super().skip_reason(device, dtype, workload, interpreter)

    def setup(self, case):
        super().setup(case)
        from liger_kernel.transformers import LigerFusedLinearCrossEntropyLoss

        self._loss = LigerFusedLinearCrossEntropyLoss(reduction="none", ignore_index=IGNORE_INDEX)

    def logprobs(self, hidden, weight, targets):
        return -self._loss(weight, hidden, targets).float()


class CutCrossEntropy(Provider):
    name = "cce"
    uses_triton = True

    def skip_reason(self, device, dtype, workload, interpreter=False):
        if not _installed("cut_cross_entropy"):
            return "cut-cross-entropy is not installed (CUDA only)"
        if device.type != "cuda":
            return "cut-cross-entropy runs only on CUDA"
        return super().skip_reason(device, dtype, workload, interpreter)

    def setup(self, case):
        super().setup(case)
        from cut_cross_entropy import linear_cross_entropy

        self._lce = linear_cross_entropy

    def logprobs(self, hidden, weight, targets):
        # Defaults kept (including its bf16 gradient filtering): the configuration users run.
        return -self._lce(hidden, weight, targets, ignore_index=IGNORE_INDEX, reduction="none").float()


class LigerDPO(Provider):
    """Liger's chunked DPO loss on the self-play batch: annotated = chosen, synthetic = rejected.

    Liger takes a reference *model* (ref_input, ref_weight) rather than precomputed reference
    log-probs, so it runs with use_ref_model=False (reference log-probs = 0). That omits a
    reference forward per chunk: its time here is a lower bound on its real cost.
    """

    name = "liger-dpo"
    workloads = ("selfplay",)
    comparable = False
    objective = {"selfplay": OBJECTIVE_SPIN}

    def skip_reason(self, device, dtype, workload, interpreter=False):
        if not _installed("liger_kernel"):
            return "liger-kernel is not installed"
        return super().skip_reason(device, dtype, workload, interpreter)

    def setup(self, case):
        super().setup(case)
        from liger_kernel.chunked_loss import LigerFusedLinearDPOLoss

        if case.B % 2:
            raise ValueError("liger-dpo needs pairs: an even number of sequences")
        self._loss = LigerFusedLinearDPOLoss(
            ignore_index=IGNORE_INDEX,
            beta=case.spin_beta,
            compute_nll_loss=False,
            # torch.compile of each chunk step is Liger's default and its fast path on CUDA; on
            # CPU the compile of its grad_and_value closure dominates a short benchmark.
            compiled=case.hidden.device.type == "cuda",
            use_ref_model=False,
            average_log_prob=False,  # SPIN sums log-probs over the response
            chunk_size=1,
        )

    def selfplay(self, case):
        # Liger shifts nothing: it takes targets aligned with hidden, i.e. the shifted labels.
        out = self._loss(case.weight, case.hidden, case.targets)
        return out[0] if isinstance(out, tuple) else out


class TrlChunked(Provider):
    """TRL's ``ChunkedLogProbFunction``: what ``trl.add_fused_lm_head`` (and so TRL's DPOTrainer)
    runs for every policy forward. Called the way TRL's fused head calls it: on Triton devices
    only the scored rows are projected (boolean compaction, as TRL does), elsewhere every row is
    projected with the ignored targets clamped to 0 and the result zeroed there. Vocabulary tile
    width: TRL's own default for the fused head.
    """

    name = "trl-chunked"

    def skip_reason(self, device, dtype, workload, interpreter=False):
        if not _installed("trl"):
            return 'trl is not installed (pip install "iris-kernels[trl]")'
        try:
            importlib.import_module("trl.kernels.chunked_logprob")
        except Exception as err:  # a broken install must show as a skip line, not a crash
            return f"trl.kernels.chunked_logprob is not importable: {type(err).__name__}: {err}"
        return super().skip_reason(device, dtype, workload, interpreter)

    def setup(self, case):
        super().setup(case)
        from trl.kernels.chunked_logprob import ChunkedLogProbFunction

        self._fn = ChunkedLogProbFunction
        try:
            from trl.trainer.utils import _CHUNKED_LOGPROB_CHUNK_SIZE as chunk
        except ImportError:  # private constant; 32768 is its value in trl 1.16
            chunk = 32768
        self._chunk = int(chunk)
        self._compact = case.hidden.device.type in ("cuda", "xpu")

    def logprobs(self, hidden, weight, targets):
        mask = targets != IGNORE_INDEX
        if self._compact:
            out = self._fn.apply(hidden[mask], weight, None, targets[mask], 1.0, self._chunk, None, 1.0, ("log_probs",))[0]
            return out.float().new_zeros(mask.shape).masked_scatter(mask, out.float())
        out = self._fn.apply(hidden, weight, None, targets.clamp(min=0), 1.0, self._chunk, None, 1.0, ("log_probs",))[0]
        # masked_fill keeps a NaN at a scored position and drops whatever the clamped rows gave.
        return out.float().masked_fill(~mask, 0.0)


# --------------------------------------------------------------------------------------------
# This library
# --------------------------------------------------------------------------------------------


class IrisBackend(Provider):
    family = "library"
    backend = "torch"

    def logprobs(self, hidden, weight, targets):
        return iris_kernels.linear_logprobs(hidden, weight, targets, ignore_index=IGNORE_INDEX, backend=self.backend)

    def selfplay(self, case):
        """IRIS fused: sequence_logprobs straight from hidden states and HF labels, then iris_loss."""
        seq = iris_kernels.sequence_logprobs(
            case.hidden, case.weight, case.labels, shift=True, ignore_index=IGNORE_INDEX, backend=self.backend
        )
        return self._objective(seq, case)


class IrisTorch(IrisBackend):
    name = "iris-torch"
    backend = "torch"


class IrisTriton(IrisBackend):
    """backend="triton" with its defaults (tuning.AUTO): what a user gets without options."""

    name = "iris-triton"
    backend = "triton"
    uses_triton = True


class IrisTritonVariant(IrisTriton):
    """backend="triton" with the forward, the backward variant and compaction pinned (issues 8, 17);
    the forward is the fused one unless the name says "split" (no autotuning in these rows).

    ``host_count``: pass the number of scored positions, counted on the host in setup() (outside
    the timed region, as a training harness knows it from the labels it built), so that only the
    scored rows are launched; without it compaction reads a device-resident count and the cuBLAS
    products of the workspace backward still span all N rows.
    """

    def __init__(self, name: str, bwd: str, compact: bool, host_count: bool = False, fwd: str = "fused"):
        self.name, self.bwd, self.compact, self.host_count, self.fwd = name, bwd, compact, host_count, fwd

    def setup(self, case):
        super().setup(case)
        self._num_valid = int((case.targets != IGNORE_INDEX).sum()) if self.host_count else None

    def _kw(self):
        return dict(bwd=self.bwd, compact=self.compact, num_valid=self._num_valid, fwd=self.fwd)

    def logprobs(self, hidden, weight, targets):
        return iris_kernels.linear_logprobs(
            hidden, weight, targets, ignore_index=IGNORE_INDEX, backend="triton", **self._kw()
        )

    def selfplay(self, case):
        seq = iris_kernels.sequence_logprobs(
            case.hidden, case.weight, case.labels, shift=True, ignore_index=IGNORE_INDEX, backend="triton",
            **self._kw(),
        )
        return self._objective(seq, case)


class LigerCuteScaledCE(Provider):
    """Liger's fused linear scaled cross-entropy on its CuTe-DSL SM90 kernel (tensor-core GEMMs with
    the softmax in the epilogue): the published ~698 TFLOP/s anchor (H100, H 4096, V 131072),
    measured here rather than quoted. Only where that kernel itself runs: sm_90 with Liger's
    CuTe-DSL module importable (it needs nvidia-cutlass-dsl); elsewhere Liger falls back to a torch
    path, which is not what this row is for, so the row is skipped with the reason."""

    name = "liger-cute-sce"

    def skip_reason(self, device, dtype, workload, interpreter=False):
        if not _installed("liger_kernel"):
            return "liger-kernel is not installed"
        if device.type != "cuda":
            return "Liger's CuTe-DSL scaled CE runs only on CUDA sm_90"
        cap = torch.cuda.get_device_capability(device)
        if tuple(cap) != (9, 0):
            return f"Liger's CuTe-DSL scaled CE runs only on sm_90 (this device is sm_{cap[0]}{cap[1]})"
        try:
            importlib.import_module("liger_kernel.ops.cutedsl.ops.fused_scaled_cross_entropy_sm90")
        except Exception as err:  # noqa: BLE001 - any import failure is a skip line
            return f"Liger's CuTe-DSL kernel is not importable (needs nvidia-cutlass-dsl): {type(err).__name__}: {err}"[:300]
        return super().skip_reason(device, dtype, workload, interpreter)

    def setup(self, case):
        super().setup(case)
        from liger_kernel.ops.fused_linear_scaled_cross_entropy import LigerFusedLinearScaledCrossEntropyFunction

        self._fn = LigerFusedLinearScaledCrossEntropyFunction

    def logprobs(self, hidden, weight, targets):
        out = self._fn.apply(hidden, weight, targets, 1.0, IGNORE_INDEX)
        nll = out[0] if isinstance(out, tuple) else out
        return -nll.float()


class IrisTritonFrozen(IrisTritonVariant):
    """The triton path with a frozen head: the weight is used detached, so no dWeight, and
    linear_logprobs picks the frozen-head path (iris_kernels/frozen_head.py: dHidden computed in
    the forward's chunks, the backward only scales it; two vocabulary products in all, which is
    also its floor). ``fwd`` is not used by that path (it is split-forward based)."""

    frozen_head = True
    products = 2

    def __init__(self):
        super().__init__("iris-triton-frozen", "workspace", True, fwd="fused")

    def logprobs(self, hidden, weight, targets):
        return super().logprobs(hidden, weight.detach(), targets)

    def selfplay(self, case):
        seq = iris_kernels.sequence_logprobs(
            case.hidden, case.weight.detach(), case.labels, shift=True, ignore_index=IGNORE_INDEX, backend="triton",
            **self._kw(),
        )
        return self._objective(seq, case)


class IrisTritonComposed(IrisTriton):
    """IRIS composed on the library's own per-token output (linear_logprobs -> per-sequence sums ->
    iris_loss), against "iris-triton"'s fused sequence_logprobs + iris_loss: what fusing buys."""

    name = "iris-triton-composed"
    workloads = ("selfplay",)

    def selfplay(self, case):
        return Provider.selfplay(self, case)


class CutCrossEntropyExact(CutCrossEntropy):
    """CCE with impl="cce_exact": no gradient filtering, its exact (and slower) configuration."""

    name = "cce-exact"

    def logprobs(self, hidden, weight, targets):
        return -self._lce(
            hidden, weight, targets, ignore_index=IGNORE_INDEX, reduction="none", impl="cce_exact"
        ).float()


# --------------------------------------------------------------------------------------------
# The floor: docs/math.md#floor, four [N x H] . [H x V] products
# --------------------------------------------------------------------------------------------


class Floor(Provider):
    """Four torch.mm of the op's size, no softmax, no loss: the least work any exact method does.

    forward = logits = h W^T; backward = recompute h W^T, dh = G W, dW = G^T h (G a logits-shaped
    matrix). An implementation that stores the logits needs three; one that does not needs four.
    Runs on every device (cuBLAS on CUDA, oneDNN/MKL on CPU), so each table has its own floor.
    """

    name = "floor"
    family = "floor"

    def skip_reason(self, device, dtype, workload, interpreter=False):
        return None

    def forward(self, case, workload):
        hidden, _ = case.flat()
        with torch.no_grad():
            return torch.mm(hidden, case.weight.t())

    def backward(self, out, case, workload):
        hidden, _ = case.flat()
        with torch.no_grad():
            g = torch.mm(hidden, case.weight.t())
            torch.mm(g, case.weight)
            torch.mm(g.t(), hidden)
        del out


PROVIDERS: Dict[str, Provider] = {
    p.name: p
    for p in (
        Naive(),
        NaiveCompile(),
        TorchLinearCrossEntropy(),
        LigerFLCE(),
        LigerDPO(),
        CutCrossEntropy(),
        CutCrossEntropyExact(),
        TrlChunked(),
        IrisTorch(),
        IrisTriton(),
        IrisTritonVariant("iris-triton-ws-hostcount", "workspace", True, host_count=True),
        IrisTritonVariant("iris-triton-ws-nocompact", "workspace", False),
        IrisTritonVariant("iris-triton-atomic", "atomic", True),
        IrisTritonVariant("iris-triton-atomic-nocompact", "atomic", False),
        IrisTritonVariant("iris-triton-split", "workspace", True, fwd="split"),
        IrisTritonVariant("iris-triton-split-atomic", "atomic", True, fwd="split"),
        IrisTritonFrozen(),
        IrisTritonComposed(),
        LigerCuteScaledCE(),
        Floor(),
    )
}

PEER_NAMES: List[str] = [n for n, p in PROVIDERS.items() if p.family == "peer"]
LIBRARY_NAMES: List[str] = [n for n, p in PROVIDERS.items() if p.family == "library"]


def get(name: str) -> Provider:
    if name not in PROVIDERS:
        raise ValueError(f"unknown provider {name!r}; choose from {', '.join(PROVIDERS)}")
    return PROVIDERS[name]
