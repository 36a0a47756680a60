"""A synthetic conditional language whose log-likelihood is exact: p_data(y | x) in closed form.

The prompt x is ``prompt_len`` symbols ``q0 … q{P-1}``; it selects a mixture over K components,

    π(x) = softmax(scale · Σ_i A[i, x_i])                                   [K]

and each component is a Markov chain over the ``vocab`` word tokens ``w0 … w{V-1}``, of order 1
(component k even) or order 2 (k odd), with a stop token:

    p_k(y) = Π_{t=1..L} (1 − h_k(t−1)) T_k(y_t | context_t) · h_k(L)

where L = len(y) counts words (the stop token ends y), the context of order 1 is y_{t−1}, of order 2
(y_{t−2}, y_{t−1}), a missing position being the BOS index V. The stop hazard after t words is
h_k(t) = 0 for t < min_len, 1 for t = max_len, λ_k in between (so lengths lie in [min_len, max_len]).
Then, exactly,

    log p_data(y | x) = logsumexp_k (log π_k(x) + log p_k(y)).

Every table is drawn once from ``numpy.random.default_rng(language_seed)`` (Dirichlet rows with
concentration ``concentration``: peaked, so the language is learnable but not trivial). The sampler
(:meth:`Language.sample`) and the likelihood (:meth:`Language.logp`) are written separately so
that the Monte-Carlo test compares two independent pieces of code.
"""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import List, Sequence, Tuple

import numpy as np

STOP = -1  # stands for the stop token in the sampler's output (never inside a response list)


@dataclass(frozen=True)
class LanguageSpec:
    vocab: int = 32  # word tokens
    prompt_symbols: int = 8
    prompt_len: int = 3
    components: int = 4
    min_len: int = 6
    max_len: int = 24
    concentration: float = 0.1  # Dirichlet concentration of every transition row
    # An order-2 chain sees the word before last only through its class (index mod order2_classes):
    # [order2_classes+1, V+1, V] rows instead of [V+1, V+1, V], so that a few hundred responses
    # can teach a small model most of the language (a full order-2 table has 33 000 free rows' worth).
    order2_classes: int = 4
    spread: float = 5.0  # component rows ~ Dirichlet(spread * base row + floor)
    floor: float = 0.02
    mixture_scale: float = 2.5  # how sharply a prompt selects its components
    hazard_low: float = 0.06  # λ_k evenly spaced in [hazard_low, hazard_high]
    hazard_high: float = 0.2
    seed: int = 1234


class Language:
    """p_data(· | x): sample responses and compute their exact log-probability (natural log)."""

    def __init__(self, spec: LanguageSpec = LanguageSpec()):
        if spec.vocab < 2 or spec.components < 1 or not (0 <= spec.min_len <= spec.max_len) or spec.max_len < 1:
            raise ValueError(f"invalid LanguageSpec {spec}")
        self.spec = spec
        rng = np.random.default_rng(spec.seed)
        V, K = spec.vocab, spec.components
        self.mix_table = rng.normal(size=(spec.prompt_len, spec.prompt_symbols, K))
        self.orders = [1 + (k % 2) for k in range(K)]
        # One shared base chain; every component's rows are Dirichlet draws centred on the base row of
        # the same context (concentration `spread`): components differ, but data about one teaches
        # something about the others, as in a natural language's dialects.
        self.base = rng.dirichlet(np.full(V, spec.concentration), size=V + 1)
        self.tables = []  # order 1: [V+1, V]; order 2: [classes+1, V+1, V]; rows sum to 1
        for order in self.orders:
            groups = 1 if order == 1 else spec.order2_classes + 1
            rows = np.stack([[rng.dirichlet(spec.spread * self.base[c] + spec.floor) for c in range(V + 1)]
                             for _ in range(groups)])
            self.tables.append(rows[0] if order == 1 else rows)
        self.hazards = np.linspace(spec.hazard_low, spec.hazard_high, K) if K > 1 else np.array([spec.hazard_low])
        # Draw order of the hazards is shuffled so length does not line up with the chain order.
        self.hazards = self.hazards[rng.permutation(K)]

    # ---------------------------------------------------------------- prompts

    def mixture(self, x: Sequence[int]) -> np.ndarray:
        """π(x) [K], fp64."""
        s = self.spec
        if len(x) != s.prompt_len or any(not (0 <= int(v) < s.prompt_symbols) for v in x):
            raise ValueError(f"x must be {s.prompt_len} prompt symbols in [0, {s.prompt_symbols}), got {list(x)}")
        z = s.mixture_scale * sum(self.mix_table[i, int(v)] for i, v in enumerate(x))
        z = z - z.max()
        return np.exp(z) / np.exp(z).sum()

    def sample_prompts(self, n: int, rng: np.random.Generator) -> np.ndarray:
        return rng.integers(0, self.spec.prompt_symbols, size=(n, self.spec.prompt_len))

    # ---------------------------------------------------------------- sampling (independent of logp)

    def _hazard(self, k: int, t: int) -> float:
        if t < self.spec.min_len:
            return 0.0
        if t >= self.spec.max_len:
            return 1.0
        return float(self.hazards[k])

    def sample(self, x: Sequence[int], rng: np.random.Generator) -> List[int]:
        """One response y ~ p_data(· | x): a list of word indices (the stop is implicit)."""
        V = self.spec.vocab
        k = int(rng.choice(self.spec.components, p=self.mixture(x)))
        y: List[int] = []
        while True:
            if rng.random() < self._hazard(k, len(y)):
                return y
            row = self.tables[k][self._context(k, [V, V] + y, len(y) + 2)]
            y.append(int(rng.choice(V, p=row)))

    def _context(self, k: int, padded: Sequence[int], t: int) -> tuple:
        """Index into table k for the word at position t of padded = [BOS, BOS] + y."""
        V = self.spec.vocab
        if self.orders[k] == 1:
            return (padded[t - 1],)
        prev2 = padded[t - 2]
        return (self.spec.order2_classes if prev2 == V else prev2 % self.spec.order2_classes, padded[t - 1])

    # ---------------------------------------------------------------- exact likelihood

    def component_logps(self, y: Sequence[int]) -> np.ndarray:
        """log p_k(y) for every component [K] (−inf where y is impossible under p_k)."""
        s, V = self.spec, self.spec.vocab
        out = np.empty(s.components)
        L = len(y)
        valid = s.min_len <= L <= s.max_len and all(0 <= int(v) < V for v in y)
        for k in range(s.components):
            if not valid:
                out[k] = -np.inf
                continue
            lam = float(self.hazards[k])
            # Words before the stop: each of positions t = 0..L-1 survives the hazard h_k(t).
            survive = sum(np.log1p(-lam) for t in range(s.min_len, L) if t < s.max_len)
            stop = 0.0 if L >= s.max_len else np.log(lam) if L >= s.min_len else -np.inf
            padded = [V, V] + [int(v) for v in y]
            trans = 0.0
            for t in range(2, L + 2):
                trans += np.log(self.tables[k][self._context(k, padded, t)][padded[t]])
            out[k] = survive + stop + trans
        return out

    def logp(self, x: Sequence[int], y: Sequence[int]) -> float:
        """log p_data(y | x) (natural log; −inf for an impossible y)."""
        a = np.log(self.mixture(x)) + self.component_logps(y)
        m = a.max()
        return float(m + np.log(np.exp(a - m).sum())) if np.isfinite(m) else -np.inf

    def describe(self) -> dict:
        return {**asdict(self.spec), "orders": self.orders, "hazards": [float(h) for h in self.hazards]}


# ------------------------------------------------------------------------------- text and files

def prompt_text(x: Sequence[int]) -> str:
    return " ".join(f"q{int(v)}" for v in x)


def response_text(y: Sequence[int]) -> str:
    return " ".join(f"w{int(v)}" for v in y)


def parse_response(tokens: Sequence[str]) -> Tuple[List[int], bool]:
    """Word indices of decoded tokens, and whether every token was a word (else p_data(y) = 0)."""
    out, ok = [], True
    for tok in tokens:
        if tok.startswith("w") and tok[1:].isdigit():
            out.append(int(tok[1:]))
        else:
            ok = False
    return out, ok


def make_rows(lang: Language, n: int, rng: np.random.Generator, prefix: str) -> List[dict]:
    """n harness rows {"id", "messages": [user x, assistant y], "x", "y", "logp_data"}."""
    xs = lang.sample_prompts(n, rng)
    rows = []
    for i, x in enumerate(xs):
        y = lang.sample(x, rng)
        rows.append({"id": f"{prefix}{i}", "messages": [{"role": "user", "content": prompt_text(x)},
                                                      {"role": "assistant", "content": response_text(y)}],
                     "x": [int(v) for v in x], "y": y, "logp_data": lang.logp(x, y)})
    return rows


def write_jsonl(path: Path, rows: Sequence[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text("".join(json.dumps(r) + "\n" for r in rows))
    tmp.replace(path)


CHAT_TEMPLATE = ("{% for message in messages %}<|{{ message['role'] }}|> {{ message['content'] }} <|end|> "
                 "{% endfor %}{% if add_generation_prompt %}<|assistant|> {% endif %}")


def build_tokenizer(spec: LanguageSpec, folder: Path):
    """A word-level fast tokenizer (one token per symbol, split on whitespace) with the chat template
    above, saved to ``folder``; deterministic, so the committed copy can be checked against it."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    special = ["<pad>", "<unk>", "<|end|>", "<|user|>", "<|assistant|>", "<|system|>"]
    words = [f"q{i}" for i in range(spec.prompt_symbols)] + [f"w{i}" for i in range(spec.vocab)]
    vocab = {t: i for i, t in enumerate(special + words)}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", pad_token="<pad>",
                                   eos_token="<|end|>", additional_special_tokens=special[3:])
    fast.chat_template = CHAT_TEMPLATE
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    fast.save_pretrained(str(folder))
    return fast
