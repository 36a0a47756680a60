"""compaction.compact_order: a stable, sync-free permutation with a device-resident count."""
import pytest
import torch

from iris_kernels.compaction import compact_order


@pytest.mark.parametrize("n, p", [(1, 0.5), (17, 0.0), (17, 1.0), (200, 0.4), (1000, 0.9)])
def test_scored_rows_first_in_order_then_the_rest_in_order(n, p):
    keep = torch.rand(n, generator=torch.Generator().manual_seed(n)) < p
    perm, count = compact_order(keep)
    assert perm.dtype == torch.int64 and count.shape == (1,) and count.dtype == torch.int64
    c = int(count)
    assert c == int(keep.sum())
    assert torch.equal(torch.sort(perm).values, torch.arange(n))  # a permutation
    assert torch.equal(perm[:c], torch.nonzero(keep).flatten())  # stable, kept rows first
    assert torch.equal(perm[c:], torch.nonzero(~keep).flatten())


def test_empty():
    perm, count = compact_order(torch.zeros(0, dtype=torch.bool))
    assert perm.numel() == 0 and int(count) == 0
