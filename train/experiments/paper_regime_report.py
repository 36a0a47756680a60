"""The paper-regime miniature's analysis (``paper_regime.py``): paired statistics, the
primary and secondary contrasts, the summary, ``table.md``, the plots and the published per-row
values. Reads a run's results dict; runs nothing."""
from __future__ import annotations

import math
from pathlib import Path

import numpy as np

from train.experiments import known_distribution as kd

REGIMES = ("R", "F")
DEFAULT_LR = 3e-4  # every method's learning rate when nothing is tuned

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
    if key.startswith("fp/"):  # the drift from the run's own start
        its, start = runs.get(key, []), start_kl(seed_result, key)
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
    # Per iteration, paired over seeds: what the plot shows (the seeds' θ_0 differ by more than the methods).
    change_t = {key: [paired([s["runs"][key][t].get("forward_kl", float("nan")) - start_kl(s, key)
                              for s in seeds.values()
                              if len(s.get("runs", {}).get(key, [])) == T and start_kl(s, key) is not None])
                      for t in range(T)] for key in keys}
    change = {key: rows[-1] for key, rows in change_t.items()}  # every complete run is measured at T
    # The best fixed α per regime: lowest mean final forward KL over seeds (chosen on the same
    # seeds: stated as such in the write-up, a selection that favours the fixed α).
    best_fixed = {}
    for regime in REGIMES:
        cands = {m: per_key.get(f"{m}/{regime}", [{}])[-1].get("forward_kl", {}).get("mean")
                 for m in ("iris_a0.5", "iris_a1", "iris_a2")}
        cands = {m: v for m, v in cands.items() if v is not None}
        if cands:
            best_fixed[regime] = min(cands, key=cands.get)
    def contrast(label: str, a: str, b: str) -> dict:
        diffs = []
        for s in seeds.values():
            x, y = final_kl(s, a, T, best_fixed), final_kl(s, b, T, best_fixed)
            if x is not None and y is not None:
                diffs.append(x - y)
        return {"contrast": label, "a": a, "b": b, **paired(diffs)}

    contrasts = [contrast(*c) for c in PRIMARY]
    for c, p in zip(contrasts, holm([c["p"] for c in contrasts])):
        c["p_holm"] = p
    secondary = [c for c in (contrast(*c) for c in SECONDARY) if c["n_seeds"]]
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
