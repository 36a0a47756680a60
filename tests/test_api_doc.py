"""docs/api.md lists every public name (each module's __all__), and each entry names every
parameter of that name's signature, so a new or changed public name cannot go undocumented."""
import enum
import importlib
import inspect
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
API = (ROOT / "docs" / "api.md").read_text()
MODULES = ["iris_kernels", "iris_kernels.integrations.hf", "iris_kernels.integrations.trl"]


def _sections():
    """{module: {name: entry text}} from the '## `module`' and '### `name`' headings."""
    out = {}
    for m in re.finditer(r"^## `([\w.]+)`\n(.*?)(?=^## |\Z)", API, flags=re.M | re.S):
        entries = re.findall(r"^### `(\w+)`\n(.*?)(?=^### |\Z)", m.group(2), flags=re.M | re.S)
        out[m.group(1)] = dict(entries)
    return out


def _module(name):
    if name.endswith(".trl"):
        pytest.importorskip("trl", reason='needs trl (pip install "iris-kernels[trl]")')
    return importlib.import_module(name)


def _own_parameters(obj):
    """The parameter names a reader must find in the entry: a function's or a class's
    constructor's, and for a dataclass extending another library's config only its own fields."""
    if inspect.isclass(obj) and obj.__name__ == "SelfPlayConfig":
        return set(vars(obj).get("__annotations__", {})) - {"_VALID_DICT_FIELDS"}
    if inspect.isclass(obj) and (issubclass(obj, (tuple, enum.Enum)) or not obj.__module__.startswith("iris_kernels")):
        return set()
    try:
        sig = inspect.signature(obj)
    except (TypeError, ValueError):
        return set()
    return {p.name for p in sig.parameters.values()
            if p.name != "self" and p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)}


@pytest.mark.parametrize("module_name", MODULES)
def test_every_public_name_is_documented(module_name):
    module = _module(module_name)
    documented = _sections().get(module_name, {})
    public = list(module.__all__)
    missing = [n for n in public if n not in documented]
    assert not missing, (
        f"docs/api.md lacks these public names of {module_name}: {', '.join(missing)}. Add a '### `NAME`' "
        f"entry for each under '## `{module_name}`' with its signature, shapes, dtypes and errors.")
    stale = sorted(set(documented) - set(public))
    assert not stale, f"docs/api.md documents {stale} under {module_name}, which are not in its __all__"


@pytest.mark.parametrize("module_name", MODULES)
def test_every_parameter_is_named(module_name):
    module = _module(module_name)
    documented = _sections().get(module_name, {})
    problems = []
    for name in module.__all__:
        if name not in documented:
            continue  # reported by the test above
        obj = getattr(module, name)
        if not callable(obj):
            continue
        entry = documented[name]
        if "```" not in entry:
            problems.append(f"{name}: no signature block")
        absent = sorted(p for p in _own_parameters(obj) if not re.search(rf"\b{re.escape(p)}\b", entry))
        if absent:
            problems.append(f"{name}: parameters {absent} are not in its entry")
    assert not problems, "docs/api.md is out of date with the code:\n" + "\n".join(problems)


def test_terms_are_stated():
    """One name per kind of row: annotated / synthetic, with TRL's chosen / rejected mapped once."""
    assert "**annotated**" in API and "**synthetic**" in API and "`chosen` (annotated)" in API
    for doc in ("README.md", "train/README.md"):
        text = (ROOT / doc).read_text()
        # "real" survives only inside code names (num_real, ref_real, ...), never as prose for the rows.
        prose = re.sub(r"`[^`]*`|```.*?```", "", text, flags=re.S)
        assert not re.search(r"\breal (rows|responses|samples|data)\b", prose), doc
