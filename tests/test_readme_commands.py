"""Every shell command of the user-facing READMEs works as written after `make test` / `make bench`.

The commands are extracted from the READMEs (fenced ```bash blocks, and inline `code` that starts
like a command), so a README edit cannot silently break one:

* every command is one this repository can run: a Makefile target, the venv's interpreter / pip /
  accelerate (`.venv/bin/...`, which `make` creates) on a script that exists with flags that
  script knows, or an install into one's own environment naming extras setup.py declares;
  a bare `python` / `accelerate` (which only works in an activated venv) fails the test;
* every complete harness command (no `...` placeholder) parses into a valid config;
* the fast ones run: `train/selfplay.py --help`, and the README's harness-to-TRL walk-through,
  both shell commands and the Python of "your own script", in a temporary folder (`runs/` is the
  only thing replaced), which must start at loss 0 without the wrong-reference warning.
"""
import ast
import os
import re
import shlex
import subprocess
import sys
import warnings
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from train.config import ConfigError, parse_cli  # noqa: E402

READMES = ["README.md", "train/README.md", "train/experiments/README.md", "benchmarks/README.md"]
VENV_BIN = ".venv/bin/"
INLINE_START = re.compile(r"^(python3?|\.venv/bin/\w+|make|pip|accelerate) ")


def _commands_of(markdown: str):
    """Commands of the fenced shell blocks, line by line (continuations joined, comments dropped)."""
    out = []
    for block in re.findall(r"```(?:bash|sh|shell)\n(.*?)```", markdown, flags=re.S):
        for line in block.replace("\\\n", " ").splitlines():
            words = shlex.split(line, comments=True)
            if words:
                out.append(" ".join(shlex.quote(w) for w in words))
    return out


def _commands(readme: str):
    """(readme, command) for each shell command: the fenced shell blocks' and the inline code
    spans that start like a command."""
    text = (ROOT / readme).read_text()
    out = [(readme, c) for c in _commands_of(text)]
    prose = re.sub(r"```.*?```", "", text, flags=re.S)
    out += [(readme, span) for span in re.findall(r"`([^`\n]+)`", prose) if INLINE_START.match(span)]
    return out


COMMANDS = [c for r in READMES for c in _commands(r)]


def _setup_extras():
    tree = ast.parse((ROOT / "setup.py").read_text())
    for node in ast.walk(tree):
        if isinstance(node, ast.keyword) and node.arg == "extras_require":
            return set(ast.literal_eval(node.value))
    raise AssertionError("setup.py has no extras_require")


def _make_targets():
    return set(re.findall(r"^([A-Za-z][\w-]*):", (ROOT / "Makefile").read_text(), flags=re.M))


def _flags(words):
    return [w.split("=")[0] for w in words if w.startswith("--")]


def test_the_readmes_have_commands():
    assert len(COMMANDS) >= 20
    assert any("train/trl_export.py" in c for _, c in COMMANDS)


def test_the_venv_the_commands_name_is_the_one_make_creates():
    assert re.search(r"^PY := \.venv/bin/python$", (ROOT / "Makefile").read_text(), flags=re.M)
    assert "VENV=${VENV:-.venv}" in (ROOT / "scripts" / "ensure_venv.sh").read_text()


@pytest.mark.parametrize("readme, command", COMMANDS, ids=[f"{r}: {c[:60]}" for r, c in COMMANDS])
def test_command_is_well_formed(readme, command):
    words = shlex.split(command)
    head = words[0]
    where = f"{readme}: `{command}`"
    if head == "make":
        targets = [w for w in words[1:] if "=" not in w and not w.startswith("-")]
        assert targets and set(targets) <= _make_targets(), f"{where}: no such Makefile target"
        for w in words[1:]:
            if w.startswith("ARGS=") and targets == ["bench"]:
                source = (ROOT / "benchmarks" / "bench_loss.py").read_text()
                for flag in _flags(shlex.split(w[5:])):
                    assert f'"{flag}"' in source, f"{where}: bench_loss.py has no {flag}"
        return
    if head == "bash":  # a script of the repository
        assert (ROOT / words[1]).is_file(), f"{where}: {words[1]} does not exist"
        return
    if head == "pip":  # one's own environment
        assert words[1] == "install", where
        for w in words[2:]:
            m = re.fullmatch(r"\.\[([\w,-]+)\]|iris-kernels\[([\w,-]+)\]", w)
            if m:
                extras = set((m.group(1) or m.group(2)).split(","))
                assert extras <= _setup_extras(), f"{where}: setup.py declares no extra {extras - _setup_extras()}"
                if "flash-attn" in extras:  # builds against the installed torch
                    assert "--no-build-isolation" in words, f"{where}: flash-attn needs --no-build-isolation"
        return
    assert head.startswith(VENV_BIN), (
        f"{where}: `{head}` is not installed outside the venv; spell it {VENV_BIN}{head.split('/')[-1]} "
        f"(the READMEs tell users to run commands that way after `make`)")
    tool = head[len(VENV_BIN):]
    if tool == "pip":
        assert words[1] == "install", where
        for pkg in (w for w in words[2:] if not w.startswith("-")):
            assert re.fullmatch(r"[\w.-]+==[\w.]+", pkg), f"{where}: pin {pkg} to an exact version"
        return
    if tool == "accelerate":
        assert words[1] == "launch", where
        script = next(w for w in words if w.endswith(".py"))
        assert (ROOT / script).is_file(), f"{where}: {script} does not exist"
        if "--config_file" in words:
            assert (ROOT / words[words.index("--config_file") + 1]).is_file(), f"{where}: no such config file"
        return
    assert tool == "python", f"{where}: unknown tool {tool}"
    if words[1] == "-m":  # a module of the installed package
        import importlib.util

        assert importlib.util.find_spec(words[2]) is not None, f"{where}: no module {words[2]}"
        return
    script = words[1]
    assert (ROOT / script).is_file(), f"{where}: {script} does not exist"
    args = words[2:]
    if script == "train/selfplay.py":
        if "..." in args or "--help" in args or "-h" in args:
            return
        try:  # the preset exists and every override is a known key of the right type
            parse_cli(args)
        except (ConfigError, FileNotFoundError) as err:
            pytest.fail(f"{where}: {err}")
        return
    source = (ROOT / script).read_text()
    for flag in _flags(args):
        assert f'"{flag}"' in source, f"{where}: {script} has no option {flag}"


def _env():
    return dict(os.environ, HF_HUB_OFFLINE="1", PYTHONPATH=str(ROOT))


def _run(command: str, tmp_path: Path):
    """A README command as written, with the venv's interpreter being this one and runs/ in tmp."""
    words = [w.replace("runs/", f"{tmp_path}/runs/", 1) if w.startswith("runs/") else w for w in shlex.split(command)]
    assert words[0] == VENV_BIN + "python"
    return subprocess.run([sys.executable, *words[1:]], cwd=ROOT, env=_env(), capture_output=True, text=True,
                          timeout=560)


@pytest.mark.timeout(120)
def test_harness_help_runs(tmp_path):
    command = next(c for r, c in COMMANDS if c.startswith(".venv/bin/python train/selfplay.py --help"))
    proc = _run(command, tmp_path)
    assert proc.returncode == 0 and proc.stdout.startswith("usage:"), proc.stderr[-2000:]


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_the_trl_walk_through_runs_as_written(tmp_path):
    """train/README.md's harness -> TRL example: the two commands, then "your own script" started
    from the θ_0 the export saved; each starts at loss 0 and the own script does not warn."""
    text = (ROOT / "train" / "README.md").read_text()
    section = text[text.index("## From the harness to TRL"):]
    commands = _commands_of(section)
    assert len(commands) == 2 and "selfplay.py" in commands[0] and "trl_export.py" in commands[1]
    for command in commands:
        proc = _run(command, tmp_path)
        assert proc.returncode == 0, f"{command}\n{proc.stderr[-3000:]}"
    first = re.search(r"step=1 loss=(\S+)", proc.stdout)
    assert first and abs(float(first.group(1))) < 1e-5, proc.stdout  # θ = the opponent whose log-probs are stored
    assert (tmp_path / "runs" / "trl-demo-trl" / "opponent" / "model.safetensors").is_file()

    code = re.search(r"```py\n(.*?)```", section, flags=re.S).group(1)
    code = code.replace('"runs/', f'"{tmp_path}/runs/').replace(".train()", "")
    code = code.replace("per_device_train_batch_size=8,", "per_device_train_batch_size=8, max_steps=2, "
                        "report_to=[], use_cpu=True, save_strategy='no', logging_steps=1, disable_tqdm=True,")
    code = code.replace("SelfPlayTrainer(model, args", "trainer = SelfPlayTrainer(model, args")
    ns = {}
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        exec(code, ns)
        ns["trainer"].train()
    assert not [w for w in seen if "differ from the reference log-probs" in str(w.message)]
    assert ns["trainer"].state.log_history[0]["loss"] == pytest.approx(0.0, abs=1e-5)

