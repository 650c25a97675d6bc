"""Text corpora -> token shards on disk, and the loaders that draw batches from them.

Design choices:
- Shards are raw numpy arrays on disk (`train_000.bin`, `val_000.bin`, ...) read back with
  `np.memmap`, as in nanoGPT: no framing, no pickle. `meta.json` records the dtype and how many
  tokens each shard holds. The dtype is uint16 when the vocabulary fits in 16 bits (half the disk
  and page cache), uint32 otherwise.
- `prepare` streams: text files are read and encoded in chunks of about `chunk_bytes`, JSONL files
  one row at a time, and tokens are appended to the current shard file, which is closed once it
  holds `shard_tokens` tokens (documents may continue into the next shard). A text chunk ends only
  between a visible character and a line break, where byte-level BPE pre-tokenizers (GPT-2's
  regex) split anyway, so chunked and whole-file encodings agree.
- Documents: each text file and each JSONL row is one document, written as
  `[bos] + encode(text) + [eos]`: bos only when the tokenizer has one distinct from eos, eos when
  it has one. `encode` must return the ids of the text alone, without special tokens.
- Validation split. `val_split="tail"` (default, nanoGPT's scheme, right for one big file such
  as tinyshakespeare): the last `val_fraction` of the input, measured in input bytes, starting at
  the first line boundary past the mark; a document crossing the mark becomes two documents.
  `val_split="documents"`: each document goes to val with probability `val_fraction`, drawn in
  order from a numpy Generator seeded with `seed` (better when a folder's last files are unlike
  the rest). Both are deterministic: same inputs, same split.
- `meta.json` records the UTF-8 bytes of text in each split, so that bits per byte can be
  computed from a loss, and a fingerprint of the tokenizer (the ids of a fixed probe text), so a
  different tokenizer is caught before training on ids it does not understand.
- Atomic output: everything is written into a temporary folder next to `out_dir` and renamed into
  place at the end. Any exception, KeyboardInterrupt included, deletes the temporary folder, so
  `out_dir` is always either the previous complete output or the new one. (A process killed with
  SIGKILL can leave a hidden `.NAME.*.tmp` folder behind; it is never read.)
- `TokenLoader` draws windows of `seq_len + 1` tokens uniformly over every valid start position in
  every shard (so shards are weighted by length), as nanoGPT does. Batch k comes from a Generator
  seeded with `(seed, k)`: resuming needs only the batch count and costs O(1), and the global
  batch does not depend on how it is divided: rank r takes rows [r*B, (r+1)*B) of the
  world_size*B windows, so 2 ranks with B=2 see exactly what 1 rank with B=4 sees.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch

from lmforge.data.jsonl import iter_jsonl_rows
from lmforge.errors import LmforgeError

META_FORMAT = "lmforge-token-shards"  # marks a folder as a prepare output
META_VERSION = 1
SPLITS = ("train", "val")
VAL_SPLITS = ("tail", "documents")
JSONL_SUFFIX = ".jsonl"
# Files picked up when an input is a folder (an input named explicitly is read whatever its suffix).
_PROSE_SUFFIXES = {".txt", ".md", ".markdown", ".rst", ".tex", ".html", ".csv", ".tsv", ".yaml", ".yml"}
_CODE_SUFFIXES = {".py", ".c", ".h", ".cc", ".cpp", ".hpp", ".rs", ".go", ".java", ".js", ".ts", ".sh"}
TEXT_SUFFIXES = frozenset(_PROSE_SUFFIXES | _CODE_SUFFIXES)
# Encoded to fingerprint a tokenizer: words, digits, accents, CJK, code and whitespace runs.
_PROBE_TEXT = "The quick brown fox, 1234567 jumps!\n\tdéjà vu — 東京 😀\ndef f(x):\n    return x ** 2\n\n"


class TokenizerLike(Protocol):
    """What `prepare` needs from a tokenizer."""

    vocab_size: int
    eos_id: int | None
    bos_id: int | None

    def encode(self, text: str) -> list[int]:
        """Ids of `text` alone, without special tokens."""
        ...


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
    windows = windows.astype(np.int64)
    return {
        "input_ids": torch.from_numpy(np.ascontiguousarray(windows[:, :-1])),  # (B, T)
        "labels": torch.from_numpy(np.ascontiguousarray(windows[:, 1:])),  # (B, T)
    }


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
        windows = [self.shards.arrays[s][o : o + self.seq_len + 1] for s, o in zip(shard_ids, offsets)]
        return _windows_to_batch(np.stack(windows))  # (B, T+1) -> two (B, T)

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


def iter_eval_batches(
    shards: TokenShards, batch_size: int, seq_len: int, max_batches: int | None = None
) -> Iterator[dict[str, torch.Tensor]]:
    """Deterministic batches of consecutive, non-overlapping windows from the start of the split.

    Window i holds inputs tokens[i*T : (i+1)*T] and labels shifted by one; the tail shorter than a
    window is dropped and the last batch may be smaller than `batch_size`. Arguments are checked
    when called, not when iteration starts.
    """
    if batch_size < 1 or seq_len < 1:
        raise LmforgeError(f"batch_size and seq_len must be positive, got {batch_size} and {seq_len}")
    n_windows = (shards.n_tokens - 1) // seq_len
    if n_windows == 0:
        raise LmforgeError(
            f"the {shards.split} split of {shards.directory} holds {shards.n_tokens} tokens, fewer than "
            f"seq_len + 1 = {seq_len + 1}; lower seq_len or prepare with a larger val_fraction"
        )
    if max_batches is not None:
        n_windows = min(n_windows, max_batches * batch_size)
    return _consecutive_batches(shards, batch_size, seq_len, n_windows)


def _consecutive_batches(
    shards: TokenShards, batch_size: int, seq_len: int, n_windows: int
) -> Iterator[dict[str, torch.Tensor]]:
    for first in range(0, n_windows, batch_size):
        indices = range(first, min(first + batch_size, n_windows))
        windows = [shards.read(i * seq_len, seq_len + 1) for i in indices]
        yield _windows_to_batch(np.stack(windows))  # (B, T+1) -> two (B, T)
