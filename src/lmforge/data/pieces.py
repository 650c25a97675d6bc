"""Input files -> pieces: the runs of raw input that `prepare` encodes at once, in input order.

Design choices:
- Reading is streamed, and memory is bounded by `chunk_bytes`, not by the corpus: a text file is
  read in blocks of `chunk_bytes` and cut into pieces of about that size; a JSONL file is read one
  line at a time and each row is one piece (a row is parsed whole, so memory follows the longest
  row; split a corpus held in one giant row into rows or into a text file).
- Pieces keep raw bytes: decoding text and parsing JSON happen where the piece is encoded (`piece_text`),
  which may be a worker process, so the reading process stays cheap.
- Where a text piece ends. Byte-level BPE pre-tokenizers (GPT-2's regex, also cl100k's) never put
  a visible character and the whitespace after it in one pre-token, so a piece that ends between
  them encodes exactly as the whole file would. A piece ends at the last such place before a line
  break (`\\r\\n` runs included) in what has been read. A line longer than `LONG_LINE_CHUNKS`
  chunks is cut before a space instead; a run of that many chunks with no whitespace at all is
  cut at a character boundary, the one case where the tokens at the cut can differ from encoding
  the file whole. At the validation cut a piece ends at a line start instead.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

from lmforge.data.jsonl import parse_object
from lmforge.errors import LmforgeError

JSONL_SUFFIX = ".jsonl"
# Files picked up when an input is a folder (an input named explicitly is read whatever its suffix).
_PROSE_SUFFIXES = {".txt", ".md", ".markdown", ".rst", ".tex", ".html", ".csv", ".tsv", ".yaml", ".yml"}
_CODE_SUFFIXES = {".py", ".c", ".h", ".cc", ".cpp", ".hpp", ".rs", ".go", ".java", ".js", ".ts", ".sh"}
TEXT_SUFFIXES = frozenset(_PROSE_SUFFIXES | _CODE_SUFFIXES)
LONG_LINE_CHUNKS = 4  # a line longer than this many chunk_bytes is cut inside (see the module docstring)


def list_input_files(inputs: Sequence[str | Path]) -> list[Path]:
    """The files `prepare` reads, in order: files as given, folders expanded recursively (sorted).

    Useful to size a progress bar: `sum(p.stat().st_size for p in list_input_files(inputs))`.
    """
    if not inputs:
        raise LmforgeError("no input given; pass at least one text file, .jsonl file or folder")
    files: list[Path] = []
    for item in map(Path, inputs):
        if item.is_dir():
            files.extend(_text_files_in(item))
        elif item.is_file():
            files.append(item)
        else:
            raise LmforgeError(f"input {item} does not exist; check the path")
    return files


def _text_files_in(folder: Path) -> list[Path]:
    """Text and JSONL files under `folder`, hidden ones (.git, ...) skipped, sorted by path."""
    files = sorted(
        path
        for path in folder.rglob("*")
        if path.is_file()
        and (path.suffix.lower() in TEXT_SUFFIXES or path.suffix.lower() == JSONL_SUFFIX)
        and not any(part.startswith(".") for part in path.relative_to(folder).parts)
    )
    if not files:
        suffixes = ", ".join(sorted(TEXT_SUFFIXES | {JSONL_SUFFIX}))
        raise LmforgeError(f"folder {folder} has no text files; expected files ending in {suffixes}")
    return files


@dataclass(frozen=True)
class Piece:
    """A run of raw input from one file, the unit that is encoded at once."""

    path: Path
    raw: bytes  # UTF-8 text, or one JSONL line
    row: int | None  # the JSONL line number (1-based) when the piece is a row, None for text
    offset: int  # position of the piece in the concatenated input files, in bytes
    n_input_bytes: int  # bytes of input the piece accounts for (JSONL: blank lines before it included)
    starts_document: bool
    ends_document: bool


def iter_pieces(files: list[Path], chunk_bytes: int, cut_at: int | None) -> Iterator[Piece]:
    """All pieces of all files in order; a text file is also cut at the first line start past `cut_at`."""
    offset = 0
    for path in files:
        if path.suffix.lower() == JSONL_SUFFIX:
            pieces = _jsonl_pieces(path, offset)
        else:
            pieces = _text_pieces(path, offset, chunk_bytes, cut_at)
        for piece in pieces:
            yield piece
            offset += piece.n_input_bytes


def piece_text(piece: Piece, text_field: str) -> str:
    """The text of a piece: decoded UTF-8, or the row's `text_field`; LmforgeError naming the line if absent."""
    if piece.row is None:  # undecodable bytes become U+FFFD rather than stopping prepare
        return piece.raw.decode("utf-8", errors="replace")
    data = parse_object(piece.raw, piece.path, piece.row)
    text = data.get(text_field)
    if not isinstance(text, str):
        where = f"{piece.path} line {piece.row}"
        if text_field not in data:
            keys = ", ".join(sorted(data)) or "none"
            raise LmforgeError(f"{where} has no {text_field!r} field (keys: {keys}); set text_field")
        raise LmforgeError(f"{where}: {text_field!r} is a {type(text).__name__}, expected a string")
    return text


def _open(path: Path) -> BinaryIO:
    try:
        return path.open("rb")
    except OSError as error:
        raise LmforgeError(f"cannot open {path}: {error.strerror}; check the path") from error


def _jsonl_pieces(path: Path, offset: int) -> Iterator[Piece]:
    """Each non-blank line as one document; blank lines count towards the next row's input bytes."""
    consumed = position = 0
    with _open(path) as handle:
        for line_number, raw in enumerate(handle, start=1):
            position += len(raw)
            if raw.strip():
                yield Piece(path, raw, line_number, offset + consumed, position - consumed, True, True)
                consumed = position


def _text_pieces(path: Path, offset: int, chunk_bytes: int, cut_at: int | None) -> Iterator[Piece]:
    """One text file as one document, read in blocks of `chunk_bytes` and cut as the module docstring says."""
    pending, start, starts_document = b"", offset, True  # read, not yet yielded; starts at `start`
    with _open(path) as handle:
        while True:
            block = handle.read(chunk_bytes)
            pending += block
            while (cut := _next_cut(pending, start, chunk_bytes, cut_at, at_end=not block)) is not None:
                end, ends_document = cut
                yield Piece(path, pending[:end], None, start, end, starts_document, ends_document)
                pending, start, starts_document = pending[end:], start + end, ends_document
            if not block:
                return


def _next_cut(
    data: bytes, start: int, chunk_bytes: int, cut_at: int | None, at_end: bool
) -> tuple[int, bool] | None:
    """(length, ends_document) of the next piece of `data` (found at input position `start`), or
    None when more input is needed first."""
    if not data:
        return None
    if cut_at is not None and start < cut_at:
        newline = data.find(b"\n", cut_at - start - 1)  # the first line start at or past the mark
        if 0 <= newline < len(data) - 1:
            return newline + 1, True
    if at_end:
        return len(data), True
    if len(data) < chunk_bytes:
        return None
    end = _last_break(data, b"\n", b"\r\n")
    if end is None and len(data) >= LONG_LINE_CHUNKS * chunk_bytes:
        end = _last_break(data, b" ", b" ") or _character_boundary(data, chunk_bytes)
    return None if end is None else (end, False)


def _last_break(data: bytes, mark: bytes, run: bytes) -> int | None:
    """The last position k > 0 with a visible character before it and only `run` bytes from it up to
    an occurrence of `mark`; None if there is none."""
    found = len(data)
    while (found := data.rfind(mark, 0, found)) > 0:
        k = found
        while k > 0 and data[k - 1] in run:
            k -= 1
        if k > 0 and _ends_visible(data[max(0, k - 4) : k]):
            return k
        found = k
    return None


def _ends_visible(body: bytes) -> bool:
    """Whether `body` ends with a character that is not whitespace (Unicode-aware)."""
    last = body.decode("utf-8", errors="ignore")[-1:]
    return bool(last) and not last.isspace()


def _character_boundary(data: bytes, near: int) -> int:
    """The start of the UTF-8 character at or before `near`: continuation bytes are 0b10xxxxxx, and a
    character has at most three (invalid UTF-8 is cut anywhere)."""
    k = near
    while k > max(1, near - 3) and data[k] & 0xC0 == 0x80:
        k -= 1
    return k
