"""read_jsonl / iter_jsonl_rows: streaming rows, blank lines, and errors naming file and line."""

from __future__ import annotations

import pytest

from lmforge.data import iter_jsonl_rows, read_jsonl
from lmforge.errors import LmforgeError


def test_rows_are_streamed_and_blank_lines_skipped(write):
    path = write("data.jsonl", '{"text": "a"}\n\n   \n{"text": "b", "n": 2}\n')
    assert list(read_jsonl(path)) == [{"text": "a"}, {"text": "b", "n": 2}]


def test_rows_know_their_line_and_bytes(write):
    path = write("data.jsonl", '{"a": 1}\n\n{"a": 22}\n')
    rows = list(iter_jsonl_rows(path))
    assert [(r.line_number, r.offset, r.n_bytes) for r in rows] == [(1, 0, 9), (3, 10, 10)]


def test_invalid_json_names_file_and_line(write):
    path = write("data.jsonl", '{"text": "a"}\n' * 6 + '{"text": oops}\n')
    with pytest.raises(LmforgeError, match=r"data\.jsonl line 7 is not valid JSON"):
        list(read_jsonl(path))


def test_row_must_be_an_object(write):
    path = write("data.jsonl", '{"text": "a"}\n[1, 2]\n')
    with pytest.raises(LmforgeError, match=r"data\.jsonl line 2 is a JSON list, expected an object"):
        list(read_jsonl(path))


def test_invalid_utf8_names_line(tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_bytes(b'{"text": "ok"}\n{"text": "\xff\xfe"}\n')
    with pytest.raises(LmforgeError, match=r"bad\.jsonl line 2 is not valid UTF-8"):
        list(read_jsonl(path))


def test_missing_file(tmp_path):
    with pytest.raises(LmforgeError, match=r"nope\.jsonl"):
        list(read_jsonl(tmp_path / "nope.jsonl"))
