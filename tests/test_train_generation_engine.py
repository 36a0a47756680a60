"""generation.backend: vllm — the harness's side of the engine contract (train/generation_requests.py),
tested with tests/fake_generation_engine.py, a TEST DOUBLE that honours the contract with
transformers generate (vLLM cannot be installed in the pinned environment); the real engine
(train/vllm_engine.py) is tested only where vLLM is installed (opt-in, skipped otherwise)."""
import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from selfplay_env import selfplay_env as _env  # noqa: E402
from train.generation import batch_seed  # noqa: E402
from train.generation_requests import read_response, run_engine  # noqa: E402
from train.io_utils import read_jsonl  # noqa: E402

SCRIPT = ROOT / "train" / "selfplay.py"
PRESET = ROOT / "train" / "configs" / "tiny-cpu.yaml"
FAKE = ROOT / "tests" / "fake_generation_engine.py"
N_TRAIN, N_EVAL = 32, 16
FAST = ["--data.max_train_prompts", str(N_TRAIN), "--data.max_eval_prompts", str(N_EVAL), "--train.epochs", "1",
        "--train.iterations", "1", "--generation.shard_size", "16", "--generation.batch_size", "8",
        "--eval.at_start", "false", "--eval.accuracy", "false"]
ENGINE = ["--generation.backend", "vllm", "--generation.engine_command", f"[{sys.executable}, {FAKE}]"]
pytestmark = pytest.mark.timeout(600)


def _run(out, *extra, **env):
    cmd = [sys.executable, str(SCRIPT), "--config", str(PRESET), "--output_dir", str(out)] + FAST + list(extra)
    return subprocess.run(cmd, cwd=ROOT, env=_env(**env), capture_output=True, text=True, timeout=500)


def _ok(proc):
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]


def _generated(out, split):
    rows = []
    for p in sorted((Path(out) / "iter_0").glob(f"generated-{split}-*.jsonl")):
        rows += read_jsonl(p)
    return rows


def test_greedy_rows_through_the_engine_equal_the_hf_backend(tmp_path):
    _ok(_run(tmp_path / "hf", "--generation.temperature", "0"))
    _ok(_run(tmp_path / "engine", "--generation.temperature", "0", *ENGINE))
    for split in ("train", "heldout"):
        a, b = _generated(tmp_path / "hf", split), _generated(tmp_path / "engine", split)
        assert [r["prompt_id"] for r in b] == list(range(N_TRAIN if split == "train" else N_EVAL))
        assert a == b, split  # same tokens, same cut at the stop token, same decoding
    # θ_0 is random (init_config): the engine loaded it from the folder the harness saved once.
    req = json.loads((tmp_path / "engine" / "iter_0" / "engine" / "train-000000.request.json").read_text())
    assert req["model"] == str(tmp_path / "engine" / "model_init")


def test_sampled_requests_carry_the_seeds_and_stop_rules_and_resume_per_shard(tmp_path):
    log = tmp_path / "engine.log"
    full = tmp_path / "full"
    _ok(_run(full, *ENGINE, FAKE_ENGINE_LOG=str(log)))
    assert sorted(log.read_text().split("\n")[:-1]) == ["heldout-000000.request.json 16",
                                                       "train-000000.request.json 16", "train-000016.request.json 16"]
    req = json.loads((full / "iter_0" / "engine" / "train-000016.request.json").read_text())
    stop = req["sampling"]["stop_token_ids"]
    assert req["sampling"]["temperature"] == 1.0 and req["sampling"]["max_new_tokens"] == 12 and stop
    assert [r["prompt_id"] for r in req["requests"]] == list(range(16, 32))
    assert [r["seed"] for r in req["requests"]] == [batch_seed(0, 0, "train", p) for p in range(16, 32)]
    rows = _generated(full, "train")
    for r in rows:  # the contract's stop rule, applied by the harness's own code
        if r["finished"]:
            assert r["response_ids"][-1] in stop and not set(r["response_ids"][:-1]) & set(stop)
        else:
            assert len(r["response_ids"]) == 12 and not set(r["response_ids"]) & set(stop)
    assert len({tuple(r["response_ids"]) for r in rows}) > 1  # really sampled
    # SIGKILL once the first shard's rows are written: the rerun runs the engine for the other
    # shards only, and the rows equal the uninterrupted run's (per-prompt seeds).
    out = tmp_path / "killed"
    log2 = tmp_path / "engine2.log"
    proc = _run(out, *ENGINE, IRIS_SELFPLAY_KILL_AT="generate:16", FAKE_ENGINE_LOG=str(log2))
    assert proc.returncode != 0
    assert log2.read_text().split("\n")[:-1] == ["train-000000.request.json 16"]
    _ok(_run(out, *ENGINE, FAKE_ENGINE_LOG=str(log2)))
    assert log2.read_text().split("\n")[:-1] == ["train-000000.request.json 16", "train-000016.request.json 16",
                                                 "heldout-000000.request.json 16"]
    for split in ("train", "heldout"):
        assert _generated(out, split) == _generated(full, split)


def _request(n=2, max_new=4):
    return {"format": "iris-generation-request/1", "model": "m", "dtype": "float32",
            "sampling": {"temperature": 1.0, "top_p": 1.0, "top_k": 0, "max_new_tokens": max_new,
                         "stop_token_ids": [2]},
            "engine_args": {}, "requests": [{"prompt_id": i, "prompt_token_ids": [5, 6], "seed": i} for i in range(n)]}


def _response(tmp_path, responses, fmt="iris-generation-response/1"):
    path = tmp_path / "r.json"
    path.write_text(json.dumps({"format": fmt, "responses": responses}))
    return path


def test_a_response_that_breaks_the_contract_is_refused(tmp_path):
    req = _request()
    good = [{"prompt_id": 1, "token_ids": [7, 2]}, {"prompt_id": 0, "token_ids": []}]
    assert read_response(_response(tmp_path, good), req) == {0: [], 1: [7, 2]}
    bad = {
        "format": (good, "other/1"),
        "repeated prompt_id": ([good[0], good[0]], None),
        "no response for prompt_id": (good[:1], None),
        "list of ints": ([good[0], {"prompt_id": 0, "token_ids": [1.5]}], None),
        "more than max_new_tokens": ([good[0], {"prompt_id": 0, "token_ids": [1, 1, 1, 1, 1]}], None),
        "unexpected": ([good[0], good[1], {"prompt_id": 9, "token_ids": []}], None),
    }
    for match, (rows, fmt) in bad.items():
        with pytest.raises(ValueError, match=match):
            read_response(_response(tmp_path, rows, fmt or "iris-generation-response/1"), req)


def test_a_failing_engine_is_named_with_its_output(tmp_path):
    cmd = [sys.executable, "-c", "import sys; print('engine exploded', file=sys.stderr); sys.exit(3)"]
    with pytest.raises(RuntimeError, match=r"(?s)failed \(status 3\).*engine exploded"):
        run_engine(_request(), tmp_path, "x", cmd)


@pytest.mark.slow
@pytest.mark.skipif(importlib.util.find_spec("vllm") is None, reason="opt-in: vLLM is not installed here")
def test_real_vllm_greedy_equals_hf_generate(tmp_path):
    _ok(_run(tmp_path / "hf", "--generation.temperature", "0"))
    _ok(_run(tmp_path / "vllm", "--generation.temperature", "0", "--generation.backend", "vllm",
             "--generation.engine_args", "{enforce_eager: true}"))
    for split in ("train", "heldout"):
        assert _generated(tmp_path / "hf", split) == _generated(tmp_path / "vllm", split)
