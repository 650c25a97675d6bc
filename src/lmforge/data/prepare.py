"""Text corpora -> token shards on disk (the format `shards.py` reads).

Design choices:
- `prepare` streams: text files are read and encoded in chunks of about `chunk_bytes`, JSONL files
  one row at a time, and tokens are appended to the current shard file, which is closed once it
  holds `shard_tokens` tokens (documents may continue into the next shard). A text chunk ends only
  between a visible character and a line break, where byte-level BPE pre-tokenizers (GPT-2's
  regex) split anyway, so chunked and whole-file encodings agree.
- The token dtype is uint16 when the vocabulary fits in 16 bits (half the disk and page cache),
  uint32 otherwise.
- Documents: each text file and each JSONL row is one document, written as
  `[bos] + encode(text) + [eos]`: bos only when the tokenizer has one distinct from eos, eos when
  it has one. `encode` must return the ids of the text alone, without special tokens.
- Validation split. `val_split="tail"` (default, nanoGPT's scheme, right for one big file such
  as tinyshakespeare): the last `val_fraction` of the input, measured in input bytes, starting at
  the first line boundary past the mark; a document crossing the mark becomes two documents.
  `val_split="documents"`: each document goes to val with probability `val_fraction`, drawn in
  order from a numpy Generator seeded with `seed` (better when a folder's last files are unlike
  the rest). Both are deterministic: same inputs, same split.
- Atomic output: everything is written into a temporary folder next to `out_dir` and renamed into
  place at the end. Any exception, KeyboardInterrupt included, deletes the temporary folder, so
  `out_dir` is always either the previous complete output or the new one. (A process killed with
  SIGKILL can leave a hidden `.NAME.*.tmp` folder behind; it is never read.)
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from lmforge.data.jsonl import iter_jsonl_rows
from lmforge.data.shards import META_FORMAT, META_VERSION, TokenizerLike, tokenizer_identity
from lmforge.errors import LmforgeError

SPLITS = ("train", "val")
VAL_SPLITS = ("tail", "documents")
JSONL_SUFFIX = ".jsonl"
# Files picked up when an input is a folder (an input named explicitly is read whatever its suffix).
_PROSE_SUFFIXES = {".txt", ".md", ".markdown", ".rst", ".tex", ".html", ".csv", ".tsv", ".yaml", ".yml"}
_CODE_SUFFIXES = {".py", ".c", ".h", ".cc", ".cpp", ".hpp", ".rs", ".go", ".java", ".js", ".ts", ".sh"}
TEXT_SUFFIXES = frozenset(_PROSE_SUFFIXES | _CODE_SUFFIXES)


@dataclass(frozen=True)
class SplitStats:
    """What one split of a prepare output holds."""

    tokens: int  # special tokens included
    documents: int  # documents started in this split
    bytes: int  # UTF-8 bytes of the text behind the tokens (for bits per byte)
    shards: int  # number of .bin files


@dataclass(frozen=True)
class PrepareStats:
    """The result of `prepare`."""

    out_dir: Path
    dtype: str  # "uint16" or "uint32"
    train: SplitStats
    val: SplitStats


@dataclass(frozen=True)
class _Options:
    """The knobs of `prepare` that shape the output; recorded in meta.json."""

    text_field: str
    val_fraction: float
    val_split: str
    shard_tokens: int
    chunk_bytes: int
    seed: int


# ----------------------------------------------------------------------------- inputs


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
class _Piece:
    """A run of text from one input file, the unit that is encoded at once."""

    path: Path
    text: str
    offset: int  # position of the piece in the concatenated input files, in bytes
    n_input_bytes: int  # bytes of input consumed by the piece (JSON syntax included)
    starts_document: bool
    ends_document: bool


def _iter_pieces(
    files: list[Path], text_field: str, chunk_bytes: int, cut_at: int | None
) -> Iterator[_Piece]:
    """All pieces of all files in order; a text file is also cut at the first line start past `cut_at`."""
    offset = 0
    for path in files:
        if path.suffix.lower() == JSONL_SUFFIX:
            pieces = _jsonl_pieces(path, offset, text_field)
        else:
            pieces = _text_pieces(path, offset, chunk_bytes, cut_at)
        for piece in pieces:
            yield piece
            offset += piece.n_input_bytes


def _text_pieces(path: Path, offset: int, chunk_bytes: int, cut_at: int | None) -> Iterator[_Piece]:
    """One text file as one document, read in chunks of about `chunk_bytes` bytes.

    A chunk ends between a line's last visible character and its line break, where byte-level BPE
    pre-tokenizers (GPT-2's regex) split anyway, so chunked and whole-file encodings agree. At the
    validation cut the document ends at a line start instead.
    """
    parts: list[bytes] = []
    start, size, starts_document = offset, 0, True
    with path.open("rb") as handle:
        for line in handle:
            if parts and cut_at is not None and start < cut_at <= start + size:
                yield _Piece(path, _decode(parts), start, size, starts_document, True)
                parts, start, size, starts_document = [], start + size, 0, True
            parts.append(line)
            size += len(line)
            body = line.rstrip(b"\r\n")
            if size >= chunk_bytes and len(body) < len(line) and _ends_visible(body):
                newline = line[len(body) :]  # carried over to start the next chunk
                parts[-1] = body
                yield _Piece(path, _decode(parts), start, size - len(newline), starts_document, False)
                start += size - len(newline)
                parts, size, starts_document = [newline], len(newline), False
    if parts:
        yield _Piece(path, _decode(parts), start, size, starts_document, True)


def _ends_visible(body: bytes) -> bool:
    """Whether `body` ends with a character that is not whitespace (Unicode-aware)."""
    last = body[-4:].decode("utf-8", errors="ignore")[-1:]
    return bool(last) and not last.isspace()


def _decode(lines: list[bytes]) -> str:
    """UTF-8 text of whole lines; undecodable bytes become U+FFFD rather than stopping prepare."""
    return b"".join(lines).decode("utf-8", errors="replace")


def _jsonl_pieces(path: Path, offset: int, text_field: str) -> Iterator[_Piece]:
    """Each row's `text_field` as one document."""
    consumed = 0  # blank lines count towards the next row, so progress adds up to the file size
    for row in iter_jsonl_rows(path):
        text = row.data.get(text_field)
        if not isinstance(text, str):
            where = f"{path} line {row.line_number}"
            if text_field not in row.data:
                keys = ", ".join(sorted(row.data)) or "none"
                raise LmforgeError(f"{where} has no {text_field!r} field (keys: {keys}); set text_field")
            raise LmforgeError(f"{where}: {text_field!r} is a {type(text).__name__}, expected a string")
        n_bytes = row.offset + row.n_bytes - consumed
        yield _Piece(path, text, offset + consumed, n_bytes, True, True)
        consumed += n_bytes


# ----------------------------------------------------------------------------- writing


def token_dtype(vocab_size: int) -> np.dtype:
    """uint16 when every id (< vocab_size) fits in 16 bits, else uint32."""
    return np.dtype(np.uint16) if vocab_size <= 2**16 else np.dtype(np.uint32)


class _SplitWriter:
    """Appends tokens of one split to `{split}_NNN.bin` files of at most `shard_tokens` tokens."""

    def __init__(self, folder: Path, split: str, dtype: np.dtype, shard_tokens: int) -> None:
        self.folder, self.split, self.dtype, self.shard_tokens = folder, split, dtype, shard_tokens
        self.shards: list[dict[str, Any]] = []  # {"file": name, "tokens": count}, as in meta.json
        self.tokens = self.documents = self.bytes = 0
        self._handle: Any = None

    def write(self, ids: np.ndarray, n_text_bytes: int, starts_document: bool) -> None:
        """Append `ids` (already of `dtype`), opening new shard files as the current one fills."""
        self.documents += int(starts_document)
        self.bytes += n_text_bytes
        while ids.size:
            if self._handle is None or self.shards[-1]["tokens"] == self.shard_tokens:
                self._open_next_shard()
            room = self.shard_tokens - self.shards[-1]["tokens"]
            self._handle.write(ids[:room].tobytes())
            self.shards[-1]["tokens"] += min(room, ids.size)
            self.tokens += min(room, ids.size)
            ids = ids[room:]

    def _open_next_shard(self) -> None:
        self.close()
        name = f"{self.split}_{len(self.shards):03d}.bin"
        self._handle = (self.folder / name).open("wb")
        self.shards.append({"file": name, "tokens": 0})

    def close(self) -> None:
        if self._handle is not None:
            self._handle.close()
            self._handle = None

    def meta(self) -> dict[str, Any]:
        return {
            "tokens": self.tokens,
            "documents": self.documents,
            "bytes": self.bytes,
            "shards": self.shards,
        }


def _piece_ids(piece: _Piece, tokenizer: TokenizerLike, dtype: np.dtype) -> np.ndarray:
    """Token ids of a piece with the document's bos / eos, checked to fit `dtype`."""
    ids = tokenizer.encode(piece.text) if piece.text else []
    bos, eos = tokenizer.bos_id, tokenizer.eos_id
    if piece.starts_document and bos is not None and bos != eos:
        ids = [bos, *ids]
    if piece.ends_document and eos is not None:
        ids = [*ids, eos]
    array = np.asarray(ids, dtype=np.int64)
    if array.size and (array.min() < 0 or array.max() > np.iinfo(dtype).max):
        bad = int(array.min()) if array.min() < 0 else int(array.max())
        raise LmforgeError(
            f"tokenizer produced token id {bad} while encoding {piece.path}, which does not fit in "
            f"{dtype.name} (vocab_size is {tokenizer.vocab_size}); the tokenizer's vocab_size is wrong"
        )
    return array.astype(dtype)


def _split_chooser(options: _Options, cut_at: int | None) -> Callable[[_Piece], str]:
    """A function piece -> "train" | "val" implementing the chosen validation scheme."""
    if options.val_split == "tail":
        return lambda piece: "val" if cut_at is not None and piece.offset >= cut_at else "train"
    rng = np.random.default_rng(options.seed)
    current = "train"

    def choose(piece: _Piece) -> str:
        nonlocal current
        if piece.starts_document:  # one draw per document, in input order
            current = "val" if rng.random() < options.val_fraction else "train"
        return current

    return choose


def _check_options(options: _Options) -> None:
    if not 0.0 <= options.val_fraction < 1.0:
        raise LmforgeError(f"val_fraction must be in [0, 1), got {options.val_fraction}; 0.01 keeps 1%")
    if options.val_split not in VAL_SPLITS:
        raise LmforgeError(f"val_split must be one of {', '.join(VAL_SPLITS)}, got {options.val_split!r}")
    if options.shard_tokens < 1 or options.chunk_bytes < 1:
        sizes = f"{options.shard_tokens} and {options.chunk_bytes}"
        raise LmforgeError(f"shard_tokens and chunk_bytes must be positive, got {sizes}")


def _check_out_dir(out_dir: Path) -> None:
    """`out_dir` may be new, empty or a previous prepare output; anything else is refused."""
    if not out_dir.exists():
        return
    if not out_dir.is_dir():
        raise LmforgeError(f"output {out_dir} is a file; choose a folder path for the token shards")
    if any(out_dir.iterdir()) and not _is_prepare_output(out_dir):
        raise LmforgeError(
            f"output folder {out_dir} exists and is not a previous prepare output (no lmforge meta.json); "
            "choose a new folder or empty this one"
        )


def _is_prepare_output(folder: Path) -> bool:
    try:
        meta = json.loads((folder / "meta.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    return isinstance(meta, dict) and meta.get("format") == META_FORMAT


def _replace_folder(new: Path, target: Path) -> None:
    """Move the finished folder `new` to `target`, replacing a previous output there."""
    if target.exists():
        old = new.with_suffix(".old")
        os.replace(target, old)
        os.replace(new, target)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(new, target)


def prepare(
    inputs: Sequence[str | Path],
    tokenizer: TokenizerLike,
    out_dir: str | Path,
    *,
    text_field: str = "text",
    val_fraction: float = 0.01,
    val_split: str = "tail",
    shard_tokens: int = 100_000_000,
    chunk_bytes: int = 1 << 20,
    seed: int = 0,
    progress: Callable[[int], None] | None = None,
) -> PrepareStats:
    """Tokenize text files, JSONL files and folders of them into train / val shards in `out_dir`.

    `text_field` is the JSONL key holding the text; `val_fraction` and `val_split` ("tail" or
    "documents", see the module docstring) choose the validation split, `seed` its random draws in
    "documents" mode; `shard_tokens` caps the tokens per .bin file; `chunk_bytes` is how much of a
    text file is encoded at once. `progress(n)` is called with each number of input bytes just
    processed (pass `tqdm.update`; the total is the size of `list_input_files(inputs)`).
    """
    files = list_input_files(inputs)
    options = _Options(text_field, val_fraction, val_split, shard_tokens, chunk_bytes, seed)
    _check_options(options)
    out_dir = Path(out_dir)
    _check_out_dir(out_dir)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.", suffix=".tmp", dir=out_dir.parent))
    try:
        meta = _write_splits(files, tokenizer, work, options, progress)
        (work / "meta.json").write_text(json.dumps(meta, indent=2) + "\n", encoding="utf-8")
        _replace_folder(work, out_dir)
    except BaseException:
        shutil.rmtree(work, ignore_errors=True)
        raise
    return PrepareStats(out_dir, meta["dtype"], *(_stats_of(meta["splits"][split]) for split in SPLITS))


def _stats_of(split: dict[str, Any]) -> SplitStats:
    return SplitStats(split["tokens"], split["documents"], split["bytes"], len(split["shards"]))


def _write_splits(
    files: list[Path],
    tokenizer: TokenizerLike,
    folder: Path,
    options: _Options,
    progress: Callable[[int], None] | None,
) -> dict[str, Any]:
    """Stream every piece of `files` into the split writers; return the content of meta.json."""
    dtype = token_dtype(tokenizer.vocab_size)
    cut_at = None
    if options.val_split == "tail" and options.val_fraction > 0:
        cut_at = int(sum(path.stat().st_size for path in files) * (1.0 - options.val_fraction))
    choose_split = _split_chooser(options, cut_at)
    writers = {split: _SplitWriter(folder, split, dtype, options.shard_tokens) for split in SPLITS}
    max_id = -1
    try:
        for piece in _iter_pieces(files, options.text_field, options.chunk_bytes, cut_at):
            ids = _piece_ids(piece, tokenizer, dtype)
            max_id = max(max_id, int(ids.max())) if ids.size else max_id
            writers[choose_split(piece)].write(ids, len(piece.text.encode("utf-8")), piece.starts_document)
            if progress is not None:
                progress(piece.n_input_bytes)
    finally:
        for writer in writers.values():
            writer.close()
    _check_split_sizes(files, writers, options.val_fraction)
    return {
        "format": META_FORMAT,
        "version": META_VERSION,
        "dtype": dtype.name,
        "vocab_size": int(tokenizer.vocab_size),
        "max_token_id": max_id,
        "tokenizer": tokenizer_identity(tokenizer),
        "inputs": [str(path) for path in files],
        **asdict(options),
        "splits": {split: writer.meta() for split, writer in writers.items()},
    }


def _check_split_sizes(files: list[Path], writers: dict[str, _SplitWriter], val_fraction: float) -> None:
    """Refuse an output that training could not use: no text, or an empty train / val split."""
    where = str(files[0]) if len(files) == 1 else f"{files[0]} and {len(files) - 1} more files"
    if writers["train"].bytes + writers["val"].bytes == 0:
        raise LmforgeError(f"the corpus is empty: {where} holds no text; check the inputs and text_field")
    if writers["train"].tokens == 0:
        raise LmforgeError(f"the train split of {where} is empty; lower val_fraction (now {val_fraction})")
    if val_fraction > 0 and writers["val"].tokens == 0:
        raise LmforgeError(
            f"the validation split of {where} is empty (too little text, or no line break after the "
            f"{1 - val_fraction:.0%} mark); raise val_fraction, try val_split='tail', or set val_fraction=0"
        )
