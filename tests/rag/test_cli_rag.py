"""`lmforge rag index` / `rag query` end to end with a tiny random BERT encoder, as a user runs them."""

from __future__ import annotations

import json

import pytest

from hf_tiny import hf_model, save_wordpiece
from lmforge.rag import Index

WORDS = ["refund", "password", "reset", "ship", "order", "days", "the", "a", "your", "link", "card", "email", "how",
         "do", "i", "get", "my", "in", "is", "by", "paid", "within", "30", "login", "page", "orders", "five", "."]


def encoder(folder, seed_shift: float = 0.0):
    model = hf_model("bert")
    for p in model.parameters():  # a different encoder when asked
        p.data.add_(seed_shift)
    model.save_pretrained(folder)
    save_wordpiece(folder, WORDS)
    return folder


@pytest.fixture(scope="module")
def kb(tmp_path_factory):
    root = tmp_path_factory.mktemp("kb")
    (root / "docs" / "billing").mkdir(parents=True)
    (root / "docs" / "billing" / "refund.md").write_text("# refund\n\na refund is paid within 30 days to your card.")
    (root / "docs" / "password.txt").write_text("reset your password by the link in the login page.")
    (root / "docs" / "ship.html").write_text("<h1>ship</h1><p>orders ship in five days.</p>")
    return root


def test_index_then_query_prints_hits_as_json(kb, cli):
    model = encoder(kb / "enc")
    out = cli("rag", "index", kb / "docs", "--embedder", model, "--out", kb / "idx", "--max-tokens", "40",
              "--overlap", "8")
    assert out.returncode == 0, out.stderr
    assert "3 chunks; documents added 3" in out.stdout
    out = cli("rag", "query", kb / "idx", "how do i get my refund", "-k", "2", "--json")
    assert out.returncode == 0, out.stderr
    hits = json.loads(out.stdout)
    assert len(hits) == 2 and set(hits[0]) == {"doc_id", "chunk", "score", "text"}
    assert hits[0]["doc_id"] == "billing/refund.md"  # lexical agreement puts it first in the fused ranking
    out = cli("rag", "index", "--embedder", model, "--out", kb / "idx", "--delete", "ship.html")
    assert out.returncode == 0 and "deleted 1" in out.stdout, out.stderr
    assert Index.open(kb / "idx").doc_ids() == ["billing/refund.md", "password.txt"]


def test_a_mismatched_embedder_is_one_line(kb, cli):
    other = encoder(kb / "other", seed_shift=0.05)
    out = cli("rag", "query", kb / "idx", "refund", "--embedder", other)
    assert out.returncode == 2
    assert out.stderr.startswith("lmforge: error: ") and out.stderr.count("\n") == 1
    assert "built with the embedder" in out.stderr
