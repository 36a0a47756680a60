"""train/selfplay.py under FSDP2 on 2 CPU processes equals the 1-process run with the doubled batch.

accelerate 1.15 enables FSDP only on accelerator devices (on a CPU-only machine
``distributed_type: FSDP`` silently becomes plain multi-CPU DDP), so the launch is
``accelerate launch --config_file train/configs/accelerate/fsdp2.yaml tests/fsdp2_cpu_launch.py``:
the shim switches accelerate's state to FSDP and runs the unchanged harness, which then goes
through accelerate's own FSDP2 code (fully_shard per decoder layer + root, sharded checkpoints,
full state dict at save) over gloo. Each test checks that FSDP really ran (sharded .distcp
checkpoint files), then compares losses, gradient norms, generated rows and saved weights.

Optimizer: AdamW with eps = 1. With the default eps = 1e-8, Adam divides each gradient by its
own running scale, so an element whose gradient is mostly cancellation (|g| ~ 1e-7) moves by
~lr whatever the rounding of the reduction order, and two exact implementations drift apart by
~lr * (a few steps) ~ 4e-5 in fp32 over two iterations. With eps = 1 an update is ~lr * g,
so the comparison at 1e-5 tests the sharding, not Adam's amplification of rounding.
"""
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from selfplay_env import generated_rows as _generated, run_metrics as _metrics, saved_weights as _weights
from selfplay_env import selfplay_env as _env

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "train" / "selfplay.py"
SHIM = ROOT / "tests" / "fsdp2_cpu_launch.py"
ACCEL_CONFIG = ROOT / "train" / "configs" / "accelerate" / "fsdp2.yaml"
PRESET = ROOT / "train" / "configs" / "tiny-cpu.yaml"
N_TRAIN, N_EVAL, BATCH, STEPS = 32, 16, 8, 4
COMMON = ["--data.max_train_prompts", str(N_TRAIN), "--data.max_eval_prompts", str(N_EVAL), "--train.epochs", "1",
          "--train.save_steps", "2", "--generation.shard_size", "16", "--generation.batch_size", "8",
          "--optim.optimizer", "adamw", "--optim.eps", "1.0"]
TOL = 1e-5
UNITS = "rank 1: 3 FSDP2 units"  # printed by the shim after accelerate's fsdp2_prepare_model
pytestmark = [pytest.mark.distributed, pytest.mark.timeout(300)]


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _untied_init_config() -> str:
    spec = yaml.safe_load(PRESET.read_text())["model"]["init_config"]
    spec["tie_word_embeddings"] = False
    return yaml.safe_dump(spec, default_flow_style=True).strip()


def _args(out, iterations, tied):
    args = ["--config", str(PRESET), "--output_dir", str(out), "--train.iterations", str(iterations)] + COMMON
    if not tied:
        args += ["--model.init_config", _untied_init_config()]
    return args


def _single(out, *, iterations, tied):
    cmd = [sys.executable, str(SCRIPT)] + _args(out, iterations, tied)
    proc = subprocess.run(cmd, cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=280)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]


def _fsdp(out, *, iterations, tied, kill_at=None):
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(ACCEL_CONFIG),
           "--num_processes", "2", "--main_process_port", str(_free_port()), str(SHIM)]
    cmd += _args(out, iterations, tied) + ["--train.per_device_batch_size", str(BATCH // 2)]
    env = _env(**({"IRIS_SELFPLAY_KILL_AT": kill_at} if kill_at else {}))
    return subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=280)


def _assert_same_run(fsdp_out, single_out, iterations, tied):
    steps, ref_steps = _metrics(fsdp_out, "train"), _metrics(single_out, "train")
    assert [r["step"] for r in steps] == [r["step"] for r in ref_steps] == list(range(1, iterations * STEPS + 1))
    for a, b in zip(steps, ref_steps):
        assert abs(a["loss"] - b["loss"]) <= TOL, (a["step"], a["loss"], b["loss"])
        assert a["grad_norm"] == pytest.approx(b["grad_norm"], rel=TOL), a["step"]
        assert a["real/ess"] == pytest.approx(b["real/ess"], rel=TOL) and a["lr"] == b["lr"]
    assert not any(r["skipped"] for r in steps)
    for t in range(iterations):
        for split in ("train", "heldout"):
            rows = _generated(fsdp_out, t, split)
            assert [r["prompt_id"] for r in rows] == list(range(N_TRAIN if split == "train" else N_EVAL))
            assert rows == _generated(single_out, t, split), (t, split)  # the same responses were sampled
        w, ref_w = _weights(fsdp_out, t), _weights(single_out, t)
        if tied:  # the full state dict of the FSDP run may list the tied head; it is the embedding
            head = w.pop("lm_head.weight", None)
            assert head is None or torch.equal(head, w["model.embed_tokens.weight"])
        assert sorted(w) == sorted(ref_w)
        for k in ref_w:
            torch.testing.assert_close(w[k], ref_w[k], rtol=0, atol=TOL, msg=f"iteration {t} {k}")
    evals, ref_evals = _metrics(fsdp_out, "eval"), _metrics(single_out, "eval")
    assert [r["iteration"] for r in evals] == [r["iteration"] for r in ref_evals]
    assert evals[-1]["nll"] == pytest.approx(ref_evals[-1]["nll"], rel=TOL)


def test_fsdp2_tied_killed_and_resumed_matches_one_process(tmp_path):
    single = tmp_path / "single"
    _single(single, iterations=1, tied=True)
    out = tmp_path / "fsdp"
    # SIGKILL at global step 3 (the checkpoint of step 2 holds sharded model and optimizer states).
    proc = _fsdp(out, iterations=1, tied=True, kill_at="train:3")
    assert proc.returncode != 0 and "Signal 9 (SIGKILL)" in proc.stdout + proc.stderr, proc.stderr[-3000:]
    ckpt = out / "iter_0" / "checkpoint"
    # FSDP really ran: accelerate wrote sharded (distributed checkpoint) model and optimizer states.
    assert sorted(p.name for p in (ckpt / "pytorch_model_fsdp_0").glob("*.distcp")) == ["__0_0.distcp", "__1_0.distcp"]
    assert (ckpt / "optimizer_0" / ".metadata").exists() and not (ckpt / "model.safetensors").exists()
    proc = _fsdp(out, iterations=1, tied=True)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    assert UNITS in proc.stderr  # 2 decoder layers + the root, on each rank
    assert "resuming training at step 2/4" in proc.stdout + proc.stderr
    assert "2 process(es), global batch 8" in proc.stdout + proc.stderr
    # The log says which parallelism ran (and no fallback warning: this is FSDP2).
    assert "parallelism: FSDP2 over 2 processes (gloo)" in proc.stdout + proc.stderr
    assert "asked for FSDP" not in proc.stdout + proc.stderr
    _assert_same_run(out, single, 1, tied=True)


def test_fsdp2_untied_two_iterations_match_one_process(tmp_path):
    # Two iterations: θ_1 is saved from the shards (full state dict) and reloaded whole on every
    # rank for iteration 1's generation and scoring, then sharded again for its training.
    single = tmp_path / "single"
    _single(single, iterations=2, tied=False)
    assert "lm_head.weight" in _weights(single, 0)  # really untied
    out = tmp_path / "fsdp"
    proc = _fsdp(out, iterations=2, tied=False)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    assert UNITS in proc.stderr
    _assert_same_run(out, single, 2, tied=False)
