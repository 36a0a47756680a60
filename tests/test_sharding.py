"""Sharded lm_head weights at the op's entry points (iris_kernels/sharding.py).

The FSDP2 case is the one a user hits: a module whose lm_head is its own FSDP2 unit (or whose
tied embedding belongs to the body's unit) calls SelfPlayLoss / linear_logprobs /
sequence_logprobs inside its forward with ``self.lm_head.weight``, which is then a DTensor shard.
Two gloo processes must reproduce the loss and every gradient of one process on the doubled batch.
"""
import enum
import os
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

from iris_kernels import SelfPlayLoss, linear_logprobs, sequence_logprobs

V, H, T, WORLD, PER_RANK = 37, 16, 9, 2, 2  # per rank: 2 annotated + 2 synthetic rows


class _Body(nn.Module):
    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(V, H)
        self.lin = nn.Linear(H, H)

    def forward(self, ids):
        return torch.tanh(self.lin(self.emb(ids)))


class _Model(nn.Module):
    """Untied: an lm_head Linear with a bias. Tied: the head IS the embedding matrix (read from
    the body, as GPT-2-style models do), so under FSDP2 it is resharded by the body's forward."""

    def __init__(self, tied: bool, objective: str, backend: str):
        super().__init__()
        self.body = _Body()
        self.lm_head = None if tied else nn.Linear(H, V)
        self.objective, self.backend = objective, backend
        self.saw_dtensor = None

    def forward(self, ids, labels, ref, num_real):
        from torch.distributed.tensor import DTensor

        hidden = self.body(ids)
        head = self.body.emb if self.lm_head is None else self.lm_head
        weight, bias = head.weight, getattr(head, "bias", None)
        self.saw_dtensor = isinstance(weight, DTensor)
        if self.objective == "selfplay":
            crit = SelfPlayLoss("iris", alpha=0.7, beta=0.5, scope="global", backend=self.backend)
            loss, _ = crit(hidden, weight, labels, num_real=num_real, ref_logps=ref, bias=bias)
            return loss
        # A plain data-parallel mean over all rows of the global batch: each rank's share.
        if self.objective == "sequence":
            s = sequence_logprobs(hidden, weight, labels, bias=bias, backend=self.backend)
        else:
            targets = labels.masked_fill(labels % 5 == 0, -100)  # ignored positions too
            s = linear_logprobs(hidden, weight, targets, bias=bias, backend=self.backend, softcap=7.0).sum(-1)
        return -(s.mean() * 0.37)


def _data():
    g = torch.Generator().manual_seed(1)
    n = WORLD * PER_RANK
    ids = torch.randint(0, V, (2 * n, T), generator=g)
    labels = ids.clone()
    labels[:, :3] = -100  # prompt positions
    ref = -torch.rand(2 * n, generator=g) * 20 - 5
    return ids, labels, ref, n


def _rows(rank, n):
    """Rank r holds annotated rows [2r, 2r+2) and their synthetic partners n + [2r, 2r+2)."""
    real = list(range(rank * PER_RANK, (rank + 1) * PER_RANK))
    return real + [n + i for i in real]


def _build(tied, objective, backend):
    torch.manual_seed(0)
    return _Model(tied, objective, backend)


CASES = [(tied, obj, "torch") for tied in (False, True) for obj in ("selfplay", "sequence", "linear")]
CASES += [(False, "selfplay", "triton"), (True, "linear", "triton")]


def _single(tied, objective, backend):
    model = _build(tied, objective, backend)
    ids, labels, ref, n = _data()
    loss = model(ids, labels, ref, n)
    loss.backward()
    return loss.detach(), {k: p.grad.clone() for k, p in model.named_parameters()}


def _worker(rank, port, outdir):
    from torch.distributed.fsdp import fully_shard
    from torch.distributed.tensor import DTensor

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=WORLD)
    try:
        out = {}
        for tied, objective, backend in CASES:
            model = _build(tied, objective, backend)
            # The layouts: the head its own unit, whose forward never runs (untied); the
            # tied weight owned by the body's unit, resharded after the body's forward (tied).
            fully_shard(model.body if tied else model.lm_head)
            fully_shard(model)
            ids, labels, ref, n = _data()
            rows = _rows(rank, n)
            loss = model(ids[rows], labels[rows], ref[rows], PER_RANK)
            loss.backward()
            grads = {}
            for k, p in model.named_parameters():
                assert isinstance(p.grad, DTensor), k
                grads[k] = p.grad.full_tensor()
            out[(tied, objective, backend)] = (loss.detach(), grads, model.saw_dtensor)
        torch.save(out, os.path.join(outdir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.distributed
@pytest.mark.timeout(180)
def test_fsdp2_sharded_head_matches_one_process(tmp_path):
    mp.spawn(_worker, args=(_free_port(), str(tmp_path)), nprocs=WORLD, join=True)
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=False) for r in range(WORLD)]
    for case in CASES:
        ref_loss, ref_grads = _single(*case)
        # The rank losses: global-scope SelfPlayLoss reports the whole batch's loss on each
        # rank; the data-parallel mean is split into one half per rank.
        losses = [r[case][0] for r in ranks]
        if case[1] == "selfplay":
            for loss in losses:
                torch.testing.assert_close(loss, ref_loss, rtol=1e-5, atol=1e-5, msg=str(case))
        else:
            torch.testing.assert_close(sum(losses) / WORLD, ref_loss, rtol=1e-5, atol=1e-5, msg=str(case))
        for r, out in enumerate(ranks):
            assert out[case][2], f"{case}: the weight was not a DTensor shard inside forward"
            assert out[case][1].keys() == ref_grads.keys()
            for k, g in ref_grads.items():
                torch.testing.assert_close(out[case][1][k], g, rtol=1e-5, atol=1e-5, msg=f"{case} rank {r} {k}")


# ---------------------------------------------------------------------------------- ZeRO-3
class _ZeroStatus(enum.Enum):  # DeepSpeed's ZeroParamStatus names
    AVAILABLE = 1
    NOT_AVAILABLE = 2
    INFLIGHT = 3


def _zero3_placeholder(shape, status="NOT_AVAILABLE"):
    """What a ZeRO-3 parameter looks like outside GatheredParameters: empty data, tagged."""
    p = nn.Parameter(torch.empty(0))
    p.ds_id, p.ds_status, p.ds_shape = 7, _ZeroStatus[status], torch.Size(shape)
    return p


def test_zero3_placeholder_gets_a_clear_error():
    hidden = torch.randn(4, 5, H)
    labels = torch.randint(0, V, (4, 5))
    w = _zero3_placeholder((V, H))
    msg = r"weight is a DeepSpeed ZeRO-3 parameter that is not gathered .*full shape \(37, 16\).*GatheredParameters"
    with pytest.raises(ValueError, match=msg):
        linear_logprobs(hidden, w, labels)
    with pytest.raises(ValueError, match=msg):
        sequence_logprobs(hidden, w, labels)
    crit = SelfPlayLoss("iris", alpha=0.7, beta=0.5)
    with pytest.raises(ValueError, match=msg):
        crit(hidden, w, labels, num_real=2, ref_logps=torch.zeros(4))
    with pytest.raises(ValueError, match=r"ref_weight is a DeepSpeed ZeRO-3 parameter"):
        crit(hidden, torch.randn(V, H), labels, num_real=2, ref_hidden=hidden, ref_weight=w)
    with pytest.raises(ValueError, match=r"bias is a DeepSpeed ZeRO-3 parameter"):
        linear_logprobs(hidden, torch.randn(V, H), labels, bias=_zero3_placeholder((V,)))
    # An in-flight gather is not usable either, even if its data already has the full size.
    w_inflight = _zero3_placeholder((V, H), "INFLIGHT")
    w_inflight.data = torch.randn(V, H)
    with pytest.raises(ValueError, match="weight is a DeepSpeed ZeRO-3 parameter"):
        linear_logprobs(hidden, w_inflight, labels)


def test_gathered_zero3_parameter_is_used_as_is():
    hidden = torch.randn(3, 4, H, dtype=torch.float64)
    targets = torch.randint(0, V, (3, 4))
    plain = torch.randn(V, H, dtype=torch.float64)
    w = _zero3_placeholder((V, H), "AVAILABLE")
    w.data = plain.clone()  # inside GatheredParameters: full data, status AVAILABLE
    torch.testing.assert_close(linear_logprobs(hidden, w, targets), linear_logprobs(hidden, plain, targets))


def _dtensor_hidden_worker(rank, port):
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Replicate, distribute_tensor

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=1)
    try:
        mesh = init_device_mesh("cpu", (1,))
        hidden = distribute_tensor(torch.randn(2, 3, H), mesh, [Replicate()])
        with pytest.raises(TypeError, match="hidden is a DTensor .*out of scope"):
            linear_logprobs(hidden, torch.randn(V, H), torch.zeros(2, 3, dtype=torch.long))
        # A DTensor weight on a one-rank mesh is gathered like any other and gives the plain result.
        w = torch.randn(V, H, requires_grad=True)
        wd = distribute_tensor(w.detach(), mesh, [Replicate()]).requires_grad_()
        h = torch.randn(2, 3, H)
        t = torch.randint(0, V, (2, 3))
        linear_logprobs(h, wd, t).sum().backward()
        linear_logprobs(h, w, t).sum().backward()
        torch.testing.assert_close(wd.grad.full_tensor(), w.grad)
    finally:
        dist.destroy_process_group()


def test_dtensor_hidden_is_refused_and_one_rank_dtensor_weight_works():
    mp.spawn(_dtensor_hidden_worker, args=(_free_port(),), nprocs=1, join=True)
