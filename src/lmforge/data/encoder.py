"""Pieces -> token id arrays, in input order, in this process or in worker processes (`prepare`'s workers).

Design choices:
- Pieces are encoded in batches. A tokenizer with `encode_batch` (lmforge's `Tokenizer`) encodes a
  batch in one call, which the `tokenizers` backend spreads over every core (its RAYON threads);
  any other `TokenizerLike` encodes piece by piece.
- `workers=1` encodes in the calling process. `workers=N` starts N worker processes, each
  encoding whole batches on one thread (TOKENIZERS_PARALLELISM=false, so N workers use N cores
  rather than N × cores threads); JSON parsing and UTF-8 decoding happen there too. The tokenizer
  is pickled once per worker (its initializer; lmforge's `Tokenizer` travels as its
  tokenizer.json string), never per batch. Workers start from a forkserver where the platform has
  one (a clean single-threaded parent, with lmforge's data modules imported once) and are spawned
  otherwise; as with any multiprocessing code, a script calling `prepare(workers=N)` keeps its
  top-level code under `if __name__ == "__main__":`.
- Order and memory: results are taken in submission order, so the output does not depend on
  `workers`, and at most `IN_FLIGHT_PER_WORKER × workers` batches are submitted and not yet
  consumed, so memory does not grow with the corpus.
- Failures: an exception in a worker (a malformed JSONL row, a tokenizer error) is raised again in
  the caller as is, the same error `workers=1` gives. Workers ignore SIGINT: Ctrl-C stops the
  caller, which cancels queued batches and waits for the running ones (each a few chunks) before
  returning, so nothing hangs. A worker that dies (killed, out of memory) becomes an LmforgeError.
"""

from __future__ import annotations

import multiprocessing
import os
import pickle
import signal
from collections import deque
from collections.abc import Iterable, Iterator
from concurrent.futures import Future, ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass

import numpy as np

from lmforge.data.pieces import Piece, piece_text
from lmforge.data.shards import TokenizerLike
from lmforge.errors import LmforgeError

IN_FLIGHT_PER_WORKER = 2  # batches per worker submitted ahead, so that no worker waits for the reader
WORKER_BATCH_CHUNKS = 2  # a worker's batch: this many chunk_bytes of input
_PRELOAD = ["lmforge.data.encoder", "lmforge.tokenizer"]  # imported once by the forkserver


@dataclass(frozen=True)
class Encoded:
    """A piece's token ids (with its document's bos / eos) and the UTF-8 size of its text."""

    ids: np.ndarray
    n_text_bytes: int


def encode_pieces(
    pieces: list[Piece], tokenizer: TokenizerLike, text_field: str, dtype: np.dtype
) -> list[Encoded]:
    """Encode one batch of pieces, checking every id fits `dtype`."""
    texts = [piece_text(piece, text_field) for piece in pieces]
    nonempty = [text for text in texts if text]
    batch_encode = getattr(tokenizer, "encode_batch", None)
    ids_of_nonempty = iter(batch_encode(nonempty) if batch_encode else [tokenizer.encode(t) for t in nonempty])
    return [
        Encoded(_with_specials(piece, next(ids_of_nonempty) if text else [], tokenizer, dtype), len(text.encode()))
        for piece, text in zip(pieces, texts)
    ]


def _with_specials(piece: Piece, ids: list[int], tokenizer: TokenizerLike, dtype: np.dtype) -> np.ndarray:
    """`ids` with the document's bos / eos, as an array of `dtype`."""
    bos, eos = tokenizer.bos_id, tokenizer.eos_id
    if piece.starts_document and bos is not None and bos != eos:
        ids = [bos, *ids]
    if piece.ends_document and eos is not None:
        ids = [*ids, eos]
    array = np.asarray(ids, dtype=np.int64)
    if array.size and (array.min() < 0 or array.max() > np.iinfo(dtype).max):
        bad = int(array.min()) if array.min() < 0 else int(array.max())
        raise LmforgeError(
            f"tokenizer produced token id {bad} while encoding {piece.path}, which does not fit in "
            f"{dtype.name} (vocab_size is {tokenizer.vocab_size}); the tokenizer's vocab_size is wrong"
        )
    return array.astype(dtype)


def _batch_bytes(workers: int, chunk_bytes: int) -> int:
    """Input bytes per batch: in this process enough pieces for two per core (the backend's threads
    stay busy), in a worker a few chunks (each worker encodes on one core)."""
    chunks = max(8, 2 * (os.cpu_count() or 1)) if workers == 1 else WORKER_BATCH_CHUNKS
    return chunks * chunk_bytes


def _batches(pieces: Iterable[Piece], batch_bytes: int) -> Iterator[list[Piece]]:
    """Consecutive pieces grouped until a group holds at least `batch_bytes` bytes of input."""
    batch: list[Piece] = []
    size = 0
    for piece in pieces:
        batch.append(piece)
        size += len(piece.raw)
        if size >= batch_bytes:
            yield batch
            batch, size = [], 0
    if batch:
        yield batch


def encode_in_order(
    pieces: Iterable[Piece], tokenizer: TokenizerLike, text_field: str, dtype: np.dtype, workers: int,
    chunk_bytes: int,
) -> Iterator[tuple[Piece, Encoded]]:
    """Every piece with its encoding, in order; close the iterator (or exhaust it) to stop the workers."""
    groups = _batches(pieces, _batch_bytes(workers, chunk_bytes))
    if workers == 1:
        for batch in groups:
            yield from zip(batch, encode_pieces(batch, tokenizer, text_field, dtype))
        return
    pool = _start_pool(tokenizer, workers)
    pending: deque[tuple[list[Piece], Future[list[Encoded]]]] = deque()
    try:
        for batch in groups:
            pending.append((batch, pool.submit(_encode_in_worker, batch, text_field, dtype)))
            if len(pending) >= IN_FLIGHT_PER_WORKER * workers:
                yield from _results(*pending.popleft())
        while pending:
            yield from _results(*pending.popleft())
    finally:
        pool.shutdown(wait=True, cancel_futures=True)


def _results(batch: list[Piece], future: Future[list[Encoded]]) -> Iterator[tuple[Piece, Encoded]]:
    try:
        encoded = future.result()
    except BrokenProcessPool as error:
        raise LmforgeError(
            "a prepare worker process stopped unexpectedly (killed, or out of memory?); "
            "run again with fewer workers or with workers=1"
        ) from error
    yield from zip(batch, encoded)


def _start_pool(tokenizer: TokenizerLike, workers: int) -> ProcessPoolExecutor:
    """N worker processes holding a copy of `tokenizer` each."""
    try:
        pickle.dumps(tokenizer)
    except Exception as error:
        raise LmforgeError(
            f"the tokenizer ({type(tokenizer).__name__}) cannot be sent to worker processes ({error}); "
            "use workers=1"
        ) from error
    method = "forkserver" if "forkserver" in multiprocessing.get_all_start_methods() else "spawn"
    context = multiprocessing.get_context(method)
    if method == "forkserver":
        context.set_forkserver_preload(_PRELOAD)
    return ProcessPoolExecutor(workers, mp_context=context, initializer=_start_worker, initargs=(tokenizer,))


# The tokenizer of a worker process: set once by its initializer, read by every batch it encodes.
_worker_tokenizer: TokenizerLike | None = None


def _start_worker(tokenizer: TokenizerLike) -> None:
    global _worker_tokenizer
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the caller's to handle
    os.environ["TOKENIZERS_PARALLELISM"] = "false"  # one core per worker
    _worker_tokenizer = tokenizer


def _encode_in_worker(batch: list[Piece], text_field: str, dtype: np.dtype) -> list[Encoded]:
    assert _worker_tokenizer is not None, "the pool initializer sets the tokenizer"
    return encode_pieces(batch, _worker_tokenizer, text_field, dtype)
