"""Token shards on disk, read back: the format `prepare.py` writes, and the loaders that draw
batches from it.

Design choices:
- Shards are raw numpy arrays on disk (`train_000.bin`, `val_000.bin`, ...) read back with
  `np.memmap`, as in nanoGPT: no framing, no pickle. `meta.json` records the dtype and how many
  tokens each shard holds; every shard's file size is checked against it before it is mapped.
- `meta.json` also records the UTF-8 bytes of text in each split, so that bits per byte can be
  computed from a loss, and a fingerprint of the tokenizer (`tokenizer_identity`: the ids of a
  fixed probe text), so a different tokenizer is caught before training on ids it does not
  understand. Both are defined here, beside the check that reads them.
- `TokenLoader` draws windows of `seq_len + 1` tokens uniformly over every valid start position in
  every shard (so shards are weighted by length), as nanoGPT does. Batch k comes from a Generator
  seeded with `(seed, k)`: resuming needs only the batch count and costs O(1), and the global
  batch does not depend on how it is divided: rank r takes rows [r*B, (r+1)*B) of the
  world_size*B windows, so 2 ranks with B=2 see exactly what 1 rank with B=4 sees.
- `iter_eval_batches` walks a split in consecutive, non-overlapping windows from its start, so
  every evaluation sees the same tokens; short windows are evaluated more at a time (`eval_rows`).
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch

from lmforge.errors import LmforgeError

META_FORMAT = "lmforge-token-shards"  # marks a folder as a prepare output
META_VERSION = 1
# Encoded to fingerprint a tokenizer: words, digits, accents, CJK, code and whitespace runs.
_PROBE_TEXT = "The quick brown fox, 1234567 jumps!\n\tdéjà vu — 東京 😀\ndef f(x):\n    return x ** 2\n\n"


@dataclass
class ShardsDataConfig:
    """Where pretraining tokens come from; the `data:` section of a pretrain recipe."""

    shards: str = ""  # folder written by `lmforge prepare` (train_*.bin, val_*.bin, meta.json)
    tokenizer: str = ""  # tokenizer folder (tokenizer.json); default: the shards folder's tokenizer/
    seq_len: int = 0  # tokens per training sequence; 0 = the model's max_seq_len


class TokenizerLike(Protocol):
    """What `prepare` and `TokenShards.check_tokenizer` need from a tokenizer."""

    vocab_size: int
    eos_id: int | None
    bos_id: int | None

    def encode(self, text: str) -> list[int]:
        """Ids of `text` alone, without special tokens."""
        ...


def tokenizer_identity(tokenizer: TokenizerLike) -> dict[str, Any]:
    """What meta.json records about the tokenizer; `fingerprint` changes if encoding changes."""
    probe = np.asarray(tokenizer.encode(_PROBE_TEXT), dtype=np.int64)
    return {
        "class": type(tokenizer).__name__,
        "vocab_size": int(tokenizer.vocab_size),
        "eos_id": None if tokenizer.eos_id is None else int(tokenizer.eos_id),
        "bos_id": None if tokenizer.bos_id is None else int(tokenizer.bos_id),
        "fingerprint": hashlib.sha256(probe.tobytes()).hexdigest()[:16],
    }


# ----------------------------------------------------------------------------- reading


@dataclass(frozen=True)
class TokenShards:
    """One split of a prepare output, memory-mapped: `arrays[i]` is shard i, read-only."""

    directory: Path
    split: str
    meta: dict[str, Any]
    arrays: tuple[np.ndarray, ...]

    @classmethod
    def open(cls, directory: str | Path, split: str = "train") -> TokenShards:
        """Read `directory/meta.json` and memory-map the shards of `split`, checking their sizes."""
        directory = Path(directory)
        meta = _read_meta(directory)
        if split not in meta["splits"]:
            raise LmforgeError(
                f"{directory} has no {split!r} split; choose one of {', '.join(meta['splits'])}"
            )
        shards = meta["splits"][split]["shards"]
        if not shards:
            raise LmforgeError(
                f"the {split} split of {directory} holds no tokens; run prepare with val_fraction > 0"
            )
        dtype = np.dtype(meta["dtype"])
        return cls(directory, split, meta, tuple(_map_shard(directory, shard, dtype) for shard in shards))

    @property
    def n_tokens(self) -> int:
        return sum(len(array) for array in self.arrays)

    @property
    def n_bytes(self) -> int:
        """UTF-8 bytes of the text of this split: bits per byte = total loss in nats / ln 2 / n_bytes."""
        return int(self.meta["splits"][self.split]["bytes"])

    @property
    def max_token_id(self) -> int:
        return int(self.meta["max_token_id"])

    def read(self, start: int, length: int) -> np.ndarray:
        """Tokens [start, start + length) of the split as int64, across shard boundaries."""
        if start < 0 or start + length > self.n_tokens:
            raise IndexError(f"tokens [{start}, {start + length}) outside a split of {self.n_tokens}")
        pieces = []
        for array in self.arrays:
            if start < len(array) and length > 0:
                piece = array[start : start + length]
                pieces.append(piece)
                length -= len(piece)
            start = max(0, start - len(array))
        return np.concatenate(pieces).astype(np.int64) if pieces else np.zeros(0, dtype=np.int64)

    def check_vocab(self, vocab_size: int) -> None:
        """Raise if a model or tokenizer with `vocab_size` entries cannot embed every id stored here."""
        if self.max_token_id >= vocab_size:
            raise LmforgeError(
                f"{self.directory} holds token id {self.max_token_id} but the vocabulary has only {vocab_size} "
                f"entries; use the tokenizer that prepared it (vocab_size {self.meta['vocab_size']}) or prepare again"
            )

    def check_tokenizer(self, tokenizer: TokenizerLike) -> None:
        """Raise if `tokenizer` is not the one that prepared these shards (by vocabulary and fingerprint)."""
        self.check_vocab(tokenizer.vocab_size)
        expected = self.meta["tokenizer"].get("fingerprint")
        actual = tokenizer_identity(tokenizer)["fingerprint"]
        if expected != actual:
            raise LmforgeError(
                f"{self.directory} was prepared with a different tokenizer (fingerprint {expected}, this one "
                f"{actual}); use the same tokenizer or run prepare again with this one"
            )


def _read_meta(directory: Path) -> dict[str, Any]:
    """meta.json of a prepare output, checked for the fields the readers use."""
    path = directory / "meta.json"
    if not directory.is_dir():
        raise LmforgeError(f"token folder {directory} does not exist; run `lmforge prepare` to create it")
    if not path.is_file():
        raise LmforgeError(f"{directory} has no meta.json; it is not a prepare output, run `lmforge prepare`")
    try:
        meta = json.loads(path.read_text(encoding="utf-8"))
        ok = meta["format"] == META_FORMAT and np.dtype(meta["dtype"]).kind == "u"
        ok = ok and all(isinstance(s["shards"], list) and s["bytes"] >= 0 for s in meta["splits"].values())
        ok = ok and isinstance(meta["max_token_id"], int) and isinstance(meta["tokenizer"], dict)
    except (ValueError, KeyError, TypeError, AttributeError) as error:
        raise LmforgeError(f"{path} is corrupt ({error!r}); run prepare again") from error
    if not ok:
        raise LmforgeError(f"{path} is not an lmforge token-shard meta file; run prepare again")
    if meta.get("version") != META_VERSION:
        raise LmforgeError(
            f"{path} has format version {meta.get('version')}, expected {META_VERSION}; run prepare again"
        )
    return meta


def _map_shard(directory: Path, shard: dict[str, Any], dtype: np.dtype) -> np.ndarray:
    """Memory-map one shard after checking that its file size matches meta.json."""
    try:
        path, tokens = directory / shard["file"], int(shard["tokens"])
    except (KeyError, TypeError, ValueError) as error:
        raise LmforgeError(
            f"{directory}/meta.json is corrupt (bad shard entry {shard!r}); run prepare again"
        ) from error
    if not path.is_file():
        raise LmforgeError(f"shard {path} is missing; the folder is incomplete, run prepare again")
    size = path.stat().st_size
    if size != tokens * dtype.itemsize:
        raise LmforgeError(
            f"shard {path} holds {size} bytes but meta.json says {tokens} {dtype.name} tokens "
            f"({tokens * dtype.itemsize} bytes); the folder is corrupt, run prepare again"
        )
    return np.memmap(path, dtype=dtype, mode="r", shape=(tokens,))


# ----------------------------------------------------------------------------- loaders


def _windows_to_batch(windows: np.ndarray) -> dict[str, torch.Tensor]:
    """(B, T+1) token windows -> inputs and next-token labels, both LongTensor (B, T)."""
    windows = torch.from_numpy(windows.astype(np.int64))  # (B, T+1)
    return {"input_ids": windows[:, :-1].contiguous(), "labels": windows[:, 1:].contiguous()}  # (B, T) each


def _gather_windows(arrays: tuple[np.ndarray, ...], shard_ids: np.ndarray, offsets: np.ndarray,
                    length: int) -> np.ndarray:
    """Row i = arrays[shard_ids[i]][offsets[i] : offsets[i] + length], (B, length): one fancy-index
    read per shard the batch touches, not one slice per row."""
    span = np.arange(length)
    if len(arrays) == 1:  # a small corpus: no grouping by shard (a step of a small model feels each op)
        return arrays[0][offsets[:, None] + span]
    out = np.empty((len(offsets), length), dtype=arrays[0].dtype)
    for shard in np.unique(shard_ids):
        rows = shard_ids == shard
        out[rows] = arrays[shard][offsets[rows, None] + span]  # (rows, length)
    return out


class TokenLoader:
    """Endless, seeded, resumable batches of random windows from `shards` (see module docstring)."""

    def __init__(
        self,
        shards: TokenShards,
        batch_size: int,
        seq_len: int,
        *,
        seed: int,
        rank: int = 0,
        world_size: int = 1,
    ) -> None:
        if batch_size < 1 or seq_len < 1:
            raise LmforgeError(f"batch_size and seq_len must be positive, got {batch_size} and {seq_len}")
        if not 0 <= rank < world_size:
            raise LmforgeError(f"rank must be in [0, world_size={world_size}), got {rank}")
        if seed < 0:
            raise LmforgeError(f"seed must be a non-negative integer, got {seed}")
        self.shards, self.batch_size, self.seq_len = shards, batch_size, seq_len
        self.seed, self.rank, self.world_size = seed, rank, world_size
        self.batches_drawn = 0
        starts_per_shard = [max(len(array) - seq_len, 0) for array in shards.arrays]
        self._start_ends = np.cumsum(starts_per_shard)  # valid starts of shard i: [begins[i], ends[i])
        self._start_begins = self._start_ends - starts_per_shard
        if self._start_ends[-1] == 0:
            longest = max(len(array) for array in shards.arrays)
            raise LmforgeError(
                f"the {shards.split} split of {shards.directory} has no shard of seq_len + 1 = {seq_len + 1} "
                f"tokens (the longest holds {longest}); lower seq_len or prepare with more text"
            )

    @property
    def global_batch_size(self) -> int:
        return self.batch_size * self.world_size

    def next_batch(self) -> dict[str, torch.Tensor]:
        """This rank's rows of the next global batch: {"input_ids", "labels"}, LongTensor (B, T)."""
        rng = np.random.default_rng([self.seed, self.batches_drawn])
        starts = rng.integers(0, self._start_ends[-1], size=self.global_batch_size)
        mine = starts[self.rank * self.batch_size : (self.rank + 1) * self.batch_size]
        self.batches_drawn += 1
        shard_ids = np.searchsorted(self._start_ends, mine, side="right")
        offsets = mine - self._start_begins[shard_ids]
        return _windows_to_batch(_gather_windows(self.shards.arrays, shard_ids, offsets, self.seq_len + 1))

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        while True:
            yield self.next_batch()

    def state_dict(self) -> dict[str, Any]:
        """JSON-serialisable position: enough to continue with exactly the next batch."""
        return {
            "seed": self.seed,
            "batches_drawn": self.batches_drawn,
            "seq_len": self.seq_len,
            "global_batch_size": self.global_batch_size,
            "split_tokens": self.shards.n_tokens,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue from `state`; the data, seq_len and global batch size must be those it was saved with."""
        saved = (state.get("seq_len"), state.get("global_batch_size"), state.get("split_tokens"))
        current = (self.seq_len, self.global_batch_size, self.shards.n_tokens)
        if saved != current:
            raise LmforgeError(
                f"loader state was saved with (seq_len, global batch, split tokens) = {saved} but this loader has "
                f"{current}; resume with the same data and batch settings"
            )
        self.seed, self.batches_drawn = int(state["seed"]), int(state["batches_drawn"])


EVAL_BATCH_TOKENS = 2048  # evaluation batches of short windows grow to about this many tokens


def eval_rows(batch_size: int, seq_len: int) -> int:
    """Windows per evaluation batch: `batch_size`, or more when its batches hold fewer than
    EVAL_BATCH_TOKENS tokens. An evaluation keeps no activations for a backward pass, and a
    forward over so few tokens is mostly per-operation overhead (`benchmarks/shakespeare.py`'s
    evaluations, 12 windows of 64 tokens per training batch)."""
    return max(batch_size, EVAL_BATCH_TOKENS // seq_len)


def iter_eval_batches(
    shards: TokenShards, batch_size: int, seq_len: int, max_batches: int | None = None, *, rows: int | None = None
) -> Iterator[dict[str, torch.Tensor]]:
    """Deterministic batches of consecutive, non-overlapping windows from the start of the split.

    Window i holds inputs tokens[i*T : (i+1)*T] and labels shifted by one; the tail shorter than a
    window is dropped. `max_batches` limits the windows to that many batches of `batch_size`;
    they come `rows` at a time (default `batch_size`; see `eval_rows`), so which windows are
    evaluated does not depend on `rows`. The last batch may be smaller. Arguments are checked when
    called, not when iteration starts.
    """
    if batch_size < 1 or seq_len < 1 or (rows is not None and rows < 1):
        raise LmforgeError(f"batch_size, seq_len and rows must be positive, got {batch_size}, {seq_len} and {rows}")
    n_windows = (shards.n_tokens - 1) // seq_len
    if n_windows == 0:
        raise LmforgeError(
            f"the {shards.split} split of {shards.directory} holds {shards.n_tokens} tokens, fewer than "
            f"seq_len + 1 = {seq_len + 1}; lower seq_len or prepare with a larger val_fraction"
        )
    if max_batches is not None:
        n_windows = min(n_windows, max_batches * batch_size)
    return _consecutive_batches(shards, rows or batch_size, seq_len, n_windows)


def _consecutive_batches(
    shards: TokenShards, batch_size: int, seq_len: int, n_windows: int
) -> Iterator[dict[str, torch.Tensor]]:
    for first in range(0, n_windows, batch_size):
        indices = range(first, min(first + batch_size, n_windows))
        windows = [shards.read(i * seq_len, seq_len + 1) for i in indices]
        yield _windows_to_batch(np.stack(windows))  # (B, T+1) -> two (B, T)
