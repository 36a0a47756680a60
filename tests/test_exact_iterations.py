"""docs/math.md#beta-step-size shows the output of scripts/exact_iterations.py, and the output
says what the text says: (1 − 1/β) contraction, β = ½ cycles, β < ½ diverges, χ² ratio = 1 step."""
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "scripts"))

import exact_iterations  # noqa: E402


def test_math_doc_shows_the_scripts_table():
    text = (ROOT / "docs" / "math.md").read_text()
    shown = text.split("<!-- exact-iterations:begin -->")[1].split("<!-- exact-iterations:end -->")[0].strip()
    assert shown == exact_iterations.table()


def test_exact_iterations_behave_as_documented():
    rows = exact_iterations.trajectories()
    by_beta = {name.split("β = ")[1].split(",")[0]: kls for name, kls in rows.items() if name.startswith("IRIS")}
    assert by_beta["0.3"][-1] > 100 * by_beta["0.3"][0]  # diverges
    cycle = by_beta["0.5"]
    assert abs(cycle[6] - cycle[0]) < 1e-9 and abs(cycle[5] - cycle[1]) < 1e-9 and cycle[1] < 0.5 * cycle[0]  # cycles
    assert by_beta["0.6"][-1] < 0.01 * by_beta["0.6"][0] and by_beta["2"][-1] < 1e-3  # converge
    assert max(by_beta["1"][1:]) < 1e-12  # one step
    chi2 = rows["χ² ratio witness (`chi2`), β = 1"]
    logratio = rows["χ² log-ratio witness (`chi2_logratio`), β = 1"]
    assert max(chi2[1:]) < 1e-12 and min(logratio[1:]) > 1e-3
