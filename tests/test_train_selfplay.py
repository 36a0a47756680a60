"""train/selfplay.py end to end on the tiny-cpu preset: two iterations, a 2-process run, crashes
during generation and training followed by a rerun, NaN steps, and bad input."""
import math
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from train.config import ConfigError  # noqa: E402
from train.io_utils import read_jsonl  # noqa: E402
from selfplay_env import selfplay_env as _env  # noqa: E402

SCRIPT = ROOT / "train" / "selfplay.py"
PRESET = ROOT / "train" / "configs" / "tiny-cpu.yaml"
N_TRAIN, N_EVAL, BATCH, STEPS = 32, 16, 8, 4  # 32 prompts / 8 per step, 1 epoch: 4 steps per iteration
# Shards of 16 prompts in batches of 8: a crash after the first batch is inside a shard.
FAST = ["--data.max_train_prompts", str(N_TRAIN), "--data.max_eval_prompts", str(N_EVAL), "--train.epochs", "1",
        "--train.iterations", "2", "--train.save_steps", "2", "--generation.shard_size", "16",
        "--generation.batch_size", "8"]
pytestmark = pytest.mark.timeout(300)


def _run(out, *extra, env=None, launcher=None):
    cmd = (launcher or [sys.executable, str(SCRIPT)]) + ["--config", str(PRESET), "--output_dir", str(out)]
    cmd += FAST + list(extra)
    return subprocess.run(cmd, cwd=ROOT, env=env or _env(), capture_output=True, text=True, timeout=280)


def _ok(proc):
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    return proc


def _metrics(out, kind):
    return [r for r in read_jsonl(Path(out) / "metrics.jsonl") if r["kind"] == kind]


def _generated(out, t, split):
    rows = []
    for p in sorted((Path(out) / f"iter_{t}").glob(f"generated-{split}-*.jsonl")):
        rows += read_jsonl(p)
    return rows


@pytest.fixture(scope="module")
def baseline(tmp_path_factory):
    out = tmp_path_factory.mktemp("baseline")
    _ok(_run(out))
    return out


def test_two_iterations_end_to_end(baseline):
    out = baseline
    for t in (0, 1):
        it = out / f"iter_{t}"
        assert (it / "DONE").exists() and (it / "model" / "model.safetensors").exists()
        assert not (it / "checkpoint").exists()  # mid-iteration state is removed once θ_{t+1} is saved
        assert not list(it.glob("*.partial")) and not list(it.glob("*.tmp*"))
        for split, n in (("train", N_TRAIN), ("heldout", N_EVAL)):
            rows = _generated(out, t, split)
            assert sorted(r["prompt_id"] for r in rows) == list(range(n))  # exactly one row per prompt
    # θ_1 sampled iteration 1's responses, θ_0 iteration 0's: the opponent really moved.
    responses = [[r["response_ids"] for r in _generated(out, t, "train")] for t in (0, 1)]
    assert responses[0] != responses[1]

    steps = _metrics(out, "train")
    assert [r["step"] for r in steps] == list(range(1, 2 * STEPS + 1))
    assert [r["step_in_iteration"] for r in steps] == list(range(1, STEPS + 1)) * 2
    for first in (steps[0], steps[STEPS]):
        # θ = θ_t at the first step of an iteration: g ≡ 0, IRIS loss 0, uniform weights.
        assert abs(first["loss"]) < 1e-5
        assert first["real/ess"] == pytest.approx(BATCH) and first["syn/ess"] == pytest.approx(BATCH)
    assert all(math.isfinite(r["loss"]) and not r["skipped"] for r in steps)
    for first in (steps[0], steps[STEPS]):  # the reference pass agrees with the training pass exactly
        assert first["first_step_mean_abs_g"] == 0.0

    evals = {r["iteration"]: r for r in _metrics(out, "eval")}
    assert sorted(evals) == [-1, 0, 1]
    assert evals[1]["nll"] < evals[-1]["nll"]  # the annotated answers became more likely
    for t in (0, 1):
        for key in ("nll", "accuracy", "reward_margin", "win_rate", "alpha", "ess_real", "ess_syn"):
            assert isinstance(evals[t][key], float), key
        assert 0 <= evals[t]["win_rate"] <= 1 and 1 <= evals[t]["ess_syn"] <= N_EVAL
        # gap-adaptive v2 on the held-out split: α_t = ½ + 1.5·u_t, u_t from the classifier test
        assert evals[t]["gap_N"] == 2 * N_EVAL and 0 <= evals[t]["gap_u"] <= 1
        assert evals[t]["alpha"] == pytest.approx(0.5 + 1.5 * evals[t]["gap_u"])
        assert isinstance(evals[t]["temperature_score"], float) and 0 <= evals[t]["gap_acc"] <= 1
    assert list((out / "tensorboard").glob("events.out.tfevents.*"))

    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(out / "iter_1" / "model")
    assert model.get_output_embeddings().weight is model.get_input_embeddings().weight
    assert all(torch.isfinite(p).all() for p in model.parameters())

    # The same command on a finished run does nothing and changes nothing.
    before = (out / "metrics.jsonl").read_bytes()
    proc = _ok(_run(out))
    assert "all 2 iterations are done" in proc.stderr + proc.stdout
    assert (out / "metrics.jsonl").read_bytes() == before


def test_killed_in_generation_and_in_training_then_rerun(baseline, tmp_path):
    out = tmp_path / "run"
    # 1) SIGKILL after the first batch (8 rows) of the first generation shard.
    proc = _run(out, env=_env(IRIS_SELFPLAY_KILL_AT="generate:8"))
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-3000:]
    partial = out / "iter_0" / "generated-train-00000.jsonl.partial"
    assert [r["prompt_id"] for r in read_jsonl(partial)] == list(range(8))
    assert not (out / "iter_0" / "generated-train-00000.jsonl").exists()

    # 2) Rerun, SIGKILL at global step 7 = step 3 of iteration 1 (checkpoint at its step 2).
    proc = _run(out, env=_env(IRIS_SELFPLAY_KILL_AT=f"train:{STEPS + 3}"))
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-3000:]
    assert (out / "iter_0" / "DONE").exists() and not (out / "iter_1" / "DONE").exists()
    assert (out / "iter_1" / "checkpoint" / "model.safetensors").exists()

    # 3) Rerun to the end.
    proc = _ok(_run(out))
    assert "resuming training at step 2/4" in proc.stderr + proc.stdout

    for t in (0, 1):
        for split in ("train", "heldout"):
            rows = _generated(out, t, split)
            assert sorted(r["prompt_id"] for r in rows) == list(range(N_TRAIN if split == "train" else N_EVAL))
            # Per-batch seeds: the crash changed nothing about what was sampled.
            assert rows == _generated(baseline, t, split)
    steps = _metrics(out, "train")
    assert [r["step"] for r in steps] == list(range(1, 2 * STEPS + 1))  # no step lost or logged twice
    ref_steps = _metrics(baseline, "train")
    for a, b in zip(steps, ref_steps):  # model, optimizer, schedules and RNG restored: same trajectory
        assert a["loss"] == pytest.approx(b["loss"], abs=1e-6) and a["lr"] == b["lr"] and a["alpha"] == b["alpha"]
    assert [r["iteration"] for r in _metrics(out, "eval")] == [-1, 0, 1]
    final = _metrics(out, "eval")[-1]
    assert final["nll"] == pytest.approx(_metrics(baseline, "eval")[-1]["nll"], rel=1e-6)


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.distributed
def test_two_processes_normalise_globally(baseline, tmp_path):
    out = tmp_path / "ddp"
    # accelerate's --cpu flag runs ONE process; --multi_gpu starts torchrun, and without CUDA the
    # harness joins a gloo group of CPU processes.
    launcher = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
                "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
                "--main_process_port", str(_free_port()), str(SCRIPT)]
    # Half the per-process batch: the same global batch of 8 prompts, split over 2 ranks.
    proc = _ok(_run(out, "--train.per_device_batch_size", str(BATCH // 2), launcher=launcher))
    assert "2 process(es), global batch 8" in proc.stderr + proc.stdout
    for t in (0, 1):
        for split, n in (("train", N_TRAIN), ("heldout", N_EVAL)):
            rows = _generated(out, t, split)
            assert sorted(r["prompt_id"] for r in rows) == list(range(n))
    steps, ref_steps = _metrics(out, "train"), _metrics(baseline, "train")
    assert [r["step"] for r in steps] == [r["step"] for r in ref_steps]
    # Global normalisation: each step's loss and IRIS weights (ESS) are those of the whole batch,
    # as in the single-process run; per-rank softmaxes would give ESS <= 4 and other losses.
    for a, b in zip(steps, ref_steps):
        assert a["loss"] == pytest.approx(b["loss"], abs=2e-4)
        assert a["real/ess"] == pytest.approx(b["real/ess"], rel=1e-3)
        assert a["syn/ess"] == pytest.approx(b["syn/ess"], rel=1e-3)
    assert steps[0]["real/ess"] == pytest.approx(BATCH)
    assert _metrics(out, "eval")[-1]["nll"] == pytest.approx(_metrics(baseline, "eval")[-1]["nll"], rel=1e-4)


def _main(out, *extra):
    from train.selfplay import main

    main(["--config", str(PRESET), "--output_dir", str(out)] + FAST + list(extra))


def test_a_nan_step_is_skipped_and_logged(tmp_path, monkeypatch):
    monkeypatch.setenv("IRIS_SELFPLAY_NAN_STEPS", "2")
    out = tmp_path / "nan"
    _main(out, "--train.iterations", "1", "--eval.accuracy", "false", "--eval.at_start", "false")
    steps = _metrics(out, "train")
    assert [r["step"] for r in steps] == [1, 2, 3, 4]
    assert steps[1]["skipped"] is True and steps[1]["loss"] == "nan"
    assert not any(r["skipped"] for r in steps[:1] + steps[2:])
    assert (out / "iter_0" / "DONE").exists()


def test_consecutive_nan_steps_stop_the_run_without_saving(tmp_path, monkeypatch):
    monkeypatch.setenv("IRIS_SELFPLAY_NAN_STEPS", "2,3")
    out = tmp_path / "nan2"
    with pytest.raises(FloatingPointError, match="2 consecutive non-finite steps"):
        _main(out, "--train.iterations", "1", "--train.max_consecutive_nan", "2", "--eval.at_start", "false",
              "--train.save_steps", "1")
    assert not (out / "iter_0" / "model").exists()
    # The last checkpoint is that of step 2 (skipped: the weights of step 1), written before step 3
    # failed again; its weights are finite.
    from safetensors.torch import load_file

    ckpt = load_file(str(out / "iter_0" / "checkpoint" / "model.safetensors"))
    assert all(torch.isfinite(v).all() for v in ckpt.values())
    state = torch.load(out / "iter_0" / "checkpoint" / "trainer_state.pt", weights_only=True)
    assert state["progress"]["step_in_iteration"] == 2 and state["progress"]["nan_streak"] == 1


def test_bad_input_is_named(tmp_path):
    with pytest.raises(ConfigError, match="unknown config key 'train.iteratoins'"):
        _main(tmp_path / "a", "--train.iteratoins", "3")
    with pytest.raises(TypeError, match="config key 'train.epochs'"):
        _main(tmp_path / "b", "--train.epochs", "two")
    with pytest.raises(FileNotFoundError, match="data.train: dataset file not found: .*nope.jsonl"):
        _main(tmp_path / "c", "--data.train", str(tmp_path / "nope.jsonl"))
    with pytest.raises(FileNotFoundError, match="model.name_or_path: .*not found: .*no-model"):
        _main(tmp_path / "d", "--model.init_config", "null", "--model.name_or_path", str(tmp_path / "no-model"))
    with pytest.raises(FileNotFoundError, match="model.tokenizer: .*not found"):
        _main(tmp_path / "e", "--model.tokenizer", str(tmp_path / "no-tokenizer"))
    with pytest.raises(ValueError, match="cannot fill one global batch"):
        _main(tmp_path / "f", "--train.per_device_batch_size", "64")


def test_trust_remote_code_is_off_unless_asked(monkeypatch, tmp_path):
    from transformers import AutoModelForCausalLM

    from train.config import ModelConfig
    from train.modeling import build_initial_model

    seen = {}

    def fake(source, **kw):
        seen.update(kw)
        raise OSError("stop here")

    monkeypatch.setattr(AutoModelForCausalLM, "from_pretrained", fake)
    folder = tmp_path / "m"
    folder.mkdir()
    for flag in (False, True):
        with pytest.raises(FileNotFoundError):
            build_initial_model(ModelConfig(name_or_path=str(folder), trust_remote_code=flag), None, seed=0)
        assert seen["trust_remote_code"] is flag


@pytest.mark.parametrize("keep_dropout", [False, True])
def test_dropout_is_off_in_training_unless_kept(tmp_path, keep_dropout):
    # A Llama with attention_dropout 0.1: the reference is scored in eval mode (no dropout), so the
    # first step at θ = θ_t has g = 0 and an IRIS loss of 0 only if training runs without dropout.
    import yaml

    cfg = yaml.safe_load(PRESET.read_text())
    cfg["model"]["init_config"]["attention_dropout"] = 0.1
    cfg["model"]["tokenizer"] = str(ROOT / cfg["model"]["tokenizer"])
    cfg["data"]["train"], cfg["data"]["eval"] = str(ROOT / cfg["data"]["train"]), str(ROOT / cfg["data"]["eval"])
    path = tmp_path / "dropout.yaml"
    path.write_text(yaml.safe_dump(cfg))
    out = tmp_path / "run"
    from train.selfplay import main

    main(["--config", str(path), "--output_dir", str(out)] + FAST
         + ["--train.iterations", "1", "--eval.accuracy", "false", "--eval.at_start", "false",
            "--train.keep_dropout", str(keep_dropout).lower()])
    first = _metrics(out, "train")[0]
    if keep_dropout:
        assert abs(first["loss"]) > 1e-4  # the documented cost of keeping it
    else:
        assert first["loss"] == 0.0  # scored and trained by the same code without dropout
        assert first["real/ess"] == pytest.approx(BATCH) and first["syn/ess"] == pytest.approx(BATCH)


def test_first_step_g_is_exactly_zero_in_bf16(tmp_path):
    """At θ = θ_t the reference pass (training micro-batches, training forward, same autocast)
    and the training pass agree bit for bit: the IRIS loss is exactly 0 and every weight exactly
    uniform, in bf16 autocast, with per-token means and gradient accumulation too."""
    out = tmp_path / "bf16"
    _ok(_run(out, "--train.mixed_precision", "'bf16'", "--train.iterations", "1", "--loss.length_normalize", "true",
             "--train.per_device_batch_size", "4", "--train.gradient_accumulation_steps", "2",
             "--eval.batch_size", "5", "--eval.at_start", "false"))
    first = _metrics(out, "train")[0]
    assert first["step_in_iteration"] == 1
    assert first["first_step_mean_abs_g"] == 0.0
    assert first["loss"] == 0.0
    assert first["real/ess"] == BATCH and first["syn/ess"] == BATCH
    assert first["real/max_weight"] == 1 / BATCH and first["syn/max_weight"] == 1 / BATCH
    rows = read_jsonl(out / "iter_0" / "reference-train-layout-r0of1.jsonl")
    assert sorted(r["prompt_id"] for r in rows) == list(range(N_TRAIN))


def test_spin_mixing_trains_on_the_previous_synthetic_responses_too(tmp_path):
    """train.mix_previous_synthetic: iteration 1 trains on 2n rows (twice the steps), the second n
    paired with iteration 0's synthetic responses and scored under θ_1, with g = 0 at its first step."""
    out = tmp_path / "mix"
    _ok(_run(out, "--loss.name", "spin", "--loss.beta", "0.1", "--train.mix_previous_synthetic", "true",
             "--eval.at_start", "false"))
    train = _metrics(out, "train")
    steps = {t: max(r["step_in_iteration"] for r in train if r["iteration"] == t) for t in (0, 1)}
    assert steps == {0: STEPS, 1: 2 * STEPS}
    assert [r["first_step_mean_abs_g"] for r in train if r["step_in_iteration"] == 1] == [0.0, 0.0]
    first = read_jsonl(out / "iter_0" / "reference-train-layout-r0of1.jsonl")
    mixed = read_jsonl(out / "iter_1" / "reference-train-layout-r0of1.jsonl")
    assert [r["prompt_id"] for r in first] == list(range(N_TRAIN))
    assert [r["prompt_id"] for r in mixed] == list(range(2 * N_TRAIN))
    old, new = _generated(out, 0, "train"), _generated(out, 1, "train")
    assert old != new
    # Rows n + i pair prompt i with y'_0 (its token count) under θ_1 (another score than θ_0 gave it).
    assert [r["n_syn"] for r in mixed[N_TRAIN:]] == [r["n_syn"] for r in first]
    assert [r["n_real"] for r in mixed[N_TRAIN:]] == [r["n_real"] for r in mixed[:N_TRAIN]]
    assert any(a["ref_syn"] != b["ref_syn"] for a, b in zip(mixed[N_TRAIN:], first))
    state = torch.load(out / "iter_1" / "state.pt", weights_only=False)
    assert state["global_step"] == 3 * STEPS
