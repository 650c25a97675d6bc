"""The embedder an index is built with: batched vectors, a token counter, and a fingerprint to recognise it.

rag/ sits below the API, so it does not load models: it takes any object with `embed(texts)`
returning (N, dim) vectors and a `tokenizer` with `encode` (an `LM` from `lmforge.load` is one).

Design choices:
- **Vectors are L2-normalised here** whatever the model's own pooling says, so that FAISS's inner
  product is the cosine similarity and scores mean the same across embedders.
- **The fingerprint is behaviour, not a name**: the vector of a fixed probe sentence. Two folders
  holding the same weights are the same embedder; a retrained one at the same path is not. The
  index stores it and refuses an embedder whose probe vector differs.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np

from lmforge.errors import LmforgeError

PROBE = "lmforge index probe: how do I reset my password?"
PROBE_TOLERANCE = 1e-3  # max |difference| of probe vectors that still counts as the same embedder

Progress = Callable[[int, int], None]  # (texts done, texts in all)


class Embedder(Protocol):
    """What the index needs from an encoder model (`lmforge.api.LM` is one)."""

    tokenizer: Any  # has encode(text, add_special_tokens=False) -> list[int]

    def embed(self, texts: Sequence[str]) -> Any: ...  # (N, dim) tensor or array


@dataclass(frozen=True)
class EmbedderRecord:
    """What an index remembers of its embedder."""

    name: str  # how it was named when the index was built (a model folder)
    dim: int
    probe: list[float]  # its vector for PROBE

    def check(self, embedder: Embedder, name: str, where: str) -> None:
        """Refuse an embedder that does not give this record's vectors."""
        probe = embed_texts(embedder, [PROBE])[0]
        if len(probe) != self.dim or float(np.abs(probe - np.asarray(self.probe)).max()) > PROBE_TOLERANCE:
            raise LmforgeError(f"{where} was built with the embedder {self.name} (dim {self.dim}) but {name} gives "
                               f"other vectors (dim {len(probe)}); use --embedder {self.name} or rebuild the index")


def record_of(embedder: Embedder, name: str) -> EmbedderRecord:
    probe = embed_texts(embedder, [PROBE])[0]
    return EmbedderRecord(name, len(probe), [float(x) for x in probe])


def embed_texts(embedder: Embedder, texts: Sequence[str], batch_size: int = 32,
                progress: Progress | None = None) -> np.ndarray:
    """(N, dim) float32 unit vectors of `texts`, in batches of `batch_size`; `progress` after each batch."""
    parts = []
    for start in range(0, len(texts), batch_size):
        vectors = embedder.embed(list(texts[start:start + batch_size]))
        parts.append(np.asarray(vectors.float().cpu() if hasattr(vectors, "float") else vectors, dtype=np.float32))
        if progress is not None:
            progress(min(start + batch_size, len(texts)), len(texts))
    if not parts:
        return np.zeros((0, 0), dtype=np.float32)
    out = np.concatenate(parts)  # (N, dim)
    return out / np.maximum(np.linalg.norm(out, axis=1, keepdims=True), 1e-12)


def token_counter(embedder: Embedder) -> Callable[[str], int]:
    """Tokens of a text in the embedder's tokenizer, special tokens not counted."""
    return lambda text: len(embedder.tokenizer.encode(text, add_special_tokens=False))


__all__ = ["Embedder", "EmbedderRecord", "embed_texts", "record_of", "token_counter"]
