"""L2-aware launch order: a 1-D grid whose consecutive programs share row blocks and columns.

The logits kernels tile an [R row blocks] x [C columns] grid (columns: vocabulary tiles for the
dZ and atomic kernels, vocabulary splits for the forward). A 2-D grid with the row block fastest
runs, at any moment, the ~132 programs (one per SM) of *all* row blocks on one or two columns:
every program re-reads its own hidden rows, and all N rows of hidden states (67 MB at
N 16384 x H 2048 in bf16, 134 MB at H 4096) pass through a 50 MB L2 for every column, i.e. they
come from HBM again and again.

``grouped_program`` maps the 1-D program id to (row block, column) in groups of GROUP row
blocks: within a group the row block runs fastest, then the column, and a group covers all C
columns before the next group starts. So W consecutive programs (W = one wave, e.g. 132) touch at
most ``rows_touched_bound(W, R, C, GROUP)`` row blocks — GROUP x (ceil((W - 1) / (GROUP C)) + 1),
never more than R — and about W / GROUP columns. The traffic this allows (estimates for an H200,
50 MB L2, bf16, GROUP 8, N 16384):
  * hidden states: the <= 2 GROUP row blocks in flight (2 x 8 x 128 rows x H x 2 B = 8 MB at
    H 2048, 17 MB at H 4096) stay in L2 while their columns are swept, so hidden is read from
    HBM about once: N H 2 B (67 / 134 MB);
  * weight: each column's tile (or split's stream) is shared by the GROUP programs of a group that
    run together, so W is read from HBM about R / GROUP times: 16 x 622 MB = 10 GB at Qwen2.5-3B
    (V 151936, H 2048), 16 x 262 MB = 4.2 GB at Zephyr-7B (V 32000, H 4096) for R = 128 — 2.1 ms
    and 0.9 ms at 4.8 TB/s, against 10.3 ms and 4.3 ms of tensor-core time per product at
    989 TFLOP/s, so the products stay compute-bound. In the forward (columns = vocabulary splits,
    each program walking its split's tiles) the concurrent programs share a split's tiles the same
    way.
The mapping is a bijection from [0, R C) onto [0, R) x [0, C) (tests/test_launch_order.py).
"""
import triton
import triton.language as tl

# Row blocks per group: 8 row blocks of 128 rows keep 2 x 8 x 128 x H x 2 B (<= 17 MB at
# H 4096) of hidden states in L2 next to the weight tiles, and cut the weight's HBM passes to R / 8.
GROUP_ROWS = 8


@triton.jit
def grouped_program(pid, num_row_blocks, num_cols, GROUP: tl.constexpr):
    """(row block, column) of program ``pid`` in [0, num_row_blocks * num_cols); see the module."""
    per_group = GROUP * num_cols
    group = pid // per_group
    first_row = group * GROUP
    # The last group may hold fewer than GROUP row blocks.
    group_rows = tl.minimum(num_row_blocks - first_row, GROUP)
    local = pid - group * per_group
    return first_row + local % group_rows, local // group_rows


def grouped_program_host(pid: int, num_row_blocks: int, num_cols: int, group: int = GROUP_ROWS):
    """The same mapping in Python (for the traffic arithmetic and tests)."""
    per_group = group * num_cols
    g = pid // per_group
    first_row = g * group
    group_rows = min(num_row_blocks - first_row, group)
    local = pid - g * per_group
    return first_row + local % group_rows, local // group_rows


def rows_touched_bound(window: int, num_row_blocks: int, num_cols: int, group: int = GROUP_ROWS) -> int:
    """Most row blocks that ``window`` consecutive programs can touch under ``grouped_program``.

    A window meets at most ceil((window - 1) / (group x num_cols)) + 1 groups of <= group rows.
    """
    groups = -(-(window - 1) // (group * num_cols)) + 1
    return min(num_row_blocks, group * groups, window)
