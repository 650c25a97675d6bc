"""Streaming JSONL reading with errors that name the file and line.

Design choices:
- The file is read in binary mode one line at a time, so memory stays flat for any file size and
  each row's exact size in bytes is known (`prepare` reports progress and places the validation
  cut in input bytes).
- Blank lines are skipped; every other line must be a JSON object. A bad line raises
  `LmforgeError` naming the file and its 1-based line number, because "invalid JSON" without a
  location is useless on a file with a million rows.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any, NamedTuple

from lmforge.errors import LmforgeError


class JsonlRow(NamedTuple):
    """One object from a JSONL file, with where it came from."""

    line_number: int  # 1-based, as editors show it
    offset: int  # byte offset of the line's start in the file
    n_bytes: int  # size of the line in the file, newline included
    data: dict[str, Any]


def iter_jsonl_rows(path: str | Path) -> Iterator[JsonlRow]:
    """Yield every non-blank line of `path` as a `JsonlRow`; raise `LmforgeError` on a bad line."""
    path = Path(path)
    try:
        handle = path.open("rb")
    except OSError as error:
        raise LmforgeError(f"cannot open {path}: {error.strerror}; check the path") from error
    offset = 0
    with handle:
        for line_number, raw in enumerate(handle, start=1):
            if raw.strip():
                yield JsonlRow(line_number, offset, len(raw), parse_object(raw, path, line_number))
            offset += len(raw)


def read_jsonl(path: str | Path) -> Iterator[dict[str, Any]]:
    """Yield the JSON objects of `path`, one per non-blank line."""
    for row in iter_jsonl_rows(path):
        yield row.data


def parse_object(raw: bytes, path: Path, line_number: int) -> dict[str, Any]:
    """Decode one line into a dict, or explain in one line why it is not a JSON object."""
    where = f"{path} line {line_number}"
    try:
        value = json.loads(raw)
    except UnicodeDecodeError as error:
        raise LmforgeError(
            f"{where} is not valid UTF-8 ({error.reason}); re-encode the file as UTF-8"
        ) from error
    except json.JSONDecodeError as error:
        raise LmforgeError(f"{where} is not valid JSON: {error.msg} at column {error.colno}") from error
    if not isinstance(value, dict):
        kind = type(value).__name__
        raise LmforgeError(f'{where} is a JSON {kind}, expected an object like {{"text": "..."}}')
    return value
