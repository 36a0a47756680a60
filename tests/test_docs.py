"""docs/: every citation of the mathematics points at a section that exists in the repository."""
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SOURCES = [p for ext in ("py", "md", "sh") for p in ROOT.rglob(f"*.{ext}")
           if not {".venv", "runs", "build", ".git"} & set(p.relative_to(ROOT).parts)]


def anchors(path: Path) -> set:
    return set(re.findall(r'<a id="([a-z0-9-]+)"></a>', path.read_text()))


def test_math_doc_has_its_sections():
    assert {"notation", "tilted-risk", "objective", "gradient", "limits", "fixed-point", "alpha-schedule",
            "baselines", "normalisation-scopes", "token-level-op", "floor"} <= anchors(ROOT / "docs" / "math.md")
    # The Rényi divergence the bound refers to, with the alpha(alpha - 1) denominator.
    assert "R_α(P ‖ Q) = log E_Q[ (dP/dQ)^α ] / (α(α−1))" in (ROOT / "docs" / "math.md").read_text()


def test_every_citation_resolves():
    math_anchors = anchors(ROOT / "docs" / "math.md")
    design_anchors = anchors(ROOT / "docs" / "design.md")
    cited = 0
    for path in SOURCES:
        text = path.read_text(errors="replace")
        for outside in ("iris" + "-math", "shared" + "/docs"):  # split: this file must not match itself
            assert outside not in text, f"{path}: cites {outside}, notes outside the repository"
        # The full form (docs, math.md, #anchor) and the short forms listing several anchors after it.
        for m in re.finditer(r"docs/(math|design)\.md((?:(?::|,| and)? ?#[a-z0-9-]+)+)", text):
            names = re.findall(r"#([a-z0-9-]+)", m.group(2))
            known = math_anchors if m.group(1) == "math" else design_anchors
            for name in names:
                cited += 1
                assert name in known, f"{path}: docs/{m.group(1)}.md#{name} does not exist"
    assert cited >= 20  # the code and the tests do cite it
