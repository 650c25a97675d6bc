"""The index: updates equal a fresh rebuild, exact FAISS equals numpy, RRF, a checked embedder, atomic updates."""

from __future__ import annotations

import numpy as np
import pytest

from lmforge.errors import LmforgeError
from lmforge.rag import Document, Index, IndexSettings, index_documents, reciprocal_rank_fusion
from rag_fakes import HashEmbedder

TOPICS = {
    "refunds.md": "# Refunds\n\nA refund is paid within 30 days of purchase to the original card.",
    "password.md": "# Password\n\nReset your password with the Forgot password link on the login page.",
    "shipping.md": "# Shipping\n\nOrders ship worldwide in five working days; tracking arrives by email.",
    "invoices.md": "# Invoices\n\nDownload invoices as PDF from the Billing page of your account.",
    "teams.md": "# Teams\n\nInvite team members from Settings; each seat is billed monthly.",
    "export.md": "# Export\n\nExport your data as CSV from the Reports tab; large exports arrive by email.",
}
QUERIES = ["how do I get a refund", "forgot my password", "where is my order tracking", "invoice pdf billing",
           "add a seat for my team", "export csv", "email"]
SMALL = IndexSettings(max_tokens=24, overlap=6)


def docs(texts: dict[str, str]) -> list[Document]:
    return [Document(k, v) for k, v in texts.items()]


def results(folder, embedder) -> list:
    index = Index.open(folder, embedder)
    out = [[(h.doc_id, h.chunk, h.text, round(h.score, 5)) for h in index.search(q, k=4, mode=m)]
           for q in QUERIES for m in ("dense", "lexical", "hybrid")]
    index.close()
    return out


@pytest.mark.parametrize("kind", ["flat", "hnsw"])
def test_add_replace_delete_equals_a_fresh_rebuild(tmp_path, kind):
    embedder, settings = HashEmbedder(), IndexSettings(kind=kind, max_tokens=24, overlap=6)
    first = dict(list(TOPICS.items())[:4])
    index_documents(tmp_path / "inc", docs(first), embedder, "hash", settings=settings)
    changed = {**first, "password.md": first["password.md"] + "\n\nA reset link expires after one hour."}
    changed.update({"teams.md": TOPICS["teams.md"], "export.md": TOPICS["export.md"]})
    report = index_documents(tmp_path / "inc", docs(changed), embedder, "hash")
    assert (report.added, report.replaced, report.unchanged) == (2, 1, 3)
    report = index_documents(tmp_path / "inc", [], embedder, "hash", delete=["shipping.md"])
    assert report.deleted == 1
    final = {k: v for k, v in changed.items() if k != "shipping.md"}
    index_documents(tmp_path / "fresh", docs(final), embedder, "hash", settings=settings)
    assert results(tmp_path / "inc", embedder) == results(tmp_path / "fresh", embedder)
    assert Index.open(tmp_path / "inc").doc_ids() == sorted(final)


def test_unchanged_documents_are_not_embedded_again(tmp_path):
    embedder = HashEmbedder()
    index_documents(tmp_path / "i", docs(TOPICS), embedder, "hash", settings=SMALL)
    before = embedder.calls
    report = index_documents(tmp_path / "i", docs(TOPICS), embedder, "hash")
    assert (report.unchanged, report.embedded) == (len(TOPICS), 0)
    assert embedder.calls == before + 1  # only the probe that checks the embedder


def test_exact_search_equals_brute_force_numpy(tmp_path):
    rng = np.random.default_rng(0)
    vocab = [f"w{i}" for i in range(60)]
    texts = {f"d{i}.md": " ".join(rng.choice(vocab, size=12)) for i in range(80)}
    embedder = HashEmbedder(dim=16)
    index_documents(tmp_path / "i", docs(texts), embedder, "hash", settings=IndexSettings(max_tokens=64))
    index = Index.open(tmp_path / "i", embedder)
    names = list(texts)
    matrix = embedder.embed([texts[n] for n in names])
    matrix /= np.linalg.norm(matrix, axis=1, keepdims=True)
    for q in ["w1 w2 w3", "w50", "w7 w7 w9 w30 w41"]:
        qv = embedder.embed([q])[0]
        scores = matrix @ (qv / np.linalg.norm(qv))
        order = np.argsort(-scores, kind="stable")[:10]
        hits = index.search(q, k=10, mode="dense")
        assert [h.doc_id for h in hits] == [names[i] for i in order]
        np.testing.assert_allclose([h.score for h in hits], scores[order], rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose([h.similarity for h in hits], scores[order], rtol=1e-5, atol=1e-6)


def test_reciprocal_rank_fusion_ranks_as_specified():
    fused = reciprocal_rank_fusion([["a", "b", "c"], ["c", "d", "a"]], k0=60)
    expected = {"a": 1 / 61 + 1 / 63, "b": 1 / 62, "c": 1 / 63 + 1 / 61, "d": 1 / 62}
    assert dict(fused) == pytest.approx(expected)
    # a and c tie on score and best rank (1st): the first list's wins; b and d tie: b, the first list's
    assert [item for item, _ in fused] == ["a", "c", "b", "d"]
    assert [i for i, _ in reciprocal_rank_fusion([[1, 2], [2, 3]], k0=0)] == [2, 1, 3]  # 1/2 + 1/1 beats 1/1


def test_hybrid_search_fuses_the_dense_and_lexical_rankings(tmp_path):
    embedder = HashEmbedder()
    index_documents(tmp_path / "i", docs(TOPICS), embedder, "hash", settings=SMALL)
    index = Index.open(tmp_path / "i", embedder)
    for q in QUERIES:
        dense = [(h.doc_id, h.chunk) for h in index.search(q, k=50, mode="dense")]
        lexical = [(h.doc_id, h.chunk) for h in index.search(q, k=50, mode="lexical")]
        expected = reciprocal_rank_fusion([dense, lexical])[:3]
        hits = index.search(q, k=3, mode="hybrid")
        assert [((h.doc_id, h.chunk), h.score) for h in hits] == [(item, pytest.approx(s)) for item, s in expected]


def test_a_different_embedder_is_refused(tmp_path):
    index_documents(tmp_path / "i", docs(TOPICS), HashEmbedder(seed=0), "models/a", settings=SMALL)
    for call in (lambda: Index.open(tmp_path / "i", HashEmbedder(seed=1), "models/b"),
                 lambda: index_documents(tmp_path / "i", docs(TOPICS), HashEmbedder(seed=1), "models/b")):
        with pytest.raises(LmforgeError, match=r"built with the embedder models/a .* models/b gives other vectors"):
            call()
    with pytest.raises(LmforgeError, match="dense search needs the embedder"):
        Index.open(tmp_path / "i").search("refund", mode="dense")
    assert Index.open(tmp_path / "i").search("refund", mode="lexical")[0].doc_id == "refunds.md"


def test_an_interrupted_update_leaves_the_previous_index_usable(tmp_path):
    embedder = HashEmbedder()
    index_documents(tmp_path / "i", docs(TOPICS), embedder, "hash", settings=SMALL)
    before = sorted(p.name for p in (tmp_path / "i").iterdir())
    expected = results(tmp_path / "i", embedder)

    def crash(done: int, total: int) -> None:
        raise KeyboardInterrupt

    more = {k: v + " More text." for k, v in TOPICS.items()}
    with pytest.raises(KeyboardInterrupt):
        index_documents(tmp_path / "i", docs(more), embedder, "hash", progress=crash)
    assert sorted(p.name for p in (tmp_path / "i").iterdir()) == before
    assert results(tmp_path / "i", embedder) == expected


def test_bad_updates_are_one_line_errors(tmp_path):
    embedder = HashEmbedder()
    index_documents(tmp_path / "i", docs(TOPICS), embedder, "hash", settings=SMALL)
    with pytest.raises(LmforgeError, match=r"has no document 'nope\.md' to delete"):
        index_documents(tmp_path / "i", [], embedder, "hash", delete=["nope.md"])
    with pytest.raises(LmforgeError, match="nothing to index"):
        index_documents(tmp_path / "empty", [], embedder, "hash")
    with pytest.raises(LmforgeError, match="is both given and to be deleted"):
        index_documents(tmp_path / "i", docs(TOPICS), embedder, "hash", delete=["teams.md"])
    with pytest.raises(LmforgeError, match="is not a retrieval index"):
        Index.open(tmp_path / "missing")
    with pytest.raises(LmforgeError, match="unknown index kind"):
        index_documents(tmp_path / "j", docs(TOPICS), embedder, "hash", settings=IndexSettings(kind="annoy"))
    assert not (tmp_path / "j" / "CURRENT").exists()
