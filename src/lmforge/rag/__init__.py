"""Retrieval: documents -> chunks -> an index (FAISS vectors + SQLite/FTS5 texts) -> dense, lexical or hybrid hits.

    from lmforge.rag import Index, index_documents, read_documents
    index_documents("kb.index", read_documents(["docs/"]), lm, "models/minilm")   # lm = lmforge.load(...)
    hits = Index.open("kb.index", lm).search("how do I get a refund?", k=5)      # hybrid by default

rag/ does not load models (it sits below the API): it takes the embedder as an argument.
"""

from lmforge.rag.documents import Chunk, Document, chunk_document, read_documents
from lmforge.rag.embedder import Embedder, embed_texts
from lmforge.rag.fusion import reciprocal_rank_fusion
from lmforge.rag.index import KINDS, MODES, Hit, Index, IndexSettings, UpdateReport, index_documents

__all__ = ["KINDS", "MODES", "Chunk", "Document", "Embedder", "Hit", "Index", "IndexSettings", "UpdateReport",
           "chunk_document", "embed_texts", "index_documents", "read_documents", "reciprocal_rank_fusion"]
