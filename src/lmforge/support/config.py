"""`support.yaml`: what the assistant retrieves from, which models it runs, when it hands over, where handovers go.

Every key is a dataclass field below, documented by its comment; unknown keys are refused in one
line (`config.build`). Relative paths are read relative to the YAML file.

    index: kb.index                 # built by `lmforge rag index`
    chat: runs/support-chat         # optional: without it answers are extractive (quoted from the top source)
    classifier: runs/sentiment      # optional: a `lmforge classify` model scoring each user turn
    retrieval: {k: 4, mode: hybrid}
    escalation: {min_similarity: 0.35, sentiment: {label: negative, threshold: 0.8, turns: 2}, topics: {...}}
    handovers: handovers.sqlite
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields, is_dataclass
from pathlib import Path
from typing import Any

import yaml

from lmforge.config import build
from lmforge.errors import LmforgeError

HUMAN_REQUEST = [  # a user asking for a person
    r"\b(talk|speak|chat)\s+(to|with)\s+(a|an|some)?\s*(human|person|agent|representative|someone)\b",
    r"\b(real|live)\s+(person|human|agent)\b", r"\bhuman\s+(agent|being|support)\b",
    r"\b(transfer|connect|put)\s+me\b", r"\bcustomer\s+service\s+rep", r"\bescalate\b",
]
DONT_KNOW = [  # the model saying it cannot answer from the sources
    r"\bi\s+(do\s+not|don't|dont)\s+know\b", r"\bi('m|\s+am)\s+not\s+sure\b", r"\bno\s+information\b",
    r"\b(cannot|can't|could\s+not|couldn't)\s+find\b", r"\bnot\s+in\s+the\s+sources\b",
]


@dataclass(frozen=True)
class RetrievalSettings:
    k: int = 4  # sources retrieved per user turn (and numbered [1]..[k] for the model)
    mode: str = "hybrid"  # "dense", "lexical" or "hybrid" (reciprocal-rank fusion)


@dataclass(frozen=True)
class AnswerSettings:
    system: str = ("You are a customer-support assistant. Answer only from the numbered sources and cite them like "
                   "[1]. If the sources do not answer the question, say \"I don't know\".")
    max_new_tokens: int = 200  # tokens per answer
    temperature: float = 0.0  # 0 = greedy: the same question gets the same answer
    extract_sentences: int = 2  # extractive answers (no chat model): sentences quoted from the top source


@dataclass(frozen=True)
class SentimentRule:
    label: str = "negative"  # the classifier label that counts as negative sentiment
    threshold: float = 0.8  # its probability at or above which a turn is negative
    turns: int = 2  # hand over after this many negative user turns in a row


@dataclass(frozen=True)
class EscalationRules:
    human_request: list[str] = field(default_factory=lambda: list(HUMAN_REQUEST))  # regexes (case-insensitive)
    sentiment: SentimentRule = field(default_factory=SentimentRule)  # needs `classifier`
    topics: dict[str, list[str]] = field(default_factory=dict)  # topic -> regexes that hand it over
    topic_labels: list[str] = field(default_factory=list)  # classifier labels that hand a turn over
    topic_threshold: float = 0.5  # probability at or above which a topic label counts
    min_similarity: float = 0.3  # hand over when the best source's cosine similarity is below this
    dont_know: list[str] = field(default_factory=lambda: list(DONT_KNOW))  # regexes on the model's answer


@dataclass(frozen=True)
class SupportConfig:
    index: str  # the index folder (`lmforge rag index`)
    embedder: str | None = None  # the encoder; default: the one the index records
    chat: str | None = None  # the chat model; None: extractive answers
    classifier: str | None = None  # a `lmforge classify` model: sentiment and topic labels per user turn
    handovers: str = "handovers.sqlite"  # the SQLite queue handovers are appended to
    handover_message: str = ("I'm handing this conversation to a person from our support team; they will reply "
                             "here shortly.")
    doc_url: str = "#{doc_id}"  # a source's link; {doc_id} is replaced by its id
    retrieval: RetrievalSettings = field(default_factory=RetrievalSettings)
    answer: AnswerSettings = field(default_factory=AnswerSettings)
    escalation: EscalationRules = field(default_factory=EscalationRules)


def read_support_config(path: str | Path) -> SupportConfig:
    """The policy file at `path`, its relative paths resolved against its folder."""
    path = Path(path)
    if not path.is_file():
        raise LmforgeError(f"support config {path} does not exist; write one (see README: Support assistant)")
    try:
        values = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except yaml.YAMLError as e:
        raise LmforgeError(f"{path} is not valid YAML ({str(e).splitlines()[0]})") from None
    if not isinstance(values, dict) or "index" not in values:
        raise LmforgeError(f"{path} must be a mapping with at least an 'index' key")
    for key in ("index", "embedder", "chat", "classifier", "handovers"):
        if values.get(key):
            values[key] = str(path.parent / str(values[key]))
    return _nested(SupportConfig, values, "support")


def _nested(cls: type, values: dict[str, Any], section: str) -> Any:
    """`config.build` one level down too: sections that are dataclasses are built from their mappings."""
    values = dict(values)
    for f in fields(cls):
        kind = f.default_factory() if callable(f.default_factory) else None  # type: ignore[misc]
        if is_dataclass(kind) and f.name in values:
            given = values[f.name]
            if not isinstance(given, dict):
                raise LmforgeError(f"section '{section}.{f.name}' must be a mapping")
            values[f.name] = _nested(type(kind), given, f"{section}.{f.name}")
    return build(cls, values, section)


__all__ = ["AnswerSettings", "EscalationRules", "RetrievalSettings", "SentimentRule", "SupportConfig",
           "read_support_config"]
