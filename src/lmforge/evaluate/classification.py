"""Classification quality: accuracy, macro-F1 and the confusion matrix; labelling new texts.

`lmforge classify` scores its evaluation split with `evaluate_classifier` at the end of training
(saved as eval_report.json), and `classify --predict` labels texts with `predict`.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from functools import partial

import torch
from torch import Tensor, nn

from lmforge.data.classification import collate_classification, encode_texts
from lmforge.data.rows import iter_row_batches
from lmforge.evaluate.logprobs import eval_mode
from lmforge.models.heads import SequenceClassifier
from lmforge.tokenizer import Tokenizer


@dataclass
class ClassificationReport:
    """Scores of a classifier on labelled examples."""

    labels: list[str]  # label names in index order
    accuracy: float
    macro_f1: float  # mean F1 over the labels that occur among the true or predicted labels
    confusion: list[list[int]]  # confusion[true][predicted] counts
    n: int  # examples scored

    def table(self) -> str:
        """The confusion matrix as aligned text: one row per true label, one column per predicted label."""
        width = max(len(x) for x in [*self.labels, *(str(c) for row in self.confusion for c in row), "true\\pred"])
        lines = ["  ".join(x.rjust(width) for x in ["true\\pred", *self.labels])]
        lines += ["  ".join(x.rjust(width) for x in [name, *map(str, row)]) for name, row in zip(self.labels, self.confusion)]
        return "\n".join(lines)


def classification_report(predicted: Sequence[int], actual: Sequence[int], labels: Sequence[str]) -> ClassificationReport:
    """Accuracy, macro-F1 and the confusion matrix of predicted against actual label indices."""
    k = len(labels)
    confusion = [[0] * k for _ in range(k)]
    for p, a in zip(predicted, actual):
        confusion[a][p] += 1
    f1s = []
    for i in range(k):
        tp, row, col = confusion[i][i], sum(confusion[i]), sum(confusion[j][i] for j in range(k))
        if row or col:
            f1s.append(2 * tp / (row + col))
    n = len(actual)
    correct = sum(confusion[i][i] for i in range(k))
    return ClassificationReport(list(labels), correct / max(n, 1), sum(f1s) / max(len(f1s), 1), confusion, n)


def accuracy(logits: Tensor, labels: Tensor) -> Tensor:
    """Share of rows whose largest logit (B, n_labels) is the label (B,): the metric training logs,
    a 0-d tensor so that the loop reads it with the step's other figures, in one host transfer."""
    return (logits.argmax(-1) == labels).float().mean()


def classifier_logits(model: nn.Module, batches: Iterable[dict[str, Tensor]]) -> tuple[Tensor, Tensor]:
    """Logits (N, n_labels) and labels (N,) of every batch, in order, in eval mode."""
    device = next(model.parameters()).device
    logits, labels = [], []
    with eval_mode(model):
        for batch in batches:
            ids, mask = batch["input_ids"].to(device), batch["attention_mask"].to(device)
            logits.append(model(ids, attention_mask=mask).float().cpu())
            labels.append(batch["labels"])
    return torch.cat(logits), torch.cat(labels)


def evaluate_classifier(model: nn.Module, batches: Iterable[dict[str, Tensor]], labels: Sequence[str]) -> ClassificationReport:
    """Score a classifier on labelled batches (input_ids, attention_mask, labels)."""
    logits, actual = classifier_logits(model, batches)
    return classification_report(logits.argmax(-1).tolist(), actual.tolist(), labels)


@dataclass
class Prediction:
    """A classifier's answer for one text."""

    label: str  # the most probable label's name
    probability: float  # its probability
    probabilities: dict[str, float]  # every label's probability


def predict(model: SequenceClassifier, tokenizer: Tokenizer, texts: Sequence[str], batch_size: int = 32) -> list[Prediction]:
    """Label each text (cut to the model's context) with the classifier."""
    ids, _ = encode_texts(tokenizer, texts, model.config.max_seq_len)
    collate = partial(collate_classification, pad_id=tokenizer.padding_id)
    logits, _ = classifier_logits(model, iter_row_batches([(i, 0) for i in ids], collate, batch_size))
    names = model.labels or [str(i) for i in range(logits.shape[-1])]
    out = []
    for probs in logits.softmax(-1).tolist():
        best = max(range(len(probs)), key=probs.__getitem__)
        out.append(Prediction(names[best], probs[best], dict(zip(names, probs))))
    return out


__all__ = ["ClassificationReport", "Prediction", "accuracy", "classification_report", "classifier_logits", "evaluate_classifier",
           "predict"]
