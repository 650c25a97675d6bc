"""Rows of a data file -> train and eval splits -> endless, seeded, resumable batches.

Every fine-tuning objective (SFT sequences, classification examples, preference pairs, GRPO
prompts) trains on a list of rows; this module is what they share, so each is written once:

- `SplitConfig`: the recipe keys every fine-tuning verb's `data:` section has (`train`, `eval`,
  `eval_fraction`, `seq_len`); each data kind's config extends it with its own keys.
- `holdout`: the eval split when no eval file is given: a seeded random share of the train rows.
- `ShuffledOrder`: position p of the endless stream of rows is row `permutation_e[p mod N]`, one
  permutation per epoch e = p // N drawn from `default_rng([seed, e])`.
- `RowLoader`: global batch k is positions k*G .. (k+1)*G - 1 of that stream (G = batch size x
  world size) and rank r takes its b rows r*b .. (r+1)*b - 1, as `TokenLoader` does over token
  shards. Its whole state is one counter, so resuming costs O(1) and continues with exactly the
  next batch.
- `iter_row_batches`: the rows in order, for evaluation.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any, Generic, TypeVar

import numpy as np
import torch
from torch import Tensor

from lmforge.errors import LmforgeError

Item = TypeVar("Item")
Collate = Callable[[list[Any]], dict[str, Tensor]]


@dataclass
class SplitConfig:
    """The keys every fine-tuning verb's `data:` section shares; each is a YAML key and a `--data.key` flag."""

    train: str = ""  # the training file
    eval: str = ""  # file for evaluation; "" = hold out eval_fraction of the train rows
    eval_fraction: float = 0.05  # share of train rows held out when eval is ""; 0 = no evaluation
    seq_len: int = 0  # tokens of one training row at most; 0 = the model's max_seq_len

    def validate(self) -> None:
        """Raise LmforgeError (one line) for the first value out of range."""
        check_fraction(self.eval_fraction)
        if self.seq_len < 0:
            raise LmforgeError(f"data.seq_len must be >= 0 (0 = the model's max_seq_len); got {self.seq_len}")

    def require_train(self, what: str) -> None:
        """A one-line error when `data.train` is missing; `what` says what the file should hold."""
        if not self.train:
            raise LmforgeError(f"data.train is not set; pass {what} (--data.train FILE)")


def check_fraction(value: float) -> None:
    if not 0 <= value < 1:
        raise LmforgeError(f"data.eval_fraction must be in [0, 1); got {value}")


def context_length(seq_len: int, max_seq_len: int) -> int:
    """`data.seq_len`, or the model's context when it is 0."""
    if seq_len > max_seq_len:
        raise LmforgeError(f"data.seq_len {seq_len} exceeds the model's max_seq_len {max_seq_len}")
    return seq_len or max_seq_len


def holdout(items: Sequence[Item], fraction: float, seed: int) -> tuple[list[Item], list[Item]]:
    """(train, held out): a seeded random `fraction` of the items, at least one when fraction > 0."""
    check_fraction(fraction)
    if fraction == 0:
        return list(items), []
    n_held = max(round(fraction * len(items)), 1)
    if n_held >= len(items):
        raise LmforgeError(f"only {len(items)} rows: too few to hold out {fraction:.0%} for evaluation; add rows, "
                           "give data.eval FILE, or set data.eval_fraction 0")
    held = set(np.random.default_rng([seed, 7]).permutation(len(items))[:n_held].tolist())
    return [x for i, x in enumerate(items) if i not in held], [items[i] for i in sorted(held)]


class ShuffledOrder:
    """The endless seeded stream of row indices (see the module docstring); one permutation is kept."""

    def __init__(self, n_items: int, seed: int) -> None:
        self.n_items, self.seed = n_items, seed
        self._epoch, self._perm = -1, np.empty(0, dtype=np.int64)

    def __getitem__(self, position: int) -> int:
        epoch, offset = divmod(position, self.n_items)
        if epoch != self._epoch:
            self._epoch, self._perm = epoch, np.random.default_rng([self.seed, epoch]).permutation(self.n_items)
        return int(self._perm[offset])

    def span(self, start: int, count: int) -> list[int]:
        """The indices at positions start .. start + count - 1."""
        return [self[p] for p in range(start, start + count)]


class RowLoader(Generic[Item]):
    """Endless, seeded, resumable batches over a list of rows (see the module docstring)."""

    def __init__(self, items: Sequence[Item], collate: Collate, batch_size: int, *, seed: int,
                 rank: int = 0, world_size: int = 1) -> None:
        if not items:
            raise LmforgeError("there is nothing to train on: the training data holds no usable rows")
        if batch_size < 1 or not 0 <= rank < world_size:
            raise LmforgeError(f"need batch_size >= 1 and 0 <= rank < world_size; got {batch_size}, {rank}, {world_size}")
        self.items, self.collate, self.batch_size = items, collate, batch_size
        self.rank, self.world_size = rank, world_size
        self.batches_drawn = 0
        self.order = ShuffledOrder(len(items), seed)

    def next_batch(self) -> dict[str, Tensor]:
        """This rank's rows of the next global batch, collated."""
        first = self.batches_drawn * self.batch_size * self.world_size + self.rank * self.batch_size
        self.batches_drawn += 1
        return self.collate([self.items[i] for i in self.order.span(first, self.batch_size)])

    def __iter__(self) -> Iterator[dict[str, Tensor]]:
        while True:
            yield self.next_batch()

    def state_dict(self) -> dict[str, Any]:
        """JSON-serialisable position: enough to continue with exactly the next batch."""
        return {"seed": self.order.seed, "batches_drawn": self.batches_drawn, "n_items": len(self.items),
                "global_batch_size": self.batch_size * self.world_size}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue from `state`; the data and global batch size must be those it was saved with."""
        saved = (state.get("n_items", state.get("n_pairs")), state.get("global_batch_size"))  # n_pairs: 0.1's PairLoader
        current = (len(self.items), self.batch_size * self.world_size)
        if saved != current:
            raise LmforgeError(
                f"loader state was saved with (rows, global batch) = {saved} but this run has {current}; "
                "resume with the same data, packing and batch settings"
            )
        self.order = ShuffledOrder(len(self.items), int(state["seed"]))
        self.batches_drawn = int(state["batches_drawn"])


def iter_row_batches(items: Sequence[Item], collate: Collate, batch_size: int) -> Iterator[dict[str, Tensor]]:
    """The items in order, `batch_size` at a time (the last batch may be smaller): for evaluation."""
    for first in range(0, len(items), batch_size):
        yield collate(list(items[first : first + batch_size]))


def pad_rows(rows: Sequence[Sequence[int]], value: int, width: int) -> Tensor:
    """Right-pad lists of ints with `value` to one LongTensor (B, width)."""
    out = torch.full((len(rows), width), value, dtype=torch.long)
    for i, row in enumerate(rows):
        out[i, : len(row)] = torch.tensor(row, dtype=torch.long)
    return out


__all__ = [
    "RowLoader",
    "ShuffledOrder",
    "SplitConfig",
    "check_fraction",
    "context_length",
    "holdout",
    "iter_row_batches",
    "pad_rows",
]
