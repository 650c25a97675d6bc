"""Corpus-level metrics of generated text: BLEU, chrF, chrF++ and TER through sacrebleu, as lm-eval computes them.

lm-eval's `generate_until` tasks name these in `metric_list` (`bleu`, `chrf`, `chrf++`, `ter`): each
document contributes its (prediction, reference) pair and the aggregation scores the whole corpus
at once with sacrebleu's defaults (13a tokens; chrF: 6 character orders, beta 2; chrF++ adds 2 word
orders), on sacrebleu's 0-100 scale. `CORPUS_METRICS` maps those names to the functions here, so a
harness looks a task's metric up by the name in its YAML.

A document's reference is one string or a list of them. Where documents have different numbers of
references, the shorter lists are padded with `None` (sacrebleu skips a missing reference), so every
reference counts; lm-eval would drop the extra ones. With one reference each, the two are the same.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

from lmforge.errors import LmforgeError

Reference = str | Sequence[str]  # one document's reference(s)


def reference_streams(references: Sequence[Reference]) -> list[list[str | None]]:
    """Per-document references -> sacrebleu's streams: stream k holds every document's k-th reference."""
    per_doc = [[r] if isinstance(r, str) else list(r) for r in references]
    width = max((len(refs) for refs in per_doc), default=0)
    return [[refs[k] if k < len(refs) else None for refs in per_doc] for k in range(width)]


def _check(predictions: Sequence[str], references: Sequence[Reference]) -> list[list[str | None]]:
    if len(predictions) != len(references):
        raise LmforgeError(f"{len(predictions)} predictions but {len(references)} references; "
                           "each document needs one prediction and its reference(s)")
    if not predictions:
        raise LmforgeError("no documents to score; a corpus metric needs at least one prediction")
    return reference_streams(references)


def corpus_bleu(predictions: Sequence[str], references: Sequence[Reference]) -> float:
    """sacrebleu's corpus BLEU (0-100) of the predictions against their references (lm-eval's `bleu`)."""
    import sacrebleu

    return sacrebleu.corpus_bleu(list(predictions), _check(predictions, references)).score


def corpus_chrf(predictions: Sequence[str], references: Sequence[Reference]) -> float:
    """sacrebleu's corpus chrF (0-100; char order 6, beta 2) (lm-eval's `chrf`)."""
    import sacrebleu

    return sacrebleu.corpus_chrf(list(predictions), _check(predictions, references)).score


def corpus_chrf_plus_plus(predictions: Sequence[str], references: Sequence[Reference]) -> float:
    """sacrebleu's corpus chrF++ (chrF with word orders 1-2) (lm-eval's `chrf++`)."""
    import sacrebleu

    return sacrebleu.corpus_chrf(list(predictions), _check(predictions, references), word_order=2).score


def corpus_ter(predictions: Sequence[str], references: Sequence[Reference]) -> float:
    """sacrebleu's corpus TER (0-100+, edits per reference word; lower is better) (lm-eval's `ter`)."""
    import sacrebleu

    return sacrebleu.corpus_ter(list(predictions), _check(predictions, references)).score


CorpusMetric = Callable[[Sequence[str], Sequence[Reference]], float]
CORPUS_METRICS: dict[str, CorpusMetric] = {  # lm-eval's metric name -> the function
    "bleu": corpus_bleu,
    "chrf": corpus_chrf,
    "chrf++": corpus_chrf_plus_plus,
    "ter": corpus_ter,
}
HIGHER_IS_BETTER = {"bleu": True, "chrf": True, "chrf++": True, "ter": False}


__all__ = ["CORPUS_METRICS", "HIGHER_IS_BETTER", "CorpusMetric", "Reference", "corpus_bleu", "corpus_chrf",
           "corpus_chrf_plus_plus", "corpus_ter", "reference_streams"]
