"""The assistant: grounded answers with citations, handovers in a durable queue, the policy file."""

from __future__ import annotations

import pytest
import yaml

from lmforge.errors import LmforgeError
from lmforge.rag import Document, Index, IndexSettings, index_documents
from lmforge.support import Assistant, HandoverQueue, SupportConfig, read_support_config
from lmforge.support.config import EscalationRules, SentimentRule
from rag_fakes import HashEmbedder

DOCS = {
    "refunds.md": "# Refunds\n\nA refund is paid within 30 days. It goes back to the original card.",
    "password.md": "# Password\n\nReset your password with the Forgot password link. The link expires in an hour.",
}


class FakeChat:
    """Answers from the first source it is given, or says it does not know."""

    def __init__(self, answer: str | None = None) -> None:
        self.answer, self.prompts = answer, []

    def chat(self, messages, **kwargs):
        self.prompts.append(messages)
        return self.answer if self.answer is not None else "Refunds are paid within 30 days [1]. See also [9]."


@pytest.fixture
def index(tmp_path):
    embedder = HashEmbedder()
    index_documents(tmp_path / "idx", [Document(k, v) for k, v in DOCS.items()], embedder, "hash",
                    settings=IndexSettings(max_tokens=64))
    return Index.open(tmp_path / "idx", embedder)


def assistant(index, tmp_path, chat=None, classify=None, labels=None, **rules):
    config = SupportConfig(index=str(tmp_path / "idx"), handovers=str(tmp_path / "queue.sqlite"),
                           escalation=EscalationRules(min_similarity=0.2, **rules))
    return Assistant(config, index, HandoverQueue(config.handovers), chat, classify, labels)


def user(*texts):
    return [{"role": "user", "content": t} for t in texts]


def test_an_answer_cites_its_sources_and_the_prompt_holds_them(index, tmp_path):
    chat = FakeChat()
    reply = assistant(index, tmp_path, chat).reply(user("refund paid days card"))
    assert reply.escalation is None and reply.text.startswith("Refunds are paid")
    assert reply.sources[0].doc_id == "refunds.md" and reply.cited == [1]  # [9] is not a source: ignored
    system = chat.prompts[0][0]["content"]
    assert "[1] (refunds.md)" in system and "A refund is paid within 30 days" in system
    extra = reply.extra()
    assert extra["escalation"] is None and extra["sources"][0]["cited"] is True


def test_without_a_chat_model_the_answer_is_extractive(index, tmp_path):
    reply = assistant(index, tmp_path).reply(user("when does the password link expire"))
    assert reply.text == "Reset your password with the Forgot password link. The link expires in an hour. [1]"
    assert reply.cited == [1]


def test_a_handover_is_queued_with_the_conversation_sources_and_scores(index, tmp_path):
    classify = lambda texts: [{"negative": 0.9, "positive": 0.1} for _ in texts]  # noqa: E731
    bot = assistant(index, tmp_path, FakeChat(), classify, ["negative", "positive"],
                    sentiment=SentimentRule(turns=2))
    first = bot.reply(user("refund paid days card"))
    assert first.escalation is None  # one negative turn is not enough
    messages = [*user("refund paid days card"), {"role": "assistant", "content": first.text},
                *user("still no refund card")]
    reply = bot.reply(messages)
    assert reply.escalation.reason == "negative_sentiment" and reply.text == bot.config.handover_message
    [handover] = HandoverQueue(tmp_path / "queue.sqlite").list()
    assert (handover.id, handover.reason) == (reply.handover_id, "negative_sentiment")
    assert handover.conversation == messages and handover.sources[0]["doc_id"] == "refunds.md"
    assert handover.scores == [{"negative": 0.9, "positive": 0.1}] * 2


def test_the_model_not_knowing_hands_over(index, tmp_path):
    reply = assistant(index, tmp_path, FakeChat("I don't know.")).reply(user("refund paid days card"))
    assert reply.escalation.reason == "dont_know" and reply.handover_id == 1


def test_the_policy_file_resolves_paths_and_refuses_bad_keys(tmp_path):
    path = tmp_path / "conf" / "support.yaml"
    path.parent.mkdir()
    path.write_text(yaml.safe_dump({"index": "kb.index", "retrieval": {"k": 3},
                                    "escalation": {"sentiment": {"turns": 3}, "topics": {"legal": ["sue"]}}}))
    config = read_support_config(path)
    assert config.index == str(tmp_path / "conf" / "kb.index")
    assert (config.retrieval.k, config.escalation.sentiment.turns) == (3, 3)
    path.write_text(yaml.safe_dump({"index": "x", "escalation": {"sentiment": {"turn": 3}}}))
    with pytest.raises(LmforgeError, match=r"unknown keys in section 'support.escalation.sentiment': \['turn'\]"):
        read_support_config(path)


def test_a_missing_classifier_is_one_line(tmp_path, cli):
    path = tmp_path / "support.yaml"
    path.write_text(yaml.safe_dump({"index": "kb.index", "classifier": "runs/nope"}))
    out = cli("support", "--config", path)
    assert out.returncode == 2 and out.stderr.count("\n") == 1
    assert "classifier" in out.stderr and "does not exist" in out.stderr
