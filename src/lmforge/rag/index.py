"""The retrieval index: chunk vectors in FAISS, chunk texts and metadata in SQLite with an FTS5 (BM25) index.

An index is a folder:

    CURRENT                 the live generation, e.g. "3" (replaced atomically: the commit point)
    chunks-3.sqlite         meta (settings, the embedder's record), docs (id, sha256), chunks
                            (text, heading, vector), fts (FTS5 over the chunk texts, porter stemming)
    vectors-3.faiss         the FAISS index over the chunk vectors, ids = chunk ids

Design choices:
- **Copy, change, then switch**: an update copies the live generation, applies the change to the
  copy and switches `CURRENT` to it in one atomic rename; until then readers, and a crash, see the
  previous index whole. Files of older generations are removed after the switch.
- **Incremental by document**: a document whose text is unchanged (sha256) is skipped, a changed one
  has its chunks replaced, a deleted one loses them; only new chunks are embedded. Vectors are kept
  in SQLite too, so an approximate FAISS index is rebuilt from them without embedding anything.
- **FAISS kinds**: `flat` (exact inner product, the default; updated in place with `remove_ids`),
  `hnsw` and `ivf` (approximate, for large collections; rebuilt from the stored vectors on each update:
  HNSW cannot delete, and IVF's lists are retrained for the new collection).
- **Scores say how sure**: dense hits score the cosine similarity, lexical hits BM25 (higher is
  better), hybrid hits the reciprocal-rank fusion sum; every hit also carries its cosine similarity
  to the query when an embedder is at hand, so a caller can judge confidence in any mode.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import sqlite3
import threading
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from lmforge.checkpoint.io import write_text
from lmforge.errors import LmforgeError
from lmforge.rag.documents import Chunk, Document, chunk_document
from lmforge.rag.embedder import Embedder, EmbedderRecord, Progress, embed_texts, record_of, token_counter
from lmforge.rag.fusion import reciprocal_rank_fusion

KINDS = ("flat", "hnsw", "ivf")
MODES = ("dense", "lexical", "hybrid")
SCHEMA = """
CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE docs (doc_id TEXT PRIMARY KEY, sha256 TEXT NOT NULL, n_chunks INTEGER NOT NULL);
CREATE TABLE chunks (id INTEGER PRIMARY KEY, doc_id TEXT NOT NULL, chunk INTEGER NOT NULL, heading TEXT NOT NULL,
                     text TEXT NOT NULL, vector BLOB NOT NULL);
CREATE INDEX chunks_doc ON chunks (doc_id, chunk);
CREATE VIRTUAL TABLE fts USING fts5 (text, tokenize = 'porter unicode61');
"""


@dataclass(frozen=True)
class IndexSettings:
    """How an index is built; fixed when it is created (recorded in its meta table)."""

    kind: str = "flat"  # FAISS index: "flat" (exact), "hnsw" or "ivf" (approximate)
    max_tokens: int = 200  # chunk budget in the embedder's tokens, heading path included
    overlap: int = 40  # tokens of trailing paragraphs/sentences a chunk repeats from the previous one
    hnsw_m: int = 32  # HNSW graph degree
    ef_search: int = 64  # HNSW candidates per query (higher: better recall, slower)
    nprobe: int = 8  # IVF lists searched per query


@dataclass(frozen=True)
class Hit:
    """One retrieved chunk."""

    doc_id: str
    chunk: int
    score: float  # the mode's score: cosine (dense), BM25 (lexical) or fused RRF (hybrid); higher is better
    text: str
    similarity: float | None = None  # cosine similarity to the query, when an embedder is at hand

    def as_json(self) -> dict[str, Any]:
        return {"doc_id": self.doc_id, "chunk": self.chunk, "score": self.score, "text": self.text}


@dataclass(frozen=True)
class UpdateReport:
    """What an update changed."""

    added: int  # documents new to the index
    replaced: int  # documents whose text changed
    unchanged: int  # documents skipped (same text)
    deleted: int
    chunks: int  # chunks in the index afterwards
    embedded: int  # chunks embedded by this update


# ----------------------------------------------------------------------------- files of a generation


def _current(folder: Path) -> int | None:
    path = folder / "CURRENT"
    if not path.is_file():
        return None
    text = path.read_text().strip()
    if not text.isdigit():
        raise LmforgeError(f"{path} is damaged ({text!r}); rebuild the index into a new folder")
    return int(text)


def _db_path(folder: Path, gen: int) -> Path:
    return folder / f"chunks-{gen}.sqlite"


def _vectors_path(folder: Path, gen: int) -> Path:
    return folder / f"vectors-{gen}.faiss"


def _remove_other_generations(folder: Path, keep: int) -> None:
    for path in folder.iterdir():
        match = re.fullmatch(r"\.?(chunks|vectors)-(\d+)\.(sqlite|faiss)(\.tmp)?", path.name)
        if match and (int(match.group(2)) != keep or match.group(4)):
            path.unlink(missing_ok=True)


# ----------------------------------------------------------------------------- FAISS


def _faiss() -> Any:
    try:
        import faiss
    except ImportError:
        raise LmforgeError("the retrieval index needs FAISS; pip install 'lmforge[rag]' (faiss-cpu)") from None
    return faiss


def build_faiss(vectors: np.ndarray, ids: np.ndarray, settings: IndexSettings) -> Any:
    """A FAISS index of `settings.kind` over unit `vectors` (N, dim), searched by inner product."""
    faiss = _faiss()
    dim = vectors.shape[1]
    if settings.kind == "flat":
        index = faiss.IndexIDMap2(faiss.IndexFlatIP(dim))
    elif settings.kind == "hnsw":
        graph = faiss.IndexHNSWFlat(dim, settings.hnsw_m, faiss.METRIC_INNER_PRODUCT)
        graph.hnsw.efSearch = settings.ef_search
        index = faiss.IndexIDMap2(graph)
    else:
        n_lists = max(1, min(int(np.sqrt(max(len(vectors), 1))), len(vectors)))
        index = faiss.IndexIVFFlat(faiss.IndexFlatIP(dim), dim, n_lists, faiss.METRIC_INNER_PRODUCT)
        if len(vectors):
            index.train(vectors)
        index.nprobe = min(settings.nprobe, n_lists)
    if len(vectors):
        index.add_with_ids(vectors, ids)
    return index


# ----------------------------------------------------------------------------- building and updating


def index_documents(folder: str | Path, docs: Sequence[Document], embedder: Embedder, embedder_name: str, *,
                    settings: IndexSettings | None = None, delete: Iterable[str] = (),
                    progress: Progress | None = None) -> UpdateReport:
    """Create the index in `folder`, or update it: add new documents, replace changed ones, delete `delete`.

    `settings` applies when the index is created (an existing index keeps its own). The embedder must
    give the vectors the index was built with. Nothing changes on disk until the new generation is
    complete; then `CURRENT` switches to it atomically.
    """
    folder = Path(folder)
    delete = list(delete)
    if not docs and not delete:
        raise LmforgeError(f"nothing to index into {folder}: give documents, or doc ids to delete")
    folder.mkdir(parents=True, exist_ok=True)
    gen = _current(folder)
    new_gen = (gen or 0) + 1
    _remove_other_generations(folder, keep=gen or 0)
    tmp_db, tmp_vectors = folder / f".chunks-{new_gen}.sqlite.tmp", folder / f".vectors-{new_gen}.faiss.tmp"
    try:
        report = _write_generation(folder, gen, tmp_db, tmp_vectors, docs, embedder, embedder_name, settings,
                                   delete, progress)
        os.replace(tmp_db, _db_path(folder, new_gen))
        os.replace(tmp_vectors, _vectors_path(folder, new_gen))
        write_text(folder / "CURRENT", f"{new_gen}\n")  # the commit point
    except BaseException:
        for path in (tmp_db, tmp_vectors, _db_path(folder, new_gen), _vectors_path(folder, new_gen)):
            path.unlink(missing_ok=True)
        raise
    _remove_other_generations(folder, keep=new_gen)
    return report


def _write_generation(folder: Path, gen: int | None, tmp_db: Path, tmp_vectors: Path, docs: Sequence[Document],
                      embedder: Embedder, embedder_name: str, settings: IndexSettings | None, delete: list[str],
                      progress: Progress | None) -> UpdateReport:
    if gen is None:
        con = sqlite3.connect(tmp_db)
        con.executescript(SCHEMA)
        settings = settings or IndexSettings()
        _check_settings(settings)
        record = record_of(embedder, embedder_name)
        _write_meta(con, settings, record)
    else:
        src = sqlite3.connect(f"file:{_db_path(folder, gen)}?mode=ro", uri=True)
        con = sqlite3.connect(tmp_db)
        src.backup(con)
        src.close()
        settings, record = _read_meta(con)
        record.check(embedder, embedder_name, str(folder))
    try:
        known = dict(con.execute("SELECT doc_id, sha256 FROM docs").fetchall())
        both = sorted({d.doc_id for d in docs} & set(delete))
        if both:
            raise LmforgeError(f"{both[0]!r} is both given and to be deleted; leave it out of one of them")
        missing = [d for d in delete if d not in known]
        if missing:
            raise LmforgeError(f"{folder} has no document {missing[0]!r} to delete; doc ids are paths relative to "
                               "the indexed folder, or JSONL ids")
        changed = [d for d in docs if known.get(d.doc_id) != _sha(d.text)]
        count = token_counter(embedder)
        chunks = [c for d in changed for c in chunk_document(d, count, settings.max_tokens, settings.overlap)]
        vectors = embed_texts(embedder, [c.text for c in chunks], progress=progress)  # (n_new, dim)
        dropped = _drop_documents(con, [d.doc_id for d in changed if d.doc_id in known] + delete)
        ids = _insert_chunks(con, changed, chunks, vectors)
        _write_vectors(con, folder, gen, tmp_vectors, settings, record.dim, dropped, ids, vectors)
        con.commit()
        total = con.execute("SELECT COUNT(*) FROM chunks").fetchone()[0]
    finally:
        con.close()
    replaced = sum(d.doc_id in known for d in changed)
    return UpdateReport(len(changed) - replaced, replaced, len(docs) - len(changed), len(delete), total, len(chunks))


def _check_settings(settings: IndexSettings) -> None:
    if settings.kind not in KINDS:
        raise LmforgeError(f"unknown index kind {settings.kind!r}; choose one of {', '.join(KINDS)}")
    if not 0 <= settings.overlap < settings.max_tokens:
        raise LmforgeError(f"overlap {settings.overlap} must be at least 0 and below max_tokens {settings.max_tokens}")


def _write_meta(con: sqlite3.Connection, settings: IndexSettings, record: EmbedderRecord) -> None:
    rows = {"settings": json.dumps(asdict(settings)), "embedder": json.dumps(asdict(record)), "last_id": "0"}
    con.executemany("INSERT INTO meta VALUES (?, ?)", rows.items())


def _read_meta(con: sqlite3.Connection) -> tuple[IndexSettings, EmbedderRecord]:
    meta = {k: json.loads(v) for k, v in con.execute("SELECT key, value FROM meta WHERE key != 'last_id'")}
    return IndexSettings(**meta["settings"]), EmbedderRecord(**meta["embedder"])


def _sha(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def _drop_documents(con: sqlite3.Connection, doc_ids: list[str]) -> list[int]:
    """Delete the documents' chunks (rows and FTS entries); return the chunk ids removed."""
    dropped: list[int] = []
    for doc_id in doc_ids:
        ids = [r[0] for r in con.execute("SELECT id FROM chunks WHERE doc_id = ?", (doc_id,))]
        con.executemany("DELETE FROM fts WHERE rowid = ?", [(i,) for i in ids])
        con.execute("DELETE FROM chunks WHERE doc_id = ?", (doc_id,))
        con.execute("DELETE FROM docs WHERE doc_id = ?", (doc_id,))
        dropped += ids
    return dropped


def _insert_chunks(con: sqlite3.Connection, docs: Sequence[Document], chunks: Sequence[Chunk],
                   vectors: np.ndarray) -> np.ndarray:
    """Store the documents and their chunks; return the new chunk ids (never reused)."""
    last = int(con.execute("SELECT value FROM meta WHERE key = 'last_id'").fetchone()[0])
    start = last + 1
    ids = np.arange(start, start + len(chunks), dtype=np.int64)
    per_doc: dict[str, int] = {}
    for i, c, v in zip(ids.tolist(), chunks, vectors):
        con.execute("INSERT INTO chunks VALUES (?, ?, ?, ?, ?, ?)", (i, c.doc_id, c.chunk, c.heading, c.text,
                                                                     v.astype(np.float32).tobytes()))
        con.execute("INSERT INTO fts (rowid, text) VALUES (?, ?)", (i, c.text))
        per_doc[c.doc_id] = per_doc.get(c.doc_id, 0) + 1
    con.executemany("INSERT INTO docs VALUES (?, ?, ?)", [(d.doc_id, _sha(d.text), per_doc.get(d.doc_id, 0))
                                                          for d in docs])
    con.execute("INSERT OR REPLACE INTO meta VALUES ('last_id', ?)", (str(int(ids[-1]) if len(ids) else last),))
    return ids


def _write_vectors(con: sqlite3.Connection, folder: Path, gen: int | None, path: Path, settings: IndexSettings,
                   dim: int, dropped: list[int], ids: np.ndarray, vectors: np.ndarray) -> None:
    """The new generation's FAISS file: the flat index updated in place, an approximate one rebuilt."""
    faiss = _faiss()
    if gen is not None and settings.kind == "flat":
        index = faiss.read_index(str(_vectors_path(folder, gen)))
        if dropped:
            index.remove_ids(np.asarray(dropped, dtype=np.int64))
        if len(ids):
            index.add_with_ids(vectors, ids)
    else:
        all_ids, all_vectors = _stored_vectors(con, dim)
        index = build_faiss(all_vectors, all_ids, settings)
    faiss.write_index(index, str(path))


def _stored_vectors(con: sqlite3.Connection, dim: int) -> tuple[np.ndarray, np.ndarray]:
    """(ids, vectors (N, dim)) of every chunk, from SQLite."""
    rows = con.execute("SELECT id, vector FROM chunks ORDER BY id").fetchall()
    ids = np.asarray([r[0] for r in rows], dtype=np.int64)
    vectors = np.stack([np.frombuffer(r[1], dtype=np.float32) for r in rows]) if rows else np.zeros((0, dim), np.float32)
    return ids, vectors


# ----------------------------------------------------------------------------- searching


class Index:
    """An index folder opened for search: `Index.open(folder, embedder)`, then `search(query, k, mode)`."""

    def __init__(self, folder: Path, con: sqlite3.Connection, vectors: Any, settings: IndexSettings,
                 record: EmbedderRecord, embedder: Embedder | None) -> None:
        self.folder, self.con, self.vectors = folder, con, vectors
        self.settings, self.record, self.embedder = settings, record, embedder
        self.lock = threading.Lock()  # one SQLite connection, shared by the server's threads

    @classmethod
    def open(cls, folder: str | Path, embedder: Embedder | None = None, embedder_name: str = "the embedder") -> Index:
        """Open the live generation; an embedder (needed for dense and hybrid search) is checked against it."""
        folder = Path(folder)
        gen = _current(folder) if folder.is_dir() else None
        if gen is None:
            raise LmforgeError(f"{folder} is not a retrieval index; build one with `lmforge rag index DOCS "
                               f"--embedder MODEL --out {folder}`")
        con = sqlite3.connect(f"file:{_db_path(folder, gen)}?mode=ro", uri=True, check_same_thread=False)
        settings, record = _read_meta(con)
        if embedder is not None:
            record.check(embedder, embedder_name, str(folder))
        vectors = _faiss().read_index(str(_vectors_path(folder, gen)))
        if settings.kind == "ivf":
            vectors.nprobe = settings.nprobe
        return cls(folder, con, vectors, settings, record, embedder)

    def close(self) -> None:
        self.con.close()

    def __len__(self) -> int:
        return int(self.vectors.ntotal)

    def doc_ids(self) -> list[str]:
        with self.lock:
            return [r[0] for r in self.con.execute("SELECT doc_id FROM docs ORDER BY doc_id")]

    def search(self, query: str, k: int = 5, mode: str = "hybrid", depth: int | None = None) -> list[Hit]:
        """The `k` best chunks for `query`: "dense" (cosine), "lexical" (BM25) or "hybrid" (RRF of both
        rankings, each `depth` long: by default max(4k, 50))."""
        if mode not in MODES:
            raise LmforgeError(f"unknown search mode {mode!r}; choose one of {', '.join(MODES)}")
        if mode != "lexical" and self.embedder is None:
            raise LmforgeError(f"{mode} search needs the embedder; open the index with one (or use mode lexical)")
        if k < 1:
            raise LmforgeError(f"k must be at least 1 (got {k})")
        q = embed_texts(self.embedder, [query])[0] if self.embedder is not None else None
        if mode == "dense":
            ranked = self.dense(q, k)
        elif mode == "lexical":
            ranked = self.lexical(query, k)
        else:
            depth = depth or max(4 * k, 50)
            lists = [[i for i, _ in self.dense(q, depth)], [i for i, _ in self.lexical(query, depth)]]
            ranked = reciprocal_rank_fusion(lists)[:k]
        return self._hits(ranked, q)

    def dense(self, query_vector: np.ndarray, k: int) -> list[tuple[int, float]]:
        """(chunk id, cosine) of the `k` nearest chunks."""
        if len(self) == 0:
            return []
        scores, ids = self.vectors.search(np.asarray(query_vector, dtype=np.float32)[None], min(k, len(self)))
        return [(int(i), float(s)) for i, s in zip(ids[0], scores[0]) if i >= 0]

    def lexical(self, query: str, k: int) -> list[tuple[int, float]]:
        """(chunk id, BM25 score, higher is better) of the `k` best chunks by FTS5 (any query word matches)."""
        words = re.findall(r"\w+", query.lower())
        if not words:
            return []
        match = " OR ".join(f'"{w}"' for w in dict.fromkeys(words))
        with self.lock:
            rows = self.con.execute("SELECT rowid, bm25(fts) FROM fts WHERE fts MATCH ? ORDER BY bm25(fts), rowid "
                                    "LIMIT ?", (match, k)).fetchall()
        return [(int(i), -float(s)) for i, s in rows]

    def _hits(self, ranked: list[tuple[int, float]], q: np.ndarray | None) -> list[Hit]:
        hits = []
        with self.lock:
            for chunk_id, score in ranked:
                doc_id, chunk, text, vector = self.con.execute(
                    "SELECT doc_id, chunk, text, vector FROM chunks WHERE id = ?", (chunk_id,)).fetchone()
                similarity = float(np.frombuffer(vector, dtype=np.float32) @ q) if q is not None else None
                hits.append(Hit(doc_id, chunk, score, text, similarity))
        return hits


__all__ = ["KINDS", "MODES", "Hit", "Index", "IndexSettings", "UpdateReport", "build_faiss", "index_documents"]
