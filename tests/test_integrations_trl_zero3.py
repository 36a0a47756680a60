"""SelfPlayTrainer (iris_kernels.integrations.trl) under DeepSpeed ZeRO-3 on 2 CPU processes: one
SGD step equals one process on the whole batch (worker: tests/trl_zero3_worker.py, which shows the
launch recipe TRL needs on a machine without CUDA)."""
import importlib.util
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from selfplay_env import selfplay_env as _env  # noqa: E402

pytestmark = [pytest.mark.distributed, pytest.mark.timeout(900),
              pytest.mark.skipif(importlib.util.find_spec("deepspeed") is None or importlib.util.find_spec("trl") is None,
                                 reason="needs deepspeed and trl (pip install -e '.[deepspeed,trl]')")]


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_selfplay_trainer_under_zero3_equals_one_process(tmp_path):
    import test_integrations_trl as T

    tok = T._tokenizer()
    want, single = T._step_delta(tmp_path / "single", tok, precompute=True, per_device=4, accumulation=1)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(_free_port()),
           str(ROOT / "tests" / "trl_zero3_worker.py"), str(tmp_path)]
    proc = subprocess.run(cmd, cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=800)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    got = torch.load(tmp_path / "zero3.pt", weights_only=False)
    assert got["partitioned"]  # the head was a ZeRO-3 partition, not a whole copy per process
    assert sorted(got["delta"]) == sorted(want)
    assert want["lm_head.weight"].abs().max() > 0 and want["model.norm.weight"].abs().max() > 0  # the step moved θ
    for n in want:
        torch.testing.assert_close(got["delta"][n], want[n], rtol=1e-4, atol=1e-6,
                                   msg=lambda m, n=n: f"{n}: {m}")
    ref = single.state.log_history[0]
    for key in ("loss", "iris/real/ess", "iris/syn/ess"):
        assert got["log"][key] == pytest.approx(ref[key], rel=1e-5, abs=1e-6), key
