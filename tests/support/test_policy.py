"""Each escalation rule fires on its case and not on a neutral one."""

from __future__ import annotations

import pytest

from lmforge.errors import LmforgeError
from lmforge.support.config import EscalationRules, SentimentRule
from lmforge.support.policy import Policy

RULES = EscalationRules(topics={"legal": [r"\blawyer\b", r"\bsue\b"]}, topic_labels=["cancel"], min_similarity=0.4,
                        sentiment=SentimentRule(label="negative", threshold=0.8, turns=2))
NEUTRAL = {"negative": 0.1, "positive": 0.9, "cancel": 0.05}
ANGRY = {"negative": 0.95, "positive": 0.05, "cancel": 0.05}
NEUTRAL_TEXT = "How do I download my invoice?"


def reason(user_turns, scores=None, similarity=0.9):
    fired = Policy(RULES).before_answer(user_turns, scores, similarity)
    return fired.reason if fired else None


def test_a_neutral_turn_is_answered():
    assert reason([NEUTRAL_TEXT], [NEUTRAL]) is None
    assert reason([NEUTRAL_TEXT]) is None  # no classifier
    assert Policy(RULES).after_answer("Open Billing and press Download [1].") is None


@pytest.mark.parametrize("text", ["Can I talk to a human please?", "I want a real person", "transfer me to an agent",
                                  "Let me speak with someone"])
def test_a_request_for_a_person(text):
    assert reason([text], [NEUTRAL]) == "human_request"


def test_a_sensitive_topic_by_pattern_or_label():
    assert reason(["My lawyer will hear about this invoice"], [NEUTRAL]) == "topic"
    assert reason(["I want to leave"], [{**NEUTRAL, "cancel": 0.7}]) == "topic"
    assert reason(["the lawyers tab"], [NEUTRAL]) is None  # \b: a pattern is a word, not a substring


def test_negative_sentiment_must_persist_for_n_turns():
    assert reason(["this is broken", NEUTRAL_TEXT], [ANGRY, NEUTRAL]) is None  # recovered
    assert reason([NEUTRAL_TEXT, "still broken!"], [NEUTRAL, ANGRY]) is None  # one turn only
    assert reason(["broken", "still broken!"], [ANGRY, ANGRY]) == "negative_sentiment"
    assert reason(["broken", "still broken!"], [ANGRY, {**ANGRY, "negative": 0.79}]) is None  # below threshold


def test_low_retrieval_confidence():
    assert reason([NEUTRAL_TEXT], [NEUTRAL], similarity=0.39) == "low_confidence"
    assert reason([NEUTRAL_TEXT], [NEUTRAL], similarity=None) == "low_confidence"
    assert reason([NEUTRAL_TEXT], [NEUTRAL], similarity=0.41) is None


@pytest.mark.parametrize("answer", ["I don't know.", "I'm not sure about that.", "I could not find this in the sources"])
def test_the_model_not_knowing(answer):
    assert Policy(RULES).after_answer(answer).reason == "dont_know"


def test_rules_that_need_labels_the_classifier_lacks_are_refused():
    policy = Policy(RULES)
    with pytest.raises(LmforgeError, match="topic_labels needs a classifier"):
        policy.check_labels(None, "support.yaml")
    with pytest.raises(LmforgeError, match="has no label 'cancel'"):
        policy.check_labels(["negative", "positive"], "support.yaml")
    policy.check_labels(["negative", "positive", "cancel"], "support.yaml")
    with pytest.raises(LmforgeError, match="not a valid regex"):
        Policy(EscalationRules(topics={"x": ["(unclosed"]}))
