"""Phase a through a separate engine process (``generation.backend: vllm``), like SPIN's scripts.

The contract (one request file in, one response file out, both JSON):

    request  {"format": "iris-generation-request/1",
              "model": folder of the saved model θ_t (safetensors + tokenizer) or a hub id,
              "dtype": "float32" | "bfloat16" | "float16" | "auto",
              "sampling": {"temperature": float (0 = greedy), "top_p": float, "top_k": int (0 = off),
                           "max_new_tokens": int, "stop_token_ids": [int, ...]},
              "engine_args": {...} (passed to the engine as they are, e.g. gpu_memory_utilization),
              "requests": [{"prompt_id": int, "prompt_token_ids": [int, ...], "seed": int}, ...]}
    response {"format": "iris-generation-response/1",
              "responses": [{"prompt_id": int, "token_ids": [int, ...]}, ...]}  (any order)

``token_ids`` are the generated tokens only, up to and including the stop token that ended the
response (any of ``stop_token_ids``, the EOS ids among them); the engine must not stop on text.
The harness cuts each response at its first stop token again and decodes it with its own code
(``train.generation.rows_from_token_ids``), so both backends make rows the same way.

Seeds: each prompt is sampled under its own seed, ``batch_seed(seed, iteration, split,
prompt_id)``: a prompt regenerated after a crash, or by another process, draws the same sample
from the same engine (the HF backend seeds per batch instead; two engines never draw the same
samples anyway).

The harness runs the engine once per shard (``generation.shard_size`` prompts of this process),
so a crash loses at most the shard in flight; request and response live in
``iter_t/engine/<split>-<first prompt id>.{request,response}.json`` and a response whose request
is unchanged is reused on a rerun. The engine command is ``generation.engine_command`` (default:
this Python running train/vllm_engine.py); vLLM can live in its own environment, e.g.
``[/opt/vllm-env/bin/python, train/vllm_engine.py]``.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Dict, List, Sequence

from .io_utils import atomic_write_json

REQUEST_FORMAT = "iris-generation-request/1"
RESPONSE_FORMAT = "iris-generation-response/1"
DEFAULT_ENGINE = [sys.executable, str(Path(__file__).resolve().parent / "vllm_engine.py")]


def build_request(examples, *, model: str, dtype: str, cfg, stop_ids: Sequence[int], seed_parts) -> dict:
    from .generation import batch_seed

    return {
        "format": REQUEST_FORMAT,
        "model": str(model),
        "dtype": dtype,
        "sampling": {"temperature": cfg.temperature, "top_p": cfg.top_p, "top_k": cfg.top_k,
                     "max_new_tokens": cfg.max_new_tokens, "stop_token_ids": [int(t) for t in stop_ids]},
        "engine_args": dict(cfg.engine_args),
        "requests": [{"prompt_id": ex.prompt_id, "prompt_token_ids": [int(t) for t in ex.prompt_ids],
                      "seed": batch_seed(*seed_parts, ex.prompt_id)} for ex in examples],
    }


def read_response(path, request: dict) -> Dict[int, List[int]]:
    """prompt_id -> token ids, checked against the request (every prompt once, ints only)."""
    data = json.loads(Path(path).read_text())
    if data.get("format") != RESPONSE_FORMAT:
        raise ValueError(f"{path}: not a {RESPONSE_FORMAT} file (format {data.get('format')!r})")
    wanted = {r["prompt_id"] for r in request["requests"]}
    out: Dict[int, List[int]] = {}
    for row in data.get("responses", []):
        pid, ids = row.get("prompt_id"), row.get("token_ids")
        if pid not in wanted or pid in out:
            raise ValueError(f"{path}: unexpected or repeated prompt_id {pid!r}")
        if not isinstance(ids, list) or not all(isinstance(t, int) and not isinstance(t, bool) for t in ids):
            raise ValueError(f"{path}: prompt_id {pid}: token_ids must be a list of ints")
        if len(ids) > request["sampling"]["max_new_tokens"]:
            raise ValueError(f"{path}: prompt_id {pid}: {len(ids)} tokens, more than max_new_tokens")
        out[pid] = ids
    if set(out) != wanted:
        raise ValueError(f"{path}: no response for prompt_id(s) {sorted(wanted - set(out))[:10]}")
    return out


def run_engine(request: dict, work_dir, name: str, command: Sequence[str], *, env_extra=None) -> Dict[int, List[int]]:
    """Write the request, run ``command + [request, response]`` unless an identical request was
    answered already, and return the checked response."""
    work_dir = Path(work_dir)
    work_dir.mkdir(parents=True, exist_ok=True)
    req_path, resp_path = work_dir / f"{name}.request.json", work_dir / f"{name}.response.json"
    if resp_path.exists() and req_path.exists() and json.loads(req_path.read_text()) == request:
        return read_response(resp_path, request)
    if resp_path.exists():
        resp_path.unlink()
    atomic_write_json(req_path, request)
    env = dict(os.environ, **(env_extra or {}))
    proc = subprocess.run(list(command) + [str(req_path), str(resp_path)], env=env, capture_output=True, text=True)
    if proc.returncode != 0 or not resp_path.exists():
        tail = (proc.stderr or proc.stdout or "")[-3000:]
        raise RuntimeError(f"generation engine {' '.join(command)} failed (status {proc.returncode}) on {req_path}:\n"
                           f"{tail}")
    return read_response(resp_path, request)


def make_engine_sampler(tokenizer, cfg, *, model: str, dtype: str, stop_ids, seed_parts, work_dir, prefix: str,
                        env_extra=None):
    """The ``process`` callback of run_sharded for ``generation.backend: vllm``."""
    from .generation import rows_from_token_ids

    command = list(cfg.engine_command) or DEFAULT_ENGINE

    def process(batch) -> List[Dict]:
        request = build_request(batch, model=model, dtype=dtype, cfg=cfg, stop_ids=stop_ids, seed_parts=seed_parts)
        answers = run_engine(request, work_dir, f"{prefix}-{batch[0].prompt_id:06d}", command, env_extra=env_extra)
        return rows_from_token_ids(batch, [answers[ex.prompt_id] for ex in batch], tokenizer, stop_ids)

    return process


def engine_model_folder(out_dir, iteration: int, model_cfg, model, tokenizer, accelerator) -> str:
    """What the engine loads as θ_t: the folder iteration t-1 saved; for θ_0 the configured
    pretrained model when it is a plain one (hub id or folder), else (random init, GGUF, separate
    tokenizer) θ_0 saved once to ``<out_dir>/model_init`` by the main process."""
    from .modeling import resolve_source, save_model

    if iteration > 0:
        return str(Path(out_dir) / f"iter_{iteration - 1}" / "model")
    if model_cfg.name_or_path and not model_cfg.gguf_file and not model_cfg.tokenizer:
        return resolve_source(model_cfg.name_or_path, "model.name_or_path")
    folder = Path(out_dir) / "model_init"
    if accelerator.is_main_process and not folder.exists():
        from .deepspeed_support import whole_model_loading

        with whole_model_loading():  # θ_0 is whole here; transformers must not treat it as ZeRO-3
            save_model(model, tokenizer, folder)
    accelerator.wait_for_everyone()
    return str(folder)


def engine_env(accelerator) -> Dict[str, str]:
    """On CUDA, the engine of process r sees only process r's GPU."""
    import torch

    if not torch.cuda.is_available() or accelerator.device.type != "cuda":
        return {}
    index = accelerator.device.index or 0
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    if visible:
        return {"CUDA_VISIBLE_DEVICES": visible.split(",")[index]}
    return {"CUDA_VISIBLE_DEVICES": str(index)}
