"""train/collate.py: the harness's rows as iris_kernels.integrations.hf rows; the re-export keeps working."""
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from iris_kernels.integrations import hf  # noqa: E402
from train.collate import PairCollator, pair_features  # noqa: E402
from train.data import Example  # noqa: E402


def test_reexport_is_the_library_collator():
    assert PairCollator is hf.PairCollator


def test_pair_features_refuses_rows_of_another_prompt():
    exs = [Example(i, str(i), (1, 2), (3,), None, "") for i in range(2)]
    syn = [{"prompt_id": 0, "response_ids": [4]}, {"prompt_id": 1, "response_ids": [5]}]
    ref = [{"prompt_id": 0, "ref_real": -1.0, "ref_syn": -2.0}, {"prompt_id": 1, "ref_real": -3.0, "ref_syn": -4.0}]
    feats = pair_features(exs, syn, ref)
    assert feats[1] == {"prompt_ids": [1, 2], "annotated_ids": [3], "synthetic_ids": [5], "ref_annotated_logps": -3.0, "ref_synthetic_logps": -4.0}
    with pytest.raises(ValueError, match="another prompt"):
        pair_features(exs, syn[::-1], ref)
    with pytest.raises(ValueError, match="one of each per prompt"):
        pair_features(exs, syn[:1], ref)
