"""Classification data: labelled texts from CSV, TSV or JSONL -> token ids and label indices.

Design choices:
- The format follows the file suffix: `.csv` (standard quoting), `.tsv` (tab-separated, no
  quoting, as GLUE ships it) or `.jsonl`. CSV and TSV files start with a header row; a column is
  named by its header or by its 0-based index ("1"), so files whose headers differ (SST-2's train
  says `sentence`, its dev file `content`) still share one recipe.
- Labels may be strings or integers; they are compared as text ("1" and 1 are the same label).
  The label names, in index order, are `data.labels` when given, else the distinct labels of the
  train file sorted (numerically when all are integers). They are saved with the model (head.json),
  so predictions come back as names.
- Texts are encoded with the tokenizer's own special tokens ([CLS] ... [SEP] for BERT, BOS for
  lmforge tokenizers) and cut to seq_len tokens; cut texts are counted and logged.
- Batches reuse `RowLoader` and `iter_row_batches` from `data/rows.py`: one resumable loader for
  every kind of row.
"""

from __future__ import annotations

import csv
import logging
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from lmforge.data.jsonl import iter_jsonl_rows
from lmforge.data.rows import SplitConfig, holdout, pad_rows
from lmforge.errors import LmforgeError
from lmforge.tokenizer import Tokenizer

log = logging.getLogger(__name__)

FORMATS = {".csv": ",", ".tsv": "\t", ".jsonl": None}


@dataclass
class ClassifyDataConfig(SplitConfig):
    """Where labelled texts come from; the `data:` section of a classify recipe.

    `train` and `eval` are CSV, TSV or JSONL files (the suffix says which); texts are cut to
    `seq_len` tokens (counted and reported).
    """

    eval_fraction: float = 0.1  # share of train rows held out when eval is ""; 0 = no evaluation
    text_column: str = "text"  # column holding the text: a CSV/TSV header name or 0-based index, or a JSONL field
    label_column: str = "label"  # column holding the label (strings or integers), named like text_column
    labels: list[str] = field(default_factory=list)  # label names in index order; [] = the sorted distinct labels of train

    def validate(self) -> None:
        """Raise LmforgeError (one line) for the first value out of range."""
        self.require_train("a CSV, TSV or JSONL file of labelled texts")
        super().validate()
        if len(set(self.labels)) != len(self.labels):
            raise LmforgeError(f"data.labels has repeated names: {self.labels}")


@dataclass
class LabelledText:
    """One row: its text, its label as text, and where it came from (for errors)."""

    text: str
    label: str
    where: str


@dataclass
class ClassificationData:
    """Encoded examples `(token ids, label index)` of both splits, and the label names."""

    train: list[tuple[list[int], int]]
    eval: list[tuple[list[int], int]]
    labels: list[str]
    truncated: int = 0  # texts cut to seq_len, both splits


# ---------------------------------------------------------------- reading rows


def _format_of(path: Path) -> str | None:
    if path.suffix.lower() not in FORMATS:
        raise LmforgeError(f"{path}: unknown suffix {path.suffix!r}; use a .csv, .tsv or .jsonl file")
    return FORMATS[path.suffix.lower()]


def _column_index(header: list[str], column: str, path: Path) -> int:
    if column in header:
        return header.index(column)
    if column.isdigit() and int(column) < len(header):
        return int(column)
    raise LmforgeError(f"{path} has no column {column!r}; its columns are {header} (or give a 0-based index)")


def _delimited_rows(path: Path, delimiter: str, text_column: str, label_column: str) -> Iterator[LabelledText]:
    quoting = csv.QUOTE_NONE if delimiter == "\t" else csv.QUOTE_MINIMAL
    with path.open(newline="", encoding="utf-8") as handle:
        reader = csv.reader(handle, delimiter=delimiter, quoting=quoting)
        header = next(reader, None)
        if header is None:
            raise LmforgeError(f"{path} is empty; it needs a header row and one row per text")
        text_at, label_at = (_column_index(header, c, path) for c in (text_column, label_column))
        for row in reader:
            if not row:
                continue
            where = f"{path} line {reader.line_num}"
            if len(row) <= max(text_at, label_at):
                raise LmforgeError(f"{where} has {len(row)} columns; the header has {len(header)}")
            yield LabelledText(row[text_at], row[label_at].strip(), where)


def _jsonl_rows(path: Path, text_column: str, label_column: str) -> Iterator[LabelledText]:
    for row in iter_jsonl_rows(path):
        where = f"{path} line {row.line_number}"
        for name in (text_column, label_column):
            if name not in row.data:
                raise LmforgeError(f"{where} has no field {name!r}; it has {sorted(row.data)[:8]}")
        yield LabelledText(str(row.data[text_column]), _label_text(row.data[label_column], where), where)


def _label_text(value: Any, where: str) -> str:
    if isinstance(value, bool) or not isinstance(value, (int, str)):
        raise LmforgeError(f"{where}: the label {value!r} must be a string or an integer")
    return str(value).strip()


def read_labelled(path: str | Path, text_column: str, label_column: str) -> list[LabelledText]:
    """Every row of a CSV, TSV or JSONL file as (text, label); errors name the file and line."""
    path = Path(path)
    if not path.is_file():
        raise LmforgeError(f"{path} does not exist; pass a CSV, TSV or JSONL file of labelled texts")
    delimiter = _format_of(path)
    if delimiter is None:
        rows = list(_jsonl_rows(path, text_column, label_column))
    else:
        rows = list(_delimited_rows(path, delimiter, text_column, label_column))
    if not rows:
        raise LmforgeError(f"{path} holds no rows")
    return rows


def label_names(rows: Sequence[LabelledText], given: Sequence[str] = ()) -> list[str]:
    """The label names in index order: `given`, else the distinct labels sorted (numerically if integers)."""
    if given:
        return [str(g) for g in given]
    found = {r.label for r in rows}
    numeric = all(x.lstrip("-").isdigit() for x in found)
    return sorted(found, key=int) if numeric else sorted(found)


# ---------------------------------------------------------------- tokens


def encode_texts(tokenizer: Tokenizer, texts: Sequence[str], seq_len: int) -> tuple[list[list[int]], int]:
    """Token ids of each text with the tokenizer's special tokens, cut to seq_len; and how many were cut.

    A long text loses words from its end, never its closing special tokens (BERT's [SEP]): the
    text is cut first and the special tokens added after, as transformers' `truncation=True` does."""
    encoded = tokenizer.encode_batch(list(texts), add_special_tokens=True)
    long = [i for i, ids in enumerate(encoded) if len(ids) > seq_len]
    for i, ids in zip(long, tokenizer.encode_batch([texts[i] for i in long], add_special_tokens=True, max_length=seq_len)):
        encoded[i] = ids[:seq_len]
    fallback = tokenizer.pad_id if tokenizer.pad_id is not None else 0
    return [ids or [fallback] for ids in encoded], len(long)


def encode_labelled(
    rows: Sequence[LabelledText], tokenizer: Tokenizer, labels: Sequence[str], seq_len: int
) -> tuple[list[tuple[list[int], int]], int]:
    """(ids, label index) per row and the number of texts cut to seq_len."""
    index = {name: i for i, name in enumerate(labels)}
    for row in rows:
        if row.label not in index:
            raise LmforgeError(f"{row.where}: label {row.label!r} is not one of {list(labels)}; add it to data.labels")
    ids, cut = encode_texts(tokenizer, [r.text for r in rows], seq_len)
    return [(i, index[r.label]) for i, r in zip(ids, rows)], cut


def load_classification_data(cfg: ClassifyDataConfig, tokenizer: Tokenizer, seq_len: int, seed: int) -> ClassificationData:
    """Read, label and encode the train file and the eval file (or a held-out share of train)."""
    cfg.validate()
    train_rows = read_labelled(cfg.train, cfg.text_column, cfg.label_column)
    labels = label_names(train_rows, cfg.labels)
    if len(labels) < 2:
        raise LmforgeError(f"{cfg.train} has only the label {labels}; a classifier needs at least two")
    train, cut = encode_labelled(train_rows, tokenizer, labels, seq_len)
    data = ClassificationData(train, [], labels, cut)
    if cfg.eval:
        eval_rows = read_labelled(cfg.eval, cfg.text_column, cfg.label_column)
        data.eval, cut = encode_labelled(eval_rows, tokenizer, labels, seq_len)
        data.truncated += cut
    else:
        data.train, data.eval = holdout(train, cfg.eval_fraction, seed)
    if data.truncated:
        log.warning("%d texts were longer than %d tokens and were cut", data.truncated, seq_len)
    return data


def collate_classification(batch: Sequence[tuple[list[int], int]], pad_id: int) -> dict[str, Tensor]:
    """Right-padded input_ids and attention_mask (B, T) and label indices (B,)."""
    ids = [i for i, _ in batch]
    width = max(len(i) for i in ids)
    return {
        "input_ids": pad_rows(ids, pad_id, width),  # (B, T)
        "attention_mask": pad_rows([[1] * len(i) for i in ids], 0, width),  # (B, T)
        "labels": torch.tensor([label for _, label in batch], dtype=torch.long),  # (B,)
    }


__all__ = [
    "ClassificationData",
    "ClassifyDataConfig",
    "LabelledText",
    "collate_classification",
    "encode_labelled",
    "encode_texts",
    "label_names",
    "load_classification_data",
    "read_labelled",
]
