"""The support assistant: per user turn, retrieve, then answer with numbered citations or hand over to a person.

    assistant = open_assistant(read_support_config("support.yaml"))
    reply = assistant.reply([{"role": "user", "content": "How do I get a refund?"}])
    reply.text, reply.sources, reply.escalation, reply.handover_id

Design choices:
- **Stateless per turn**: the conversation comes in whole (as the OpenAI chat endpoint sends it),
  so the same assistant serves the CLI, the server and the evaluation script; the classifier
  scores every user turn (cached), which is what the persistent-sentiment rule needs.
- **Grounding is in the prompt**: the retrieved chunks are listed as `[1]..[k]` in the system
  message and the model is told to cite them and to say "I don't know" otherwise; the answer's
  `[n]` marks become `cited`. Without a chat model the answer is extractive: the sentences of the
  top source that share most words with the question, cited as [1].
- **A handover is durable before it is announced**: the record goes to the SQLite queue
  (`handovers.py`) first, then the reply tells the user a person will take over.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Any, Protocol

from lmforge.errors import LmforgeError
from lmforge.rag import Hit, Index
from lmforge.support.config import SupportConfig
from lmforge.support.handovers import HandoverQueue
from lmforge.support.policy import Escalation, Policy, Scores

Message = dict[str, Any]
Classify = Callable[[Sequence[str]], list[Scores]]  # texts -> each text's label probabilities
CITATION = re.compile(r"\[(\d+)\]")
WORD = re.compile(r"\w+")


class Chat(Protocol):
    """A chat model (`lmforge.api.LM` is one)."""

    def chat(self, messages: list[Message], **kwargs: Any) -> str: ...


@dataclass(frozen=True)
class Source:
    """A retrieved chunk as numbered for the model and shown to the user."""

    n: int  # its number in the answer's citations, from 1
    doc_id: str
    chunk: int
    score: float  # the retrieval mode's score
    similarity: float | None  # cosine similarity to the question
    text: str
    url: str  # where the document is read (`doc_url` with its id)


@dataclass(frozen=True)
class SupportReply:
    """The assistant's turn."""

    text: str  # the answer, or the handover message
    sources: list[Source]
    cited: list[int]  # source numbers the answer cites
    escalation: Escalation | None = None
    handover_id: int | None = None  # the queue id, when handed over
    scores: list[Scores] = field(default_factory=list)  # classifier scores of each user turn

    def extra(self) -> dict[str, Any]:
        """The `support` field of a chat completion: sources (with `cited`) and the escalation, or null."""
        sources = [{"n": s.n, "doc_id": s.doc_id, "chunk": s.chunk, "score": s.score, "similarity": s.similarity,
                    "url": s.url, "cited": s.n in self.cited} for s in self.sources]
        escalation = None
        if self.escalation is not None:
            escalation = {"reason": self.escalation.reason, "detail": self.escalation.detail,
                          "handover_id": self.handover_id}
        return {"sources": sources, "escalation": escalation}


class Assistant:
    """Retrieval + policy + answer + handover queue; see the module docstring."""

    def __init__(self, config: SupportConfig, index: Index, queue: HandoverQueue, chat: Chat | None = None,
                 classify: Classify | None = None, labels: Sequence[str] | None = None) -> None:
        self.config, self.index, self.queue, self.chat = config, index, queue, chat
        self.policy = Policy(config.escalation)
        self.policy.check_labels(None if classify is None else list(labels or []), "support config")
        self.classify = lru_cache(maxsize=4096)(lambda text: classify([text])[0]) if classify else None

    def reply(self, messages: Sequence[Message], chat: Chat | None = None) -> SupportReply:
        """Answer the conversation's last user turn, or hand the conversation over."""
        user_turns = [str(m.get("content") or "") for m in messages if m.get("role") == "user"]
        if not user_turns:
            raise LmforgeError("the conversation has no user message to answer")
        settings = self.config.retrieval
        hits = self.index.search(user_turns[-1], k=settings.k, mode=settings.mode)
        sources = [self._source(n, h) for n, h in enumerate(hits, 1)]
        scores = [self.classify(t) for t in user_turns] if self.classify else []
        best = max((h.similarity for h in hits if h.similarity is not None), default=None)
        escalation = self.policy.before_answer(user_turns, scores or None, best)
        text = ""
        if escalation is None:
            text = self._answer(messages, user_turns[-1], sources, chat or self.chat)
            escalation = self.policy.after_answer(text)
        if escalation is not None:
            handover = self.queue.append(escalation.reason, escalation.detail, list(messages),
                                         [_source_json(s) for s in sources], scores)
            return SupportReply(self.config.handover_message, sources, [], escalation, handover, scores)
        cited = sorted({int(n) for n in CITATION.findall(text) if 1 <= int(n) <= len(sources)})
        return SupportReply(text, sources, cited, None, None, scores)

    def _source(self, n: int, hit: Hit) -> Source:
        url = self.config.doc_url.replace("{doc_id}", hit.doc_id)
        return Source(n, hit.doc_id, hit.chunk, hit.score, hit.similarity, hit.text, url)

    def _answer(self, messages: Sequence[Message], question: str, sources: list[Source], chat: Chat | None) -> str:
        if chat is None:
            return extractive_answer(question, sources, self.config.answer.extract_sentences)
        listed = "\n\n".join(f"[{s.n}] ({s.doc_id})\n{s.text}" for s in sources)
        system = f"{self.config.answer.system}\n\nSources:\n{listed}"
        theirs = [m for m in messages if m.get("role") == "system"]
        turns = [{"role": m["role"], "content": m.get("content") or ""} for m in messages
                 if m.get("role") in ("user", "assistant")]
        extra = "\n\n" + "\n".join(str(m.get("content") or "") for m in theirs) if theirs else ""
        answer = self.config.answer
        return chat.chat([{"role": "system", "content": system + extra}, *turns],
                         max_new_tokens=answer.max_new_tokens, temperature=answer.temperature).strip()


def extractive_answer(question: str, sources: Sequence[Source], n_sentences: int) -> str:
    """The sentences of the top source sharing most words with the question, in their order, cited [1]."""
    if not sources:
        return "I don't know."
    body = sources[0].text.split("\n\n", 1)[-1] if "\n\n" in sources[0].text else sources[0].text
    sentences = [s.strip() for s in re.split(r"(?<=[.!?])\s+|\n+", body) if s.strip()]
    asked = set(WORD.findall(question.lower()))
    ranked = sorted(range(len(sentences)), key=lambda i: -len(asked & set(WORD.findall(sentences[i].lower()))))
    keep = sorted(ranked[:n_sentences])
    return " ".join(sentences[i] for i in keep) + " [1]"


def _source_json(s: Source) -> dict[str, Any]:
    return {"n": s.n, "doc_id": s.doc_id, "chunk": s.chunk, "score": s.score, "similarity": s.similarity,
            "text": s.text}


def open_assistant(config: SupportConfig, chat: Chat | None = None) -> Assistant:
    """Load what `config` names (embedder, index, chat model unless `chat` is given, classifier, queue)."""
    import lmforge
    from lmforge.evaluate.classification import predict

    for key in ("chat", "classifier", "embedder"):
        path = getattr(config, key)
        if path and not Path(path).is_dir():
            raise LmforgeError(f"the support config's {key} {path} does not exist; "
                               f"{'train it with `lmforge classify`' if key == 'classifier' else 'fix the path'} "
                               f"or remove the '{key}' key")
    embedder_name = config.embedder or Index.open(config.index).record.name
    index = Index.open(config.index, lmforge.load(embedder_name), embedder_name)
    if chat is None and config.chat:
        chat = lmforge.load(config.chat)
    classify, labels = None, None
    if config.classifier:
        classifier = lmforge.load(config.classifier)
        labels = list(getattr(classifier.model, "labels", None) or [])

        def classify(texts: Sequence[str]) -> list[Scores]:
            return [p.probabilities for p in predict(classifier.model, classifier.tokenizer, texts)]

    return Assistant(config, index, HandoverQueue(config.handovers), chat, classify, labels)


__all__ = ["Assistant", "Chat", "Source", "SupportReply", "extractive_answer", "open_assistant"]
