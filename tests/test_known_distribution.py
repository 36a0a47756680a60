"""The known-distribution miniature (train/experiments/): exact log p_data, and the --quick run's JSON.

The quick run trains through train/selfplay.py (1 seed, 2 iterations, 3 methods) in a subprocess;
it takes well under 2 minutes on 2 idle CPU cores.
"""
import json
import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from train.experiments import known_distribution as kd
from train.experiments.language import Language, LanguageSpec, build_tokenizer, make_rows, parse_response

ROOT = Path(__file__).resolve().parents[1]


def test_mc_check_matches_exact_logp():
    r = kd.mc_check(n_samples=20000, seed=3)
    assert abs(r["total_probability"] - 1.0) < 1e-9
    assert r["support"] == 39
    # 39 frequencies from 20 000 draws: a 5-sigma miss has probability ~ 2e-5.
    assert r["max_z"] < 5.0


def test_mc_check_detects_a_wrong_logp(monkeypatch):
    # Dropping the stop probability h_k(L) is the kind of slip the check exists for.
    orig = Language.component_logps

    def no_stop_term(self, y):
        out = orig(self, y)
        L = len(y)
        if self.spec.min_len <= L < self.spec.max_len:
            out = out - np.log(self.hazards)
        return out

    monkeypatch.setattr(Language, "component_logps", no_stop_term)
    r = kd.mc_check(n_samples=20000, seed=3)
    assert abs(r["total_probability"] - 1.0) > 0.1 or r["max_z"] > 5.0


def test_language_lengths_and_logp_are_finite_on_samples():
    lang = Language()
    rows = make_rows(lang, 200, np.random.default_rng(0), "t")
    lengths = [len(r["y"]) for r in rows]
    assert min(lengths) >= lang.spec.min_len and max(lengths) <= lang.spec.max_len
    assert all(math.isfinite(r["logp_data"]) and r["logp_data"] < 0 for r in rows)
    x = rows[0]["x"]
    assert lang.logp(x, [0] * (lang.spec.min_len - 1)) == -math.inf  # too short
    assert lang.logp(x, [0] * (lang.spec.max_len + 1)) == -math.inf  # too long
    with pytest.raises(ValueError, match="prompt symbols"):
        lang.mixture([99, 0, 0])


def test_committed_tokenizer_is_the_generated_one(tmp_path):
    tok = build_tokenizer(LanguageSpec(), tmp_path / "tok")
    committed = json.loads((ROOT / "train/experiments/tokenizer/tokenizer.json").read_text())
    assert json.loads((tmp_path / "tok/tokenizer.json").read_text()) == committed
    ids = tok("<|assistant|> w3 w31 <|end|>", add_special_tokens=False)["input_ids"]
    words, ok = parse_response(tok.convert_ids_to_tokens(ids[1:-1]))
    assert words == [3, 31] and ok
    assert parse_response(["w1", "q2"]) == ([1], False)


@pytest.mark.timeout(900)
def test_quick_run_json_shape(tmp_path):
    out = tmp_path / "kd"
    proc = subprocess.run([sys.executable, str(ROOT / "train/experiments/known_distribution.py"), "--quick",
                           "--out", str(out)], cwd=ROOT, capture_output=True, text=True, timeout=850)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    res = out / "results"
    for name in ("known_distribution.json", "table.md", "kl_vs_iteration.png", "ess_vs_alpha.png",
                 "kl_vs_data_size.png"):
        assert (res / name).stat().st_size > 0, name
    r = json.loads((res / "known_distribution.json").read_text())
    assert r["quick"] is True and r["config"]["iterations"] == 2
    assert r["mc_check"]["max_z"] < 5.0
    seed = r["seeds"]["0"]
    assert math.isfinite(seed["theta0"]["forward_kl"]) and seed["theta0"]["forward_kl_se"] > 0
    assert set(seed["methods"]) == set(kd.QUICK_METHODS)
    for name, its in seed["methods"].items():
        assert len(its) == 2
        for m in its:
            for key in ("forward_kl", "forward_kl_se", "reverse_invalid_frac", "test_nll_per_token", "val_nll"):
                assert isinstance(m[key], float) and math.isfinite(m[key]), (name, key)
            assert 0.0 <= m["reverse_invalid_frac"] <= 1.0
    iris = seed["methods"]["iris_adaptive"]
    assert all(0 < m["ess_real_frac"] <= 1 and 0 < m["ess_syn_frac"] <= 1 for m in iris)
    assert all(0.5 <= m["alpha"] <= 2.0 for m in iris)
    summary = r["summary"]["methods"]
    assert set(summary) == set(kd.QUICK_METHODS)
    assert all(len(rows) == 3 and rows[0]["n_seeds"] == 1 for rows in summary.values())
    # θ_0 is shared: iteration 0 of every method is the same number.
    assert len({rows[0]["forward_kl"] for rows in summary.values()}) == 1
