"""Generation quality and model collapse: how varied a model's samples are, beside its training text.

A model that collapses (trained on its own output, over-aligned, or just too small) writes the same
phrases again and again. These figures show it, and `diversity_report` puts the same figures for
the training text beside them, so "low" has a scale:

- `distinct_n` (Li et al. 2016): unique n-grams / all n-grams, pooled over every text.
- `self_bleu` (Zhu et al. 2018, Texygen): each text's BLEU with all the others as references,
  averaged. sacrebleu's sentence BLEU (13a tokens, exponential smoothing, effective order), on
  sacrebleu's 0-100 scale like every BLEU in lmforge; higher = the texts resemble each other.
- `repetition_rate` (seq-rep-4, Welleck et al. 2019): within one text, the share of 4-grams that
  repeat an earlier one, 1 - unique/all, averaged over the texts; the degeneration measure.
- `mean_length`: whitespace tokens per text.

Tokens are whitespace-separated words (self-BLEU: sacrebleu's own tokens), so the figures do not
depend on a model's tokenizer and compare across models. Self-BLEU is computed in one pass over
n-gram counts (each text's best reference count is the largest over the others), not N sentence
BLEUs of N references, and equals `sacrebleu.sentence_bleu(text, others)` for every text.
"""

from __future__ import annotations

import random
from collections import Counter
from collections.abc import Sequence

REPETITION_N = 4  # seq-rep-4, as in Welleck et al. 2019
BLEU_ORDER = 4  # n-gram orders of BLEU


def ngrams(words: Sequence[str], n: int) -> list[tuple[str, ...]]:
    """The n-grams of a word list, in order (none when it is shorter than n)."""
    return [tuple(words[i : i + n]) for i in range(len(words) - n + 1)]


def distinct_n(texts: Sequence[str], n: int) -> float:
    """Unique n-grams / all n-grams over every text (whitespace words); 0.0 when there is no n-gram."""
    grams = [g for text in texts for g in ngrams(text.split(), n)]
    return len(set(grams)) / len(grams) if grams else 0.0


def repetition_rate(texts: Sequence[str], n: int = REPETITION_N) -> float:
    """Mean over texts of 1 - unique n-grams / n-grams within the text (seq-rep-n); texts with no
    n-gram are left out, and 0.0 when no text has one."""
    rates = []
    for text in texts:
        grams = ngrams(text.split(), n)
        if grams:
            rates.append(1 - len(set(grams)) / len(grams))
    return sum(rates) / len(rates) if rates else 0.0


def mean_length(texts: Sequence[str]) -> float:
    """Mean number of whitespace words per text; 0.0 for no texts."""
    return sum(len(text.split()) for text in texts) / len(texts) if texts else 0.0


def _best_other_counts(counts: Sequence[Counter]) -> dict[tuple[str, ...], tuple[int, int, int]]:
    """For each n-gram: (largest count, the text holding it, second largest count) over all texts."""
    best: dict[tuple[str, ...], tuple[int, int, int]] = {}
    for i, counter in enumerate(counts):
        for gram, c in counter.items():
            top, holder, second = best.get(gram, (0, -1, 0))
            best[gram] = (c, i, top) if c > top else (top, holder, max(second, c))
    return best


def _closest_length(hyp_len: int, lengths: Sequence[int], skip: int) -> int:
    """The reference length BLEU uses: the closest to the hypothesis's, the shorter on a tie."""
    return min((n for j, n in enumerate(lengths) if j != skip), key=lambda n: (abs(hyp_len - n), n))


def self_bleu(texts: Sequence[str]) -> float:
    """Mean sentence BLEU (0-100) of each text against all the others; 0.0 for fewer than two texts,
    which have nothing to resemble."""
    if len(texts) < 2:
        return 0.0
    from sacrebleu.metrics.bleu import BLEU
    from sacrebleu.metrics.helpers import extract_all_word_ngrams
    from sacrebleu.tokenizers.tokenizer_13a import Tokenizer13a

    tokenize = Tokenizer13a()
    extracted = [extract_all_word_ngrams(tokenize(text.rstrip()), 1, BLEU_ORDER) for text in texts]
    counts, lengths = [c for c, _ in extracted], [n for _, n in extracted]
    best = _best_other_counts(counts)
    scores = []
    for i, counter in enumerate(counts):
        correct, total = [0] * BLEU_ORDER, [0] * BLEU_ORDER
        for gram, c in counter.items():
            top, holder, second = best[gram]
            total[len(gram) - 1] += c
            correct[len(gram) - 1] += min(c, second if holder == i else top)
        ref_len = _closest_length(lengths[i], lengths, skip=i)
        score = BLEU.compute_bleu(correct, total, lengths[i], ref_len, smooth_method="exp", effective_order=True)
        scores.append(score.score)
    return sum(scores) / len(scores)


def reference_pieces(reference: str | Sequence[str], count: int, length: int, seed: int = 0) -> list[str]:
    """`count` pieces of `length` words of a reference corpus (a text, or a list of texts joined): the
    corpus cut into consecutive pieces, `count` of them drawn without replacement with `seed` (all
    when there are fewer). Pieces never overlap, so shared words come from the corpus, not the cut."""
    words = (reference if isinstance(reference, str) else "\n".join(reference)).split()
    length = max(1, length)
    if len(words) <= length:
        return [" ".join(words)] if words else []
    starts = range(0, len(words) - length + 1, length)
    chosen = random.Random(seed).sample(starts, min(count, len(starts)))
    return [" ".join(words[s : s + length]) for s in chosen]


def _figures(texts: Sequence[str]) -> dict[str, float]:
    return {
        "distinct_1": distinct_n(texts, 1),
        "distinct_2": distinct_n(texts, 2),
        "distinct_3": distinct_n(texts, 3),
        "self_bleu": self_bleu(texts),
        "repetition_rate": repetition_rate(texts),
        "mean_length": mean_length(texts),
    }


def diversity_report(texts: Sequence[str], reference: str | Sequence[str] | None = None,
                     seed: int = 0) -> dict[str, float]:
    """The collapse figures of `texts` (distinct_1/2/3, self_bleu, repetition_rate, mean_length) and,
    given a reference corpus (the training text), `reference_<key>` for as many pieces of it, each as
    long as the texts' mean length (`reference_pieces`, drawn with `seed`)."""
    report = _figures(texts)
    if reference is not None:
        pieces = reference_pieces(reference, len(texts), round(report["mean_length"]), seed)
        report |= {f"reference_{k}": v for k, v in _figures(pieces).items()}
    return report


__all__ = ["distinct_n", "diversity_report", "mean_length", "ngrams", "reference_pieces", "repetition_rate",
           "self_bleu"]
