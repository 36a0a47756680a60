"""Does self-play move a model toward p_data? A miniature with exact likelihood, through the harness.

    python train/experiments/known_distribution.py                 # the full protocol (resumable)
    python train/experiments/known_distribution.py --quick         # 1 seed, 2 iterations, 3 methods (CI)

The language is ``train/experiments/language.py`` (a prompt-selected mixture of order-1/order-2
Markov chains with exact log p_data). Every model is trained by ``train/selfplay.py`` (called
in-process through its ``main``, preset ``train/configs/known-distribution.yaml``); this file only
writes the data, decides what to run, and measures the saved models:

* θ_0 = SFT on n annotated rows from a random init, stopped on a validation split: the harness runs
  one SFT "iteration" (``sft_epochs_per_iter`` epochs) at a time and the run stops when the
  validation NLL has not improved for ``patience`` iterations; θ_0 is the best iteration's model.
* from θ_0, T iterations of each method on the same n rows: IRIS adaptive α, IRIS fixed α ∈
  {0.5, 1, 2}, SPIN (β 0.1), SPACE, χ² (β 1), SFT continued (same steps); and SFT on 8n rows from
  the same random init (validation-stopped like θ_0), plus SFT at 2n for the data-size curve.
* the learning rate of every method is chosen once, on a separate tuning seed, by the validation
  NLL after the tuning iterations, then frozen for every seed.
* measures of every saved model (cached beside it in ``measure.json``): the forward KL(p_data ‖ p_θ)
  on fresh p_data samples (mean of log p_data − log p_θ, with its standard error), the reverse KL
  from model samples (over samples p_data can produce; the fraction it cannot is reported), the
  per-token test NLL, and from the harness the validation NLL and the ESS of each IRIS term.
* the fixed-point check: IRIS iterations started from the best model we can afford (SFT on 8n).

Outputs (``--results``): ``known_distribution.json`` (every number), ``kl_vs_iteration.png``,
``ess_vs_alpha.png``, ``kl_vs_data_size.png``, ``table.md``. Work goes to ``--out`` and is resumed
from there: a finished harness run, early-stopping step or measurement is never redone.
"""
from __future__ import annotations

import argparse
import contextlib
import io
import json
import math
import os
import sys
import time
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import numpy as np
import torch

from train.experiments.language import Language, LanguageSpec, build_tokenizer, make_rows, parse_response, \
    write_jsonl

ROOT = Path(__file__).resolve().parents[2]
PRESET = ROOT / "train" / "configs" / "known-distribution.yaml"

METHODS = {  # name -> harness overrides (besides the learning rate)
    "iris_adaptive": {"loss.name": "iris", "loss.alpha_schedule": "temperature_score"},
    "iris_a0.5": {"loss.name": "iris", "loss.alpha_schedule": "constant", "loss.alpha": 0.5},
    "iris_a1": {"loss.name": "iris", "loss.alpha_schedule": "constant", "loss.alpha": 1.0},
    "iris_a2": {"loss.name": "iris", "loss.alpha_schedule": "constant", "loss.alpha": 2.0},
    "spin": {"loss.name": "spin", "loss.beta": 0.1},
    "space": {"loss.name": "space", "loss.beta": 1.0},
    "chi2": {"loss.name": "chi2_logratio", "loss.beta": 1.0},  # the χ² form this miniature ran (now chi2_logratio)
    # SFT ignores the synthetic responses: one sampled token keeps the harness's phase a cheap.
    "sft_cont": {"loss.name": "sft", "generation.max_new_tokens": 1},
}
QUICK_METHODS = ["iris_adaptive", "spin", "sft_cont"]

FULL = dict(seeds=5, iterations=4, n=128, n_val=96, n_test=1000, n_rev=300, sizes=[2, 8],
            sft_epochs_per_iter=2, sft_max_iters=15, patience=2, lr_grid=[1e-4, 3e-4, 1e-3], tune_iterations=2,
            methods=list(METHODS), fixed_point=True)
QUICK = dict(seeds=1, iterations=2, n=64, n_val=32, n_test=200, n_rev=64, sizes=[],
             sft_epochs_per_iter=2, sft_max_iters=3, patience=1, lr_grid=[], tune_iterations=0,
             methods=QUICK_METHODS, fixed_point=False)
DEFAULT_LR = 3e-4
SFT_LR = 3e-3  # θ_0 and the SFT-from-init runs (AdamW); 3e-3 and 1e-2 reached the same validation NLL
TUNE_SEED = 100

# 97.5 % quantiles of Student's t (df = 1..30); no scipy in the pinned environment.
_T975 = [12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228, 2.201, 2.179, 2.160, 2.145,
         2.131, 2.120, 2.110, 2.101, 2.093, 2.086, 2.080, 2.074, 2.069, 2.064, 2.060, 2.056, 2.052, 2.048,
         2.045, 2.042]


def mean_ci(values):
    """(mean, half-width of the 95 % t interval, n); the half-width is None for fewer than 2 values."""
    v = np.asarray([x for x in values if x is not None and np.isfinite(x)], dtype=np.float64)
    if len(v) == 0:
        return None, None, 0
    if len(v) == 1:
        return float(v[0]), None, 1
    t = _T975[len(v) - 2] if len(v) - 1 <= len(_T975) else 1.96
    return float(v.mean()), float(t * v.std(ddof=1) / math.sqrt(len(v))), len(v)


def kls(its) -> str:
    return " ".join(f"{x['forward_kl']:.3f}" for x in its)


def log(msg: str) -> None:
    print(f"[kd {time.strftime('%H:%M:%S')}] {msg}", flush=True)


# ----------------------------------------------------------------------------- harness runs


def run_harness(out_dir: Path, overrides: dict, *, quiet: bool = True) -> None:
    """train/selfplay.py main() with the preset and --key value overrides (in-process: one import)."""
    from train import selfplay

    argv = ["--config", str(PRESET), "--output_dir", str(out_dir)]
    for k, v in overrides.items():
        argv += [f"--{k}", json.dumps(v) if not isinstance(v, str) else v]
    sink = io.StringIO()
    with contextlib.redirect_stderr(sink) if quiet else contextlib.nullcontext():
        try:
            selfplay.main(argv)
        except BaseException:
            sys.stderr.write(sink.getvalue()[-4000:])
            raise
    (out_dir / "harness.log").write_text(sink.getvalue()[-20000:]) if quiet else None


def read_eval(run_dir: Path, t: int) -> dict:
    p = run_dir / ("eval_initial.json" if t < 0 else f"iter_{t}/eval.json")
    return json.loads(p.read_text()) if p.exists() else {}


def train_ess(run_dir: Path) -> dict:
    """Per iteration, the mean over logged steps of every ESS metric the loss reported."""
    p = run_dir / "metrics.jsonl"
    out = {}
    if not p.exists():
        return out
    for line in p.read_text().splitlines():
        r = json.loads(line)
        if r.get("kind") != "train":
            continue
        for k, v in r.items():
            if "ess" in k and isinstance(v, (int, float)):
                out.setdefault(r["iteration"], {}).setdefault(k, []).append(v)
    return {t: {k: float(np.mean(v)) for k, v in d.items()} for t, d in out.items()}


def sft_early_stopped(run_dir: Path, base: dict, cfg: dict) -> dict:
    """SFT from a random init, one harness iteration at a time, stopped on the validation NLL."""
    done = run_dir / "early_stop.json"
    if done.exists():
        return json.loads(done.read_text())
    overrides = {**base, "loss.name": "sft", "generation.max_new_tokens": 1, "train.epochs": cfg["sft_epochs_per_iter"],
                 "optim.lr": SFT_LR}
    history = []
    best = None
    for it in range(1, cfg["sft_max_iters"] + 1):
        run_harness(run_dir, {**overrides, "train.iterations": it})
        nll = read_eval(run_dir, it - 1)["nll"]
        history.append(nll)
        if best is None or nll < history[best]:
            best = it - 1
        if it - 1 - best >= cfg["patience"]:
            break
    result = {"best_iteration": best, "val_nll": history, "model": str(run_dir / f"iter_{best}" / "model"),
              "epochs": (best + 1) * cfg["sft_epochs_per_iter"]}
    done.write_text(json.dumps(result))
    return result


# ----------------------------------------------------------------------------- measures


class Measurer:
    """Forward / reverse KL and test NLL of a saved model against the exact p_data."""

    def __init__(self, lang: Language, tokenizer, test_rows, rev_prompts, seed: int):
        from train.data import build_examples, stop_token_ids

        self.lang, self.tok, self.seed = lang, tokenizer, seed
        self.stop_ids = stop_token_ids(tokenizer)
        render = dict(messages_field="messages", answer_field="answer", max_prompt_length=8, max_length=40)
        self.test_rows = test_rows
        self.test_ex = build_examples(test_rows, tokenizer, self.stop_ids, name="test", **render)
        self.rev_prompts = rev_prompts
        rev_rows = [{"messages": [m, {"role": "assistant", "content": "w0"}]} for m in
                    ({"role": "user", "content": " ".join(f"q{v}" for v in x)} for x in rev_prompts)]
        self.rev_ex = build_examples(rev_rows, tokenizer, self.stop_ids, name="rev", **render)
        self.logp_data_test = np.array([r["logp_data"] for r in test_rows])
        self.test_tokens = sum(len(e.response_ids) for e in self.test_ex)

    @torch.no_grad()
    def _score(self, seq_model, examples, responses):
        from train.data import pair_batch

        out = []
        for s in range(0, len(examples), 256):
            exs, resp = examples[s:s + 256], responses[s:s + 256]
            b = pair_batch(exs, resp, self.tok.pad_token_id, 40)
            out.append(seq_model(**b).double()[len(exs):])
        return torch.cat(out).numpy()

    def __call__(self, model_dir: Path) -> dict:
        cache = Path(model_dir) / "measure.json"
        if cache.exists():
            return json.loads(cache.read_text())
        from transformers import AutoModelForCausalLM

        from train.generation import generate_responses
        from train.modeling import SequenceLogprobs

        model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32,
                                                     attn_implementation="sdpa").eval()
        seq = SequenceLogprobs(model)
        lp_model = self._score(seq, self.test_ex, [e.response_ids for e in self.test_ex])
        d = self.logp_data_test - lp_model
        fwd, fwd_se = float(d.mean()), float(d.std(ddof=1) / math.sqrt(len(d)))
        rows = []
        for s in range(0, len(self.rev_ex), 128):
            rows += generate_responses(model, self.tok, self.rev_ex[s:s + 128], stop_ids=self.stop_ids,
                                       max_new_tokens=self.lang.spec.max_len + 1, do_sample=True,
                                       seed=self.seed * 1000003 + s)
        lp_syn = self._score(seq, self.rev_ex, [r["response_ids"] for r in rows])
        diffs, invalid = [], 0
        for x, r, lq in zip(self.rev_prompts, rows, lp_syn):
            words, ok = parse_response(self.tok.convert_ids_to_tokens(r["response_ids"][:-1]))
            lpd = self.lang.logp(x, words) if (ok and r["finished"]) else -math.inf
            if math.isfinite(lpd):
                diffs.append(lq - lpd)
            else:
                invalid += 1
        diffs = np.array(diffs)
        result = {
            "forward_kl": fwd, "forward_kl_se": fwd_se,
            "reverse_kl_valid": float(diffs.mean()) if len(diffs) else None,
            "reverse_kl_valid_se": float(diffs.std(ddof=1) / math.sqrt(len(diffs))) if len(diffs) > 1 else None,
            "reverse_invalid_frac": invalid / len(rows),
            "test_nll_per_token": float(-lp_model.sum() / self.test_tokens),
            "mean_sample_len": float(np.mean([len(r["response_ids"]) for r in rows])),
        }
        cache.write_text(json.dumps(result))
        return result


def mc_check(n_samples: int = 40000, seed: int = 7) -> dict:
    """Exact log p_data against Monte-Carlo frequencies, on a language small enough to enumerate
    (3 words, lengths 1..3: 39 responses per prompt), built by the same class with the same code.
    Returns the total probability (must be 1), the largest |frequency − p| and its MC standard error."""
    import itertools

    lang = Language(LanguageSpec(vocab=3, prompt_symbols=2, prompt_len=2, components=3, min_len=1, max_len=3,
                                 concentration=0.7, seed=seed))
    x = [1, 0]
    ys = [list(t) for L in range(1, 4) for t in itertools.product(range(3), repeat=L)]
    p = np.array([math.exp(lang.logp(x, y)) for y in ys])
    rng = np.random.default_rng(seed)
    index = {tuple(y): i for i, y in enumerate(ys)}
    counts = np.zeros(len(ys))
    for _ in range(n_samples):
        counts[index[tuple(lang.sample(x, rng))]] += 1
    freq = counts / n_samples
    se = np.sqrt(p * (1 - p) / n_samples)
    return {"total_probability": float(p.sum()), "max_abs_err": float(np.abs(freq - p).max()),
            "max_z": float((np.abs(freq - p) / np.maximum(se, 1e-12)).max()), "n_samples": n_samples,
            "support": len(ys)}


# ----------------------------------------------------------------------------- the protocol


def seed_data(lang, out: Path, seed: int, cfg: dict) -> dict:
    """Annotated rows (the first n of the 8n, so SFT on 8n sees the same n), validation, test, prompts."""
    d = out / "data"
    big = max([1] + cfg["sizes"])
    paths = {"val": d / "val.jsonl", "test": d / "test.jsonl", **{f"n{m}": d / f"train_{m}n.jsonl" for m in [1] + cfg["sizes"]}}
    if not all(p.exists() for p in paths.values()):
        rng = np.random.default_rng([seed, 1])
        rows = make_rows(lang, big * cfg["n"], rng, "train")
        for m in [1] + cfg["sizes"]:
            write_jsonl(paths[f"n{m}"], rows[: m * cfg["n"]])
        write_jsonl(paths["val"], make_rows(lang, cfg["n_val"], np.random.default_rng([seed, 2]), "val"))
        write_jsonl(paths["test"], make_rows(lang, cfg["n_test"], np.random.default_rng([seed, 3]), "test"))
    return {k: str(v) for k, v in paths.items()}


def run_methods(lang, tok, out: Path, seed: int, cfg: dict, lrs: dict, methods, results: dict,
                iterations: int, save) -> None:
    from train.io_utils import read_jsonl

    sd = out / f"seed_{seed}"
    data = seed_data(lang, sd, seed, cfg)
    test_rows = read_jsonl(data["test"])
    rev_prompts = lang.sample_prompts(cfg["n_rev"], np.random.default_rng([seed, 4]))
    measure = Measurer(lang, tok, test_rows, rev_prompts, seed)
    base = {"seed": seed, "model.tokenizer": str(out / "tokenizer"), "data.eval": data["val"]}
    R = results.setdefault("seeds", {}).setdefault(str(seed), {})

    def from_theta0(name, theta0, train_path, extra, n_iter):
        run_dir = sd / name
        run_harness(run_dir, {**base, **extra, "data.train": train_path, "model.name_or_path": theta0,
                              "model.init_config": None, "train.iterations": n_iter})
        per_iter = []
        ess = train_ess(run_dir)
        for t in range(n_iter):
            ev = read_eval(run_dir, t)
            m = measure(run_dir / f"iter_{t}" / "model")
            per_iter.append({**m, "val_nll": ev.get("nll"), "alpha": ev.get("alpha"),
                             "ess_real_frac": ev.get("ess_real_frac"), "ess_syn_frac": ev.get("ess_syn_frac"),
                             "win_rate": ev.get("win_rate"), "reward_margin": ev.get("reward_margin"),
                             "train_ess": ess.get(t, {})})
        return per_iter

    # θ_0
    t0 = time.time()
    sft = sft_early_stopped(sd / "sft_1n", {**base, "data.train": data["n1"]}, cfg)
    theta0 = sft["model"]
    m0 = {**measure(Path(theta0)), "val_nll": sft["val_nll"][sft["best_iteration"]]}
    R["theta0"] = {**m0, "sft": sft}
    log(f"seed {seed}: θ_0 after {sft['epochs']} epochs, forward KL {m0['forward_kl']:.3f} ({time.time() - t0:.0f}s)")
    save()
    for name in methods:
        if name in R.get("methods", {}) and len(R["methods"][name]) == iterations:
            continue
        t0 = time.time()
        its = from_theta0(name, theta0, data["n1"], {**METHODS[name], "optim.lr": lrs.get(name, DEFAULT_LR)},
                          iterations)
        R.setdefault("methods", {})[name] = its
        log(f"seed {seed}: {name}: forward KL {kls(its)} "
            f"({time.time() - t0:.0f}s)")
        save()
    # SFT on m·n from the same random init, validation-stopped: the data-size curve and claim 3.
    for m in cfg["sizes"]:
        key = f"sft_{m}n"
        if key in R.get("sft_sizes", {}):
            continue
        t0 = time.time()
        s = sft_early_stopped(sd / key, {**base, "data.train": data[f"n{m}"]}, cfg)
        R.setdefault("sft_sizes", {})[key] = {**measure(Path(s["model"])), "sft": s}
        log(f"seed {seed}: SFT on {m}n: forward KL {R['sft_sizes'][key]['forward_kl']:.3f} ({time.time() - t0:.0f}s)")
        save()
    # Fixed point: IRIS (adaptive) iterations, on the same n rows, from the closest model to p_data
    # we have (SFT on 8n): does self-play move a model that is already better than its data away?
    if cfg["fixed_point"] and cfg["sizes"] and "fixed_point" not in R:
        big = max(cfg["sizes"])
        start = R["sft_sizes"][f"sft_{big}n"]["sft"]["model"]
        its = from_theta0("fixed_point", start, data["n1"],
                          {**METHODS["iris_adaptive"], "optim.lr": lrs.get("iris_adaptive", DEFAULT_LR)}, iterations)
        R["fixed_point"] = {"start": R["sft_sizes"][f"sft_{big}n"], "iterations": its}
        log(f"seed {seed}: fixed point from SFT-{big}n: {kls(its)}")
        save()


def tune(lang, tok, out: Path, cfg: dict, methods, results: dict, save) -> dict:
    """Per method, the learning rate of cfg['lr_grid'] with the lowest validation NLL after
    cfg['tune_iterations'] iterations on the tuning seed (its own data; never the test measure)."""
    T = results.setdefault("tuning", {"seed": TUNE_SEED, "grid": cfg["lr_grid"], "val_nll": {}, "chosen": {}})
    if not cfg["lr_grid"]:
        return {}
    sd = out / "tune"
    data = seed_data(lang, sd, TUNE_SEED, {**cfg, "sizes": []})
    base = {"seed": TUNE_SEED, "model.tokenizer": str(out / "tokenizer"), "data.eval": data["val"]}
    theta0 = sft_early_stopped(sd / "sft_1n", {**base, "data.train": data["n1"]}, cfg)["model"]
    for name in methods:
        if name in T["chosen"]:
            continue
        scores = {}
        for lr in cfg["lr_grid"]:
            run_dir = sd / f"{name}_lr{lr:g}"
            run_harness(run_dir, {**base, **METHODS[name], "data.train": data["n1"], "model.name_or_path": theta0,
                                  "model.init_config": None, "train.iterations": cfg["tune_iterations"],
                                  "optim.lr": lr})
            scores[f"{lr:g}"] = read_eval(run_dir, cfg["tune_iterations"] - 1)["nll"]
        T["val_nll"][name] = scores
        T["chosen"][name] = float(min(scores, key=scores.get))
        log(f"tune {name}: {scores} -> lr {T['chosen'][name]:g}")
        save()
    return T["chosen"]


def measure_tuning(lang, tok, out: Path, cfg: dict) -> None:
    """Forward / reverse KL of every tuning model (tuning seed's own test set): how each method
    moves at each learning rate, a sensitivity check beside the frozen choice."""
    from train.io_utils import read_jsonl

    sd = out / "tune"
    measure = Measurer(lang, tok, read_jsonl(sd / "data" / "test.jsonl"),
                       lang.sample_prompts(cfg["n_rev"], np.random.default_rng([TUNE_SEED, 4])), TUNE_SEED)
    res = {"theta0": measure(Path(json.loads((sd / "sft_1n" / "early_stop.json").read_text())["model"]))}
    for name in cfg["methods"]:
        for lr in cfg["lr_grid"]:
            run_dir = sd / f"{name}_lr{lr:g}"
            its = [{**measure(run_dir / f"iter_{t}" / "model"),
                    **{k: read_eval(run_dir, t).get(k) for k in ("nll", "alpha", "ess_real_frac", "ess_syn_frac")}}
                   for t in range(cfg["tune_iterations"]) if (run_dir / f"iter_{t}" / "DONE").exists()]
            res.setdefault(name, {})[f"{lr:g}"] = its
        log(f"tuning measures {name}: " + ", ".join(f"lr {k}: {kls(v)}" for k, v in res[name].items()))
    (out / "tuning_measures.json").write_text(json.dumps(res, indent=1))


# ----------------------------------------------------------------------------- summary


def summarize(results: dict, cfg: dict) -> dict:
    seeds = results.get("seeds", {})
    T = cfg["iterations"]
    summary = {"methods": {}, "paired_final_forward_kl_vs_iris_adaptive": {}, "data_size": {}, "fixed_point": {}}
    for name in cfg["methods"]:
        runs = [s for s in seeds.values() if len(s.get("methods", {}).get(name, [])) == T]
        rows = []
        for t in range(T + 1):
            pick = (lambda s: s["theta0"]) if t == 0 else (lambda s, t=t: s["methods"][name][t - 1])
            row = {"iteration": t}
            for key in ("forward_kl", "reverse_kl_valid", "reverse_invalid_frac", "test_nll_per_token", "val_nll",
                        "ess_real_frac", "ess_syn_frac", "alpha"):
                mu, hw, n = mean_ci([pick(s).get(key) for s in runs])
                row[key] = mu
                row[key + "_ci95"] = hw
                row["n_seeds"] = len(runs)
            rows.append(row)
        summary["methods"][name] = rows
    summary["paired_change_from_theta0"] = {}
    for name in cfg["methods"]:
        per_t = []
        for t in range(T):
            d = [s["methods"][name][t]["forward_kl"] - s["theta0"]["forward_kl"] for s in seeds.values()
                 if len(s.get("methods", {}).get(name, [])) == T]
            mu, hw, n = mean_ci(d)
            per_t.append({"iteration": t + 1, "mean": mu, "ci95": hw, "n_seeds": n})
        summary["paired_change_from_theta0"][name] = per_t
        d = [s["methods"][name][-1]["reverse_kl_valid"] - s["theta0"]["reverse_kl_valid"] for s in seeds.values()
             if len(s.get("methods", {}).get(name, [])) == T]
        mu, hw, n = mean_ci(d)
        summary.setdefault("paired_reverse_change_from_theta0", {})[name] = {"mean": mu, "ci95": hw, "n_seeds": n}
    ref = "iris_adaptive"
    for name in cfg["methods"] + [f"sft_{m}n" for m in cfg["sizes"]]:
        if name == ref:
            continue
        diffs = []
        for s in seeds.values():
            a = s.get("methods", {}).get(ref, [])
            if len(a) != T:
                continue
            if name.startswith("sft_") and name.endswith("n") and name in s.get("sft_sizes", {}):
                b = s["sft_sizes"][name]["forward_kl"]
            elif len(s.get("methods", {}).get(name, [])) == T:
                b = s["methods"][name][-1]["forward_kl"]
            else:
                continue
            diffs.append(a[-1]["forward_kl"] - b)
        mu, hw, n = mean_ci(diffs)
        summary["paired_final_forward_kl_vs_iris_adaptive"][name] = {"iris_minus_other": mu, "ci95": hw, "n_seeds": n}
    for m in [1] + cfg["sizes"]:
        sft_vals = [s["theta0"]["forward_kl"] if m == 1 else s.get("sft_sizes", {}).get(f"sft_{m}n", {}).get("forward_kl")
                    for s in seeds.values() if "theta0" in s]
        mu, hw, n = mean_ci(sft_vals)
        summary["data_size"][f"sft_{m}n"] = {"forward_kl": mu, "ci95": hw, "n_seeds": n}
    iris = [s["methods"][ref][-1]["forward_kl"] for s in seeds.values() if len(s.get("methods", {}).get(ref, [])) == T]
    mu, hw, n = mean_ci(iris)
    summary["data_size"]["iris_adaptive_1n"] = {"forward_kl": mu, "ci95": hw, "n_seeds": n}
    fp = [s["fixed_point"] for s in seeds.values() if "fixed_point" in s]
    if fp:
        start = [f["start"]["forward_kl"] for f in fp]
        summary["fixed_point"] = {
            "start_forward_kl": mean_ci(start)[:2],
            "per_iteration_change": [mean_ci([f["iterations"][t]["forward_kl"] - f["start"]["forward_kl"] for f in fp])[:2]
                                     for t in range(T)],
            "start_forward_kl_se": float(np.mean([f["start"]["forward_kl_se"] for f in fp])),
            "n_seeds": len(fp)}
    return summary


def plots(results: dict, summary: dict, cfg: dict, res_dir: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker

    fig, ax = plt.subplots(1, 3, figsize=(17, 4.5))
    for k, (name, per_t) in enumerate(summary.get("paired_change_from_theta0", {}).items()):
        pts = [(0, 0.0, 0.0)] + [(r["iteration"], r["mean"], r["ci95"] or 0) for r in per_t if r["mean"] is not None]
        if len(pts) > 1:  # a small horizontal offset per method keeps the intervals apart
            ax[2].errorbar([x + 0.03 * (k - 3.5) for x, _, _ in pts], [y for _, y, _ in pts], yerr=[e for _, _, e in pts],
                           marker="o", capsize=3, label=name)
    ax[2].axhline(0, c="k", lw=0.8)
    ax[2].set(xlabel="self-play iteration", ylabel="KL(θ_t) − KL(θ_0), paired per seed [nats]",
              title="forward KL change from θ_0 (same test rows), 95 % CI")
    for name, rows in summary["methods"].items():
        if not rows or rows[0]["n_seeds"] == 0:
            continue
        for a, key in zip(ax, ("forward_kl", "reverse_kl_valid")):
            x = [r["iteration"] for r in rows]
            y = [r[key] for r in rows]
            e = [r[key + "_ci95"] or 0 for r in rows]
            a.errorbar(x, y, yerr=e, marker="o", capsize=3, label=name)
    for m, r in summary["data_size"].items():
        if m == f"sft_{max([1] + cfg['sizes'])}n" and r["forward_kl"] is not None and m != "sft_1n":
            ax[0].axhline(r["forward_kl"], ls="--", c="k", lw=1, label=f"{m.replace('_', ' on ')} (from init)")
    n = max((r[0]["n_seeds"] for r in summary["methods"].values() if r), default=0)
    ax[0].set(xlabel="self-play iteration (0 = θ_0, SFT on n)", ylabel="KL(p_data ‖ p_θ) [nats / response]",
              title=f"forward KL, mean ± 95 % CI over {n} seeds")
    ax[1].set(xlabel="self-play iteration", ylabel="KL(p_θ ‖ p_data) over valid samples [nats]",
              title="reverse KL from model samples")
    ax[0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(res_dir / "kl_vs_iteration.png", dpi=110)
    plt.close(fig)

    # ESS vs α: the main runs (frozen learning rate, every seed) and, when measured, the tuning
    # runs at every learning rate of the grid (one seed, mean over its iterations), where the
    # larger steps make the weights visibly uneven.
    fig, ax = plt.subplots(1, 2, figsize=(11, 4.5), sharey=True)
    fixed = (("iris_a0.5", 0.5), ("iris_a1", 1.0), ("iris_a2", 2.0))
    tm = results.get("tuning", {}).get("measures", {})
    for a, (key, lab) in zip(ax, (("ess_real_frac", "real term  w ∝ exp((α−1) g)"),
                                  ("ess_syn_frac", "synthetic term  w ∝ exp(α g)"))):
        for lr in cfg["lr_grid"]:
            pts = [(alpha, np.mean([m[key] for m in tm.get(name, {}).get(f"{lr:g}", []) if m.get(key) is not None]))
                   for name, alpha in fixed if tm.get(name, {}).get(f"{lr:g}")]
            if pts:
                a.plot([p[0] for p in pts], [p[1] for p in pts], marker="s", ls="--",
                       label=f"tuning seed, lr {lr:g}")
        pts = []
        for name, alpha in fixed:
            rows = summary["methods"].get(name, [])[1:]
            vals = [s["methods"][name][t].get(key) for s in results["seeds"].values()
                    if len(s.get("methods", {}).get(name, [])) == cfg["iterations"] for t in range(cfg["iterations"])]
            mu, hw, _ = mean_ci(vals)
            if mu is not None:
                pts.append((alpha, mu, hw or 0))
        if pts:
            a.errorbar([p[0] for p in pts], [p[1] for p in pts], yerr=[p[2] for p in pts], marker="o", c="k",
                       capsize=3, label="main runs (frozen lr), all seeds × iterations")
        a.set(xlabel="α", title=lab, xscale="log")
        a.set_xticks([0.5, 1, 2], ["0.5", "1", "2"])
        a.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
    ax[0].set_ylabel("ESS / N of the IRIS weights (validation split)")
    ax[0].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(res_dir / "ess_vs_alpha.png", dpi=110)
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(6, 4.5))
    sizes = [1] + cfg["sizes"]
    pts = [(m * cfg["n"], summary["data_size"][f"sft_{m}n"]) for m in sizes]
    pts = [(x, r) for x, r in pts if r["forward_kl"] is not None]
    if pts:
        ax.errorbar([x for x, _ in pts], [r["forward_kl"] for _, r in pts], yerr=[r["ci95"] or 0 for _, r in pts],
                    marker="o", capsize=3, label="SFT (validation-stopped)")
    r = summary["data_size"]["iris_adaptive_1n"]
    if r["forward_kl"] is not None:
        ax.errorbar([cfg["n"]], [r["forward_kl"]], yerr=[r["ci95"] or 0], marker="*", ms=12, capsize=3,
                    ls="none", label=f"IRIS adaptive, {cfg['iterations']} iterations")
    ax.set_xscale("log", base=2)
    ax.set(xlabel="annotated responses", ylabel="KL(p_data ‖ p_θ) [nats / response]", title="data efficiency")
    ax.legend()
    fig.tight_layout()
    fig.savefig(res_dir / "kl_vs_data_size.png", dpi=110)
    plt.close(fig)


def fmt(mu, hw, d=3):
    if mu is None:
        return "—"
    return f"{mu:.{d}f}" + (f" ± {hw:.{d}f}" if hw is not None else "")


def table(summary: dict, cfg: dict) -> str:
    T = cfg["iterations"]
    lines = ["| method | seeds | forward KL θ_0 | forward KL θ_T | reverse KL θ_T (valid) | invalid θ_T | "
             "test NLL/token θ_T | fwd KL θ_T − θ_0 (paired) | rev KL θ_T − θ_0 (paired) | "
             "Δ fwd KL vs IRIS-adaptive (IRIS − other) |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    paired = summary["paired_final_forward_kl_vs_iris_adaptive"]
    for name, rows in summary["methods"].items():
        a, b = rows[0], rows[-1]
        p = paired.get(name, {})
        ch = summary["paired_change_from_theta0"][name][-1]
        rv = summary.get("paired_reverse_change_from_theta0", {}).get(name, {})
        lines.append(f"| {name} | {b['n_seeds']} | {fmt(a['forward_kl'], a['forward_kl_ci95'])} | "
                     f"{fmt(b['forward_kl'], b['forward_kl_ci95'])} | {fmt(b['reverse_kl_valid'], b['reverse_kl_valid_ci95'])} | "
                     f"{fmt(b['reverse_invalid_frac'], None)} | {fmt(b['test_nll_per_token'], b['test_nll_per_token_ci95'])} | "
                     f"{fmt(ch['mean'], ch['ci95'])} | {fmt(rv.get('mean'), rv.get('ci95'), 1)} | "
                     f"{fmt(p.get('iris_minus_other'), p.get('ci95'))} |")
    for m in cfg["sizes"]:
        r = summary["data_size"][f"sft_{m}n"]
        p = paired.get(f"sft_{m}n", {})
        lines.append(f"| SFT on {m}n (from init) | {r['n_seeds']} | — | {fmt(r['forward_kl'], r['ci95'])} | — | — | — | — | — | "
                     f"{fmt(p.get('iris_minus_other'), p.get('ci95'))} |")
    lines.append("")
    lines.append(f"Mean ± 95 % t-interval over seeds; θ_T after T = {T} iterations; KL in nats per response; "
                 "forward KL on fresh p_data samples, reverse KL over the model samples p_data can produce.")
    fp = summary.get("fixed_point")
    if fp:
        ch = "; ".join(f"t={t + 1}: {fmt(*c)}" for t, c in enumerate(fp["per_iteration_change"]))
        lines.append("")
        lines.append(f"Fixed-point check (IRIS adaptive from SFT on {max(cfg['sizes'])}n, {fp['n_seeds']} seeds): start "
                     f"forward KL {fmt(*fp['start_forward_kl'])} (per-seed SE ≈ {fp['start_forward_kl_se']:.3f}); "
                     f"change per iteration {ch}.")
    return "\n".join(lines) + "\n"


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="1 seed, 2 iterations, 3 methods, small data (CI)")
    ap.add_argument("--out", default=None, help="work folder (resumable); default runs/known-distribution[-quick]")
    ap.add_argument("--results", default=None,
                    help="where the JSON, PNGs and table go; default train/experiments/results (full) or OUT/results")
    ap.add_argument("--seeds", type=int, default=None, help="number of seeds (default 5; --quick 1)")
    ap.add_argument("--measure-tuning", action="store_true",
                    help="measure every model of the tuning runs (forward/reverse KL per learning rate) into "
                         "OUT/tuning_measures.json, which --report then adds to the results")
    ap.add_argument("--report", action="store_true",
                    help="only rewrite the JSON, table and plots from OUT/results.json (no training)")
    ap.add_argument("--threads", type=int, default=1,
                    help="torch threads (default 1: tiny matrices gain nothing from more, and a busy machine "
                         "makes multi-threaded ops wait for descheduled threads)")
    args = ap.parse_args(argv)
    cfg = dict(QUICK if args.quick else FULL)
    if args.seeds is not None:
        cfg["seeds"] = args.seeds
    if args.threads:
        torch.set_num_threads(args.threads)
    out = Path(args.out or ROOT / "runs" / ("known-distribution-quick" if args.quick else "known-distribution"))
    res_dir = Path(args.results) if args.results else (out / "results" if args.quick else
                                                      ROOT / "train" / "experiments" / "results")
    out.mkdir(parents=True, exist_ok=True)
    res_dir.mkdir(parents=True, exist_ok=True)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    import transformers

    transformers.logging.set_verbosity_error()

    lang = Language()
    if (out / "tokenizer" / "tokenizer.json").exists():  # never rewritten under a running invocation
        from transformers import AutoTokenizer

        tok = AutoTokenizer.from_pretrained(str(out / "tokenizer"))
    else:
        tok = build_tokenizer(lang.spec, out / "tokenizer")
    res_path = out / "results.json"
    results = json.loads(res_path.read_text()) if res_path.exists() else {}
    results.update({"config": {k: v for k, v in cfg.items()}, "language": lang.describe(),
                    "preset": str(PRESET.relative_to(ROOT)), "quick": args.quick})
    results["mc_check"] = results.get("mc_check") or mc_check(20000 if args.quick else 100000)
    log(f"Monte-Carlo check of log p_data: {results['mc_check']}")

    def save():
        results["summary"] = summarize(results, cfg)
        if args.report:  # the running invocation owns OUT/results.json
            return
        tmp = res_path.with_name("results.json.tmp")
        tmp.write_text(json.dumps(results, indent=1))
        tmp.replace(res_path)

    def publish():
        save()
        (res_dir / "known_distribution.json").write_text(json.dumps(results, indent=1))
        (res_dir / "table.md").write_text(table(results["summary"], cfg))
        plots(results, results["summary"], cfg, res_dir)

    if args.measure_tuning:
        measure_tuning(lang, tok, out, cfg)
        return
    if args.report:
        extra = out / "tuning_measures.json"
        if extra.exists():
            results.setdefault("tuning", {})["measures"] = json.loads(extra.read_text())
        publish()
        log(f"report rewritten in {res_dir}")
        return
    t_start = time.time()
    lrs = tune(lang, tok, out, cfg, cfg["methods"], results, save)
    for seed in range(cfg["seeds"]):
        run_methods(lang, tok, out, seed, cfg, lrs, cfg["methods"], results, cfg["iterations"], save)
        results["wall_seconds_this_invocation"] = time.time() - t_start
        publish()  # after every seed, so that a stopped run still leaves its finished seeds
    log(f"done in {time.time() - t_start:.0f}s; results in {res_dir}")


if __name__ == "__main__":
    main()
