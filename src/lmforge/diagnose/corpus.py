"""Corpora and tokens for the diagnostics: text, JSONL or token-shard folders read as documents.

Design choices:
- A document is a non-empty line of a text file, a row of a JSONL file (its `text_field`), or a
  line of the text decoded from a `lmforge prepare` folder (with the folder's own tokenizer), so
  that drift and tokenizer statistics see every input kind the same way.
- Corpora are read up to `max_bytes` of text (a prefix, flagged `truncated`): the statistics are
  frequencies and rates, which a few megabytes estimate well, and reading stays fast.
- Without a tokenizer the units are words and punctuation marks (`WORD_PATTERN`), so drift works
  on any text with nothing to train first.
- A *fallback* token is one that does not stand for whole characters: the unknown token, a
  `<0xNN>` byte token (SentencePiece byte fallback), or a byte-level BPE token that is a single
  byte >= 0x80 (a piece of a multi-byte character the vocabulary has no merge for).
"""

from __future__ import annotations

import json
import re
from collections import Counter
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path

from lmforge.data.jsonl import iter_jsonl_rows
from lmforge.data.pieces import JSONL_SUFFIX, list_input_files
from lmforge.data.shards import META_FORMAT, TokenShards
from lmforge.errors import LmforgeError
from lmforge.tokenizer import Tokenizer
from lmforge.tokenizer.bpe import byte_to_unicode

MAX_BYTES = 8_000_000  # text read per corpus at most
WORD_PATTERN = re.compile(r"\w+|[^\w\s]")
_BYTE_TOKEN = re.compile(r"<0x([0-9A-Fa-f]{2})>")


@dataclass(frozen=True)
class Corpus:
    """The documents of one corpus (a file, a folder, or a token-shard folder)."""

    name: str
    documents: list[str]
    truncated: bool  # reading stopped at max_bytes

    @cached_property
    def n_bytes(self) -> int:
        return sum(len(d.encode("utf-8")) for d in self.documents)

    @cached_property
    def n_words(self) -> int:
        return sum(len(WORD_PATTERN.findall(d)) for d in self.documents)


def read_corpus(path: str | Path, *, text_field: str = "text", max_bytes: int = MAX_BYTES) -> Corpus:
    """The documents under `path`: a text or JSONL file, a folder of them, or a prepare output."""
    path = Path(path)
    if not path.exists():
        raise LmforgeError(f"{path} does not exist; pass a text file, a .jsonl file, or a folder of them")
    if path.is_dir() and (path / "meta.json").is_file() and _is_shard_folder(path):
        documents, truncated = _shard_documents(path, max_bytes)
    else:
        documents, truncated = _file_documents(list_input_files([path]), text_field, max_bytes)
    if not documents:
        raise LmforgeError(f"{path} holds no text (only blank lines); pass a file with text in it")
    return Corpus(path.name or str(path), documents, truncated)


def _is_shard_folder(path: Path) -> bool:
    try:
        return json.loads((path / "meta.json").read_text(encoding="utf-8")).get("format") == META_FORMAT
    except (OSError, ValueError, AttributeError):
        return False


def _file_documents(files: Sequence[Path], text_field: str, max_bytes: int) -> tuple[list[str], bool]:
    documents: list[str] = []
    size = 0
    for path in files:
        for document in _documents_of(path, text_field):
            documents.append(document)
            size += len(document)
            if size >= max_bytes:
                return documents, True
    return documents, False


def _documents_of(path: Path, text_field: str) -> Iterator[str]:
    """Non-empty lines of a text file, or `text_field` of each row of a JSONL file."""
    if path.suffix.lower() == JSONL_SUFFIX:
        for row in iter_jsonl_rows(path):
            text = row.data.get(text_field)
            if not isinstance(text, str):
                raise LmforgeError(f"{path} line {row.line_number} has no {text_field!r} string; pass --text-field")
            if text.strip():
                yield text
        return
    try:
        with path.open(encoding="utf-8") as handle:
            yield from (line.rstrip("\r\n") for line in handle if line.strip())
    except UnicodeDecodeError as err:
        raise LmforgeError(f"{path} is not UTF-8 text ({err.reason}); convert it (e.g. iconv) or leave it out") from None
    except OSError as err:
        raise LmforgeError(f"cannot read {path} ({err.strerror}); check its permissions") from None


def _shard_documents(folder: Path, max_bytes: int) -> tuple[list[str], bool]:
    """The text of a prepare output's train split, decoded with the tokenizer it was prepared with."""
    tokenizer_dir = folder / "tokenizer"
    if not (tokenizer_dir / "tokenizer.json").is_file():
        raise LmforgeError(f"{folder} has no tokenizer/ folder to decode its shards; prepare it with `lmforge prepare`")
    shards = TokenShards.open(folder, "train")
    tokenizer = Tokenizer.from_dir(tokenizer_dir)
    n_tokens = min(shards.n_tokens, int(max_bytes / max(shards.n_bytes / max(shards.n_tokens, 1), 1e-9)))
    text = tokenizer.decode(shards.read(0, n_tokens).tolist())
    return [line for line in text.splitlines() if line.strip()], n_tokens < shards.n_tokens


# ---------------------------------------------------------------- tokens


def words(text: str) -> list[str]:
    """Words and punctuation marks of `text`, the units used when no tokenizer is given."""
    return WORD_PATTERN.findall(text)


def token_counts(corpus: Corpus, tokenizer: Tokenizer | None) -> tuple[Counter, list[int]]:
    """Occurrences of each token (ids, or words without a tokenizer) and each document's length in tokens."""
    counts: Counter = Counter()
    lengths: list[int] = []
    if tokenizer is None:
        for document in corpus.documents:
            units = words(document)
            counts.update(units)
            lengths.append(len(units))
        return counts, lengths
    for ids in tokenizer.encode_batch(corpus.documents):
        counts.update(ids)
        lengths.append(len(ids))
    return counts, lengths


def load_tokenizer(path: str | Path) -> Tokenizer:
    """A tokenizer folder, or a model folder holding one, with a one-line error otherwise."""
    path = Path(path)
    if not (path / "tokenizer.json").is_file():
        inner = path / "tokenizer"
        if (inner / "tokenizer.json").is_file():
            path = inner
        else:
            raise LmforgeError(f"{path} has no tokenizer.json; pass a tokenizer folder (from `lmforge tokenizer train`) or a model folder")
    return Tokenizer.from_dir(path)


def token_bytes(tokenizer: Tokenizer) -> list[bytes]:
    """What each id stands for, as UTF-8 bytes (byte-level and `<0xNN>` tokens as their byte)."""
    byte_level = _is_byte_level(tokenizer)
    byte_of = {char: byte for byte, char in byte_to_unicode().items()}
    out = []
    for i in range(tokenizer.vocab_size):
        token = tokenizer.id_to_token(i) or ""
        if match := _BYTE_TOKEN.fullmatch(token):
            out.append(bytes([int(match.group(1), 16)]))
        elif byte_level and all(c in byte_of for c in token):
            out.append(bytes(byte_of[c] for c in token))
        else:
            out.append(token.replace("\u2581", " ").encode("utf-8"))
    return out


def display(piece: bytes) -> str:
    """A token's text, or `<0xNN>` for each byte of a piece that is not whole UTF-8 characters."""
    try:
        return piece.decode("utf-8")
    except UnicodeDecodeError:
        return "".join(f"<0x{b:02X}>" for b in piece)


def fallback_ids(tokenizer: Tokenizer, pieces: Sequence[bytes]) -> set[int]:
    """Ids of the tokens that stand for less than a character, and the unknown token (see the module doc)."""
    found = {i for i, piece in enumerate(pieces) if len(piece) == 1 and piece[0] >= 0x80}
    found |= {i for i in range(len(pieces)) if _BYTE_TOKEN.fullmatch(tokenizer.id_to_token(i) or "")}
    unknown = tokenizer.token_to_id(tokenizer.unk_token) if tokenizer.unk_token else None
    return found | ({unknown} if unknown is not None else set())


def _is_byte_level(tokenizer: Tokenizer) -> bool:
    state = json.loads(tokenizer.backend.to_str())
    kinds = {(state.get(part) or {}).get("type") for part in ("pre_tokenizer", "decoder")}
    nested = [p.get("type") for p in (state.get("pre_tokenizer") or {}).get("pretokenizers", []) if isinstance(p, dict)]
    return "ByteLevel" in kinds or "ByteLevel" in nested
