"""Retrieval pairs: (query, passage[, negative]) rows from JSONL -> token ids, for training embedders.

Each row is `{"query": ..., "passage": ...}` with an optional `"negative"` (a passage that looks
relevant but does not answer the query: a hard negative) and an optional `"doc_id"` (the document
the passage comes from, so that mining hard negatives from an index skips every chunk of it).

Design choices:
- Texts are encoded as `lm.embed` encodes them (the sentence config's prompt and lowercasing, the
  tokenizer's special tokens, cut to `seq_len`), so training sees what indexing and querying see.
- A batch stacks the queries, the passages and the negatives of its rows as separate padded
  tensors; rows without a negative add none (every passage and negative of the batch is a
  candidate for every query, so a batch may mix rows with and without negatives).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from torch import Tensor

from lmforge.checkpoint.sentence import SentenceConfig
from lmforge.data.jsonl import iter_jsonl_rows
from lmforge.data.rows import SplitConfig, pad_rows
from lmforge.errors import LmforgeError
from lmforge.tokenizer import Tokenizer

FIELDS = ("query", "passage")  # required in every row
OPTIONAL_FIELDS = ("negative", "doc_id")


@dataclass
class PairDataConfig(SplitConfig):
    """Where (query, passage) pairs come from; the `data:` section of an embed-train recipe."""

    eval_fraction: float = 0.1  # share of train rows held out when eval is "" (recall@k before and after); 0 = none
    mine_index: str = ""  # a `lmforge rag index` folder: rows without a negative get the top hit that is not their passage
    mine_depth: int = 10  # hits looked at per query when mining

    def validate(self) -> None:
        """Raise LmforgeError (one line) for the first value out of range."""
        self.require_train('a JSONL file of {"query": ..., "passage": ...} rows')
        super().validate()
        if self.mine_depth < 1:
            raise LmforgeError(f"data.mine_depth must be >= 1; got {self.mine_depth}")


@dataclass
class Pair:
    """One training row as text."""

    query: str
    passage: str
    negative: str | None = None  # a hard negative passage, given or mined
    doc_id: str | None = None  # the passage's document (mining skips its chunks)


EncodedPair = tuple[list[int], list[int], list[int] | None]  # query ids, passage ids, negative ids


def _text(data: dict[str, Any], name: str, where: str) -> str | None:
    value = data.get(name)
    if value is None and name in OPTIONAL_FIELDS:
        return None
    if not isinstance(value, str) or not value.strip():
        fix = f'each row needs non-empty "{FIELDS[0]}" and "{FIELDS[1]}" strings (and may have "negative")'
        problem = f"has no field {name!r}" if name not in data else f"has {name!r} = {value!r}"
        raise LmforgeError(f"{where} {problem}; {fix}")
    return value


def read_pairs(path: str | Path) -> list[Pair]:
    """Every row of a JSONL file of pairs; a missing or empty field fails in one line naming file and line."""
    path = Path(path)
    if not path.is_file():
        raise LmforgeError(f'{path} does not exist; pass a JSONL file of {{"query": ..., "passage": ...}} rows')
    pairs = []
    for row in iter_jsonl_rows(path):
        where = f"{path} line {row.line_number}"
        query, passage, negative, doc_id = (_text(row.data, name, where) for name in (*FIELDS, *OPTIONAL_FIELDS))
        pairs.append(Pair(query, passage, negative, doc_id))  # type: ignore[arg-type]
    if not pairs:
        raise LmforgeError(f"{path} holds no rows")
    return pairs


def encode_texts(tokenizer: Tokenizer, texts: Sequence[str], max_length: int, how: SentenceConfig) -> list[list[int]]:
    """Token ids of texts as `lm.embed` makes them: prompt, lowercasing, special tokens, cut to max_length."""
    texts = [how.prompt + t for t in texts]
    encoded = tokenizer.encode_batch([t.lower() for t in texts] if how.lowercase else texts,
                                     add_special_tokens=True, max_length=max_length)
    return [row or [tokenizer.padding_id] for row in encoded]


def encode_pairs(pairs: Sequence[Pair], tokenizer: Tokenizer, max_length: int, how: SentenceConfig) -> list[EncodedPair]:
    """The pairs as token ids (negative None when the row has none)."""
    queries = encode_texts(tokenizer, [p.query for p in pairs], max_length, how)
    passages = encode_texts(tokenizer, [p.passage for p in pairs], max_length, how)
    with_negative = [p.negative for p in pairs if p.negative is not None]
    negatives = iter(encode_texts(tokenizer, with_negative, max_length, how)) if with_negative else iter(())
    return [(q, d, next(negatives) if p.negative is not None else None) for q, d, p in zip(queries, passages, pairs)]


def padded(rows: Sequence[Sequence[int]], pad_id: int) -> tuple[Tensor, Tensor]:
    """Right-padded ids (B, T) and their attention mask (B, T)."""
    width = max(len(r) for r in rows)
    ids = pad_rows(rows, pad_id, width)  # (B, T)
    mask = pad_rows([[1] * len(r) for r in rows], 0, width)  # (B, T)
    return ids, mask


def collate_pairs(items: list[EncodedPair], pad_id: int) -> dict[str, Tensor]:
    """`query_ids`/`query_mask` (B, Tq), `passage_*` (B, Tp) and, when any row has one, `negative_*` (N, Tn)."""
    batch = {}
    for name, rows in (("query", [q for q, _, _ in items]), ("passage", [p for _, p, _ in items]),
                       ("negative", [n for _, _, n in items if n is not None])):
        if rows:
            batch[f"{name}_ids"], batch[f"{name}_mask"] = padded(rows, pad_id)
    return batch


__all__ = ["EncodedPair", "Pair", "PairDataConfig", "collate_pairs", "encode_pairs", "encode_texts", "padded",
           "read_pairs"]
