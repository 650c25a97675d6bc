"""Retrieval verbs: `lmforge rag index` (build or update an index) and `lmforge rag query`.

The commands load the embedder with `lmforge.load` and hand it to `lmforge.rag`, which does the
work; library modules are imported inside the functions so `lmforge --help` stays light.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable

Setup = Callable[[argparse.ArgumentParser], None]


def cmd_rag_index(args: argparse.Namespace) -> None:
    from tqdm import tqdm

    import lmforge
    from lmforge.rag import IndexSettings, index_documents, read_documents

    docs = read_documents(args.docs)  # bad documents are refused before the model loads
    lm = lmforge.load(args.embedder)
    settings = IndexSettings(kind=args.kind, max_tokens=args.max_tokens, overlap=args.overlap)
    with tqdm(total=0, unit="chunk", desc="embedding", file=sys.stderr, disable=not sys.stderr.isatty()) as bar:

        def progress(done: int, total: int) -> None:
            bar.total = total
            bar.update(done - bar.n)

        report = index_documents(args.out, docs, lm, args.embedder, settings=settings, delete=args.delete,
                                 progress=progress)
    print(f"{args.out}: {report.chunks} chunks; documents added {report.added}, replaced {report.replaced}, "
          f"unchanged {report.unchanged}, deleted {report.deleted}; {report.embedded} chunks embedded")


def cmd_rag_query(args: argparse.Namespace) -> None:
    import lmforge
    from lmforge.rag import Index

    embedder = None
    if args.mode != "lexical":
        name = args.embedder or Index.open(args.index).record.name
        embedder = lmforge.load(name)
    index = Index.open(args.index, embedder, args.embedder or "the recorded embedder")
    hits = index.search(args.question, k=args.k, mode=args.mode)
    if args.json:
        print(json.dumps([h.as_json() for h in hits], ensure_ascii=False, indent=2))
        return
    for rank, hit in enumerate(hits, 1):
        print(f"{rank}. {hit.doc_id} #{hit.chunk}  score {hit.score:.4f}")
        print("   " + hit.text.replace("\n", "\n   "))


def setup_rag(p: argparse.ArgumentParser) -> None:
    verbs = p.add_subparsers(dest="rag_verb", required=True)
    i = verbs.add_parser("index", help="build an index of documents, or update one (add, replace changed, delete)")
    i.add_argument("docs", nargs="*", help="Markdown / text / HTML / JSONL files or folders of them")
    i.add_argument("--embedder", required=True, help="encoder model folder (a sentence-transformers folder works)")
    i.add_argument("--out", required=True, help="the index folder (updated in place if it exists)")
    i.add_argument("--kind", choices=("flat", "hnsw", "ivf"), default="flat",
                   help="FAISS index: flat = exact (default); hnsw / ivf = approximate, for large collections")
    i.add_argument("--max-tokens", type=int, default=200, help="chunk budget in the embedder's tokens")
    i.add_argument("--overlap", type=int, default=40, help="tokens a chunk repeats from the previous one")
    i.add_argument("--delete", action="append", default=[], metavar="DOC_ID",
                   help="remove a document by id (repeatable)")
    i.set_defaults(func=cmd_rag_index)
    q = verbs.add_parser("query", help="search an index: dense, lexical or hybrid (reciprocal-rank fusion)")
    q.add_argument("index", help="the index folder")
    q.add_argument("question")
    q.add_argument("-k", type=int, default=5, help="hits to return")
    q.add_argument("--mode", choices=("dense", "lexical", "hybrid"), default="hybrid")
    q.add_argument("--embedder", default=None, help="the encoder (default: the one the index was built with)")
    q.add_argument("--json", action="store_true", help='print [{"doc_id", "chunk", "score", "text"}, ...]')
    q.set_defaults(func=cmd_rag_query)


VERBS: dict[str, tuple[str, Setup]] = {
    "rag": ("retrieval: `rag index DOCS --embedder M --out I` builds or updates, `rag query I TEXT` searches",
            setup_rag),
}
