"""iris_kernels.integrations.hf: PairCollator lays out [annotated; synthetic] batches that survive
shuffling; score_pairs fills the rows' reference log-probs; render_pair, from_trl_row; the example
examples/hf_trainer.py runs from the installed package (no `train` import)."""
import math
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from iris_kernels import SelfPlayLoss  # noqa: E402
from iris_kernels.integrations.hf import PairCollator, from_trl_row, render_pair, score_pairs  # noqa: E402
from train.data import Example, pair_batch  # noqa: E402

PAD, V, H = 0, 23, 8


def _features(n=6, seed=0):
    g = torch.Generator().manual_seed(seed)
    feats = []
    for i in range(n):
        lp, lr, ls = (int(x) for x in torch.randint(1, 6, (3,), generator=g))
        feats.append({
            "prompt_ids": torch.randint(1, V, (lp,), generator=g).tolist(),
            "annotated_ids": torch.randint(1, V, (lr,), generator=g).tolist(),
            "synthetic_ids": torch.randint(1, V, (ls,), generator=g),  # a tensor works too
            "ref_annotated_logps": float(torch.randn((), generator=g)) * 3 - 10,
            "ref_synthetic_logps": float(torch.randn((), generator=g)) * 3 - 12,
        })
    return feats


def test_layout_matches_pair_batch():
    feats = _features()
    batch = PairCollator(PAD, max_length=9)(feats)
    exs = [Example(i, str(i), tuple(f["prompt_ids"]), tuple(f["annotated_ids"]), None, "") for i, f in enumerate(feats)]
    want = pair_batch(exs, [f["synthetic_ids"].tolist() for f in feats], PAD, 9)
    for k in ("input_ids", "attention_mask", "labels"):
        assert torch.equal(batch[k], want[k]), k
    assert batch["ref_logps"].dtype == torch.float32 and batch["ref_logps"].shape == (12,)
    assert batch["ref_logps"].tolist() == pytest.approx([f["ref_annotated_logps"] for f in feats] + [f["ref_synthetic_logps"] for f in feats])


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
    return [dict(f, ref_annotated_logps=float(s[i] + noise[i]), ref_synthetic_logps=float(s[n + i] + noise[n + i])) for i, f in enumerate(feats)]


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
    with pytest.raises(ValueError, match=r"features\[1\] lacks \['ref_synthetic_logps'\]"):
        collate([good[0], {k: v for k, v in good[1].items() if k != "ref_synthetic_logps"}])
    with pytest.raises(TypeError, match=r"features\[0\]\['annotated_ids'\]"):
        collate([dict(good[0], annotated_ids="abc")])
    with pytest.raises(TypeError, match=r"features\[0\]\['synthetic_ids'\] must be a 1-D integer tensor"):
        collate([dict(good[0], synthetic_ids=torch.zeros(3))])
    with pytest.raises(ValueError, match=r"features\[0\]\['ref_annotated_logps'\] is NaN"):
        collate([dict(good[0], ref_annotated_logps=float("nan"))])
    with pytest.raises(TypeError, match=r"features\[0\]\['ref_synthetic_logps'\] must be a number"):
        collate([dict(good[0], ref_synthetic_logps="1.0")])
    with pytest.raises(ValueError, match="leaves no room"):
        collate([dict(good[0], prompt_ids=list(range(1, 8)))])
    with pytest.raises(TypeError, match="pad_token_id"):
        PairCollator(None)
    with pytest.raises(ValueError, match="max_length"):
        PairCollator(0, max_length=1)


# ----------------------------------------------------------------------------- score_pairs, render_pair


def _tiny_llama(seed=0):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    return LlamaForCausalLM(LlamaConfig(vocab_size=V, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                        num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=64,
                                        pad_token_id=PAD, tie_word_embeddings=False))


def test_score_pairs_are_the_opponents_logprobs_of_the_collated_rows():
    """Each stored value is log p_θ(response | prompt) of the row as PairCollator builds it (cut to
    max_length), against an fp64 computation from the materialised logits; the first IRIS loss at
    θ = θ_0 is then 0 whatever the order of the rows."""
    model = _tiny_llama()
    model.train()
    rows = [{k: (v.tolist() if isinstance(v, torch.Tensor) else v) for k, v in f.items() if k.endswith("_ids")}
            for f in _features(5, seed=3)]
    rows[0]["extra"] = "kept"
    scored = score_pairs(model, rows, pad_token_id=PAD, max_length=9, batch_size=2, backend="torch")
    assert model.training  # mode restored
    assert scored[0]["extra"] == "kept" and "ref_annotated_logps" not in rows[0]
    for row, out in zip(rows, scored):
        for which in ("annotated", "synthetic"):
            ids = (row["prompt_ids"] + row[f"{which}_ids"])[:9]
            with torch.no_grad():
                model.eval()
                logits = model(torch.tensor([ids])).logits[0].double()
            lp = torch.log_softmax(logits, -1)
            want = sum(float(lp[t - 1, ids[t]]) for t in range(len(row["prompt_ids"]), len(ids)))
            assert out[f"ref_{which}_logps"] == pytest.approx(want, abs=1e-4)
    crit = SelfPlayLoss("iris", alpha=1.5, beta=1.0, backend="torch")
    batch = PairCollator(PAD, max_length=9)(scored[::-1])
    with torch.no_grad():
        hidden = model.get_decoder()(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).last_hidden_state
        loss, _ = crit(hidden, model.get_output_embeddings().weight, batch["labels"], num_real=5,
                       ref_logps=batch["ref_logps"])
    assert abs(float(loss)) < 1e-5
    with pytest.raises(ValueError, match="batch_size"):
        score_pairs(model, rows, pad_token_id=PAD, batch_size=0)
    with pytest.raises(ValueError, match=r"features\[0\] lacks \['synthetic_ids'\]"):
        score_pairs(model, [{"prompt_ids": [1], "annotated_ids": [2]}], pad_token_id=PAD)


def test_render_pair_splits_the_template_and_cuts_after_the_stop_token():
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(ROOT / "train" / "data" / "tiny-tokenizer"))
    prompt = [{"role": "user", "content": "What is 2+3?"}]
    prompt_ids, response_ids = render_pair(tok, prompt, "5")
    full = tok(tok.apply_chat_template(prompt + [{"role": "assistant", "content": "5"}], tokenize=False),
               add_special_tokens=False)["input_ids"]
    assert full[: len(prompt_ids)] == prompt_ids  # the prompt is the template's prefix
    assert tok.decode(response_ids) == "5<|end|>" and response_ids[-1] == tok.eos_token_id
    # A stop id the template does not add is appended, as a sampled response ends with one.
    assert render_pair(tok, prompt, "5", stop_ids=[7])[1][-1] == 7


def test_from_trl_row_maps_chosen_to_annotated():
    trl_row = {"prompt": [], "prompt_ids": [1, 2], "chosen_ids": [3], "rejected_ids": [4, 5],
               "ref_chosen_logps": -1.5, "ref_rejected_logps": -2.5}
    row = from_trl_row(trl_row)
    assert row == {"prompt_ids": [1, 2], "annotated_ids": [3], "synthetic_ids": [4, 5],
                   "ref_annotated_logps": -1.5, "ref_synthetic_logps": -2.5}
    assert PairCollator(PAD)([row])["ref_logps"].tolist() == [-1.5, -2.5]
    with pytest.raises(KeyError, match="ref_rejected_logps"):
        from_trl_row({k: v for k, v in trl_row.items() if k != "ref_rejected_logps"})
    with pytest.raises(ValueError, match="from_trl_row"):  # a TRL row given as is: the error says what to do
        PairCollator(PAD)([trl_row])


@pytest.mark.timeout(300)
def test_example_script_runs_without_the_repository_modules(tmp_path):
    """examples/hf_trainer.py builds its rows and trains 3 steps from the installed package: the
    harness package `train` is made unimportable, and it runs from another folder."""
    import os
    import subprocess

    code = ("import sys, runpy; sys.modules['train'] = None; "
            f"sys.argv = ['hf_trainer.py', '--output_dir', {str(tmp_path / 'out')!r}]; "
            f"runpy.run_path({str(ROOT / 'examples' / 'hf_trainer.py')!r}, run_name='__main__')")
    env = dict(os.environ, HF_HUB_OFFLINE="1", PYTHONPATH=str(ROOT))
    proc = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=env, capture_output=True, text=True,
                          timeout=280)
    assert proc.returncode == 0, proc.stderr[-3000:]
    line = next(l for l in proc.stdout.splitlines() if l.startswith("losses per step:"))
    losses = [float(v) for v in line.split(":")[1].split()]
    assert len(losses) == 3 and losses[0] == pytest.approx(0.0, abs=1e-6)  # θ = θ_0 at the first step
    assert all(math.isfinite(v) for v in losses) and losses[-1] < 0  # IRIS improves on the opponent
