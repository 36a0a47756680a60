"""train/selfplay.py as a user meets it: --help, Ctrl-C, the resume messages, typo suggestions, a
start-up failure that leaves no trace, the eval legend, and checkpoints of tied weights saved
without accelerate's shared-tensor notice."""
import json
import logging
import signal
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from train import selfplay  # noqa: E402
from train.config import (ConfigError, flatten, Config, load_config, preset_description, suggest_key,  # noqa: E402
                          usage_text)
from train.io_utils import append_jsonl  # noqa: E402
from train.shards import run_sharded  # noqa: E402
from selfplay_env import selfplay_env as _env  # noqa: E402

SCRIPT = ROOT / "train" / "selfplay.py"
PRESET = ROOT / "train" / "configs" / "tiny-cpu.yaml"
FAST = ["--data.max_train_prompts", "32", "--data.max_eval_prompts", "16", "--train.epochs", "1",
        "--train.iterations", "1", "--train.save_steps", "2", "--generation.shard_size", "16",
        "--generation.batch_size", "8"]
pytestmark = pytest.mark.timeout(300)


def _run(*args, env=None):
    return subprocess.run([sys.executable, str(SCRIPT), *args], cwd=ROOT, env=env or _env(),
                          capture_output=True, text=True, timeout=280)


# ----------------------------------------------------------------------------- --help


@pytest.mark.parametrize("flag", ["--help", "-h"])
def test_help_prints_usage(flag, capsys):
    selfplay.main(["--config", str(PRESET), flag])  # wherever the flag is, no value needed
    out = capsys.readouterr().out
    assert out.startswith("usage: python train/selfplay.py --config FILE --output_dir DIR")
    for must in ("tiny-cpu.yaml", "zephyr-7b.yaml", "--optim.lr", "--train.iterations", "--loss.alpha_schedule",
                 "examples:", "resume"):
        assert must in out, must
    # Every config key is listed, with its documentation where the dataclass has a comment.
    for key in flatten(Config().to_dict()):
        assert f"--{key} " in out, key
    assert "passes over the prompts per iteration" in out
    # Each preset's whole description (its leading comment block), not a cut first line.
    for preset in sorted(PRESET.parent.glob("*.yaml")):
        for line in preset_description(preset):
            assert line in out, (preset.name, line)
    assert "…" not in out


def test_help_from_the_command_line_exits_0():
    proc = _run("-h")
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.startswith("usage:") and "Traceback" not in proc.stderr


# ----------------------------------------------------------------------------- typo suggestions


@pytest.mark.parametrize("typo, meant", [
    ("optim.learning_rate", "optim.lr"),
    ("train.iteratoins", "train.iterations"),
    ("train.batch_size", "train.per_device_batch_size"),
    ("train.grad_accum", "train.gradient_accumulation_steps"),
    ("optim.weight_decy", "optim.weight_decay"),
    ("loss.alpha_shedule", "loss.alpha_schedule"),
    ("model.name", "model.name_or_path"),
    ("optim.lr_rate", "optim.lr"),
])
def test_suggestions_weigh_the_last_component(typo, meant):
    assert suggest_key(typo, flatten(Config().to_dict())) == meant
    with pytest.raises(ConfigError, match=f"unknown config key '{typo}'; did you mean '{meant}'"):
        load_config(str(PRESET), {typo: 1})


def test_no_suggestion_for_nonsense():
    assert suggest_key("zzz.qqqq", flatten(Config().to_dict())) is None


# ----------------------------------------------------------------------------- files: one line, exit 2, no folder


def _bad_start(tmp_path, capsys, *args):
    out = tmp_path / "run"
    rc = selfplay.cli(["--output_dir", str(out), *args])
    err = capsys.readouterr().err
    assert rc == 2, err
    assert err.count("\n") == 1 and "Traceback" not in err and err.startswith("selfplay: error: "), err
    assert not out.exists()  # a failed start leaves no output folder
    return err


def test_missing_config_file(tmp_path, capsys):
    err = _bad_start(tmp_path, capsys, "--config", str(tmp_path / "nope.yaml"))
    assert f"--config: config file not found: {tmp_path / 'nope.yaml'}" in err


def test_malformed_config_file(tmp_path, capsys):
    bad = tmp_path / "bad.yaml"
    bad.write_text("seed: 0\ntrain:\n  iterations: [1, 2\n  epochs: 1\n")
    err = _bad_start(tmp_path, capsys, "--config", str(bad))
    assert f"config file {bad}, line " in err and "not valid YAML" in err


def test_missing_data_file(tmp_path, capsys):
    err = _bad_start(tmp_path, capsys, "--config", str(PRESET), "--data.train", str(tmp_path / "none.jsonl"))
    assert f"data.train: dataset file not found: {tmp_path / 'none.jsonl'}" in err


def test_malformed_data_file(tmp_path, capsys):
    data = tmp_path / "rows.jsonl"
    good = (ROOT / "train" / "data" / "verifiable" / "train.jsonl").read_text().splitlines()[:3]
    data.write_text("\n".join(good[:2] + ['{"messages": [oops'] + good[2:]) + "\n")
    err = _bad_start(tmp_path, capsys, "--config", str(PRESET), "--data.train", str(data))
    assert f"data.train: {data}: line 3 is not valid JSON" in err
    data.write_text(json.dumps({"messages": [{"role": "user", "content": "hi"}]}) + "\n")
    err = _bad_start(tmp_path, capsys, "--config", str(PRESET), "--data.train", str(data))
    assert "data.train row 0" in err


def test_missing_tokenizer_folder(tmp_path, capsys):
    err = _bad_start(tmp_path, capsys, "--config", str(PRESET), "--model.tokenizer", str(tmp_path / "tok"))
    assert "model.tokenizer" in err and str(tmp_path / "tok") in err


# ----------------------------------------------------------------------------- what the log says


def test_describe_parallelism(monkeypatch):
    from types import SimpleNamespace as NS

    def acc(kind, world, backend="gloo", version=2):
        return NS(distributed_type=NS(name=kind), num_processes=world,
                  state=NS(backend=backend, fsdp_plugin=NS(fsdp_version=version)))

    monkeypatch.delenv("ACCELERATE_USE_FSDP", raising=False)
    assert selfplay.describe_parallelism(acc("NO", 1)) == "one process, no data parallelism"
    assert selfplay.describe_parallelism(acc("MULTI_CPU", 2)).startswith("DDP over 2 processes (gloo)")
    assert selfplay.describe_parallelism(acc("FSDP", 2)).startswith("FSDP2 over 2 processes (gloo)")
    monkeypatch.setenv("ACCELERATE_USE_FSDP", "true")  # asked for FSDP, got DDP
    said = selfplay.describe_parallelism(acc("MULTI_CPU", 2))
    assert said.startswith("DDP over 2 processes") and "asked for FSDP" in said and "not FSDP" in said
    assert "warning" not in selfplay.describe_parallelism(acc("FSDP", 2))


def test_spin_logs_no_alpha(tmp_path):
    """SPIN has no α: neither the train nor the eval records (nor the legend) carry one."""
    out = tmp_path / "spin"
    proc = _run("--config", str(PRESET), "--output_dir", str(out), *FAST, "--loss.name", "spin",
                "--loss.beta", "0.1", "--train.max_steps", "2", "--eval.accuracy", "false")
    assert proc.returncode == 0, proc.stderr[-3000:]
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert {r["kind"] for r in records} == {"train", "eval"}
    for r in records:
        assert "alpha" not in r and "gap" not in r and not any(k.startswith("ess_") for k in r), r
        if r["kind"] == "eval":
            assert set(r) <= set(selfplay.EVAL_KEYS)
    text = proc.stdout + proc.stderr
    assert "alpha =" not in text and "alpha=" not in text and "-J_alpha" not in text
    assert "reward_margin = " in text


# ----------------------------------------------------------------------------- Ctrl-C


def test_ctrl_c_is_one_line_and_exit_130(tmp_path, monkeypatch, capsys):
    def interrupted(*a, **k):
        raise KeyboardInterrupt

    monkeypatch.setattr(selfplay, "load_tokenizer", interrupted)  # in the middle of start-up
    rc = selfplay.cli(["--config", str(PRESET), "--output_dir", str(tmp_path / "run")])
    err = capsys.readouterr().err
    assert rc == 130
    assert err.strip() == "interrupted; run the same command to resume"


def test_config_mistake_is_one_line_and_exit_2(tmp_path, capsys):
    rc = selfplay.cli(["--config", str(PRESET), "--output_dir", str(tmp_path / "run"), "--optim.learning_rate", "1"])
    err = capsys.readouterr().err
    assert rc == 2
    assert err.count("\n") == 1 and "Traceback" not in err
    assert err.startswith("selfplay: error: unknown config key 'optim.learning_rate'; did you mean 'optim.lr'?")
    assert not (tmp_path / "run" / "config.yaml").exists()


def test_sigint_in_a_real_run(tmp_path):
    """SIGINT while the run is generating: one line on stderr, no traceback, status 130."""
    out = tmp_path / "run"
    # A test runner started in the background (`make test &`, nohup) has SIGINT ignored, and an
    # ignored signal stays ignored across exec: Python would then never raise KeyboardInterrupt.
    # The child gets the default disposition, as an interactive shell gives a command.
    proc = subprocess.Popen([sys.executable, str(SCRIPT), "--config", str(PRESET), "--output_dir", str(out), *FAST,
                             "--train.iterations", "50", "--eval.at_start", "false"],
                            cwd=ROOT, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    try:
        # Interrupt once generation has written its first rows (the run is past start-up).
        import time

        deadline = time.monotonic() + 240
        while not list(out.glob("iter_0/generated-train-*")) and time.monotonic() < deadline:
            if proc.poll() is not None:
                break
            time.sleep(0.2)
        # Otherwise the signal lands in start-up (e.g. while another process holds the shared
        # torch-extension build lock), which is not what this test is about.
        assert proc.poll() is None and list(out.glob("iter_0/generated-train-*")), \
            "the run did not reach generation within 240 s (or ended first)"
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 130, err[-3000:]
    assert "Traceback" not in err
    assert err.strip().splitlines()[-1] == "interrupted; run the same command to resume"


# ----------------------------------------------------------------------------- resume messages


class _Item:
    def __init__(self, i):
        self.prompt_id, self.prompt_sha = i, f"sha{i}"


def _rows(batch):
    return [{"prompt_id": it.prompt_id, "prompt_sha": it.prompt_sha} for it in batch]


def test_sharded_phases_say_where_they_resume(tmp_path):
    items = [_Item(i) for i in range(10)]
    said = []
    run_sharded(items, _rows, out_dir=tmp_path, prefix="gen", shard_size=4, batch_size=2, desc="gen", log=said.append,
                show_progress=False)
    assert said == []  # a fresh start says nothing
    # As a crash leaves it: shard 1 removed, its first two rows in a partial file.
    (tmp_path / "gen-00001.jsonl").unlink()
    append_jsonl(tmp_path / "gen-00001.jsonl.partial", _rows(items[4:6]))
    run_sharded(items, _rows, out_dir=tmp_path, prefix="gen", shard_size=4, batch_size=2, desc="gen", log=said.append,
                show_progress=False)
    assert len(said) == 1 and "resuming at shard 1" in said[0] and "prompt 6 after 2 done" in said[0]
    assert "8 of 10 prompts done" in said[0]
    run_sharded(items, _rows, out_dir=tmp_path, prefix="gen", shard_size=4, batch_size=2, desc="gen", log=said.append,
                show_progress=False)
    assert "done already" in said[-1]


def test_startup_failure_leaves_no_resume_trace_then_resume_messages(tmp_path):
    out = tmp_path / "run"
    # 1) A start-up failure (the data file does not exist) leaves no config.yaml behind.
    with pytest.raises(FileNotFoundError):
        selfplay.main(["--config", str(PRESET), "--output_dir", str(out), *FAST,
                       "--data.train", str(tmp_path / "nope.jsonl")])
    assert not out.exists()  # not even an empty folder

    # 2) The corrected command starts afresh; SIGKILL at step 3 (checkpoint at step 2).
    proc = _run("--config", str(PRESET), "--output_dir", str(out), *FAST,
                env=_env(IRIS_SELFPLAY_KILL_AT="train:3"))
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-3000:]
    text = proc.stdout + proc.stderr
    assert "resuming" not in text and "changed config keys" not in text
    assert "Removed shared tensor" not in text  # the tied lm_head is saved once, silently
    assert (out / "iter_0" / "checkpoint" / "model.safetensors").exists()

    # 3) The same command resumes, and says where at every phase.
    proc = _run("--config", str(PRESET), "--output_dir", str(out), *FAST)
    assert proc.returncode == 0, proc.stderr[-3000:]
    text = proc.stdout + proc.stderr
    assert "resuming iteration 0" in text
    assert "generate train: done already" in text and "score heldout: done already" in text
    assert "resuming training at step 2/4 from the checkpoint in" in text
    assert "changed config keys" not in text and "Removed shared tensor" not in text
    # The eval line explains itself.
    assert "accuracy = fraction of prompts whose greedy answer" in text
    assert "-J_alpha" in text and "negative values are normal" in text
    # Every key an eval record holds is explained by the legend, and the legend is printed.
    record = json.loads((out / "iter_0" / "eval.json").read_text())
    assert set(record) <= set(selfplay.EVAL_KEYS), set(record) - set(selfplay.EVAL_KEYS)
    for key in ("choice_accuracy", "ess_real_frac", "ess_syn_frac", "alpha", "gap_u", "temperature_score", "win_rate"):
        assert key in record and f"{key} = " in text, key
    assert "parallelism: one process" in text

    # 4) Once more: everything is done.
    proc = _run("--config", str(PRESET), "--output_dir", str(out), *FAST)
    text = proc.stdout + proc.stderr
    assert proc.returncode == 0 and "all 1 iterations are done" in text and "not applied" not in text
    # 5) A finished run asked for other settings says they were not applied (not silence).
    proc = _run("--config", str(PRESET), "--output_dir", str(out), *FAST, "--seed", "7")
    text = proc.stdout + proc.stderr
    assert proc.returncode == 0 and "all 1 iterations are done" in text
    assert "other values of seed" in text and "not applied" in text


# ----------------------------------------------------------------------------- tied-weight notice


def test_only_the_expected_tie_notice_is_dropped():
    from train.checkpoint import _DropExpectedTieNotice

    filt = _DropExpectedTieNotice({"model.lm_head.weight"})

    def rec(msg):
        return logging.LogRecord("accelerate.utils.other", logging.WARNING, __file__, 1, msg, None, None)

    assert not filt.filter(rec("Removed shared tensor {'model.lm_head.weight'} while saving. This should be OK"))
    assert not filt.filter(rec("[RANK 0] Removed shared tensor {'model.lm_head.weight'} while saving."))
    assert filt.filter(rec("Removed shared tensor {'model.other.weight'} while saving. This should be OK"))
    assert filt.filter(rec("Removed shared tensor {'model.lm_head.weight', 'x'} while saving."))
    assert filt.filter(rec("something else"))


def test_trl_export_missing_run_is_one_line(tmp_path, capsys):
    from train import trl_export

    rc = trl_export.cli(["--run", str(tmp_path / "norun"), "--output_dir", str(tmp_path / "out")])
    err = capsys.readouterr().err
    assert rc == 2 and err.count("\n") == 1 and "Traceback" not in err
    assert err.startswith("trl_export: error: --run/--iteration: ") and str(tmp_path / "norun") in err
    assert not (tmp_path / "out").exists()


def test_a_reused_folder_says_it_holds_a_longer_run(tmp_path, capsys):
    """`--train.iterations 1` on a folder that holds 2 finished iterations: done, and it says so."""
    out = tmp_path / "run"
    for t in (0, 1):
        (out / f"iter_{t}").mkdir(parents=True)
        (out / f"iter_{t}" / "DONE").write_text("")
    selfplay.main(["--config", str(PRESET), "--output_dir", str(out), "--train.iterations", "1"])
    said = capsys.readouterr()
    text = said.out + said.err
    assert "all 1 iterations are done" in text
    assert "also holds iteration(s) 1 of an earlier, longer run" in text and "new --output_dir" in text


@pytest.mark.parametrize("loss,schedule", [("spin", "constant"), ("iris", "adaptive"), ("iris", "constant")])
def test_the_legend_explains_each_logged_key_once_and_only_those(loss, schedule):
    from train.config import load_config

    cfg = load_config(str(PRESET))
    cfg.loss.name, cfg.loss.alpha_schedule = loss, schedule
    legend = selfplay.metrics_legend(cfg)
    gap = loss == "iris" and schedule == "adaptive"
    for key in ("gap_u", "gap_acc", "temperature_score"):
        assert legend.count(f"\n    {key} = ") == (1 if gap else 0), key
    assert ("min(gap_u / u_ref, 1)" in legend) == gap
    assert "temperature_score_train" not in legend
