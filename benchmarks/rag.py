"""Retrieval index speed: exact (FAISS flat) against approximate (HNSW, IVF) search, at 10k and 100k chunks.

The vectors are synthetic (unit vectors drawn around 200 random centres, the way document embeddings
cluster by topic), the queries are perturbed chunk vectors, and every index is the one
`lmforge rag index` builds (`lmforge.rag.index.build_faiss`, inner product on unit vectors). For
each size and kind: build time, single-query latency (p50 over `--queries` queries, one at a time,
as the support assistant asks), batched throughput (all queries in one call), and recall@10 of the
approximate index against the exact one measured in the same run. The host is shared, so compare
the ratios (approximate / exact), not the absolute times.

    python benchmarks/rag.py                 # last line: p50_ms=P recall_at_10=R (HNSW at the largest size)
                                             # speedup=S (exact p50 / HNSW p50) ivf_recall_at_10=... ivf_speedup=...
    python benchmarks/rag.py --sizes 10000   # quicker
"""

from __future__ import annotations

import argparse
import statistics
import time

import faiss
import numpy as np

from lmforge.rag.index import IndexSettings, build_faiss


def clustered_vectors(n: int, dim: int, rng: np.random.Generator, centres: int = 200) -> np.ndarray:
    """(n, dim) unit vectors around `centres` random directions."""
    middle = rng.standard_normal((centres, dim)).astype(np.float32)
    x = middle[rng.integers(0, centres, n)] + 0.6 * rng.standard_normal((n, dim)).astype(np.float32)  # (n, dim)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def measure(index: faiss.Index, queries: np.ndarray, k: int) -> tuple[float, float, np.ndarray]:
    """(p50 ms of one query at a time, queries per second batched, ids (Q, k) of the batched search)."""
    single = []
    for q in queries:
        start = time.perf_counter()
        index.search(q[None], k)
        single.append(time.perf_counter() - start)
    start = time.perf_counter()
    _, ids = index.search(queries, k)
    batched = len(queries) / (time.perf_counter() - start)
    return statistics.median(single) * 1000, batched, ids


def recall(found: np.ndarray, truth: np.ndarray) -> float:
    return float(np.mean([len(set(a) & set(b)) / len(b) for a, b in zip(found, truth)]))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[10_000, 100_000])
    parser.add_argument("--dim", type=int, default=384, help="all-MiniLM-L6-v2's width")
    parser.add_argument("--queries", type=int, default=200)
    parser.add_argument("--k", type=int, default=10)
    parser.add_argument("--threads", type=int, default=1, help="FAISS threads (1: comparable on a shared host)")
    args = parser.parse_args()
    faiss.omp_set_num_threads(args.threads)
    rng = np.random.default_rng(0)
    print(f"{'chunks':>8} {'kind':5} {'build s':>8} {'p50 ms':>8} {'q/s batched':>12} {'recall@10':>10} {'speedup':>8}")
    last: dict[str, float] = {}
    for n in args.sizes:
        vectors = clustered_vectors(n, args.dim, rng)
        picks = vectors[rng.integers(0, n, args.queries)]
        queries = picks + 0.05 * rng.standard_normal(picks.shape).astype(np.float32)
        queries /= np.linalg.norm(queries, axis=1, keepdims=True)
        truth, exact_p50 = None, 0.0
        for kind in ("flat", "hnsw", "ivf"):
            start = time.perf_counter()
            index = build_faiss(vectors, np.arange(n, dtype=np.int64), IndexSettings(kind=kind))
            build_s = time.perf_counter() - start
            p50, qps, ids = measure(index, queries, args.k)
            if kind == "flat":
                truth, exact_p50 = ids, p50
            r = recall(ids, truth)
            print(f"{n:8d} {kind:5} {build_s:8.2f} {p50:8.3f} {qps:12.0f} {r:10.3f} {exact_p50 / p50:8.2f}")
            last[kind] = p50
            last[f"{kind}_recall"] = r
    print(f"p50_ms={last['hnsw']:.3f} recall_at_10={last['hnsw_recall']:.3f} speedup={last['flat'] / last['hnsw']:.2f} "
          f"exact_p50_ms={last['flat']:.3f} ivf_recall_at_10={last['ivf_recall']:.3f} "
          f"ivf_speedup={last['flat'] / last['ivf']:.2f}")


if __name__ == "__main__":
    main()
