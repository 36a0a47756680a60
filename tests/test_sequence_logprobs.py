"""sequence_logprobs (HF shift convention, padding, packing, length normalisation) and the Triton
forward's vocabulary-split merge."""
import pytest
import torch

from iris_kernels import linear_logprobs, sequence_logprobs
from iris_kernels.ops.logprobs_fwd import logprobs_fwd


def manual_sequence_sums(hidden, weight, labels, ignore_index=-100):
    """Loop over sequences and tokens in fp64: position t scores label t + 1."""
    B, T, _ = hidden.shape
    out = torch.zeros(B, dtype=torch.float64)
    logp = torch.log_softmax(hidden.double() @ weight.double().t(), -1)
    for b in range(B):
        for t in range(T - 1):
            y = labels[b, t + 1].item()
            if y != ignore_index:
                out[b] += logp[b, t, y]
    return out


def batch(B=3, T=11, H=16, V=37, seed=0):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(B, T, H, generator=g)
    weight = torch.randn(V, H, generator=g) * 0.5
    labels = torch.randint(0, V, (B, T), generator=g)
    labels[:, :3] = -100  # prompt
    labels[1, 8:] = -100  # padding
    return hidden, weight, labels


@pytest.mark.parametrize("backend", ["reference", "torch", "triton"])
def test_sums_follow_the_shift_convention(backend):
    hidden, weight, labels = batch()
    got = sequence_logprobs(hidden, weight, labels, backend=backend)
    torch.testing.assert_close(got.double(), manual_sequence_sums(hidden, weight, labels), atol=1e-5, rtol=1e-5)
    assert got.shape == (3,) and got.dtype == torch.float32


def test_no_shift_scores_labels_in_place():
    hidden, weight, labels = batch(seed=1)
    got = sequence_logprobs(hidden, weight, labels, shift=False)
    want = linear_logprobs(hidden, weight, labels).sum(-1)
    torch.testing.assert_close(got, want)


def test_length_normalisation_divides_by_scored_tokens():
    hidden, weight, labels = batch(seed=2)
    sums = sequence_logprobs(hidden, weight, labels)
    means = sequence_logprobs(hidden, weight, labels, length_normalize=True)
    counts = (labels[:, 1:] != -100).sum(-1).float()
    torch.testing.assert_close(means, sums / counts)


def test_sequence_with_no_scored_token_gives_zero():
    hidden, weight, labels = batch(seed=3)
    labels[2] = -100
    out = sequence_logprobs(hidden, weight, labels, length_normalize=True)
    assert out[2] == 0.0 and torch.isfinite(out).all()


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_packed_batch_equals_padded_batch(backend):
    g = torch.Generator().manual_seed(4)
    H, V = 12, 29
    lengths = [5, 9, 1, 7]
    weight = torch.randn(V, H, generator=g, requires_grad=True)
    seqs_h = [torch.randn(n, H, generator=g) for n in lengths]
    seqs_y = [torch.randint(0, V, (n,), generator=g) for n in lengths]
    seqs_y[1][:3] = -100
    # Padded [B, T] layout.
    T = max(lengths)
    padded_h = torch.zeros(len(lengths), T, H)
    padded_y = torch.full((len(lengths), T), -100)
    for i, (hh, yy) in enumerate(zip(seqs_h, seqs_y)):
        padded_h[i, : len(hh)] = hh
        padded_y[i, : len(yy)] = yy
    padded_h.requires_grad_()
    want = sequence_logprobs(padded_h, weight, padded_y, backend=backend)
    # Packed [1, total, H] layout with two padding positions at the end of the pack.
    packed_h = torch.cat(seqs_h + [torch.randn(2, H, generator=g)])[None].requires_grad_()
    packed_y = torch.cat(seqs_y + [torch.randint(0, V, (2,), generator=g)])[None]
    cu = torch.tensor([0] + list(torch.tensor(lengths).cumsum(0)), dtype=torch.int32)
    got = sequence_logprobs(packed_h, weight, packed_y, cu_seqlens=cu, backend=backend)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    # Gradients agree too, and the trailing padding gets none.
    c = torch.randn(len(lengths), generator=g)
    gw_packed = torch.autograd.grad((got * c).sum(), (packed_h, weight))
    gw_padded = torch.autograd.grad((want * c).sum(), (padded_h, weight))
    torch.testing.assert_close(gw_packed[1], gw_padded[1], atol=1e-5, rtol=1e-5)
    assert torch.all(gw_packed[0][0, -2:] == 0)


def test_bad_arguments():
    hidden, weight, labels = batch()
    with pytest.raises(ValueError, match="hidden"):
        sequence_logprobs(hidden[0], weight, labels)
    with pytest.raises(ValueError, match="labels"):
        sequence_logprobs(hidden, weight, labels[:, :-1])
    with pytest.raises(TypeError, match="cu_seqlens"):
        sequence_logprobs(hidden[0], weight, labels[0], cu_seqlens=torch.tensor([0.0, 11.0]))
    with pytest.raises(ValueError, match="packed"):
        sequence_logprobs(hidden, weight, labels, cu_seqlens=torch.tensor([0, 11]))


@pytest.mark.parametrize("num_splits", [1, 2, 3, 64])
@pytest.mark.parametrize("with_entropy", [False, True])
def test_triton_vocabulary_splits_merge_exactly(num_splits, with_entropy):
    g = torch.Generator().manual_seed(5)
    N, H, V = 19, 20, 300  # 3 tiles of 128 columns: splits of one, two and three tiles
    hidden, weight = torch.randn(N, H, generator=g), torch.randn(V, H, generator=g)
    targets = torch.randint(0, V, (N,), generator=g)
    lse, target_z, entropy = logprobs_fwd(
        hidden, weight, targets, None, inv_temperature=1.0, softcap=None, with_entropy=with_entropy,
        upcast=True, tiles=(32, 128, 64, 4), num_splits=num_splits,
    )
    z = hidden.double() @ weight.double().t()
    torch.testing.assert_close(lse.double(), torch.logsumexp(z, -1), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(target_z.double(), z.gather(1, targets[:, None]).squeeze(1), atol=1e-5, rtol=1e-5)
    if with_entropy:
        # The forward returns the entropy H itself (offset-safe), not E_p[z].
        want = -(torch.softmax(z, -1) * torch.log_softmax(z, -1)).sum(-1)
        torch.testing.assert_close(entropy.double(), want, atol=1e-5, rtol=1e-5)
    else:
        assert entropy is None


def test_host_count_equals_the_device_count_path():
    """Issue 16, item 5: the host count of scored positions after the shift (what a caller holding
    CPU labels passes as num_valid) gives the same values and gradients as the device count, and
    None for labels already on a device."""
    from iris_kernels.logprobs import host_scored_count, shift_labels

    g = torch.Generator().manual_seed(3)
    B, T, H_, V_ = 3, 11, 24, 163
    hidden = torch.randn(B, T, H_, generator=g)
    weight = torch.randn(V_, H_, generator=g) / H_ ** 0.5
    labels = torch.randint(0, V_, (B, T), generator=g)
    labels[:, :4] = -100
    labels[2, 8:] = -100
    count = host_scored_count(shift_labels(labels, -100), -100)
    assert count == int((labels[:, 1:] != -100).sum())
    assert host_scored_count(labels.to("meta"), -100) is None
    res = []
    for num_valid in (count, None):
        h = hidden.clone().requires_grad_()
        s = sequence_logprobs(h, weight, labels, backend="triton", compact=True, num_valid=num_valid, validate=True)
        s.sum().backward()
        res.append((s, h.grad))
    torch.testing.assert_close(res[0][0], res[1][0], rtol=1e-6, atol=1e-5)
    torch.testing.assert_close(res[0][1], res[1][1], rtol=1e-5, atol=1e-6)
