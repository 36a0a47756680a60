"""The paper-regime miniature (train/experiments/paper_regime.py): its statistics and the --quick run.

The quick run trains through train/selfplay.py (1 seed, 2 iterations, IRIS-v2 and SFT-continued on
R and F) in a subprocess; about a minute on 2 idle CPU cores.
"""
import json
import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from train.experiments import paper_regime as pr
from train.experiments import paper_regime_report as report

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("t, df, p", [(2.262157, 9, 0.05), (12.7062, 1, 0.05), (3.24984, 9, 0.01), (0.0, 5, 1.0),
                                      (1.959964, 10**6, 0.05)])
def test_student_t_two_sided_p(t, df, p):
    assert report.t_two_sided_p(t, df) == pytest.approx(p, rel=1e-4, abs=1e-9)
    assert report.t_two_sided_p(-t, df) == pytest.approx(p, rel=1e-4, abs=1e-9)


def test_holm_adjustment():
    # Holm: sorted p·(k − rank), made monotone; None passes through.
    assert report.holm([0.01, 0.04, None, 0.03]) == pytest.approx([0.03, 0.06, None, 0.06])
    assert report.holm([0.5, 0.9]) == [1.0, 1.0]


def test_paired_interval_matches_the_t_interval():
    d = [0.1, -0.05, 0.2, 0.07, 0.01]
    out = report.paired(d)
    v = np.asarray(d)
    assert out["mean"] == pytest.approx(v.mean())
    assert out["ci95"] == pytest.approx(2.776 * v.std(ddof=1) / math.sqrt(5), rel=1e-3)
    assert 0.05 < out["p"] < 1 and out["n_seeds"] == 5


@pytest.mark.timeout(900)
def test_quick_run_json_shape(tmp_path):
    out = tmp_path / "pr"
    proc = subprocess.run([sys.executable, str(ROOT / "train/experiments/paper_regime.py"), "--quick",
                           "--out", str(out)], cwd=ROOT, capture_output=True, text=True, timeout=850)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    res = out / "results"
    for name in ("paper_regime.json", "forward_kl_rows.npz", "table.md", "kl_vs_iteration.png", "contrasts.png"):
        assert (res / name).stat().st_size > 0, name
    r = json.loads((res / "paper_regime.json").read_text())
    assert r["quick"] is True and r["config"]["iterations"] == 2 and r["warmup_ratio"] == 0.25
    seed = r["seeds"]["0"]
    assert math.isfinite(seed["theta0"]["forward_kl"])
    assert set(seed["runs"]) == {"iris_v2/R", "iris_v2/F", "sft_cont/R", "sft_cont/F"}
    for key, its in seed["runs"].items():
        assert len(its) == 2
        for t, m in enumerate(its):
            # Every iteration gets the forward KL and test NLL; the final model every measure.
            full = t == len(its) - 1
            for k in ("forward_kl", "test_nll_per_token", "nll") + (("d_half", "tv", "invalid_frac") if full else ()):
                assert isinstance(m[k], float) and math.isfinite(m[k]), (key, k)
            if full:
                assert 0 <= m["tv"] <= 1 and 0 <= m["invalid_frac"] <= 1 and m["d_half"] >= -1e-9
            else:
                assert "d_half" not in m
            assert "forward_kl_rows" not in m  # published in forward_kl_rows.npz
    rows = np.load(res / "forward_kl_rows.npz")
    assert {"0|theta0", "0|iris_v2/R", "0|iris_v2/F", "0|sft_cont/R", "0|sft_cont/F"} <= set(rows.files)
    for key in ("iris_v2/R", "sft_cont/F"):
        assert rows[f"0|{key}"].shape == (r["config"]["n_test"],)
        assert seed["runs"][key][-1]["forward_kl"] == pytest.approx(float(rows[f"0|{key}"].mean()), abs=1e-4)
    for m in seed["runs"]["iris_v2/R"] + seed["runs"]["iris_v2/F"]:
        assert 0 <= m["gap_u"] <= 1 and m["alpha"] == pytest.approx(0.5 + 1.5 * m["gap_u"])
        assert m["first_step_mean_abs_g"] == 0.0  # the reference pass agrees with the training pass
    assert all(m["alpha"] is None for m in seed["runs"]["sft_cont/R"])
    contrasts = r["summary"]["primary_contrasts"]
    assert [c["contrast"] for c in contrasts] == [c[0] for c in report.PRIMARY]
    assert contrasts[0]["n_seeds"] == 1 and contrasts[0]["mean"] is not None
