"""pyproject.toml's warning filters (pytest) and the library's own (iris_kernels/_warning_filters.py,
every other process) drop exactly the Triton interpreter's expected numpy warnings."""
import tomllib
import warnings
from pathlib import Path

import pytest
from _pytest.config import parse_warning_filter

ROOT = Path(__file__).resolve().parent.parent


def _caught(message: str, module: str) -> bool:
    filters = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["pytest"]["ini_options"]["filterwarnings"]
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        for spec in filters:  # as pytest applies them: later entries take precedence
            action, msg, category, mod, lineno = parse_warning_filter(spec, escape=False)
            warnings.filterwarnings(action, message=msg, category=category, module=mod, lineno=lineno)
        warnings.warn_explicit(message, RuntimeWarning, filename=module.replace(".", "/") + ".py", lineno=491,
                               module=module)
    return bool(seen)


@pytest.mark.parametrize("message", ["overflow encountered in exp", "invalid value encountered in multiply",
                                     "invalid value encountered in matmul", "overflow encountered in multiply"])
def test_expected_interpreter_warnings_are_dropped(message):
    assert not _caught(message, "triton.runtime.interpreter")


@pytest.mark.parametrize("message, module", [
    ("divide by zero encountered in log", "triton.runtime.interpreter"),  # another message
    ("overflow encountered in exp", "iris_kernels.chunked"),  # the same message elsewhere
])
def test_other_warnings_still_show(message, module):
    assert _caught(message, module)


# ----------------------------------------------------------------------------- outside pytest

_SCRIPT = """
import warnings, torch, iris_kernels as ik
torch.manual_seed(0)
h = (torch.randn(2, 19, 24) * 30).requires_grad_(); w = torch.randn(53, 24, requires_grad=True)
lab = torch.randint(0, 53, (2, 19)); lab[:, :5] = -100
crit = ik.SelfPlayLoss("iris", alpha=1.5, backend="triton")
loss, _ = crit(torch.cat([h, h.flip(0)]), w, torch.cat([lab, lab]), num_real=2, ref_logps=torch.randn(4) * 50 - 100)
loss.backward()
assert torch.isfinite(loss)
# The same messages from anywhere else, and other interpreter messages, still show.
for message, module in [("overflow encountered in exp", "iris_kernels.chunked"),
                        ("divide by zero encountered in log", "triton.runtime.interpreter")]:
    warnings.warn_explicit(message, RuntimeWarning, filename="x.py", lineno=1, module=module)
"""


def test_a_script_outside_pytest_sees_no_masked_lane_warnings():
    """A finite IRIS loss through the Triton interpreter, run as a plain script (no pytest
    filters): numpy's masked-lane warnings are filtered by the library itself, and only those."""
    import os
    import subprocess
    import sys

    env = dict(os.environ, TRITON_INTERPRET="1", PYTHONPATH=str(ROOT))
    proc = subprocess.run([sys.executable, "-W", "default", "-c", _SCRIPT], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=280)
    assert proc.returncode == 0, proc.stderr[-3000:]
    warned = [line for line in proc.stderr.splitlines() if "RuntimeWarning" in line]
    assert len(warned) == 2, proc.stderr[-3000:]
    assert "overflow encountered in exp" in warned[0] and "divide by zero" in warned[1]
