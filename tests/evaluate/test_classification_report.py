"""Classification scores: accuracy, macro-F1 and the confusion matrix against hand-computed values."""

from __future__ import annotations

import pytest

from lmforge.evaluate.classification import classification_report


def test_classification_report():
    r = classification_report([0, 1, 1, 2, 0], [0, 1, 2, 2, 1], ["a", "b", "c"])
    assert r.accuracy == pytest.approx(0.6) and r.confusion == [[1, 0, 0], [1, 1, 0], [0, 1, 1]]
    # F1: a 2*1/(1+2), b 2*1/(2+2), c 2*1/(2+1)
    assert r.macro_f1 == pytest.approx((2 / 3 + 1 / 2 + 2 / 3) / 3)
    assert r.table().splitlines()[0].split() == ["true\\pred", "a", "b", "c"]
