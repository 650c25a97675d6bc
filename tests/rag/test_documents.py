"""Reading documents and cutting them into chunks that fit the embedder's token budget."""

from __future__ import annotations

import itertools
import json
import random
import re

import pytest

from lmforge.errors import LmforgeError
from lmforge.rag.documents import Document, chunk_document, html_to_markdown, read_documents, sections
from rag_fakes import WordTokenizer

count = lambda text: len(WordTokenizer().encode(text))  # noqa: E731


def words(text: str) -> list[str]:
    return re.findall(r"\w+", text)


def test_sections_follow_the_heading_path():
    text = "intro line\n\n# Billing\n\npara one\n\n## Refunds\n\nr1\n\nr2\n\n# Shipping ###\n\ns1"
    assert sections(text) == [("", ["intro line"]), ("Billing", ["para one"]), ("Billing > Refunds", ["r1", "r2"]),
                              ("Shipping", ["s1"])]


def test_html_becomes_headings_and_paragraphs_without_scripts():
    html = ("<html><head><title>T</title><style>p{}</style></head><body><h2>Reset</h2><p>Click <b>Forgot</b>.</p>"
            "<script>alert(1)</script><ul><li>one</li><li>two</li></ul></body></html>")
    assert html_to_markdown(html) == "## Reset\n\nClick Forgot.\n\none\n\ntwo"


def random_document(rng: random.Random) -> str:
    vocab = ["refund", "password", "invoice", "ship", "order", "account", "card", "plan", "team", "export"]
    parts = []
    for s in range(rng.randint(1, 4)):
        parts.append(f"{'#' * rng.randint(1, 3)} Section {s}")
        for _ in range(rng.randint(1, 5)):  # paragraphs of 1..8 sentences of 1..30 words
            sentences = [" ".join(rng.choice(vocab) for _ in range(rng.randint(1, 30))) + "."
                         for _ in range(rng.randint(1, 8))]
            parts.append(" ".join(sentences))
    return "\n\n".join(parts)


@pytest.mark.parametrize("seed", range(6))
@pytest.mark.parametrize(("max_tokens", "overlap"), [(24, 0), (40, 12), (120, 30)])
def test_chunks_fit_the_budget_keep_every_word_and_overlap(seed, max_tokens, overlap):
    doc = Document("d", random_document(random.Random(seed)))
    chunks = chunk_document(doc, count, max_tokens, overlap)
    assert [c.chunk for c in chunks] == list(range(len(chunks)))
    assert all(count(c.text) <= max_tokens for c in chunks)
    for heading, paragraphs in sections(doc.text):  # the section's words, in order, are covered by its chunks
        mine = [c for c in chunks if c.heading == heading]
        assert all(c.text.startswith(heading + "\n\n") for c in mine)
        body_words = [w for c in mine for w in words(c.text.removeprefix(heading + "\n\n"))]
        assert set(words(" ".join(paragraphs))) <= set(body_words)
        assert len(body_words) >= len(words(" ".join(paragraphs)))
        for a, b in itertools.pairwise(mine):  # overlap: b starts with a's tail, within `overlap` tokens
            pa, pb = (c.text.removeprefix(heading + "\n\n").split("\n\n") for c in (a, b))
            shared = next((n for n in range(min(len(pa), len(pb)), 0, -1) if pa[-n:] == pb[:n]), 0)
            assert shared < len(pa) and count("\n\n".join(pb[:shared])) <= overlap
            if overlap and shared == 0:  # nothing repeated: the last piece of a alone would not fit b's room
                assert count(pa[-1]) > overlap or count("\n\n".join([pa[-1], *pb])) > max_tokens - count(heading)


def test_chunks_fit_a_real_tokenizer(tiny_tokenizer):
    real = lambda text: len(tiny_tokenizer.encode(text))  # noqa: E731
    doc = Document("d", random_document(random.Random(7)))
    chunks = chunk_document(doc, real, 50, 10)
    assert len(chunks) > 3 and all(real(c.text) <= 50 for c in chunks)


def test_a_paragraph_that_fits_stays_whole():
    doc = Document("d", "# A\n\none two three.\n\nfour five.\n\nsix.")
    assert [c.text for c in chunk_document(doc, count, 100)] == ["A\n\none two three.\n\nfour five.\n\nsix."]
    assert [c.text for c in chunk_document(doc, count, 7)] == ["A\n\none two three.", "A\n\nfour five.\n\nsix."]


def test_documents_are_named_by_relative_path_or_jsonl_id(tmp_path):
    (tmp_path / "kb" / "billing").mkdir(parents=True)
    (tmp_path / "kb" / "billing" / "refunds.md").write_text("# Refunds\n\n30 days.")
    (tmp_path / "kb" / "faq.jsonl").write_text(json.dumps({"id": 7, "title": "Reset", "text": "Use the link."}) + "\n")
    (tmp_path / "kb" / "image.png").write_bytes(b"\x89PNG\0")  # not a document extension: not read
    docs = read_documents([tmp_path / "kb"])
    assert [(d.doc_id, d.text) for d in docs] == [("billing/refunds.md", "# Refunds\n\n30 days."),
                                                  ("7", "# Reset\n\nUse the link.")]


@pytest.mark.parametrize(("name", "content", "needle"), [
    ("empty.md", b"  \n\n", "is empty"),
    ("blob.txt", b"abc\0def", "is a binary file"),
    ("latin.txt", "café".encode("latin-1"), "is not UTF-8"),
    ("doc.pdf", b"%PDF", "unknown extension"),
    ("rows.jsonl", b'{"id": 1}\n', 'needs an "id" and a "text"'),
    ("broken.jsonl", b"{nope\n", "is not valid JSON"),
])
def test_bad_documents_are_one_line_errors(tmp_path, name, content, needle):
    (tmp_path / name).write_bytes(content)
    with pytest.raises(LmforgeError, match=needle) as err:
        read_documents([tmp_path / name])
    assert "\n" not in str(err.value)


def test_duplicate_ids_and_missing_paths_are_refused(tmp_path):
    (tmp_path / "a.jsonl").write_text('{"id": "x", "text": "one"}\n{"id": "x", "text": "two"}\n')
    with pytest.raises(LmforgeError, match="two documents have the id 'x'"):
        read_documents([tmp_path / "a.jsonl"])
    with pytest.raises(LmforgeError, match="does not exist"):
        read_documents([tmp_path / "nope"])
