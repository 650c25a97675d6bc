"""Text corpora -> token shards on disk (the format `shards.py` reads).

Design choices:
- `prepare` streams: `pieces.py` reads text files in chunks of about `chunk_bytes` and JSONL files
  one row at a time (where a chunk may end: its docstring), `encoder.py` encodes batches of pieces
  in this process or in `workers` processes, and the tokens are appended, in input order, to the
  current shard file, which is closed once it holds `shard_tokens` tokens (documents may continue
  into the next shard). Memory stays bounded by the chunk size, whatever the corpus size.
- `workers` only changes the speed, never the output: the same shards, split and meta.json (it is
  not recorded there).
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
from collections.abc import Callable, Sequence
from contextlib import closing
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from lmforge.data.encoder import encode_in_order
from lmforge.data.pieces import Piece, iter_pieces, list_input_files
from lmforge.data.shards import META_FORMAT, META_VERSION, TokenizerLike, tokenizer_identity
from lmforge.errors import LmforgeError

SPLITS = ("train", "val")
VAL_SPLITS = ("tail", "documents")


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


def _split_chooser(options: _Options, cut_at: int | None) -> Callable[[Piece], str]:
    """A function piece -> "train" | "val" implementing the chosen validation scheme."""
    if options.val_split == "tail":
        return lambda piece: "val" if cut_at is not None and piece.offset >= cut_at else "train"
    rng = np.random.default_rng(options.seed)
    current = "train"

    def choose(piece: Piece) -> str:
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


def _check_workers(workers: int) -> None:
    if isinstance(workers, bool) or not isinstance(workers, int) or workers < 1:
        raise LmforgeError(
            f"workers must be a whole number of at least 1, got {workers!r}; 1 encodes in this process, "
            "N > 1 in N worker processes"
        )


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
    workers: int = 1,
    progress: Callable[[int], None] | None = None,
) -> PrepareStats:
    """Tokenize text files, JSONL files and folders of them into train / val shards in `out_dir`.

    `text_field` is the JSONL key holding the text; `val_fraction` and `val_split` ("tail" or
    "documents", see the module docstring) choose the validation split, `seed` its random draws in
    "documents" mode; `shard_tokens` caps the tokens per .bin file; `chunk_bytes` is how much of a
    text file is encoded at once. `workers` is the number of processes that encode: 1 (default)
    encodes here, where lmforge's `Tokenizer` already spreads each batch over every core; N > 1 starts
    N processes of one core each, which also parse JSONL and decode text in parallel (see
    `encoder.py`; the output is the same). `progress(n)` is called with each number of input bytes just
    processed (pass `tqdm.update`; the total is the size of `list_input_files(inputs)`).
    """
    files = list_input_files(inputs)
    options = _Options(text_field, val_fraction, val_split, shard_tokens, chunk_bytes, seed)
    _check_options(options)
    _check_workers(workers)
    out_dir = Path(out_dir)
    _check_out_dir(out_dir)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.", suffix=".tmp", dir=out_dir.parent))
    try:
        meta = _write_splits(files, tokenizer, work, options, workers, progress)
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
    workers: int,
    progress: Callable[[int], None] | None,
) -> dict[str, Any]:
    """Stream every piece of `files` into the split writers; return the content of meta.json."""
    dtype = token_dtype(tokenizer.vocab_size)
    cut_at = None
    if options.val_split == "tail" and options.val_fraction > 0:
        cut_at = int(sum(path.stat().st_size for path in files) * (1.0 - options.val_fraction))
    choose_split = _split_chooser(options, cut_at)
    writers = {split: _SplitWriter(folder, split, dtype, options.shard_tokens) for split in SPLITS}
    pieces = iter_pieces(files, options.chunk_bytes, cut_at)
    encoded = encode_in_order(pieces, tokenizer, options.text_field, dtype, workers, options.chunk_bytes)
    max_id = -1
    try:
        with closing(encoded):
            for piece, result in encoded:
                if result.ids.size:
                    max_id = max(max_id, int(result.ids.max()))
                writers[choose_split(piece)].write(result.ids, result.n_text_bytes, piece.starts_document)
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
