"""The vLLM engine of ``generation.backend: vllm``: ``python train/vllm_engine.py REQUEST.json RESPONSE.json``.

Reads a request (the contract: train/generation_requests.py), generates one response per prompt
with ``vllm.LLM`` on the request's model folder, and writes the response file atomically. Runs
in its own process, possibly in its own Python environment (vLLM pins its own torch), so it
imports nothing from the harness. Per prompt: ``SamplingParams(n=1, seed=<the prompt's seed>,
temperature, top_p, top_k (0 -> off), max_tokens=max_new_tokens, stop_token_ids)`` with the
tokenizer's own EOS ignored as a stop unless listed (the request lists every stop token), and
the stop token that ended a response appended when vLLM left it out of the token ids.
"""
import json
import os
import sys
from pathlib import Path


def main(argv):
    if len(argv) != 2:
        print("usage: python train/vllm_engine.py REQUEST.json RESPONSE.json", file=sys.stderr)
        return 2
    request = json.loads(Path(argv[0]).read_text())
    if request.get("format") != "iris-generation-request/1":
        print(f"{argv[0]}: not an iris-generation-request/1 file", file=sys.stderr)
        return 2
    from vllm import LLM, SamplingParams

    s = request["sampling"]
    stop = list(s["stop_token_ids"])
    llm = LLM(model=request["model"], dtype=request.get("dtype", "auto"), **request.get("engine_args", {}))
    greedy = s["temperature"] == 0
    params = [SamplingParams(n=1, seed=r["seed"], temperature=0.0 if greedy else s["temperature"],
                             top_p=1.0 if greedy else s["top_p"], top_k=(s["top_k"] or -1) if not greedy else -1,
                             max_tokens=s["max_new_tokens"], stop_token_ids=stop, ignore_eos=True,
                             skip_special_tokens=False)
              for r in request["requests"]]
    prompts = [{"prompt_token_ids": r["prompt_token_ids"]} for r in request["requests"]]
    outputs = llm.generate(prompts, params, use_tqdm=False)
    responses = []
    for r, out in zip(request["requests"], outputs):
        completion = out.outputs[0]
        ids = list(completion.token_ids)
        reason = getattr(completion, "stop_reason", None)
        if completion.finish_reason == "stop" and isinstance(reason, int) and (not ids or ids[-1] != reason):
            ids.append(reason)
        responses.append({"prompt_id": r["prompt_id"], "token_ids": ids})
    tmp = Path(argv[1]).with_name(Path(argv[1]).name + ".tmp")
    tmp.write_text(json.dumps({"format": "iris-generation-response/1", "responses": responses}))
    os.replace(tmp, argv[1])
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
