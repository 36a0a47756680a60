"""ops/launch_order.py: the grouped 1-D launch order (issue 16, item 3).

The Triton function itself runs through the interpreter (tests/conftest.py) on awkward grids, and
must be a bijection onto the (row block, column) grid; any window of 132 consecutive programs (one
wave on an H200) must touch no more row blocks than the module's traffic arithmetic assumes.
"""
import pytest
import torch
import triton
import triton.language as tl

from iris_kernels.ops.launch_order import GROUP_ROWS, grouped_program, grouped_program_host, rows_touched_bound

WAVE = 132


@triton.jit
def _map_kernel(rows_ptr, cols_ptr, R, C, GROUP: tl.constexpr):
    pid = tl.program_id(0)
    r, c = grouped_program(pid, R, C, GROUP)
    tl.store(rows_ptr + pid, r)
    tl.store(cols_ptr + pid, c)


def _device_map(R, C, group):
    rows = torch.full((R * C,), -1, dtype=torch.int32)
    cols = torch.full((R * C,), -1, dtype=torch.int32)
    _map_kernel[(R * C,)](rows, cols, R, C, GROUP=group)
    return rows.tolist(), cols.tolist()


@pytest.mark.parametrize("R,C,group", [(1, 1, 8), (1, 7, 8), (7, 1, 8), (9, 5, 8), (17, 3, 8), (8, 11, 8),
                                       (13, 13, 4), (3, 2, 1), (23, 6, 8)])
def test_grouped_program_is_a_bijection(R, C, group):
    rows, cols = _device_map(R, C, group)
    pairs = list(zip(rows, cols))
    assert all(0 <= r < R and 0 <= c < C for r, c in pairs)
    assert len(set(pairs)) == R * C
    assert pairs == [grouped_program_host(p, R, C, group) for p in range(R * C)]


@pytest.mark.parametrize("R,C", [(128, 9), (27, 1187), (128, 250), (256, 1187), (256, 250), (37, 3), (129, 10),
                                 (5, 400), (200, 1)])
def test_a_wave_touches_few_row_blocks(R, C):
    """Host mirror (checked equal to the kernel's mapping above) on the real grids: forward at
    N 16384 with 9 splits, dZ chunks of 3456 and 16384 rows, the atomic kernel's 64-row blocks."""
    pairs = [grouped_program_host(p, R, C) for p in range(R * C)]
    bound = rows_touched_bound(WAVE, R, C)
    worst = max(len({r for r, _ in pairs[s:s + WAVE]}) for s in range(0, max(1, R * C - WAVE + 1)))
    assert worst <= bound
    if C * GROUP_ROWS >= WAVE:
        # A wave spans at most two groups: <= 16 row blocks of 128 rows (8 MB of bf16 hidden
        # states at H 2048, 17 MB at H 4096), not all of them as in the row-fastest 2-D grid.
        assert bound <= 2 * GROUP_ROWS
    # Before (2-D grid, row block fastest): a wave covered min(R, 132) row blocks.
    if R >= WAVE and C * GROUP_ROWS >= WAVE:
        assert worst < min(R, WAVE) / 4
