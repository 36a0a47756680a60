"""train/collate.py: PairCollator lays out [annotated; synthetic] batches that survive shuffling."""
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from iris_kernels import SelfPlayLoss  # noqa: E402
from train.collate import PairCollator, pair_features  # noqa: E402
from train.data import Example, pair_batch  # noqa: E402

PAD, V, H = 0, 23, 8


def _features(n=6, seed=0):
    g = torch.Generator().manual_seed(seed)
    feats = []
    for i in range(n):
        lp, lr, ls = (int(x) for x in torch.randint(1, 6, (3,), generator=g))
        feats.append({
            "prompt_ids": torch.randint(1, V, (lp,), generator=g).tolist(),
            "real_ids": torch.randint(1, V, (lr,), generator=g).tolist(),
            "syn_ids": torch.randint(1, V, (ls,), generator=g),  # a tensor works too
            "ref_real": float(torch.randn((), generator=g)) * 3 - 10,
            "ref_syn": float(torch.randn((), generator=g)) * 3 - 12,
        })
    return feats


def test_layout_matches_pair_batch():
    feats = _features()
    batch = PairCollator(PAD, max_length=9)(feats)
    exs = [Example(i, str(i), tuple(f["prompt_ids"]), tuple(f["real_ids"]), None, "") for i, f in enumerate(feats)]
    want = pair_batch(exs, [f["syn_ids"].tolist() for f in feats], PAD, 9)
    for k in ("input_ids", "attention_mask", "labels"):
        assert torch.equal(batch[k], want[k]), k
    assert batch["ref_logps"].dtype == torch.float32 and batch["ref_logps"].shape == (12,)
    assert batch["ref_logps"].tolist() == pytest.approx([f["ref_real"] for f in feats] + [f["ref_syn"] for f in feats])


def _model():
    g = torch.Generator().manual_seed(1)
    return torch.randn(V, H, generator=g, dtype=torch.float64), torch.randn(V, H, generator=g, dtype=torch.float64)


def _with_opponent_refs(feats):
    """ref_real / ref_syn = the stand-in model's own summed log-probs of each row plus ~0.3 nat, as
    an opponent close to the policy would give: g is small, so only a misplaced row moves it far."""
    import iris_kernels as ik

    emb, weight = _model()
    batch = PairCollator(PAD)(feats)
    s = ik.sequence_logprobs(emb[batch["input_ids"]], weight, batch["labels"], backend="torch")
    noise = torch.randn(s.shape[0], generator=torch.Generator().manual_seed(2), dtype=torch.float64) * 0.3
    n = len(feats)
    return [dict(f, ref_real=float(s[i] + noise[i]), ref_syn=float(s[n + i] + noise[n + i])) for i, f in enumerate(feats)]


def _loss(batch, loss_type):
    """SelfPlayLoss on hidden states that depend only on each row's own tokens (a stand-in model)."""
    emb, weight = _model()
    hidden = emb[batch["input_ids"]]
    kw = {"alpha": 2.0, "beta": 1.0} if loss_type == "iris" else {"beta": 0.1}
    crit = SelfPlayLoss(loss_type, backend="torch", **kw)
    loss, _ = crit(hidden, weight, batch["labels"], num_real=batch["input_ids"].shape[0] // 2,
                   ref_logps=batch["ref_logps"].double())
    return float(loss)


@pytest.mark.parametrize("loss_type", ["iris", "spin"])
def test_shuffled_pairs_give_the_same_loss(loss_type):
    """A Trainer shuffles items; with one item per prompt the loss is the same in any order. A
    row-level shuffle (what a dataset of single rows would give) is not, so this test can fail."""
    feats = _with_opponent_refs(_features())
    collate = PairCollator(PAD)
    base = _loss(collate(feats), loss_type)
    perm = [3, 0, 5, 1, 4, 2]
    assert _loss(collate([feats[i] for i in perm]), loss_type) == pytest.approx(base, rel=1e-12, abs=1e-12)
    # Rows shuffled individually: annotated and synthetic rows mixed, references detached from rows.
    batch = collate(feats)
    rows = torch.tensor([0, 7, 2, 9, 4, 11, 6, 1, 8, 3, 10, 5])
    mixed = {k: v[rows] for k, v in batch.items()}
    mixed["ref_logps"] = batch["ref_logps"]
    assert abs(_loss(mixed, loss_type) - base) > 1e-3


def test_bad_items_are_named():
    collate = PairCollator(PAD, max_length=6)
    good = _features(2)
    with pytest.raises(ValueError, match="empty"):
        collate([])
    with pytest.raises(ValueError, match=r"features\[1\] lacks \['ref_syn'\]"):
        collate([good[0], {k: v for k, v in good[1].items() if k != "ref_syn"}])
    with pytest.raises(TypeError, match=r"features\[0\]\['real_ids'\]"):
        collate([dict(good[0], real_ids="abc")])
    with pytest.raises(TypeError, match=r"features\[0\]\['syn_ids'\] must be a 1-D integer tensor"):
        collate([dict(good[0], syn_ids=torch.zeros(3))])
    with pytest.raises(ValueError, match=r"features\[0\]\['ref_real'\] is NaN"):
        collate([dict(good[0], ref_real=float("nan"))])
    with pytest.raises(TypeError, match=r"features\[0\]\['ref_syn'\] must be a number"):
        collate([dict(good[0], ref_syn="1.0")])
    with pytest.raises(ValueError, match="leaves no room"):
        collate([dict(good[0], prompt_ids=list(range(1, 8)))])
    with pytest.raises(TypeError, match="pad_token_id"):
        PairCollator(None)
    with pytest.raises(ValueError, match="max_length"):
        PairCollator(0, max_length=1)


def test_pair_features_refuses_rows_of_another_prompt():
    exs = [Example(i, str(i), (1, 2), (3,), None, "") for i in range(2)]
    syn = [{"prompt_id": 0, "response_ids": [4]}, {"prompt_id": 1, "response_ids": [5]}]
    ref = [{"prompt_id": 0, "ref_real": -1.0, "ref_syn": -2.0}, {"prompt_id": 1, "ref_real": -3.0, "ref_syn": -4.0}]
    feats = pair_features(exs, syn, ref)
    assert feats[1] == {"prompt_ids": [1, 2], "real_ids": [3], "syn_ids": [5], "ref_real": -3.0, "ref_syn": -4.0}
    with pytest.raises(ValueError, match="another prompt"):
        pair_features(exs, syn[::-1], ref)
    with pytest.raises(ValueError, match="one of each per prompt"):
        pair_features(exs, syn[:1], ref)
