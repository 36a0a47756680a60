"""DeepSpeed ZeRO-3 on 2 CPU processes: the op, then train/selfplay.py, each equal to one process.

* The op: ``sequence_logprobs`` on the lm_head weight read inside the forward of the module the
  ZeRO-3 engine runs (tied and untied heads), every parameter partitioned
  (``stage3_param_persistence_threshold: 0``, checked on the head), gradients equal to one process
  without DeepSpeed on the whole batch. And the misuse — forward inside
  ``deepspeed.zero.GatheredParameters``, backward after it — gives the op's ValueError saying what
  to do, not DeepSpeed's size mismatch. Worker: tests/zero3_op_worker.py.
* The harness: ``accelerate launch --config_file`` the shipped ZeRO-3 config (its JSON copied with
  the persistence threshold at 0) runs the unchanged train/selfplay.py — no launcher shim — and
  equals the one-process run on the doubled batch: losses, gradient norms, sampled responses,
  saved weights. One run is SIGKILLed at step 3 and resumed from DeepSpeed's sharded checkpoint;
  the other runs two iterations (θ_1 gathered, saved and reloaded whole, then partitioned again)
  with a NaN step, skipped by both runs.

Optimizer AdamW with eps = 1, as in tests/test_train_fsdp2.py (why: there). DeepSpeed's first use
on a machine compiles a small C++ op (deepspeed_shm_comm, cached in ~/.cache/torch_extensions).
"""
import importlib.util
import json
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
WORKER = ROOT / "tests" / "zero3_op_worker.py"
ACCEL_CONFIG = ROOT / "train" / "configs" / "accelerate" / "deepspeed-zero3.yaml"
PRESET = ROOT / "train" / "configs" / "tiny-cpu.yaml"
N_TRAIN, N_EVAL, BATCH, STEPS = 32, 16, 8, 4
COMMON = ["--data.max_train_prompts", str(N_TRAIN), "--data.max_eval_prompts", str(N_EVAL), "--train.epochs", "1",
          "--train.save_steps", "2", "--generation.shard_size", "16", "--generation.batch_size", "8",
          "--optim.optimizer", "adamw", "--optim.eps", "1.0"]
TOL = 1e-5
pytestmark = [pytest.mark.distributed, pytest.mark.timeout(900),
              pytest.mark.skipif(importlib.util.find_spec("deepspeed") is None,
                                 reason="deepspeed is not installed (pip install -e '.[deepspeed]')")]


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# ----------------------------------------------------------------------------- the op


@pytest.mark.parametrize("tied", [True, False], ids=["tied", "untied"])
def test_op_under_zero3_equals_one_process(tmp_path, tied):
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
           str(_free_port()), str(WORKER), "--tied", str(int(tied)), "--out", str(tmp_path)]
    proc = subprocess.run(cmd, cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=800)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    r = torch.load(tmp_path / "result.pt", weights_only=True)
    assert r["world"] == 2 and r["partitioned"]  # the head really was a ZeRO-3 partition
    assert r["loss"] == pytest.approx(r["ref_loss"], rel=1e-6)
    assert sorted(r["grads"]) == sorted(r["ref_grads"])
    assert ("model.lm_head.weight" in r["grads"]) is not tied  # tied: one Parameter, listed once
    for name, ref in r["ref_grads"].items():
        scale = float(ref.abs().max())
        assert scale > 0, name
        torch.testing.assert_close(r["grads"][name].double(), ref, rtol=1e-5, atol=1e-6 * scale, msg=name)
    # Backward after the GatheredParameters block: the op's error, saying what to do.
    assert r["misuse"].startswith("ValueError: weight is a DeepSpeed ZeRO-3 parameter that was released"), r["misuse"]
    assert "run the backward inside the same `with` block" in r["misuse"]


# ----------------------------------------------------------------------------- the harness


def _accelerate_config(tmp_path) -> Path:
    """The shipped accelerate config, its DeepSpeed JSON copied with every parameter partitioned."""
    cfg = yaml.safe_load(ACCEL_CONFIG.read_text())
    ds = json.loads((ROOT / cfg["deepspeed_config"]["deepspeed_config_file"]).read_text())
    ds["zero_optimization"]["stage3_param_persistence_threshold"] = 0
    (tmp_path / "ds.json").write_text(json.dumps(ds))
    cfg["deepspeed_config"]["deepspeed_config_file"] = str(tmp_path / "ds.json")
    path = tmp_path / "accelerate.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def _untied_init_config() -> str:
    spec = yaml.safe_load(PRESET.read_text())["model"]["init_config"]
    spec["tie_word_embeddings"] = False
    return yaml.safe_dump(spec, default_flow_style=True).strip()


def _args(out, iterations, tied):
    args = ["--config", str(PRESET), "--output_dir", str(out), "--train.iterations", str(iterations)] + COMMON
    if not tied:
        args += ["--model.init_config", _untied_init_config()]
    return args


def _single(out, *, iterations, tied, extra=(), **env):
    cmd = [sys.executable, str(SCRIPT)] + _args(out, iterations, tied) + list(extra)
    proc = subprocess.run(cmd, cwd=ROOT, env=_env(**env), capture_output=True, text=True, timeout=280)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]


def _zero3(tmp_path, out, *, iterations, tied, extra=(), **env):
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(_accelerate_config(tmp_path)),
           "--num_processes", "2", "--main_process_port", str(_free_port()), str(SCRIPT)]
    cmd += _args(out, iterations, tied) + ["--train.per_device_batch_size", str(BATCH // 2)] + list(extra)
    return subprocess.run(cmd, cwd=ROOT, env=_env(**env), capture_output=True, text=True, timeout=800)


def _assert_same_run(z_out, single_out, iterations, tied, skipped=()):
    steps, ref_steps = _metrics(z_out, "train"), _metrics(single_out, "train")
    assert [r["step"] for r in steps] == [r["step"] for r in ref_steps] == list(range(1, iterations * STEPS + 1))
    for a, b in zip(steps, ref_steps):
        assert a["skipped"] == b["skipped"] == (a["step"] in skipped), a["step"]
        assert a["lr"] == b["lr"]
        if a["skipped"]:
            continue
        assert abs(a["loss"] - b["loss"]) <= TOL, (a["step"], a["loss"], b["loss"])
        assert a["grad_norm"] == pytest.approx(b["grad_norm"], rel=TOL), a["step"]
        assert a["real/ess"] == pytest.approx(b["real/ess"], rel=TOL)
    for t in range(iterations):
        for split in ("train", "heldout"):
            rows = _generated(z_out, t, split)
            assert [r["prompt_id"] for r in rows] == list(range(N_TRAIN if split == "train" else N_EVAL))
            assert rows == _generated(single_out, t, split), (t, split)  # the same responses were sampled
        w, ref_w = _weights(z_out, t), _weights(single_out, t)
        if tied:  # the gathered state dict may list the tied head; it is the embedding
            head = w.pop("lm_head.weight", None)
            assert head is None or torch.equal(head, w["model.embed_tokens.weight"])
        assert sorted(w) == sorted(ref_w)
        for k in ref_w:
            torch.testing.assert_close(w[k], ref_w[k], rtol=0, atol=TOL, msg=f"iteration {t} {k}")
    evals, ref_evals = _metrics(z_out, "eval"), _metrics(single_out, "eval")
    assert [r["iteration"] for r in evals] == [r["iteration"] for r in ref_evals]
    for a, b in zip(evals, ref_evals):
        assert a["nll"] == pytest.approx(b["nll"], rel=TOL)


def test_zero3_tied_killed_and_resumed_matches_one_process(tmp_path):
    single = tmp_path / "single"
    _single(single, iterations=1, tied=True)
    out = tmp_path / "zero3"
    # SIGKILL at global step 3: the checkpoint of step 2 holds DeepSpeed's partitioned states.
    proc = _zero3(tmp_path, out, iterations=1, tied=True, IRIS_SELFPLAY_KILL_AT="train:3")
    assert proc.returncode != 0 and "Signal 9 (SIGKILL)" in proc.stdout + proc.stderr, proc.stderr[-3000:]
    ckpt = out / "iter_0" / "checkpoint"
    # DeepSpeed really ran ZeRO-3: one partition of the optimizer state per process.
    parts = sorted(p.name for p in ckpt.rglob("*optim_states.pt"))
    assert len(parts) == 2 and all("zero_pp_rank_" in p for p in parts), parts
    proc = _zero3(tmp_path, out, iterations=1, tied=True)
    log = proc.stdout + proc.stderr
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    assert "DeepSpeed ZeRO-3: gradient clipping is the DeepSpeed config's gradient_clipping (1.0)" in log
    assert "resuming training at step 2/4" in log
    assert "2 process(es), global batch 8" in log
    _assert_same_run(out, single, 1, tied=True)


def test_zero3_untied_two_iterations_with_a_nan_step_match_one_process(tmp_path):
    # With lm-eval on each saved model (train/lm_eval_support.py: its own process, outside the
    # run's process group), when installed: the same scores as the one-process run's.
    lm_eval = ["--eval.lm_eval.tasks", "[iris_heldout_mc]", "--eval.lm_eval.limit", "8"] \
        if importlib.util.find_spec("lm_eval") else []
    single = tmp_path / "single"
    _single(single, iterations=2, tied=False, IRIS_SELFPLAY_NAN_STEPS="6", extra=lm_eval)
    assert "lm_head.weight" in _weights(single, 0)  # really untied
    out = tmp_path / "zero3"
    proc = _zero3(tmp_path, out, iterations=2, tied=False, IRIS_SELFPLAY_NAN_STEPS="6", extra=lm_eval)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    if lm_eval:
        for t in (0, 1):
            key = "lm_eval/iris_heldout_mc/acc_norm"
            assert _metrics(out, "eval")[-2 + t][key] == _metrics(single, "eval")[-2 + t][key]
    assert "DeepSpeed ZeRO-3: gradient clipping" in proc.stdout + proc.stderr  # DeepSpeed ran, not plain DDP
    _assert_same_run(out, single, 2, tied=False, skipped=(6,))
