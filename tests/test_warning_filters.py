"""pyproject.toml's warning filters drop exactly the Triton interpreter's expected numpy warnings."""
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
