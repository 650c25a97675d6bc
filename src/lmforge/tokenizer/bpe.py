"""Train a byte-level BPE tokenizer (GPT-2 style) with the `tokenizers` library.

Design choices
- Byte-level: the ByteLevel pre-tokenizer (GPT-2 split regex, no prefix space) maps every UTF-8 byte to
  one of 256 printable characters, and the initial alphabet holds all 256, so there is no unknown token
  and any Unicode text round-trips losslessly. No normalizer: the text is kept exactly.
- Ids: byte b is token id b (0..255), then the merges in the order they were learned, then the special
  tokens `<|bos|> <|eos|> <|pad|> <|im_start|> <|im_end|>`. `vocab_size` counts the bytes and the
  merges, not the specials, so `vocab_size=256` is a pure byte tokenizer (256 + 5 tokens). Training
  stops early when no pair occurs `min_frequency` times, so the vocabulary may come out smaller.
- `encode(text, add_special_tokens=True)` prepends `<|bos|>` (the post-processor). The chat template is
  ChatML with `<|bos|>` once at the start; `<|im_end|>` ends a turn.
- The corpus is streamed: files are read in chunks of whole lines (about 64 KiB) and never held whole.
  Inputs are files or folders. A folder is searched recursively, in sorted order, for the suffixes in
  `TEXT_SUFFIXES`, skipping hidden files and folders; a file named explicitly is read whatever its
  suffix. A `.jsonl` file holds one JSON object per line whose `text` field is used. Files must be
  UTF-8; line endings are kept as they are.
"""

from __future__ import annotations

import itertools
import json
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path

import tokenizers
from tokenizers import AddedToken, decoders, models, pre_tokenizers, processors, trainers

from lmforge.errors import LmforgeError
from lmforge.tokenizer.chat import CHATML_TEMPLATE
from lmforge.tokenizer.core import Tokenizer

BOS, EOS, PAD, IM_START, IM_END = "<|bos|>", "<|eos|>", "<|pad|>", "<|im_start|>", "<|im_end|>"
SPECIAL_TOKENS = (BOS, EOS, PAD, IM_START, IM_END)
TEXT_SUFFIXES = frozenset(
    {".txt", ".text", ".md", ".markdown", ".rst", ".tex", ".html", ".htm", ".xml", ".csv", ".tsv", ".jsonl"}
    | {
        ".py",
        ".c",
        ".h",
        ".cc",
        ".cpp",
        ".hpp",
        ".rs",
        ".go",
        ".java",
        ".js",
        ".ts",
        ".sh",
        ".toml",
        ".yaml",
        ".yml",
    }
)
_CHUNK_CHARS = 1 << 16


def train_tokenizer(
    inputs: Sequence[str | Path],
    vocab_size: int,
    *,
    min_frequency: int = 2,
    show_progress: bool = False,
) -> Tokenizer:
    """Train a byte-level BPE with `vocab_size` byte + merge tokens on the text files in `inputs`.

    `show_progress` lets the `tokenizers` trainer draw its progress bar on stderr.
    """
    if vocab_size < 256:
        raise LmforgeError(f"vocab_size must be at least 256 (one token per byte), got {vocab_size}")
    files = corpus_files(inputs)
    backend = tokenizers.Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=min_frequency,
        show_progress=show_progress,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        special_tokens=[],
    )
    backend.train_from_iterator(_nonempty(iter_corpus(files), files), trainer)
    backend = _bytes_first(backend)
    backend.add_special_tokens(
        [AddedToken(token, special=True, normalized=False) for token in SPECIAL_TOKENS]
    )
    bos_id = backend.token_to_id(BOS)
    backend.post_processor = processors.TemplateProcessing(
        single=f"{BOS} $A", pair=f"{BOS} $A {BOS}:1 $B:1", special_tokens=[(BOS, bos_id)]
    )
    return Tokenizer(
        backend,
        special_tokens={"bos_token": BOS, "eos_token": EOS, "pad_token": PAD},
        chat_template=CHATML_TEMPLATE,
    )


# ----- the corpus ------------------------------------------------------------------------------


def corpus_files(inputs: Sequence[str | Path]) -> list[Path]:
    """The text files named by `inputs` (files, or folders searched recursively)."""
    if isinstance(inputs, (str, Path)):
        inputs = [inputs]
    if not inputs:
        raise LmforgeError("no training inputs given; pass text files or folders of text files")
    files: list[Path] = []
    for item in map(Path, inputs):
        if item.is_file():
            files.append(item)
        elif item.is_dir():
            found = _text_files_in(item)
            if not found:
                raise LmforgeError(
                    f"folder {item} has no text files; expected files ending in {', '.join(sorted(TEXT_SUFFIXES))}"
                )
            files.extend(found)
        else:
            raise LmforgeError(f"training input {item} does not exist; check the path")
    return files


def _text_files_in(folder: Path) -> list[Path]:
    return sorted(
        path
        for path in folder.rglob("*")
        if path.suffix.lower() in TEXT_SUFFIXES
        and not any(part.startswith(".") for part in path.relative_to(folder).parts)
        and path.is_file()
    )


def iter_corpus(files: Iterable[Path]) -> Iterator[str]:
    """Stream the text of `files` in chunks of whole lines."""
    for path in files:
        lines = _jsonl_texts(path) if path.suffix.lower() == ".jsonl" else _text_lines(path)
        yield from _chunked(lines)


def _text_lines(path: Path) -> Iterator[str]:
    try:
        with open(path, encoding="utf-8", newline="") as handle:
            yield from handle
    except UnicodeDecodeError as err:
        raise LmforgeError(
            f"{path} is not UTF-8 text ({err.reason}); convert it (e.g. iconv) or leave it out"
        ) from err


def _jsonl_texts(path: Path) -> Iterator[str]:
    for number, line in enumerate(_text_lines(path), start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as err:
            raise LmforgeError(
                f"{path}:{number} is not valid JSON ({err.msg}); each line must be one object"
            ) from err
        if not isinstance(record, dict) or not isinstance(record.get("text"), str):
            raise LmforgeError(
                f'{path}:{number} has no "text" string; each line must look like {{"text": "..."}}'
            )
        yield record["text"]


def _chunked(pieces: Iterable[str]) -> Iterator[str]:
    """Join small pieces into chunks of about `_CHUNK_CHARS` characters."""
    buffer: list[str] = []
    size = 0
    for piece in pieces:
        buffer.append(piece)
        size += len(piece)
        if size >= _CHUNK_CHARS:
            yield "".join(buffer)
            buffer, size = [], 0
    if buffer:
        yield "".join(buffer)


def _nonempty(chunks: Iterator[str], files: Sequence[Path]) -> Iterator[str]:
    """`chunks` unchanged, after checking that some chunk holds non-whitespace text."""
    head = []
    for chunk in chunks:
        head.append(chunk)
        if chunk.strip():
            return itertools.chain(head, chunks)
    names = ", ".join(str(path) for path in files[:3]) + (" ..." if len(files) > 3 else "")
    raise LmforgeError(f"the training corpus ({names}) has no text (only whitespace); add text to train on")


# ----- byte ids first --------------------------------------------------------------------------


def byte_to_unicode() -> dict[int, str]:
    """GPT-2's map from each byte to the printable character that stands for it in the vocabulary."""
    printable = [
        *range(ord("!"), ord("~") + 1),
        *range(ord("¡"), ord("¬") + 1),
        *range(ord("®"), ord("ÿ") + 1),
    ]
    mapping = {byte: chr(byte) for byte in printable}
    others = (byte for byte in range(256) if byte not in mapping)
    mapping.update({byte: chr(256 + n) for n, byte in enumerate(others)})
    return dict(sorted(mapping.items()))


def _bytes_first(backend: tokenizers.Tokenizer) -> tokenizers.Tokenizer:
    """Renumber the trained vocabulary so that byte b is id b; merged tokens keep their order."""
    state = json.loads(backend.to_str())
    vocab: dict[str, int] = state["model"]["vocab"]
    byte_tokens = list(byte_to_unicode().values())
    is_byte = set(byte_tokens)
    merged = sorted((token for token in vocab if token not in is_byte), key=vocab.__getitem__)
    state["model"]["vocab"] = {token: new_id for new_id, token in enumerate(byte_tokens + merged)}
    return tokenizers.Tokenizer.from_str(json.dumps(state))
