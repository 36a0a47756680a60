"""train/evaluation.py: the multiple-choice answer metric (choice_accuracy)."""
from pathlib import Path

import pytest
import torch
from torch import nn

from train.config import load_config
from train.data import build_examples, load_rows, stop_token_ids
from train.evaluation import choice_candidates, evaluate
from train.modeling import build_initial_model, load_tokenizer

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def setup():
    cfg = load_config(str(ROOT / "train/configs/tiny-cpu.yaml"))
    cfg.model.tokenizer = str(ROOT / cfg.model.tokenizer)
    tok = load_tokenizer(cfg.model)
    stop = stop_token_ids(tok)
    rows = load_rows(str(ROOT / cfg.data.eval), split="test", key="data.eval", limit=24)
    rows.append({"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]})
    ex = build_examples(rows, tok, stop, messages_field="messages", answer_field="answer", max_prompt_length=96,
                        max_length=128, name="eval")
    model = build_initial_model(cfg.model, tok, 0).eval()
    return tok, stop, ex, model


def test_candidates_true_first_same_kind_deterministic(setup):
    tok, stop, ex, _ = setup
    cands = choice_candidates(ex, tok, stop, choices=4)
    assert cands == choice_candidates(ex, tok, stop, choices=4)
    assert cands[-1] is None  # no answer
    checked = 0
    for e, c in zip(ex, cands):
        if c is None:
            continue
        assert c[0] == list(e.response_ids)
        assert len(c) == 4 and len({tuple(x) for x in c}) == 4
        for other in c[1:]:
            assert other[-1] in stop and all(t not in stop for t in other[:-1])
            text = tok.decode(other, skip_special_tokens=True).strip()
            assert text != e.answer and text.lstrip("-").isdigit() == e.answer.lstrip("-").isdigit()
        checked += 1
    assert checked >= 20
    with pytest.raises(ValueError, match="choices"):
        choice_candidates(ex, tok, stop, choices=1)


class TableScores(nn.Module):
    """A stand-in for SequenceLogprobs: score = table[tokens of the row], default `other`."""

    def __init__(self, table, other):
        super().__init__()
        self.p = nn.Parameter(torch.zeros(()))
        self.table, self.other = table, other

    def forward(self, input_ids, attention_mask, labels):
        keys = [tuple(r[m.bool()].tolist()) for r, m in zip(input_ids, attention_mask)]
        return torch.tensor([self.table.get(k, self.other) for k in keys], dtype=torch.float32)


def _eval(seq, setup, **kw):
    tok, stop, ex, model = setup
    return evaluate(seq, model, tok, ex, stop_ids=stop, pad_id=tok.pad_token_id, max_length=128, batch_size=8,
                    max_new_tokens=4, **kw)


def test_choice_accuracy_follows_the_scores(setup):
    tok, stop, ex, _ = setup
    true = {tuple(e.prompt_ids) + tuple(e.response_ids): 0.0 for e in ex}
    oracle = _eval(TableScores(true, -1.0), setup)
    n = sum(c is not None for c in choice_candidates(ex, tok, stop, choices=4))
    assert oracle["choice_accuracy"] == 1.0 and oracle["choice_prompts"] == n and oracle["choices"] == 4
    anti = _eval(TableScores({k: -1.0 for k in true}, 0.0), setup)
    assert anti["choice_accuracy"] == 0.0
    ties = _eval(TableScores({}, 0.0), setup)
    assert ties["choice_accuracy"] == 0.0  # a tie is not a win
    assert "choice_accuracy" not in _eval(TableScores(true, -1.0), setup, accuracy=False)
    assert "choice_accuracy" not in _eval(TableScores(true, -1.0), setup, choices=0)


def test_choice_accuracy_of_a_real_model_is_a_fraction(setup):
    from train.modeling import SequenceLogprobs

    _, _, _, model = setup
    out = _eval(SequenceLogprobs(model), setup, choices=3)
    assert 0.0 <= out["choice_accuracy"] <= 1.0 and out["choices"] == 3
