"""train/scoring.py: the training split is scored in exactly the micro-batches that train on it."""
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from train.data import step_micro_batches  # noqa: E402
from train.scoring import training_layout  # noqa: E402


@pytest.mark.parametrize("n, per_device, accumulation, world", [(32, 8, 1, 1), (37, 4, 2, 1), (50, 3, 2, 2),
                                                                 (23, 5, 1, 3)])
def test_training_layout_is_the_first_epochs_micro_batches(n, per_device, accumulation, world):
    layout = training_layout(n, per_device=per_device, accumulation=accumulation, world=world, seed=5, iteration=2)
    G = per_device * accumulation * world
    steps = n // G
    for rank in range(world):
        expect = []
        for step in range(steps):
            expect += step_micro_batches(n, step, per_device=per_device, accumulation=accumulation, rank=rank,
                                         world=world, seed=5, iteration=2)
        assert layout[rank][: len(expect)] == expect  # the same prompts together, in the same order
    # every prompt exactly once over all ranks (the dropped incomplete batch too)
    every = sorted(i for per_rank in layout for mb in per_rank for i in mb)
    assert every == list(range(n))
