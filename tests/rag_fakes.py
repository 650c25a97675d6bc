"""A fast deterministic embedder for index tests: hashed bag of words, projected and normalised."""

from __future__ import annotations

import hashlib
import re

import numpy as np


class WordTokenizer:
    """One token per word or punctuation mark."""

    def encode(self, text: str, add_special_tokens: bool = False) -> list[int]:
        return [len(w) for w in re.findall(r"\w+|[^\w\s]", text)]


class HashEmbedder:
    """Each word has a random unit vector (seeded by the word and `seed`); a text is the mean of its words'."""

    def __init__(self, dim: int = 32, seed: int = 0) -> None:
        self.dim, self.seed, self.tokenizer, self.calls = dim, seed, WordTokenizer(), 0

    def word(self, w: str) -> np.ndarray:
        digest = hashlib.sha256(f"{self.seed}:{w}".encode()).digest()
        return np.random.default_rng(int.from_bytes(digest[:8], "little")).standard_normal(self.dim)

    def embed(self, texts: list[str]) -> np.ndarray:
        self.calls += 1
        out = np.zeros((len(texts), self.dim), dtype=np.float32)
        for i, t in enumerate(texts):
            words = re.findall(r"\w+", t.lower()) or ["<empty>"]
            out[i] = np.mean([self.word(w) for w in words], axis=0)
        return out
