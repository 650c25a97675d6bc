"""SFT data: conversations or instruction rows -> token ids with assistant-only labels; packing; loaders.

Rows come from JSONL, one object per line, in either form:
- `{"messages": [{"role": "system" | "user" | "assistant", "content": "..."}, ...]}` (OpenAI style);
- `{"instruction": "...", "input": "..." (optional), "output": "..."}`: one user turn (the
  instruction, then a blank line and the input when there is one) and one assistant turn.

Design choices:
- Rows are rendered through the model's own chat template (`Tokenizer.encode_chat`), which also
  gives the exact assistant mask: each reply and the end-of-turn token after it. A template that
  does not close an assistant turn with the end-of-turn or EOS token is refused (the model would
  never learn to stop). A BOS is put first when the template does not emit one, so every row
  starts with exactly one.
- A row of n tokens trains n - 1 next-token predictions: inputs ids[:-1], labels ids[1:] where the
  predicted token is an assistant token and IGNORE_INDEX elsewhere. It fits the context when
  n - 1 <= seq_len. A longer row is dropped or truncated to seq_len inputs (`too_long`); a
  truncated row left with no assistant target is dropped. Every row dropped or cut is counted in
  `SftStats` and logged as a warning, never skipped silently.
- Packing (`pack: true`) fills sequences of at most seq_len positions with whole rows, in a seeded
  shuffled order, closing a sequence when the next row does not fit (next-fit). Packed batches
  carry `positions` that restart at 0 for every row and `document_ids`; the decoder then attends
  only within a row, so a packed row gets exactly the loss it gets alone.
- Splits, shuffling and resumable batches are `data/rows.py`'s, shared with every other kind of row.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from torch import Tensor

from lmforge.data.jsonl import iter_jsonl_rows
from lmforge.data.masking import IGNORE_INDEX
from lmforge.data.rows import SplitConfig, holdout, pad_rows
from lmforge.errors import LmforgeError
from lmforge.tokenizer import Tokenizer

log = logging.getLogger(__name__)

TOO_LONG = ("drop", "truncate")
Message = dict[str, Any]


@dataclass
class SftDataConfig(SplitConfig):
    """Where SFT rows come from and how they become sequences; the `data:` section of an sft recipe.

    `train` and `eval` are JSONL files of conversations ("messages") or instruction rows
    ("instruction", "input", "output"); `seq_len` is the context of one training sequence.
    """

    too_long: str = "drop"  # a row longer than seq_len: "drop" it or "truncate" it (either is counted and reported)
    pack: bool = False  # pack several rows into each sequence; document masking keeps them apart

    def validate(self) -> None:
        """Raise LmforgeError (one line) for the first value out of range."""
        self.require_train("a JSONL file of conversations or instruction rows")
        if self.too_long not in TOO_LONG:
            raise LmforgeError(f"data.too_long must be one of {', '.join(TOO_LONG)}; got {self.too_long!r}")
        super().validate()


@dataclass
class SftExample:
    """One row as next-token pairs: labels are IGNORE_INDEX where the target is not an assistant token."""

    input_ids: list[int]
    labels: list[int]

    def __len__(self) -> int:
        return len(self.input_ids)


@dataclass
class SftStats:
    """What happened to the rows of one file."""

    rows: int = 0  # rows read
    kept: int = 0  # rows that became examples (truncated ones included)
    truncated: int = 0  # rows cut to seq_len (too_long: truncate)
    dropped_too_long: int = 0  # rows longer than seq_len left out (too_long: drop)
    dropped_no_target: int = 0  # truncated rows whose assistant tokens were all cut away
    tokens: int = 0  # input positions of the kept rows
    targets: int = 0  # assistant tokens the loss covers

    def summary(self, seq_len: int) -> str:
        """One line for the user, e.g. '200 rows -> 198 examples (2 dropped as longer than 128 tokens)'."""
        notes = [f"{n} {what}" for n, what in (
            (self.truncated, f"truncated to {seq_len} tokens"),
            (self.dropped_too_long, f"dropped as longer than {seq_len} tokens"),
            (self.dropped_no_target, "dropped with no assistant token left after truncation"),
        ) if n]
        extra = f" ({'; '.join(notes)})" if notes else ""
        return f"{self.rows} rows -> {self.kept} examples{extra}, {self.tokens:,} tokens, {self.targets:,} assistant targets"


@dataclass
class SftData:
    """Encoded train and eval examples with the statistics of each split."""

    train: list[SftExample]
    eval: list[SftExample]
    stats: dict[str, SftStats] = field(default_factory=dict)


# ---------------------------------------------------------------- rows -> messages -> tokens


def row_messages(row: Mapping[str, Any], where: str) -> list[Message]:
    """The conversation of a JSONL row: its `messages`, or an instruction row as user + assistant turns."""
    if "messages" in row:
        messages = row["messages"]
        if not isinstance(messages, list):
            raise LmforgeError(f"{where}: 'messages' must be a list of {{'role': ..., 'content': ...}} objects")
        return messages
    if "instruction" in row and "output" in row:
        prompt = str(row["instruction"])
        if row.get("input"):
            prompt = f"{prompt}\n\n{row['input']}"
        return [{"role": "user", "content": prompt}, {"role": "assistant", "content": str(row["output"])}]
    raise LmforgeError(
        f"{where} has neither 'messages' nor 'instruction' and 'output' (it has {sorted(row)[:6]}); "
        "see the data format in `lmforge sft --help`"
    )


def encode_conversation(tokenizer: Tokenizer, messages: Sequence[Mapping[str, Any]]) -> tuple[list[int], list[bool]]:
    """Token ids of a conversation through the chat template and its assistant mask, with exactly one BOS first."""
    ids, mask = tokenizer.encode_chat(messages)
    bos = tokenizer.bos_id
    if bos is not None and (not ids or ids[0] != bos):
        ids, mask = [bos, *ids], [False, *mask]
    enders = {i for i in (tokenizer.eot_id, tokenizer.eos_id) if i is not None}
    for end in _run_ends(mask):
        if ids[end] not in enders:
            raise LmforgeError(
                f"the chat template ends an assistant turn with {tokenizer.decode([ids[end]])!r}, not an end-of-turn "
                "or EOS token, so the model would never learn to stop; use a template that closes each turn"
            )
    return ids, mask


def _run_ends(mask: Sequence[bool]) -> list[int]:
    """Indices of the last True of every run of Trues."""
    return [i for i, m in enumerate(mask) if m and (i + 1 == len(mask) or not mask[i + 1])]


def to_example(ids: Sequence[int], mask: Sequence[bool]) -> SftExample:
    """Next-token pairs of a token row; only assistant tokens are targets."""
    labels = [t if m else IGNORE_INDEX for t, m in zip(ids[1:], mask[1:])]
    return SftExample(list(ids[:-1]), labels)


def fit_context(example: SftExample, seq_len: int, too_long: str, stats: SftStats) -> SftExample | None:
    """The example if it fits seq_len; else truncated or None as `too_long` says. Counts into `stats`."""
    if len(example) > seq_len:
        if too_long == "drop":
            stats.dropped_too_long += 1
            return None
        example = SftExample(example.input_ids[:seq_len], example.labels[:seq_len])
        stats.truncated += 1
    targets = sum(label != IGNORE_INDEX for label in example.labels)
    if targets == 0:
        stats.dropped_no_target += 1
        return None
    stats.kept += 1
    stats.tokens += len(example)
    stats.targets += targets
    return example


def encode_sft_file(path: str | Path, tokenizer: Tokenizer, seq_len: int, too_long: str) -> tuple[list[SftExample], SftStats]:
    """Every row of a JSONL file as an example that fits `seq_len`; errors name the file and line."""
    examples, stats = [], SftStats()
    for row in iter_jsonl_rows(path):
        where = f"{path} line {row.line_number}"
        stats.rows += 1
        messages = row_messages(row.data, where)
        try:
            ids, mask = encode_conversation(tokenizer, messages)
        except LmforgeError as err:
            raise LmforgeError(f"{where}: {err}") from None
        example = fit_context(to_example(ids, mask), seq_len, too_long, stats)
        if example is not None:
            examples.append(example)
    if stats.rows == 0:
        raise LmforgeError(f"{path} holds no rows; write one JSON object per line")
    if stats.dropped_too_long or stats.truncated or stats.dropped_no_target:
        log.warning("%s: %s", path, stats.summary(seq_len))
    return examples, stats


def load_sft_data(cfg: SftDataConfig, tokenizer: Tokenizer, seq_len: int, seed: int) -> SftData:
    """Encode the train file (and the eval file, or a held-out share of train)."""
    cfg.validate()
    train, stats = encode_sft_file(cfg.train, tokenizer, seq_len, cfg.too_long)
    if not train:
        raise LmforgeError(f"{cfg.train} has no row that fits seq_len {seq_len}; raise data.seq_len or use too_long: truncate")
    data = SftData(train, [], {"train": stats})
    if cfg.eval:
        data.eval, data.stats["eval"] = encode_sft_file(cfg.eval, tokenizer, seq_len, cfg.too_long)
    else:
        data.train, data.eval = holdout(train, cfg.eval_fraction, seed)
    return data


# ---------------------------------------------------------------- packing and batches


def pack(lengths: Sequence[int], seq_len: int, seed: int) -> list[list[int]]:
    """Groups of example indices whose lengths add up to at most seq_len (seeded order, next-fit)."""
    groups: list[list[int]] = []
    used = seq_len + 1  # nothing open yet
    for i in np.random.default_rng([seed, 11]).permutation(len(lengths)).tolist():
        if used + lengths[i] > seq_len:
            groups.append([])
            used = 0
        groups[-1].append(i)
        used += lengths[i]
    return groups


def sequences(examples: Sequence[SftExample], seq_len: int, packed: bool, seed: int) -> list[list[SftExample]]:
    """Training sequences: one example each, or several packed up to seq_len."""
    if not packed:
        return [[e] for e in examples]
    return [[examples[i] for i in group] for group in pack([len(e) for e in examples], seq_len, seed)]


def collate_sft(batch: Sequence[Sequence[SftExample]], pad_id: int, packed: bool) -> dict[str, Tensor]:
    """Right-padded (B, T) input_ids, labels and attention_mask; packed batches add positions and document_ids."""
    ids = [[t for e in seq for t in e.input_ids] for seq in batch]
    width = max(len(r) for r in ids)
    out = {
        "input_ids": pad_rows(ids, pad_id, width),  # (B, T)
        "labels": pad_rows([[t for e in seq for t in e.labels] for seq in batch], IGNORE_INDEX, width),  # (B, T)
        "attention_mask": pad_rows([[1] * len(r) for r in ids], 0, width),  # (B, T)
    }
    if packed:
        out["positions"] = pad_rows([[p for e in seq for p in range(len(e))] for seq in batch], 0, width)  # (B, T)
        docs = [[d for d, e in enumerate(seq) for _ in range(len(e))] for seq in batch]
        out["document_ids"] = pad_rows(docs, -1, width)  # (B, T) pads form their own document
    return out


__all__ = [
    "SftData",
    "SftDataConfig",
    "SftExample",
    "SftStats",
    "collate_sft",
    "encode_conversation",
    "encode_sft_file",
    "fit_context",
    "load_sft_data",
    "pack",
    "row_messages",
    "sequences",
    "to_example",
]
