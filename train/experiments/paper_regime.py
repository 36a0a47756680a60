"""The known-distribution miniature rerun in the paper's regime (issue 18 item 5).

    python train/experiments/paper_regime.py --quick                  # CI: 1 seed, 2 iterations, 2 methods
    python train/experiments/paper_regime.py                          # the full protocol (resumable)
    python train/experiments/paper_regime.py --seeds 3 --methods iris_v2,iris_a0.5,sft_cont --no-baselines

Same language (``language.py``) and model (``train/configs/known-distribution.yaml``) as
``known_distribution.py``, whose results stay as they are. What changes is the regime:

* per seed, disjoint draws from p_data: S = 8n = 1024 rows (θ_0's SFT data); R = the first n = 128
  rows of S (self-play on rows θ_0 was trained on: the paper's regime); F = 128 fresh rows;
  V = 512 validation rows (early stopping, the learning rate, and the gap-adaptive α's held-out
  split); 4000 test rows (forward KL, per row kept); 8000 further p-samples (D_½, TV); 1000
  prompts for model samples (invalid mass);
* θ_0 = SFT on S from a random init, stopped on V; an under-trained arm θ_0^½ stopped at half
  θ_0's epochs;
* from θ_0, T = 4 iterations × 2 epochs on R and on F of: IRIS v2 (gap-adaptive α), IRIS α ∈ {½, 1,
  2} (β 1), SPIN (β 0.1), SPACE (μ 1), χ² (ratio witness, β 1), SFT continued; baselines: SFT
  continued on S ∪ F, SFT from init on 9n (S ∪ F) and on 16n; the fixed point: IRIS v2 and SFT
  continued on R from SFT on 16n; the under-trained arm: IRIS v2 and SFT continued from θ_0^½;
* per method and regime, the learning rate from {3e-5, 1e-4, 3e-4, 1e-3} with the lowest V-NLL
  after 2 iterations on the tuning seed; warm-up 25 %; the harness starts a fresh AdamW every
  iteration (its design: the opponent changes, so the moments are reset);
* measures per saved model (``measure_pr.json`` beside it): forward KL on the test rows (mean,
  SE, per-row values), D_½ = −2·log E_p[√(q/p)] and TV = ½(E_p|1 − q/p| + q-mass p_data cannot
  produce) from the p-samples, the invalid mass from model samples, test NLL/token; a run's earlier
  iterations get the forward KL and test NLL only (``measure_pr_kl.json``: the p-samples and model
  samples are two thirds of a measure's cost); from the harness per iteration: V-NLL, u_t, α_t,
  ESS/N per term, mean |g| at the first step;
* primary contrasts at iteration T, paired over seeds, Holm-corrected (two-sided paired t).

Outputs in ``--results`` (default ``train/experiments/results/paper_regime/``): ``paper_regime.json``
(every number but the per-row values), ``forward_kl_rows.npz`` (per-row forward KL of the final
models the primary contrasts pair, key "seed|run"),
``table.md``, ``kl_vs_iteration.png``, ``contrasts.png``. Nothing is claimed here; the README reports what a run gave.
"""
from __future__ import annotations

import argparse
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

from train.experiments import known_distribution as kd
from train.experiments.language import Language, build_tokenizer, make_rows, parse_response, write_jsonl

ROOT = kd.ROOT
METHODS = {
    "iris_v2": {"loss.name": "iris", "loss.alpha_schedule": "gap_adaptive"},
    "iris_a0.5": {"loss.name": "iris", "loss.alpha_schedule": "constant", "loss.alpha": 0.5},
    "iris_a1": {"loss.name": "iris", "loss.alpha_schedule": "constant", "loss.alpha": 1.0},
    "iris_a2": {"loss.name": "iris", "loss.alpha_schedule": "constant", "loss.alpha": 2.0},
    "spin": {"loss.name": "spin", "loss.beta": 0.1},
    "space": {"loss.name": "space", "loss.beta": 1.0},
    "chi2": {"loss.name": "chi2", "loss.beta": 1.0},
    "sft_cont": {"loss.name": "sft", "generation.max_new_tokens": 1},
}
REGIMES = ("R", "F")
# Ablations (--ablations, on the first 3 seeds, regime R, from θ_0 unless noted): IRIS-v2 with
# β ∈ {0.1, 0.5}; generation at temperature 0.8 / top-p 0.95; SPIN with the previous iteration's
# synthetic responses mixed into the training rows (the harness's train.mix_previous_synthetic,
# as the SPIN paper trains from iteration 1 on); a capacity arm (4 layers × 128 hidden: its own
# θ_0, then IRIS-v2 and SFT-continued). Each takes the learning rate tuned for its base method.
ABLATIONS = {
    "iris_v2_beta0.1": {**METHODS["iris_v2"], "loss.beta": 0.1},
    "iris_v2_beta0.5": {**METHODS["iris_v2"], "loss.beta": 0.5},
    "iris_v2_t0.8": {**METHODS["iris_v2"], "generation.temperature": 0.8, "generation.top_p": 0.95},
    "spin_mix": {**METHODS["spin"], "train.mix_previous_synthetic": True},
}
ABLATION_BASE = {"spin_mix": "spin"}  # the method whose tuned learning rate an ablation uses; else iris_v2
CAPACITY = {"model_type": "llama", "hidden_size": 128, "intermediate_size": 256, "num_hidden_layers": 4,
            "num_attention_heads": 4, "num_key_value_heads": 2, "max_position_embeddings": 64,
            "tie_word_embeddings": True}
ABLATION_SEEDS = 3
FULL = dict(seeds=10, max_seeds=20, iterations=4, n=128, s_mult=8, n_val=512, n_test=4000, n_psamples=8000,
            n_prompts=1000, sft_epochs_per_iter=2, sft_max_iters=15, patience=2,
            lr_grid=[3e-5, 1e-4, 3e-4, 1e-3], tune_iterations=2, methods=list(METHODS), baselines=True)
QUICK = dict(seeds=1, max_seeds=1, iterations=2, n=32, s_mult=4, n_val=64, n_test=200, n_psamples=300,
             n_prompts=64, sft_epochs_per_iter=2, sft_max_iters=2, patience=1, lr_grid=[], tune_iterations=0,
             methods=["iris_v2", "sft_cont"], baselines=False)
DEFAULT_LR = 3e-4
WARMUP = 0.25
TUNE_SEED = 100
PRIMARY = [  # (label, a, b): paired difference a − b of forward KL at iteration T
    ("IRIS-v2 on F vs SFT-continued on F", "iris_v2/F", "sft_cont/F"),
    ("IRIS-v2 on R vs θ_0", "iris_v2/R", "theta0"),
    ("IRIS-v2 on R vs SFT-continued on R", "iris_v2/R", "sft_cont/R"),
    ("IRIS-v2 on R vs SFT from init on 9n", "iris_v2/R", "sft_9n"),
    ("IRIS-v2 on R vs the best fixed α on R", "iris_v2/R", "best_fixed/R"),
    ("fixed point: IRIS-v2 drift from SFT-16n on R minus SFT-continued's", "fp/iris_v2", "fp/sft_cont"),
]

# Secondary contrasts (paired over the seeds that have both, unadjusted p: descriptive, not claims).
SECONDARY = [(f"{m} − IRIS-v2 on {r}", f"{m}/{r}", f"iris_v2/{r}")
             for r in REGIMES for m in ("iris_a0.5", "iris_a1", "iris_a2", "spin", "space", "chi2")] + [
    ("SFT-continued on S ∪ F − SFT-continued on F", "sft_cont/SF", "sft_cont/F"),
    ("under-trained θ_0^½: IRIS-v2 − SFT-continued on R", "half/iris_v2/R", "half/sft_cont/R"),
    ("under-trained θ_0^½: IRIS-v2 − SFT-continued on F", "half/iris_v2/F", "half/sft_cont/F"),
    ("ablation: IRIS-v2 β 0.1 − β 1 on R", "abl/iris_v2_beta0.1/R", "iris_v2/R"),
    ("ablation: IRIS-v2 β 0.5 − β 1 on R", "abl/iris_v2_beta0.5/R", "iris_v2/R"),
    ("ablation: IRIS-v2 sampling T 0.8 / top-p 0.95 − T 1 on R", "abl/iris_v2_t0.8/R", "iris_v2/R"),
    ("ablation: SPIN with the previous synthetic data mixed in − SPIN on R", "abl/spin_mix/R", "spin/R"),
    ("ablation, capacity arm: IRIS-v2 − SFT-continued on R", "abl/capacity_iris_v2/R", "abl/capacity_sft_cont/R"),
]


# ----------------------------------------------------------------------------- statistics


def _betainc(a: float, b: float, x: float) -> float:
    """Regularised incomplete beta I_x(a, b) by its continued fraction (modified Lentz)."""
    if x <= 0:
        return 0.0
    if x >= 1:
        return 1.0
    if x > (a + 1) / (a + b + 2):
        return 1.0 - _betainc(b, a, 1.0 - x)
    front = math.exp(math.lgamma(a + b) - math.lgamma(a) - math.lgamma(b) + a * math.log(x) + b * math.log1p(-x)) / a
    f, c, d = 1.0, 1.0, 0.0
    for i in range(400):
        m = i // 2
        if i == 0:
            num = 1.0
        elif i % 2 == 0:
            num = m * (b - m) * x / ((a + 2 * m - 1) * (a + 2 * m))
        else:
            num = -(a + m) * (a + b + m) * x / ((a + 2 * m) * (a + 2 * m + 1))
        d = 1.0 + num * d
        d = 1.0 / (d if abs(d) > 1e-300 else 1e-300)
        c = 1.0 + num / (c if abs(c) > 1e-300 else 1e-300)
        f *= c * d
        if abs(1.0 - c * d) < 1e-14:
            break
    return front * (f - 1.0)


def t_two_sided_p(t: float, df: int) -> float:
    """P(|T| ≥ |t|) for Student's t with df degrees of freedom."""
    return _betainc(df / 2.0, 0.5, df / (df + t * t))


def paired(diffs) -> dict:
    v = np.asarray([x for x in diffs if x is not None and np.isfinite(x)], dtype=np.float64)
    mu, hw, n = kd.mean_ci(v)
    out = {"mean": mu, "ci95": hw, "n_seeds": n, "p": None}
    if n >= 2:
        sd = v.std(ddof=1)
        out["p"] = 0.0 if sd == 0 else t_two_sided_p(float(v.mean() / (sd / math.sqrt(n))), n - 1)
    return out


def holm(ps):
    """Holm–Bonferroni adjusted p-values (None stays None), in the input order."""
    idx = sorted((p, i) for i, p in enumerate(ps) if p is not None)
    out, running, k = [None] * len(ps), 0.0, len(idx)
    for rank, (p, i) in enumerate(idx):
        running = max(running, min(1.0, (k - rank) * p))
        out[i] = running
    return out


# ----------------------------------------------------------------------------- data and measures


def seed_data(lang, sd: Path, seed: int, cfg: dict) -> dict:
    """Disjoint p_data draws: S (R = its first n), F, 7n more (16n = S ∪ F ∪ extra), V, test, p-samples."""
    d = sd / "data"
    n, big = cfg["n"], cfg["s_mult"] * cfg["n"]
    paths = {k: d / f"{k}.jsonl" for k in ("S", "R", "F", "SF", "16n", "V", "test", "psamples")}
    if not all(p.exists() for p in paths.values()):
        rng = np.random.default_rng([seed, 11])
        pool = make_rows(lang, 2 * big, rng, "train")  # S, then F and the extra rows of 16n
        S, F, extra = pool[:big], pool[big:big + n], pool[big + n:]
        write_jsonl(paths["S"], S)
        write_jsonl(paths["R"], S[:n])
        write_jsonl(paths["F"], F)
        write_jsonl(paths["SF"], S + F)
        write_jsonl(paths["16n"], S + F + extra[: 2 * big - big - n])
        write_jsonl(paths["V"], make_rows(lang, cfg["n_val"], np.random.default_rng([seed, 12]), "val"))
        write_jsonl(paths["test"], make_rows(lang, cfg["n_test"], np.random.default_rng([seed, 13]), "test"))
        write_jsonl(paths["psamples"], make_rows(lang, cfg["n_psamples"], np.random.default_rng([seed, 14]), "ps"))
    return {k: str(v) for k, v in paths.items()}


class Measure(kd.Measurer):
    """kd.Measurer plus per-row forward KL, D_½ and TV from p-samples, invalid mass."""

    def __init__(self, lang, tok, test_rows, psample_rows, prompts, seed):
        super().__init__(lang, tok, test_rows, prompts, seed)
        from train.data import build_examples

        render = dict(messages_field="messages", answer_field="answer", max_prompt_length=8, max_length=40)
        self.ps_ex = build_examples(psample_rows, tok, self.stop_ids, name="psamples", **render)
        self.logp_data_ps = np.array([r["logp_data"] for r in psample_rows])

    def __call__(self, model_dir: Path, full: bool = True) -> dict:
        """Every measure (``full``), or only the forward KL and test NLL (a run's earlier
        iterations: a third of the cost; the p-samples and model samples are skipped)."""
        cache = Path(model_dir) / "measure_pr.json"
        if cache.exists():
            return json.loads(cache.read_text())
        light = Path(model_dir) / "measure_pr_kl.json"
        if not full and light.exists():
            return json.loads(light.read_text())
        from transformers import AutoModelForCausalLM

        from train.generation import generate_responses
        from train.modeling import SequenceLogprobs

        model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32,
                                                     attn_implementation="sdpa").eval()
        seq = SequenceLogprobs(model)
        lq = self._score(seq, self.test_ex, [e.response_ids for e in self.test_ex])
        d = self.logp_data_test - lq
        if not full:
            result = {"forward_kl": float(d.mean()), "forward_kl_se": float(d.std(ddof=1) / math.sqrt(len(d))),
                      "forward_kl_rows": [round(float(x), 5) for x in d],
                      "test_nll_per_token": float(-lq.sum() / self.test_tokens)}
            light.write_text(json.dumps(result))
            return result
        lq_ps = self._score(seq, self.ps_ex, [e.response_ids for e in self.ps_ex])
        log_ratio = lq_ps - self.logp_data_ps  # log q/p on p-samples
        rows = []
        for s in range(0, len(self.rev_ex), 128):
            rows += generate_responses(model, self.tok, self.rev_ex[s:s + 128], stop_ids=self.stop_ids,
                                       max_new_tokens=self.lang.spec.max_len + 1, do_sample=True,
                                       seed=self.seed * 1000003 + s)
        invalid = 0
        for x, r in zip(self.rev_prompts, rows):
            words, ok = parse_response(self.tok.convert_ids_to_tokens(r["response_ids"][:-1]))
            if not (ok and r["finished"] and math.isfinite(self.lang.logp(x, words))):
                invalid += 1
        invalid_frac = invalid / max(len(rows), 1)
        result = {
            "forward_kl": float(d.mean()), "forward_kl_se": float(d.std(ddof=1) / math.sqrt(len(d))),
            "forward_kl_rows": [round(float(x), 5) for x in d],
            "d_half": float(-2.0 * np.log(np.mean(np.exp(0.5 * log_ratio)))),
            "tv": float(0.5 * (np.mean(np.abs(1.0 - np.exp(log_ratio))) + invalid_frac)),
            "invalid_frac": invalid_frac,
            "test_nll_per_token": float(-lq.sum() / self.test_tokens),
        }
        cache.write_text(json.dumps(result))
        return result


def harness_per_iteration(run_dir: Path, t: int, method: str) -> dict:
    ev = kd.read_eval(run_dir, t)
    out = {k: ev.get(k) for k in ("nll", "alpha", "gap_u", "gap_acc", "temperature_score", "ess_real_frac",
                                  "ess_syn_frac")}
    if {**METHODS, **ABLATIONS}[method]["loss.name"] != "iris":
        out["alpha"] = None  # the harness logs a constant α the other losses never read
    p = run_dir / "metrics.jsonl"
    if p.exists():
        for line in p.read_text().splitlines():
            r = json.loads(line)
            if r.get("kind") == "train" and r.get("iteration") == t and r.get("step_in_iteration") == 1:
                out["first_step_mean_abs_g"] = r.get("first_step_mean_abs_g")
    return out


# ----------------------------------------------------------------------------- runs


class Seed:
    def __init__(self, lang, tok, out: Path, seed: int, cfg: dict, results: dict, save):
        self.lang, self.tok, self.cfg, self.save = lang, tok, cfg, save
        self.sd = out / ("tune" if seed == TUNE_SEED else f"seed_{seed}")
        self.data = seed_data(lang, self.sd, seed, cfg)
        self.base = {"seed": seed, "model.tokenizer": str(out / "tokenizer"), "data.eval": self.data["V"],
                     "optim.warmup_ratio": WARMUP}
        self.R = results.setdefault("seeds", {}).setdefault(str(seed), {})
        self.seed = seed
        self._measure = None

    @property
    def measure(self):
        if self._measure is None:
            from train.io_utils import read_jsonl

            prompts = self.lang.sample_prompts(self.cfg["n_prompts"], np.random.default_rng([self.seed, 15]))
            self._measure = Measure(self.lang, self.tok, read_jsonl(self.data["test"]),
                                    read_jsonl(self.data["psamples"]), prompts, self.seed)
        return self._measure

    def sft(self, key: str, train: str) -> dict:
        return kd.sft_early_stopped(self.sd / key, {**self.base, "data.train": train, "optim.warmup_ratio": 0.1},
                                    self.cfg)

    def theta0(self) -> str:
        return self.sft("sft_S", self.data["S"])["model"]

    def theta0_half(self) -> str:
        s = self.sft("sft_S", self.data["S"])
        half = max((s["best_iteration"] + 1) // 2 - 1, 0)  # iteration k holds 2(k + 1) epochs
        return str(self.sd / "sft_S" / f"iter_{half}" / "model")

    def run(self, key: str, start: str, train: str, method: str, lr: float, n_iter: int, measure=True) -> list:
        run_dir = self.sd / key
        overrides = {**METHODS, **ABLATIONS}[method]
        kd.run_harness(run_dir, {**self.base, **overrides, "data.train": train, "model.name_or_path": start,
                                 "model.init_config": None, "train.iterations": n_iter, "optim.lr": lr})
        its = []
        for t in range(n_iter):
            final = t == n_iter - 1
            measured = measure and (final or not self.cfg.get("measure_final_only"))
            its.append({**(self.measure(run_dir / f"iter_{t}" / "model", full=final) if measured else {}),
                        **harness_per_iteration(run_dir, t, method)})
        return its


def complete(its, T: int, cfg: dict) -> bool:
    """A run with all T iterations, each measured (only the last under --measure-final-only);
    an incomplete one is rerun: the harness resumes after its last finished iteration and the
    measures are cached beside each model, so only what is missing is computed."""
    if its is None or len(its) != T:
        return False
    return cfg.get("measure_final_only") or all(x.get("forward_kl") is not None for x in its)


def run_ablations(lang, tok, out: Path, seed: int, cfg: dict, lrs: dict, results: dict, save) -> None:
    s = Seed(lang, tok, out, seed, cfg, results, save)
    runs, T = s.R.setdefault("runs", {}), cfg["iterations"]
    theta0 = s.theta0()
    for name in ABLATIONS:
        key = f"abl/{name}/R"
        if not complete(runs.get(key), T, cfg):
            runs[key] = s.run(f"abl_{name}_R", theta0, s.data["R"], name,
                              lr_of(lrs, ABLATION_BASE.get(name, "iris_v2"), "R"), T)
            kd.log(f"seed {seed}: {key}: forward KL {kls(runs[key])}")
            save()
    if "capacity_theta0" not in s.R:
        big = kd.sft_early_stopped(s.sd / "cap_sft_S", {**s.base, "data.train": s.data["S"], "optim.warmup_ratio": 0.1,
                                                         "model.init_config": CAPACITY}, cfg)
        s.R["capacity_theta0"] = {**s.measure(Path(big["model"])), "sft": big}
        save()
    start = s.R["capacity_theta0"]["sft"]["model"]
    for method in ("iris_v2", "sft_cont"):
        key = f"abl/capacity_{method}/R"
        if not complete(runs.get(key), T, cfg):
            runs[key] = s.run(f"abl_capacity_{method}_R", start, s.data["R"], method, lr_of(lrs, method, "R"), T)
            save()


def kls(its) -> str:
    return " ".join("—" if x.get("forward_kl") is None else f"{x['forward_kl']:.3f}" for x in its)


def lr_of(lrs: dict, method: str, regime: str) -> float:
    return lrs.get(f"{method}/{regime}", DEFAULT_LR)


def tune(lang, tok, out: Path, cfg: dict, results: dict, save) -> dict:
    T = results.setdefault("tuning", {"seed": TUNE_SEED, "grid": cfg["lr_grid"], "val_nll": {}, "chosen": {},
                                      "forward_kl": {}})
    if not cfg["lr_grid"]:
        return {}
    s = Seed(lang, tok, out, TUNE_SEED, cfg, {"seeds": {}}, save)
    theta0 = s.theta0()
    for method in cfg["methods"]:
        for regime in REGIMES:
            key = f"{method}/{regime}"
            if key in T["chosen"]:
                continue
            scores, kls_ = {}, {}
            for lr in cfg["lr_grid"]:
                its = s.run(f"{method}_{regime}_lr{lr:g}", theta0, s.data[regime], method, lr, cfg["tune_iterations"])
                scores[f"{lr:g}"] = its[-1]["nll"]
                kls_[f"{lr:g}"] = its[-1]["forward_kl"]  # the sensitivity table only; never used to choose
            T["val_nll"][key], T["forward_kl"][key] = scores, kls_
            T["chosen"][key] = float(min(scores, key=scores.get))
            kd.log(f"tune {key}: V-NLL {scores} -> lr {T['chosen'][key]:g}")
            save()
    return T["chosen"]


def run_seed(lang, tok, out: Path, seed: int, cfg: dict, lrs: dict, results: dict, save) -> None:
    s = Seed(lang, tok, out, seed, cfg, results, save)
    R, T = s.R, cfg["iterations"]
    if "theta0" not in R:
        theta0 = s.theta0()
        sft = json.loads((s.sd / "sft_S" / "early_stop.json").read_text())
        R["theta0"] = {**s.measure(Path(theta0)), "sft": sft}
        kd.log(f"seed {seed}: θ_0 after {sft['epochs']} epochs, forward KL {R['theta0']['forward_kl']:.3f}")
        save()
    theta0 = s.theta0()
    runs = R.setdefault("runs", {})
    for method in cfg["methods"]:
        for regime in REGIMES:
            key = f"{method}/{regime}"
            if complete(runs.get(key), T, cfg):
                continue
            t0 = time.time()
            runs[key] = s.run(f"{method}_{regime}", theta0, s.data[regime], method, lr_of(lrs, method, regime), T)
            kd.log(f"seed {seed}: {key}: forward KL {kls(runs[key])} ({time.time() - t0:.0f}s)")
            save()
    if not cfg["baselines"]:
        return
    if not complete(runs.get("sft_cont/SF"), T, cfg):
        runs["sft_cont/SF"] = s.run("sft_cont_SF", theta0, s.data["SF"], "sft_cont", lr_of(lrs, "sft_cont", "F"), T)
        save()
    for key, train in (("sft_9n", "SF"), ("sft_16n", "16n")):
        if key not in R:
            out_sft = s.sft(key, s.data[train])
            R[key] = {**s.measure(Path(out_sft["model"])), "sft": out_sft}
            kd.log(f"seed {seed}: {key} from init: forward KL {R[key]['forward_kl']:.3f}")
            save()
    fp_start = R["sft_16n"]["sft"]["model"]
    for method in ("iris_v2", "sft_cont"):
        if not complete(runs.get(f"fp/{method}"), T, cfg):
            runs[f"fp/{method}"] = s.run(f"fp_{method}", fp_start, s.data["R"], method, lr_of(lrs, method, "R"), T)
            save()
    if "theta0_half" not in R:
        R["theta0_half"] = s.measure(Path(s.theta0_half()))
        save()
    for method in ("iris_v2", "sft_cont"):
        for regime in REGIMES:
            key = f"half/{method}/{regime}"
            if not complete(runs.get(key), T, cfg):
                runs[key] = s.run(f"half_{method}_{regime}", s.theta0_half(), s.data[regime], method,
                                  lr_of(lrs, method, regime), T)
                save()


# ----------------------------------------------------------------------------- summary


def start_kl(seed_result: dict, key: str):
    """Forward KL of the model a run started from: θ_0, or θ_0^½ / SFT on 16n / the capacity θ_0."""
    start = ("theta0_half" if key.startswith("half/") else "sft_16n" if key.startswith("fp/")
             else "capacity_theta0" if key.startswith("abl/capacity") else "theta0")
    return seed_result.get(start, {}).get("forward_kl")


def final_kl(seed_result: dict, key: str, T: int, best_fixed: dict):
    runs = seed_result.get("runs", {})
    if key == "theta0":
        return seed_result.get("theta0", {}).get("forward_kl")
    if key in ("sft_9n", "sft_16n"):
        return seed_result.get(key, {}).get("forward_kl")
    if key.startswith("best_fixed/"):
        key = f"{best_fixed.get(key.split('/')[1])}/{key.split('/')[1]}"
    if key.startswith("fp/"):
        its, start = runs.get(key, []), seed_result.get("sft_16n", {}).get("forward_kl")
        return its[-1]["forward_kl"] - start if len(its) == T and start is not None else None
    its = runs.get(key, [])
    return its[-1]["forward_kl"] if len(its) == T else None


def summarize(results: dict, cfg: dict) -> dict:
    T, seeds = cfg["iterations"], results.get("seeds", {})
    keys = sorted({k for s in seeds.values() for k in s.get("runs", {})})
    per_key = {}
    for key in keys:
        rows = []
        for t in range(T):
            vals = {m: kd.mean_ci([s["runs"][key][t].get(m) for s in seeds.values() if len(s.get("runs", {}).get(key, [])) == T])
                    for m in ("forward_kl", "d_half", "tv", "invalid_frac", "test_nll_per_token", "nll", "gap_u",
                              "alpha", "ess_real_frac", "ess_syn_frac", "first_step_mean_abs_g")}
            rows.append({m: {"mean": v[0], "ci95": v[1], "n": v[2]} for m, v in vals.items()})
        per_key[key] = rows
    change = {key: paired([s["runs"][key][-1]["forward_kl"] - start_kl(s, key) for s in seeds.values()
                           if len(s.get("runs", {}).get(key, [])) == T and start_kl(s, key) is not None])
              for key in keys}
    # Per iteration, paired over seeds: what the plot shows (the seeds' θ_0 differ by more than the methods).
    change_t = {key: [paired([s["runs"][key][t].get("forward_kl", float("nan")) - start_kl(s, key)
                              for s in seeds.values()
                              if len(s.get("runs", {}).get(key, [])) == T and start_kl(s, key) is not None])
                      for t in range(T)] for key in keys}
    # The best fixed α per regime: lowest mean final forward KL over seeds (chosen on the same
    # seeds: stated as such in the write-up, a selection that favours the fixed α).
    best_fixed = {}
    for regime in REGIMES:
        cands = {m: per_key.get(f"{m}/{regime}", [{}])[-1].get("forward_kl", {}).get("mean")
                 for m in ("iris_a0.5", "iris_a1", "iris_a2")}
        cands = {m: v for m, v in cands.items() if v is not None}
        if cands:
            best_fixed[regime] = min(cands, key=cands.get)
    contrasts = []
    for label, a, b in PRIMARY:
        diffs = []
        for s in seeds.values():
            x, y = final_kl(s, a, T, best_fixed), final_kl(s, b, T, best_fixed)
            if x is not None and y is not None:
                diffs.append(x - y)
        contrasts.append({"contrast": label, "a": a, "b": b, **paired(diffs)})
    for c, p in zip(contrasts, holm([c["p"] for c in contrasts])):
        c["p_holm"] = p
    secondary = []
    for label, a, b in SECONDARY:
        diffs = [final_kl(s, a, T, best_fixed) - final_kl(s, b, T, best_fixed) for s in seeds.values()
                 if final_kl(s, a, T, best_fixed) is not None and final_kl(s, b, T, best_fixed) is not None]
        if diffs:
            secondary.append({"contrast": label, "a": a, "b": b, **paired(diffs)})
    single = {}
    for key in SINGLE_MODELS:
        vals = [s[key] for s in seeds.values() if isinstance(s.get(key), dict)]
        if vals:
            single[key] = {m: dict(zip(("mean", "ci95", "n"), kd.mean_ci([v.get(m) for v in vals])))
                           for m in ("forward_kl", "d_half", "tv", "invalid_frac", "test_nll_per_token")}
    return {"per_iteration": per_key, "change_from_theta0": change, "change_per_iteration": change_t,
            "best_fixed_alpha": best_fixed,
            "primary_contrasts": contrasts, "secondary_contrasts": secondary, "single_models": single,
            "n_seeds": len(seeds)}


SINGLE_MODELS = {  # models trained once per seed (no self-play iterations); {k}: S = k·n rows
    "theta0": "θ_0: SFT on S ({k}n) from init, validation-stopped",
    "theta0_half": "θ_0^½: the same run stopped at half θ_0's epochs",
    "sft_9n": "SFT from init on S ∪ F ({k1}n)",
    "sft_16n": "SFT from init on {k2}n (the fixed-point arm's start)",
    "capacity_theta0": "capacity arm's θ_0 (4 layers × 128 hidden) on S",
}


def split_rows(results: dict):
    """(the results without per-row values, {"seed|key": float32 per-row forward KL}): the rows of
    the final models the primary contrasts pair (θ_0, SFT 9n / 16n, IRIS-v2, SFT-continued, the best
    fixed α, the fixed-point runs), so that any paired analysis of them can be redone from the
    published files; every other model's rows stay in its measure_pr.json in the work folder
    (all of them would be ~60 MB of JSON)."""
    import copy

    slim = copy.deepcopy(results)
    best = slim.get("summary", {}).get("best_fixed_alpha", {})
    keep = {"theta0", "sft_9n", "sft_16n", "fp/iris_v2", "fp/sft_cont"} | {f"{m}/{r}" for m in ("iris_v2", "sft_cont")
                                                                          for r in REGIMES}
    keep |= {f"{m}/{r}" for r, m in best.items()}
    rows = {}
    for seed, sr in slim.get("seeds", {}).items():
        for key, value in sr.items():
            if isinstance(value, dict) and "forward_kl_rows" in value:
                r = value.pop("forward_kl_rows")
                if key in keep:
                    rows[f"{seed}|{key}"] = np.asarray(r, dtype=np.float32)
        for key, its in sr.get("runs", {}).items():
            for t, m in enumerate(its):
                r = m.pop("forward_kl_rows", None)
                if r is not None and key in keep and t == len(its) - 1:
                    rows[f"{seed}|{key}"] = np.asarray(r, dtype=np.float32)
    return slim, rows


def fmt(m, d=3):
    if m is None or m.get("mean") is None:
        return "—"
    return f"{m['mean']:.{d}f}" + (f" ± {m['ci95']:.{d}f}" if m.get("ci95") is not None else "")


def table(summary: dict, cfg: dict, tuning: dict = None, quick: bool = False) -> str:
    T, k = cfg["iterations"], cfg["s_mult"]
    lines = ([f"**Quick run** (CI size: n = {cfg['n']}, S = {k}n, {cfg['n_test']} test rows; not a result).", ""]
             if quick else [])
    lines += [f"Seeds: {summary['n_seeds']}. Mean ± 95 % t-interval over seeds; θ_T after T = {T} iterations "
              f"(iteration t is the harness's folder iter_{{t−1}}).", "",
             "| model trained once per seed | fwd KL | D_½ | TV | invalid | test NLL/token |", "|---|---|---|---|---|---|"]
    for key, m in summary.get("single_models", {}).items():
        lines.append(f"| {SINGLE_MODELS[key].format(k=k, k1=k + 1, k2=2 * k)} | {fmt(m['forward_kl'])} | {fmt(m['d_half'])} | {fmt(m['tv'])} | "
                     f"{fmt(m['invalid_frac'])} | {fmt(m['test_nll_per_token'])} |")
    lines += ["", "Forward KL per iteration (nats / response):", "",
              "| run | " + " | ".join(f"t = {t + 1}" for t in range(T)) + " |", "|---" * (T + 1) + "|"]
    for key, rows in summary["per_iteration"].items():
        lines.append(f"| {key} | " + " | ".join(fmt(r["forward_kl"]) for r in rows) + " |")
    lines += ["", "IRIS-v2's gap u_t and order α_t per iteration (u_t measured on V before iteration t's training):",
              "", "| run | " + " | ".join(f"u, α at t = {t + 1}" for t in range(T)) + " |", "|---" * (T + 1) + "|"]
    for key, rows in summary["per_iteration"].items():
        if key.split("/")[0] in ("iris_v2", "fp", "half") and "iris_v2" in key:
            lines.append(f"| {key} | " + " | ".join(f"{fmt(r['gap_u'])}, {fmt(r['alpha'], 2)}" for r in rows) + " |")
    lines += [""]
    grid = (tuning or {}).get("grid") or []
    if not grid:
        lines += [f"No learning-rate tuning (--quick or --no-tune): every method at lr {DEFAULT_LR:g}.", ""]
    else:
        lines += ["Learning-rate choice on the tuning seed: V-NLL/token after "
                  f"{cfg['tune_iterations']} iterations (chosen: lowest), and the forward KL of the "
                  "same models (the sensitivity table; never used to choose):", "",
                  "| method/regime | " + " | ".join(f"lr {lr:g}" for lr in grid) + " | chosen |",
                  "|---" * (len(grid) + 2) + "|"]
    for key, scores in ((tuning or {}).get("val_nll", {}) if grid else {}).items():
        kl = tuning.get("forward_kl", {}).get(key, {})
        cells = [f"{scores[f'{lr:g}']:.4f} / {kl.get(f'{lr:g}', float('nan')):.3f}" if f"{lr:g}" in scores else "—"
                 for lr in tuning["grid"]]
        lines.append(f"| {key} | " + " | ".join(cells) + f" | {tuning['chosen'].get(key, float('nan')):g} |")
    lines += ["",
             "| run | fwd KL θ_T | Δ fwd KL vs its start (paired) | D_½ | TV | invalid | V-NLL/token | u_T | α_T | ESS/N annotated, synthetic | mean abs g, first step |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for key, rows in summary["per_iteration"].items():
        r = rows[-1]
        lines.append(f"| {key} | {fmt(r['forward_kl'])} | {fmt(summary['change_from_theta0'].get(key))} | "
                     f"{fmt(r['d_half'])} | {fmt(r['tv'])} | {fmt(r['invalid_frac'])} | {fmt(r['nll'])} | "
                     f"{fmt(r['gap_u'])} | {fmt(r['alpha'])} | {fmt(r['ess_real_frac'], 2)}, {fmt(r['ess_syn_frac'], 2)} | "
                     f"{fmt(r['first_step_mean_abs_g'], 2)} |")
    lines += ["", "| primary contrast (a − b, forward KL at T) | mean ± 95 % | seeds | p | p (Holm) |", "|---|---|---|---|---|"]
    for c in summary["primary_contrasts"]:
        p = "—" if c["p"] is None else f"{c['p']:.3g}"
        ph = "—" if c["p_holm"] is None else f"{c['p_holm']:.3g}"
        lines.append(f"| {c['contrast']} | {fmt(c)} | {c['n_seeds']} | {p} | {ph} |")
    lines += ["", "Secondary contrasts (descriptive; unadjusted p):", "",
              "| contrast (a − b, forward KL at T) | mean ± 95 % | seeds | p |", "|---|---|---|---|"]
    for c in summary.get("secondary_contrasts", []):
        p = "—" if c["p"] is None else f"{c['p']:.3g}"
        lines.append(f"| {c['contrast']} | {fmt(c, 4)} | {c['n_seeds']} | {p} |")
    lines += ["", "Δ vs its start: θ_0 for the runs from θ_0; θ_0^½ for half/…; SFT on 16n for fp/…; the "
              "capacity θ_0 for abl/capacity_…. Runs before iteration T carry the forward KL and test NLL only."]
    return "\n".join(lines) + "\n"


def plot(summary: dict, cfg: dict, res_dir: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(1, 2, figsize=(13, 4.5), sharey=True)
    for a, regime in zip(ax, REGIMES):
        keys = [k for k in summary.get("change_per_iteration", {})
                if k.endswith(f"/{regime}") and not k.startswith(("fp/", "half/", "abl/"))]
        for i, key in enumerate(keys):
            rows = summary["change_per_iteration"][key]
            off = 0.03 * (i - len(keys) / 2)
            pts = [(off, 0.0, 0.0)] + [(t + 1 + off, r["mean"], r["ci95"] or 0) for t, r in enumerate(rows)
                                      if r["mean"] is not None]  # --measure-final-only: the last iteration only
            if pts:
                a.errorbar([p[0] for p in pts], [p[1] for p in pts], yerr=[p[2] for p in pts], marker="o",
                           capsize=3, label=key.split("/")[0])
        a.axhline(0.0, color="grey", lw=0.8)
        a.set_xticks(range(0, cfg["iterations"] + 1))
        a.set(xlabel="self-play iteration (0: θ_0)", title=f"regime {regime} ({'reused S rows' if regime == 'R' else 'fresh rows'})")
    ax[0].set_ylabel("Δ KL(p_data ‖ p_θ) from θ_0, paired [nats]")
    ax[0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(res_dir / "kl_vs_iteration.png", dpi=110)
    plt.close(fig)

    # The primary contrasts as a forest plot: paired mean difference ± 95 % t-interval over seeds.
    rows = [c for c in summary["primary_contrasts"] if c.get("mean") is not None]
    if rows:
        fig, a = plt.subplots(figsize=(9, 0.55 * len(rows) + 1.2))
        y = np.arange(len(rows))[::-1]
        a.errorbar([c["mean"] for c in rows], y, xerr=[c["ci95"] or 0 for c in rows], fmt="o", capsize=4)
        a.axvline(0.0, color="grey", lw=0.8)
        a.set_yticks(y, [f"{c['contrast']}  (p_Holm {c['p_holm']:.2g})" if c.get("p_holm") is not None
                         else c["contrast"] for c in rows], fontsize=8)
        a.set_xlabel("a − b: paired difference of forward KL at iteration T [nats / response]; < 0: a closer to p_data", fontsize=9)
        fig.tight_layout()
        fig.savefig(res_dir / "contrasts.png", dpi=110, bbox_inches="tight")
        plt.close(fig)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="1 seed, 2 iterations, IRIS-v2 and SFT-continued (CI)")
    ap.add_argument("--out", default=None, help="work folder (resumable); default runs/paper-regime[-quick]")
    ap.add_argument("--results", default=None, help="default train/experiments/results/paper_regime (full) or OUT/results")
    ap.add_argument("--seeds", type=int, default=None, help="number of seeds (default 10)")
    ap.add_argument("--first-seed", type=int, default=0, help="run seeds first-seed .. first-seed + seeds − 1")
    ap.add_argument("--methods", default=None, help="comma-separated subset of " + ",".join(METHODS))
    ap.add_argument("--no-baselines", action="store_true", help="skip SFT on S∪F, 9n, 16n, the fixed point and θ_0^½")
    ap.add_argument("--no-tune", action="store_true", help="skip tuning: every method at lr 3e-4")
    ap.add_argument("--iterations", type=int, default=None)
    ap.add_argument("--measure-final-only", action="store_true",
                    help="measure (KL, D_½, TV) only each run's last iteration's model (a reduced run)")
    ap.add_argument("--merge", nargs="*", default=[],
                    help="with --report: other OUT/results.json files whose seeds and runs join this report "
                         "(a seed in both must have the same θ_0, and no run in both)")
    ap.add_argument("--ablations", action="store_true", help=f"also the ablations on the first {ABLATION_SEEDS} seeds")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--report", action="store_true", help="only rewrite the JSON, table and plot from OUT/results.json")
    args = ap.parse_args(argv)
    cfg = dict(QUICK if args.quick else FULL)
    if args.seeds is not None:
        cfg["seeds"] = args.seeds
    if args.methods:
        unknown = set(args.methods.split(",")) - set(METHODS)
        if unknown:
            ap.error(f"--methods: unknown {sorted(unknown)}")
        cfg["methods"] = args.methods.split(",")
    if args.no_baselines:
        cfg["baselines"] = False
    if args.no_tune:
        cfg["lr_grid"] = []
    if args.iterations:
        cfg["iterations"] = args.iterations
    cfg["measure_final_only"] = args.measure_final_only
    torch.set_num_threads(args.threads)
    out = Path(args.out or ROOT / "runs" / ("paper-regime-quick" if args.quick else "paper-regime"))
    res_dir = Path(args.results) if args.results else (out / "results" if args.quick else
                                                      ROOT / "train" / "experiments" / "results" / "paper_regime")
    out.mkdir(parents=True, exist_ok=True)
    res_dir.mkdir(parents=True, exist_ok=True)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    import transformers

    transformers.logging.set_verbosity_error()
    lang = Language()
    if (out / "tokenizer" / "tokenizer.json").exists():
        from transformers import AutoTokenizer

        tok = AutoTokenizer.from_pretrained(str(out / "tokenizer"))
    else:
        tok = build_tokenizer(lang.spec, out / "tokenizer")
    res_path = out / "results.json"
    results = json.loads(res_path.read_text()) if res_path.exists() else {}
    results.update({"config": cfg, "language": lang.describe(), "preset": str(kd.PRESET.relative_to(ROOT)),
                    "quick": args.quick, "warmup_ratio": WARMUP, "optimizer": "AdamW, fresh every iteration"})

    def save():
        results["summary"] = summarize(results, cfg)
        if args.report:  # a report never rewrites the run's own OUT/results.json
            return
        tmp = res_path.with_name("results.json.tmp")
        tmp.write_text(json.dumps(results))
        tmp.replace(res_path)

    def publish():
        save()
        slim, rows = split_rows(results)
        (res_dir / "paper_regime.json").write_text(json.dumps(slim))
        np.savez_compressed(res_dir / "forward_kl_rows.npz", **rows)
        (res_dir / "table.md").write_text(table(results["summary"], cfg, results.get("tuning"), quick=args.quick))
        plot(results["summary"], cfg, res_dir)

    if args.report:
        for other in args.merge:
            theirs = json.loads(Path(other).read_text())
            for k, v in theirs.get("seeds", {}).items():
                mine = results.setdefault("seeds", {}).setdefault(k, {})
                if "theta0" in mine and "theta0" in v and mine["theta0"]["forward_kl"] != v["theta0"]["forward_kl"]:
                    ap.error(f"--merge: seed {k} has another θ_0 in {other}: its runs cannot be paired with these")
                clash = set(mine.get("runs", {})) & set(v.get("runs", {}))
                if clash:
                    ap.error(f"--merge: seed {k} has runs {sorted(clash)} in both {res_path} and {other}")
                mine.setdefault("runs", {}).update(v.get("runs", {}))
                for key, value in v.items():
                    if key != "runs":
                        mine.setdefault(key, value)
            results.setdefault("merged_from", []).append(str(other))
        publish()
        kd.log(f"report rewritten in {res_dir}")
        return
    t_start = time.time()
    lrs = tune(lang, tok, out, cfg, results, save)
    for seed in range(args.first_seed, args.first_seed + cfg["seeds"]):
        run_seed(lang, tok, out, seed, cfg, lrs, results, save)
        if args.ablations and seed < args.first_seed + ABLATION_SEEDS:
            run_ablations(lang, tok, out, seed, cfg, lrs, results, save)
        results["wall_seconds_this_invocation"] = time.time() - t_start
        publish()
    kd.log(f"done in {time.time() - t_start:.0f}s; results in {res_dir}")


if __name__ == "__main__":
    main()
