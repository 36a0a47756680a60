"""A classifier two-sample test between annotated and synthetic responses (docs/math.md#alpha-schedule).

The gap-adaptive α schedule (``schedules.GapAdaptiveAlpha``) reads the distance between the data
distribution p_data and the opponent p_θt from how well a simple classifier tells their held-out
responses apart. For any classifier f and balanced classes, 2·acc(f) − 1 ≤ TV(p_data, p_θt)
(the optimal Bayes classifier reaches (1 + TV)/2); with cross-fitted accuracy over N rows this is
an estimate whose chance fluctuations have a standard deviation ≈ 1/√N, so

    u = clip(2·acc − 1 − 0.4/√N, 0, 1)

is a debiased lower bound on TV (the 0.4/√N removes the part of the selection optimism a
2-fold cross-fit leaves; over 20 seeds of p_data against itself at N = 1000, u ≤ 0.05:
``tests/test_schedules.py``). The classifier: L2-regularised logistic regression on cheap
per-response features (:func:`response_features`), fitted by Newton's method (IRLS).

Everything here runs on the CPU in float64, once per self-play iteration: it is not a hot path.
"""
from __future__ import annotations

import math
from typing import Dict, Optional, Sequence

import torch

__all__ = [
    "EXACT_VOCAB_LIMIT",
    "HASH_BUCKETS",
    "response_features",
    "fit_logistic",
    "classifier_two_sample_test",
]

EXACT_VOCAB_LIMIT = 4096  # up to this vocabulary size the unigram histogram has one column per token
HASH_BUCKETS = 1024  # otherwise token ids are hashed into this many buckets
_HASH_MULT = 2654435761  # Knuth's multiplicative hash (2^32 / golden ratio): spreads consecutive ids


def _bucket_ids(ids: torch.Tensor, vocab_size: int) -> torch.Tensor:
    if vocab_size <= EXACT_VOCAB_LIMIT:
        return ids
    return ((ids * _HASH_MULT) % (1 << 32)) % HASH_BUCKETS


def response_features(response_ids: Sequence[Sequence[int]], logps: torch.Tensor, finished: Sequence[bool],
                      *, vocab_size: int, lengths: Optional[Sequence[int]] = None) -> torch.Tensor:
    """Per-response features, float64 [n, K + 3], the same for annotated and synthetic responses.

    Columns: the unigram histogram of the response tokens divided by the length (K = vocab_size
    columns when vocab_size ≤ 4096, else K = 1024 hashed buckets), log(length), the finished flag
    (1.0 when the response ended with a stop token), and s̄ = s_θt / length, the opponent's
    per-token mean log-prob. No intercept and no standardisation: :func:`classifier_two_sample_test`
    adds both on the pooled rows.

    Args:
        response_ids: n token-id lists (ints in [0, vocab_size)).
        logps: [n] the opponent's summed log-probs s_θt of the responses (nats).
        finished: n booleans.
        vocab_size: the tokenizer's vocabulary size (> 0).
        lengths: n scored-token counts (default: len of each id list); lengths < 1 count as 1.

    Raises ValueError (naming the argument) on mismatched lengths or ids outside the vocabulary.
    """
    if isinstance(vocab_size, bool) or not isinstance(vocab_size, int) or vocab_size < 1:
        raise ValueError(f"vocab_size must be an int >= 1, got {vocab_size!r}")
    n = len(response_ids)
    if not isinstance(logps, torch.Tensor):
        logps = torch.as_tensor(logps, dtype=torch.float64)
    if logps.dim() != 1 or logps.shape[0] != n:
        raise ValueError(f"logps must have shape [{n}] (one per response), got {tuple(logps.shape)}")
    if len(finished) != n:
        raise ValueError(f"finished must have {n} entries (one per response), got {len(finished)}")
    if lengths is None:
        lengths = [len(r) for r in response_ids]
    elif len(lengths) != n:
        raise ValueError(f"lengths must have {n} entries (one per response), got {len(lengths)}")
    K = vocab_size if vocab_size <= EXACT_VOCAB_LIMIT else HASH_BUCKETS
    out = torch.zeros(n, K + 3, dtype=torch.float64)
    if n == 0:
        return out
    flat = torch.tensor([t for r in response_ids for t in r], dtype=torch.int64)
    if flat.numel() and (int(flat.min()) < 0 or int(flat.max()) >= vocab_size):
        raise ValueError(f"response_ids must lie in [0, vocab_size={vocab_size})")
    row = torch.repeat_interleave(torch.arange(n), torch.tensor([len(r) for r in response_ids], dtype=torch.int64))
    hist = out[:, :K]
    hist.index_put_((row, _bucket_ids(flat, vocab_size)), torch.ones(flat.numel(), dtype=torch.float64),
                    accumulate=True)
    length = torch.tensor([max(int(x), 1) for x in lengths], dtype=torch.float64)
    counts = torch.tensor([max(len(r), 1) for r in response_ids], dtype=torch.float64)
    hist /= counts[:, None]
    out[:, K] = length.log()
    out[:, K + 1] = torch.tensor([1.0 if f else 0.0 for f in finished], dtype=torch.float64)
    out[:, K + 2] = logps.detach().to(torch.float64).cpu() / length
    return out


def _standardise(x: torch.Tensor) -> torch.Tensor:
    """Centre and scale each column on the pooled rows; constant columns become 0; add an intercept."""
    mean = x.mean(0)
    std = x.std(0, unbiased=False)
    z = (x - mean) / torch.where(std > 0, std, torch.ones_like(std))
    return torch.cat([z, torch.ones(x.shape[0], 1, dtype=x.dtype)], 1)


def fit_logistic(x: torch.Tensor, y: torch.Tensor, *, lam: float = 1e-2, max_iter: int = 25,
                 tol: float = 1e-10) -> torch.Tensor:
    """L2-logistic regression by Newton's method (IRLS) with backtracking; returns w [d] (float64).

    Minimises F(w) = mean_i [softplus(x_i·w) − y_i·x_i·w] + (λ/2)·‖w‖², every weight penalised
    (the intercept too: the classes are balanced, so its optimum is ≈ 0 either way). F is
    λ-strongly convex, so Newton converges; a step is halved until F does not increase.
    ∇F = Xᵀ(p − y)/n + λw, ∇²F = XᵀWX/n + λI with W = diag(p(1 − p)). When d > n the Newton
    system is solved in its n × n Woodbury form: with A = (W/n)^{1/2}X,
    (AᵀA + λI)⁻¹g = (g − Aᵀ(λI + AAᵀ)⁻¹Ag)/λ.
    """
    x = x.to(torch.float64)
    y = y.to(torch.float64)
    n, d = x.shape
    w = torch.zeros(d, dtype=torch.float64)

    def objective(w):
        z = x @ w
        return float((torch.nn.functional.softplus(z) - y * z).mean() + 0.5 * lam * (w @ w))

    f = objective(w)
    for _ in range(max_iter):
        p = torch.sigmoid(x @ w)
        grad = x.T @ (p - y) / n + lam * w
        a = x * (p * (1 - p) / n).sqrt()[:, None]
        if d <= n:
            step = torch.linalg.solve(a.T @ a + lam * torch.eye(d, dtype=torch.float64), grad)
        else:
            inner = torch.linalg.solve(lam * torch.eye(n, dtype=torch.float64) + a @ a.T, a @ grad)
            step = (grad - a.T @ inner) / lam
        t = 1.0
        while True:
            f_new = objective(w - t * step)
            if f_new <= f or t < 1e-8:
                break
            t *= 0.5
        w = w - t * step
        done = abs(f - f_new) <= tol * max(1.0, abs(f))
        f = f_new
        if done:
            break
    return w


def classifier_two_sample_test(real: torch.Tensor, syn: torch.Tensor, *, seed: int = 0, lam: float = 1e-2,
                               max_iter: int = 25) -> Dict[str, float]:
    """Cross-fitted logistic-regression two-sample test; returns {"u", "acc", "ce", "N"}.

    real [n, F], syn [m, F]: features (:func:`response_features`) of annotated (label 1) and
    synthetic (label 0) responses. Non-intercept columns are standardised on the pooled N = n + m
    rows, an intercept is added, each class is split at random in two halves (``seed``: a
    ``torch.Generator`` seed), a classifier is fitted on each fold and scores the other, so every
    row is predicted out of sample. acc: accuracy over all N rows (threshold ½); ce: mean
    cross-entropy of those predictions (nats; log 2 ≈ 0.693 at chance);
    u = clip(2·acc − 1 − 0.4/√N, 0, 1), the debiased lower bound on TV (module docstring).
    Needs n, m ≥ 2.
    """
    for name, t in (("real", real), ("syn", syn)):
        if not isinstance(t, torch.Tensor) or t.dim() != 2:
            raise ValueError(f"{name} must be a 2-D tensor [rows, features]")
        if t.shape[0] < 2:
            raise ValueError(f"{name} needs at least 2 rows for a 2-fold split, got {t.shape[0]}")
    if real.shape[1] != syn.shape[1]:
        raise ValueError(f"real has {real.shape[1]} feature columns but syn has {syn.shape[1]}")
    x = _standardise(torch.cat([real, syn]).to(torch.float64).cpu())
    n, m = real.shape[0], syn.shape[0]
    N = n + m
    y = torch.cat([torch.ones(n, dtype=torch.float64), torch.zeros(m, dtype=torch.float64)])
    gen = torch.Generator().manual_seed(int(seed))
    fold = torch.empty(N, dtype=torch.int64)
    for lo, hi in ((0, n), (n, N)):  # stratified: each class split in half
        perm = torch.randperm(hi - lo, generator=gen) + lo
        fold[perm[: (hi - lo) // 2]] = 0
        fold[perm[(hi - lo) // 2:]] = 1
    logit = torch.empty(N, dtype=torch.float64)
    for k in (0, 1):
        train, test = fold != k, fold == k
        w = fit_logistic(x[train], y[train], lam=lam, max_iter=max_iter)
        logit[test] = x[test] @ w
    acc = float(((logit > 0).double() == y).double().mean())
    # cross-entropy from logits, stably: softplus(z) − y·z
    ce = float((torch.nn.functional.softplus(logit) - y * logit).mean())
    u = min(max(2.0 * acc - 1.0 - 0.4 / math.sqrt(N), 0.0), 1.0)
    return {"u": u, "acc": acc, "ce": ce, "N": N}
