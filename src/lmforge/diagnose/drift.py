"""Data drift: how far a new corpus has moved from a reference one, in tokens, lengths and perplexity.

`compare_corpora(reference, new)` profiles both corpora with one tokenizer (or as words without
one) and measures:
- the Jensen–Shannon divergence of the token frequencies, in bits (0 = the same distribution,
  1 = no token in common), next to the *noise floor*: the divergence between the two halves of
  the reference, which is what sampling alone gives at this corpus size;
- the new-token rate (share of the new corpus's tokens never seen in the reference) and the
  fallback rate of each corpus (tokens standing for less than a character; `corpus.py`);
- the document-length distributions (medians, and the Kolmogorov–Smirnov distance between them);
- the tokens whose share of the text moved most;
- with a model, the perplexity of each corpus under it.

The verdict reads the divergence against the floor: "no drift" within `NO_DRIFT_FACTOR` times the
floor (and below `NO_DRIFT_BITS`), "strong drift" past `STRONG_DRIFT_BITS`, "drift" between.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from lmforge.diagnose.corpus import Corpus, display, fallback_ids, token_bytes, token_counts
from lmforge.errors import LmforgeError
from lmforge.tokenizer import Tokenizer

NO_DRIFT_BITS = 0.02  # below this divergence (and near the noise floor) the corpora read the same
NO_DRIFT_FACTOR = 2.0  # ... "near" = within this factor of the reference's own half-to-half divergence
STRONG_DRIFT_BITS = 0.15  # past this the corpora share little vocabulary in the same proportions
TOP_MOVED = 12
PPL_TOKENS = 20_000  # tokens of each corpus scored under --model


@dataclass
class CorpusProfile:
    """What drift measures of one corpus."""

    name: str
    n_documents: int
    n_tokens: int
    n_bytes: int
    truncated: bool
    counts: Counter
    lengths: list[int]  # tokens per document
    fallback_rate: float | None  # share of fallback tokens; None without a tokenizer
    perplexity: float | None = None

    @property
    def median_length(self) -> float:
        return float(np.median(self.lengths))


@dataclass
class MovedToken:
    """A token whose share of the text changed between the corpora."""

    token: str
    reference_share: float
    new_share: float

    @property
    def log2_ratio(self) -> float:
        return math.log2((self.new_share + 1e-7) / (self.reference_share + 1e-7))


@dataclass
class DriftReport:
    """The comparison of a new corpus against a reference."""

    reference: CorpusProfile
    new: CorpusProfile
    unit: str  # "tokens of TOKENIZER" or "words"
    js_divergence: float  # bits
    noise_floor: float  # bits, between the halves of the reference
    new_token_rate: float
    length_ks: float  # Kolmogorov–Smirnov distance of the length distributions
    moved: list[MovedToken]

    @property
    def verdict(self) -> str:
        """"no drift", "drift" or "strong drift" (see the module doc)."""
        threshold = max(NO_DRIFT_BITS, NO_DRIFT_FACTOR * self.noise_floor)
        if self.js_divergence <= threshold:
            return "no drift"
        return "strong drift" if self.js_divergence >= max(STRONG_DRIFT_BITS, threshold) else "drift"

    def verdict_line(self) -> str:
        return (f"verdict: {self.verdict} (JS divergence {self.js_divergence:.3f} bits, noise floor "
                f"{self.noise_floor:.3f}; {self.new_token_rate:.1%} new tokens; median length "
                f"{self.reference.median_length:g} -> {self.new.median_length:g})")

    def headline(self) -> list[str]:
        """The side-by-side table and the measures, without the moved tokens."""
        ref, new = self.reference, self.new
        out = [f"{'':24}{'reference':>16}{'new':>16}", _row("corpus", ref.name, new.name),
               _row("documents", f"{ref.n_documents:,}", f"{new.n_documents:,}"),
               _row(self.unit.split()[0], f"{ref.n_tokens:,}", f"{new.n_tokens:,}"),
               _row("median length", f"{ref.median_length:g}", f"{new.median_length:g}")]
        if ref.fallback_rate is not None and new.fallback_rate is not None:
            out.append(_row("fallback rate", f"{ref.fallback_rate:.2%}", f"{new.fallback_rate:.2%}"))
        if ref.perplexity is not None and new.perplexity is not None:
            out.append(_row("perplexity", f"{ref.perplexity:.2f}", f"{new.perplexity:.2f}"))
        if ref.truncated or new.truncated:
            out.append("(read up to the first megabytes of a corpus; rates are estimated on that prefix)")
        return [*out, f"units: {self.unit}",
                      f"Jensen-Shannon divergence {self.js_divergence:.4f} bits "
                      f"(noise floor {self.noise_floor:.4f}: the reference's halves)",
                      f"new-token rate {self.new_token_rate:.2%} (of the new corpus, unseen in the reference)",
                      f"length distribution distance (KS) {self.length_ks:.3f}"]

    def lines(self) -> list[str]:
        """The whole report as plain text, ending with the verdict line."""
        moved = [f"  {m.token!r:>18} {m.reference_share:8.3%} -> {m.new_share:8.3%}" for m in self.moved]
        return [*self.headline(), "moved most (share of the text, reference -> new):", *moved, self.verdict_line()]


def _row(label: str, a: str, b: str) -> str:
    return f"{label:24}{a[:15]:>16}{b[:15]:>16}"


# ---------------------------------------------------------------- measures


def js_divergence(p_counts: Counter, q_counts: Counter) -> float:
    """Jensen–Shannon divergence of two count tables, in bits (0..1)."""
    keys = list(p_counts.keys() | q_counts.keys())
    p = np.array([p_counts.get(k, 0) for k in keys], dtype=np.float64)
    q = np.array([q_counts.get(k, 0) for k in keys], dtype=np.float64)
    if p.sum() == 0 or q.sum() == 0:
        raise LmforgeError("a corpus has no tokens to compare; pass files with text in them")
    p, q = p / p.sum(), q / q.sum()
    m = (p + q) / 2
    return float(max(0.0, 0.5 * (_kl_bits(p, m) + _kl_bits(q, m))))


def _kl_bits(p: np.ndarray, m: np.ndarray) -> float:
    nz = p > 0
    return float(np.sum(p[nz] * np.log2(p[nz] / m[nz])))


def ks_distance(a: Sequence[int], b: Sequence[int]) -> float:
    """The largest gap between the empirical distribution functions of two samples."""
    xa, xb = np.sort(np.asarray(a)), np.sort(np.asarray(b))
    grid = np.union1d(xa, xb)
    cdf_a = np.searchsorted(xa, grid, side="right") / len(xa)
    cdf_b = np.searchsorted(xb, grid, side="right") / len(xb)
    return float(np.max(np.abs(cdf_a - cdf_b)))


def moved_tokens(ref: Counter, new: Counter, show: Any, top: int = TOP_MOVED) -> list[MovedToken]:
    """The `top` tokens whose share of the text changed most (absolute change of share)."""
    n_ref, n_new = sum(ref.values()), sum(new.values())
    change = {k: new.get(k, 0) / n_new - ref.get(k, 0) / n_ref for k in ref.keys() | new.keys()}
    ranked = sorted(change, key=lambda k: (-abs(change[k]), str(k)))[:top]
    return [MovedToken(show(k), ref.get(k, 0) / n_ref, new.get(k, 0) / n_new) for k in ranked]


def _noise_floor(corpus: Corpus, tokenizer: Tokenizer | None) -> float:
    """JS divergence between the first and second half of the documents (interleaved, so order-neutral)."""
    if len(corpus.documents) < 2:
        return 0.0
    halves = [Corpus("half", corpus.documents[i::2], False) for i in (0, 1)]
    return js_divergence(token_counts(halves[0], tokenizer)[0], token_counts(halves[1], tokenizer)[0])


def profile(corpus: Corpus, tokenizer: Tokenizer | None, fallback: set[int] | None) -> CorpusProfile:
    """Token counts, lengths and fallback rate of one corpus."""
    counts, lengths = token_counts(corpus, tokenizer)
    n_tokens = sum(counts.values())
    rate = None if fallback is None else sum(counts[i] for i in fallback) / max(n_tokens, 1)
    return CorpusProfile(corpus.name, len(corpus.documents), n_tokens, corpus.n_bytes, corpus.truncated,
                         counts, lengths, rate)


def compare_corpora(reference: Corpus, new: Corpus, tokenizer: Tokenizer | None = None) -> DriftReport:
    """Drift of `new` from `reference`, counted in `tokenizer`'s tokens (or words without one)."""
    fallback = None
    show: Any = str
    if tokenizer is not None:
        pieces = token_bytes(tokenizer)
        fallback = fallback_ids(tokenizer, pieces)
        show = lambda i: display(pieces[i])  # noqa: E731
    ref, nw = profile(reference, tokenizer, fallback), profile(new, tokenizer, fallback)
    unseen = sum(c for k, c in nw.counts.items() if k not in ref.counts) / max(nw.n_tokens, 1)
    unit = "words and punctuation" if tokenizer is None else f"tokens ({tokenizer.vocab_size:,}-token vocabulary)"
    return DriftReport(ref, nw, unit, js_divergence(ref.counts, nw.counts), _noise_floor(reference, tokenizer),
                       unseen, ks_distance(ref.lengths, nw.lengths), moved_tokens(ref.counts, nw.counts, show))


# ---------------------------------------------------------------- perplexity and picture


def perplexity(model: Any, tokenizer: Tokenizer, corpus: Corpus, max_tokens: int = PPL_TOKENS,
               window: int = 256) -> float:
    """exp(mean next-token loss) of the corpus's first `max_tokens` tokens under a causal LM, in windows."""
    import torch
    import torch.nn.functional as F

    ids: list[int] = []
    for row in tokenizer.encode_batch(corpus.documents[: max_tokens]):
        ids += row + ([tokenizer.eos_id] if tokenizer.eos_id is not None else [])
        if len(ids) > max_tokens:
            break
    ids = ids[: max_tokens + 1]
    window = min(window, getattr(getattr(model, "config", None), "max_seq_len", window) or window)
    total, count = 0.0, 0
    with torch.no_grad():
        for start in range(0, len(ids) - 1, window):
            chunk = torch.tensor(ids[start: start + window + 1]).unsqueeze(0)  # (1, <= window+1)
            if chunk.shape[1] < 2:
                break
            logits = model(chunk[:, :-1])  # (1, T, vocab)
            total += float(F.cross_entropy(logits[0].float(), chunk[0, 1:], reduction="sum"))
            count += chunk.shape[1] - 1
    return math.exp(total / max(count, 1))


def plot_drift(report: DriftReport, path: str | Path) -> None:
    """drift.png: moved tokens, length distributions, rank-frequency curves, and the headline figures."""
    from lmforge.figures import new_figure, save_figure

    fig = new_figure((12, 8))
    (moved, lengths), (ranks, text) = fig.subplots(2, 2)
    names = (f"reference: {report.reference.name}", f"new: {report.new.name}")
    labels = [repr(m.token) for m in report.moved][::-1]
    y = np.arange(len(labels))
    moved.barh(y - 0.2, [m.reference_share for m in report.moved][::-1], 0.4, label=names[0])
    moved.barh(y + 0.2, [m.new_share for m in report.moved][::-1], 0.4, label=names[1])
    moved.set(yticks=y, yticklabels=labels, xlabel="share of the text", title="tokens that moved most")
    moved.legend(fontsize=8)
    top = max(np.percentile(report.reference.lengths, 99), np.percentile(report.new.lengths, 99), 1)
    bins = np.linspace(0, top, 40)
    for profile_, name in zip((report.reference, report.new), names):
        lengths.hist(np.clip(profile_.lengths, 0, top), bins=bins, alpha=0.5, density=True, label=name)
        share = np.sort(np.array(list(profile_.counts.values()), dtype=np.float64))[::-1] / profile_.n_tokens
        ranks.loglog(np.arange(1, len(share) + 1), share, label=name)
    lengths.set(xlabel=f"document length ({report.unit.split()[0]})", ylabel="density", title="length distribution")
    lengths.legend(fontsize=8)
    ranks.set(xlabel="rank", ylabel="share of the text", title="rank-frequency")
    ranks.legend(fontsize=8)
    text.axis("off")
    text.text(0, 1, "\n".join([*report.headline(), "", report.verdict]), va="top", family="monospace", fontsize=8)
    save_figure(fig, Path(path))
