"""Corpus BLEU / chrF / TER equal lm-eval's aggregations of the same (reference, prediction) items."""

from __future__ import annotations

import pytest
from lm_eval.api import metrics

from lmforge.errors import LmforgeError
from lmforge.evaluate.corpus_metrics import CORPUS_METRICS, corpus_bleu, reference_streams

PREDICTIONS = ["le chat est sur le tapis", "il fait beau aujourd'hui", "je suis content", "bonjour"]
REFERENCES = ["le chat est assis sur le tapis", "il fait très beau aujourd'hui", "je suis heureux", "salut"]


@pytest.mark.parametrize("name", ["bleu", "chrf", "chrf++", "ter"])
def test_equals_lm_eval_aggregation(name):
    lm_eval_fn = {"bleu": metrics.bleu, "chrf": metrics.chrf, "chrf++": metrics.chrfpp, "ter": metrics.ter}[name]
    expected = lm_eval_fn(list(zip(REFERENCES, PREDICTIONS)))  # lm-eval's items: (gold, prediction) per doc
    assert CORPUS_METRICS[name](PREDICTIONS, REFERENCES) == pytest.approx(expected, abs=1e-9)
    assert 0 < expected < 100


def test_every_reference_of_a_document_counts():
    assert reference_streams([["a", "b"], "c"]) == [["a", "c"], ["b", None]]
    # the first document's prediction is its second reference: a perfect score
    assert corpus_bleu(["x y z w v", "a b c d e"], [["p q r s t", "x y z w v"], "a b c d e"]) == pytest.approx(100.0)


def test_mismatched_or_empty_inputs_are_user_errors():
    with pytest.raises(LmforgeError, match="2 predictions but 1 references"):
        corpus_bleu(["a", "b"], ["a"])
    with pytest.raises(LmforgeError, match="no documents"):
        corpus_bleu([], [])
