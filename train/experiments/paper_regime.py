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
from train.experiments.paper_regime_report import DEFAULT_LR, REGIMES, plot, split_rows, summarize, table

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
WARMUP = 0.25
TUNE_SEED = 100
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
        kl = {"forward_kl": float(d.mean()), "forward_kl_se": float(d.std(ddof=1) / math.sqrt(len(d))),
              "forward_kl_rows": [round(float(x), 5) for x in d],
              "test_nll_per_token": float(-lq.sum() / self.test_tokens)}
        if not full:
            light.write_text(json.dumps(kl))
            return kl
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
            **kl,
            "d_half": float(-2.0 * np.log(np.mean(np.exp(0.5 * log_ratio)))),
            "tv": float(0.5 * (np.mean(np.abs(1.0 - np.exp(log_ratio))) + invalid_frac)),
            "invalid_frac": invalid_frac,
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
