"""tuning.py: the auto table, the workspace height and the torch backend's per-device chunk size."""
import pytest
import torch

from iris_kernels.chunked import chunk_size_for
from iris_kernels.tuning import AUTO, auto_choice, padded_vocab, torch_chunk_size, workspace_rows
from iris_kernels.types import LogprobsParams


def test_cuda_chunk_of_the_torch_backend_is_large_at_qwen_vocab():
    # Computed, no GPU needed: a torch.device("cuda") object is enough.
    c = chunk_size_for(151936, LogprobsParams(), torch.device("cuda"))
    assert c >= 1024 and c % 128 == 0
    assert c * 151936 * 4 <= LogprobsParams().workspace_bytes
    assert torch_chunk_size(32000, torch.device("cuda")) >= 8192


def test_cpu_chunk_unchanged():
    assert chunk_size_for(151936, LogprobsParams(), torch.device("cpu")) == max(16, (1 << 22) // 151936)
    assert chunk_size_for(32000, LogprobsParams()) == (1 << 22) // 32000
    assert chunk_size_for(32000, LogprobsParams(chunk_size=7), torch.device("cuda")) == 7


@pytest.mark.parametrize("v, itemsize, budget, n", [(151936, 2, 1 << 30, 16384), (32000, 2, 1 << 30, 16384),
                                                    (163, 4, 1, 70), (151936, 2, 1 << 30, 100)])
def test_workspace_rows(v, itemsize, budget, n):
    c = workspace_rows(v, itemsize, budget, n, multiple=128)
    assert c % 128 == 0 and c >= 128
    assert c <= -(-n // 128) * 128  # never more rows than there are (rounded up to the tile)
    if c > 128:
        assert c * padded_vocab(v) * itemsize <= budget


def test_auto_table_defaults_to_the_workspace_backward_and_says_why():
    assert auto_choice(torch.device("cuda"), "bwd") == "workspace"
    assert auto_choice(torch.device("cuda"), "workspace_bytes") == 1 << 30
    for entry in AUTO.values():
        assert entry["bwd"] in ("workspace", "atomic") and entry["source"]
