"""When the assistant hands a conversation to a person: the escalation rules as pure functions of one turn.

Before answering, in this order (the first that fires is the reason):
1. `human_request`: the user's message matches a request-for-a-person pattern;
2. `topic`: it matches a sensitive topic's patterns, or the classifier gives a listed label;
3. `negative_sentiment`: the classifier's negative probability reached the threshold on each of the
   last N user turns (frustration that persists, not one sharp word);
4. `low_confidence`: the best retrieved source's cosine similarity is below `min_similarity`.
After answering: 5. `dont_know`: the model's answer says it does not know.

Without a classifier rule 3 is off, and topic labels (in 2) are refused; with one, every label the
rules name must be one of its labels (`Policy.check_labels`).
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass

from lmforge.errors import LmforgeError
from lmforge.support.config import EscalationRules

REASONS = ("human_request", "topic", "negative_sentiment", "low_confidence", "dont_know")
Scores = dict[str, float]  # classifier label -> probability, for one user turn


@dataclass(frozen=True)
class Escalation:
    """Why a conversation goes to a person."""

    reason: str  # one of REASONS
    detail: str  # what fired, in words


def _compile(patterns: Sequence[str], where: str) -> list[re.Pattern[str]]:
    try:
        return [re.compile(p, re.IGNORECASE) for p in patterns]
    except re.error as e:
        raise LmforgeError(f"escalation.{where}: the pattern {e.pattern!r} is not a valid regex ({e})") from None


class Policy:
    """The escalation rules with their patterns compiled."""

    def __init__(self, rules: EscalationRules) -> None:
        self.rules = rules
        self.human = _compile(rules.human_request, "human_request")
        self.topics = {name: _compile(p, f"topics.{name}") for name, p in rules.topics.items()}
        self.dont_know = _compile(rules.dont_know, "dont_know")

    def check_labels(self, labels: Sequence[str] | None, where: str) -> None:
        """Refuse classifier labels the rules need but the classifier (or its absence) cannot give."""
        if labels is None:
            if self.rules.topic_labels:
                raise LmforgeError(f"{where}: escalation.topic_labels needs a classifier; name one (classifier: "
                                   "a `lmforge classify` run) or remove topic_labels")
            return
        wanted = [*self.rules.topic_labels, *([self.rules.sentiment.label] if self.rules.sentiment.label else [])]
        missing = [w for w in wanted if w not in labels]
        if missing:
            raise LmforgeError(f"{where}: the classifier has no label {missing[0]!r} (it has {', '.join(labels)}); "
                               "fix escalation.topic_labels / escalation.sentiment.label ('' turns sentiment off)")

    def before_answer(self, user_turns: Sequence[str], scores: Sequence[Scores] | None,
                      best_similarity: float | None) -> Escalation | None:
        """The rule that hands the last user turn over before any answer, or None.

        `scores`: the classifier's scores of each user turn (None without a classifier);
        `best_similarity`: the best source's cosine similarity (None: nothing retrieved)."""
        last = user_turns[-1]
        for pattern in self.human:
            if pattern.search(last):
                return Escalation("human_request", f"the user asked for a person ({pattern.pattern})")
        for topic, patterns in self.topics.items():
            if any(p.search(last) for p in patterns):
                return Escalation("topic", f"the message is about {topic}")
        if scores:  # with a classifier
            for label in self.rules.topic_labels:
                if scores[-1].get(label, 0.0) >= self.rules.topic_threshold:
                    return Escalation("topic", f"the classifier says {label} ({scores[-1][label]:.2f})")
            fired = self._persistent_negative(scores)
            if fired:
                return fired
        if best_similarity is None or best_similarity < self.rules.min_similarity:
            got = "nothing retrieved" if best_similarity is None else f"best similarity {best_similarity:.2f}"
            return Escalation("low_confidence", f"{got} < {self.rules.min_similarity}")
        return None

    def _persistent_negative(self, scores: Sequence[Scores]) -> Escalation | None:
        rule = self.rules.sentiment
        if not rule.label or rule.turns < 1:
            return None
        recent = scores[-rule.turns:]
        if len(recent) == rule.turns and all(s.get(rule.label, 0.0) >= rule.threshold
                                                                for s in recent):
            return Escalation("negative_sentiment",
                              f"{rule.label} >= {rule.threshold} on the last {rule.turns} user turns")
        return None

    def after_answer(self, answer: str) -> Escalation | None:
        """`dont_know` when the model's answer says it cannot answer."""
        for pattern in self.dont_know:
            if pattern.search(answer):
                return Escalation("dont_know", f"the model could not answer ({pattern.pattern})")
        return None


__all__ = ["REASONS", "Escalation", "Policy", "Scores"]
