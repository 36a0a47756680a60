"""TEST DOUBLE of train/vllm_engine.py: honours the generation-engine contract
(train/generation_requests.py) with transformers ``generate`` instead of vLLM, so CI can test the
harness's side of ``generation.backend: vllm`` where vLLM cannot be installed. Not an engine to
use: one prompt at a time, no batching.

    python tests/fake_generation_engine.py REQUEST.json RESPONSE.json

Per prompt: seeded with the prompt's own seed, sampled (or greedy at temperature 0) up to
max_new_tokens, stopping at any of stop_token_ids, the stop token kept: what the contract asks of
a real engine. FAKE_ENGINE_LOG (optional) gets one line per run, so a test can count the runs.
"""
import json
import os
import sys
from pathlib import Path

import torch


def main(argv):
    request = json.loads(Path(argv[0]).read_text())
    assert request["format"] == "iris-generation-request/1", request.get("format")
    from transformers import AutoModelForCausalLM, GenerationConfig

    model = AutoModelForCausalLM.from_pretrained(request["model"], dtype=torch.float32).eval()
    s = request["sampling"]
    sample = s["temperature"] > 0
    gen = GenerationConfig(do_sample=sample, max_new_tokens=s["max_new_tokens"], eos_token_id=s["stop_token_ids"],
                           pad_token_id=s["stop_token_ids"][0],
                           **(dict(temperature=s["temperature"], top_p=s["top_p"], top_k=s["top_k"]) if sample else {}))
    responses = []
    for r in request["requests"]:
        torch.manual_seed(r["seed"])
        ids = torch.tensor([r["prompt_token_ids"]])
        with torch.no_grad():
            out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), generation_config=gen)
        new = out[0, ids.shape[1]:].tolist()
        for i, t in enumerate(new):  # stop at (and keep) the first stop token, as an engine does
            if t in s["stop_token_ids"]:
                new = new[: i + 1]
                break
        responses.append({"prompt_id": r["prompt_id"], "token_ids": new})
    if os.environ.get("FAKE_ENGINE_LOG"):
        with open(os.environ["FAKE_ENGINE_LOG"], "a") as f:
            f.write(f"{Path(argv[0]).name} {len(request['requests'])}\n")
    Path(argv[1]).write_text(json.dumps({"format": "iris-generation-response/1", "responses": responses}))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
