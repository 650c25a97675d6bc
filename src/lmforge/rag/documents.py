"""Documents in, chunks out: reading Markdown, text, HTML and JSONL, and cutting them to a token budget.

A document is `Document(doc_id, text)`; `doc_id` is its path relative to the folder that was
indexed (or the file name when a file is given), or the `id` of a JSONL row. `chunk_document`
cuts it into `Chunk`s whose text, heading path included, fits `max_tokens` tokens of the
embedder's tokenizer (special tokens not counted: the embedder adds its own).

Design choices:
- **Structure first**: Markdown headings (`#`..`######`) and HTML `h1`-`h6` start sections; a
  section's blank-line paragraphs are packed greedily into chunks. A paragraph over the budget is
  cut at sentence ends, and a sentence over it at word boundaries, so no text is ever dropped.
- **Every chunk starts with its heading path** (`Billing > Refunds`): a chunk read alone still says
  what it is about, which helps both the embedding and BM25.
- **Overlap in whole pieces**: the next chunk of a section repeats the trailing paragraphs or
  sentences of the previous one, up to `overlap` tokens, never the whole previous chunk (progress
  is guaranteed).
- **Budgets are measured on the joined text**, not summed per piece, because tokenizers do not add
  up across boundaries.
- HTML is read with the standard library's parser; `script`, `style` and `head` are skipped.
- Bad input is refused with one line: an empty document, a binary or non-UTF-8 file, an unknown
  extension, a JSONL row without `id` and `text`.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from html.parser import HTMLParser
from pathlib import Path

from lmforge.errors import LmforgeError

MARKDOWN = (".md", ".markdown")
TEXT = (".txt", ".text", ".rst")
HTML = (".html", ".htm")
JSONL = (".jsonl",)
SUFFIXES = MARKDOWN + TEXT + HTML + JSONL
HEADING = re.compile(r"^(#{1,6})\s+(.*?)\s*#*\s*$")
SENTENCE_END = re.compile(r"(?<=[.!?])\s+")

Counter = Callable[[str], int]  # text -> its number of tokens


@dataclass(frozen=True)
class Document:
    """A text to index, named by `doc_id`."""

    doc_id: str
    text: str  # Markdown (HTML is converted to it when read)


@dataclass(frozen=True)
class Chunk:
    """A piece of a document that fits the embedder's budget."""

    doc_id: str
    chunk: int  # its position in the document, from 0
    heading: str  # the heading path, " > "-joined ("" before the first heading)
    text: str  # heading path + body: what is embedded, searched and shown


# ----------------------------------------------------------------------------- reading


def read_documents(paths: Iterable[str | Path]) -> list[Document]:
    """The documents in `paths`: files, and folders searched for files with a known extension."""
    docs: list[Document] = []
    for given in map(Path, paths):
        if given.is_dir():
            files = sorted(p for p in given.rglob("*") if p.is_file() and p.suffix.lower() in SUFFIXES)
            if not files:
                raise LmforgeError(f"{given} holds no documents ({', '.join(SUFFIXES)}); point at a folder of them")
            docs += [d for f in files for d in read_file(f, f.relative_to(given).as_posix())]
        elif given.is_file():
            docs += read_file(given, given.name)
        else:
            raise LmforgeError(f"{given} does not exist; pass document files or folders")
    seen: set[str] = set()
    for d in docs:
        if d.doc_id in seen:
            raise LmforgeError(f"two documents have the id {d.doc_id!r}; give each file or JSONL row its own")
        seen.add(d.doc_id)
    return docs


def read_file(path: Path, doc_id: str) -> list[Document]:
    """One file as documents (several for JSONL), refusing binary, non-UTF-8, empty and unknown files."""
    suffix = path.suffix.lower()
    if suffix not in SUFFIXES:
        raise LmforgeError(f"{path} has an unknown extension; documents are {', '.join(SUFFIXES)}")
    raw = path.read_bytes()
    if b"\0" in raw:
        raise LmforgeError(f"{path} is a binary file, not a document; remove it or convert it to text")
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError:
        raise LmforgeError(f"{path} is not UTF-8 text; convert it to UTF-8 or remove it") from None
    if suffix in JSONL:
        return list(_jsonl_documents(path, text))
    if suffix in HTML:
        text = html_to_markdown(text)
    return [_checked(Document(doc_id, text), str(path))]


def _jsonl_documents(path: Path, text: str) -> Iterator[Document]:
    lines = [(n, line) for n, line in enumerate(text.splitlines(), 1) if line.strip()]
    if not lines:
        raise LmforgeError(f"{path} is empty; give it one {{\"id\", \"text\"}} object per line")
    for n, line in lines:
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise LmforgeError(f"{path}:{n} is not valid JSON ({e.msg})") from None
        if not isinstance(row, dict) or "id" not in row or not isinstance(row.get("text"), str):
            raise LmforgeError(f"{path}:{n} needs an \"id\" and a \"text\" string")
        title = row.get("title")
        body = f"# {title}\n\n{row['text']}" if isinstance(title, str) and title.strip() else row["text"]
        yield _checked(Document(str(row["id"]), body), f"{path}:{n}")


def _checked(doc: Document, where: str) -> Document:
    if not doc.text.strip():
        raise LmforgeError(f"{where} is empty; give it text or leave it out")
    return doc


class _HtmlText(HTMLParser):
    """HTML -> Markdown-ish text: headings become `#` lines, block elements end paragraphs."""

    BLOCKS = frozenset({"p", "div", "li", "ul", "ol", "br", "tr", "table", "section", "article", "pre", "blockquote"})
    SKIP = frozenset({"script", "style", "head", "template", "noscript"})

    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.parts: list[str] = []
        self.skipping = 0

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        if tag in self.SKIP:
            self.skipping += 1
        elif re.fullmatch(r"h[1-6]", tag):
            self.parts.append("\n\n" + "#" * int(tag[1]) + " ")
        elif tag in self.BLOCKS:
            self.parts.append("\n\n")

    def handle_endtag(self, tag: str) -> None:
        if tag in self.SKIP:
            self.skipping = max(self.skipping - 1, 0)
        elif re.fullmatch(r"h[1-6]", tag) or tag in self.BLOCKS:
            self.parts.append("\n\n")

    def handle_data(self, data: str) -> None:
        if not self.skipping:
            self.parts.append(re.sub(r"\s+", " ", data))


def html_to_markdown(html: str) -> str:
    """The text of an HTML page with its headings as Markdown headings and one blank line between blocks."""
    parser = _HtmlText()
    parser.feed(html)
    parser.close()
    blocks = (b.strip() for b in "".join(parser.parts).split("\n\n"))
    return "\n\n".join(b for b in blocks if b)


# ----------------------------------------------------------------------------- chunking


def sections(text: str) -> list[tuple[str, list[str]]]:
    """(heading path, paragraphs) of each section of a Markdown text, in order."""
    path: list[str] = []
    out: list[tuple[str, list[str]]] = [("", [])]
    paragraph: list[str] = []

    def end_paragraph() -> None:
        if paragraph:
            out[-1][1].append("\n".join(paragraph).strip())
            paragraph.clear()

    for line in text.splitlines():
        match = HEADING.match(line)
        if match:
            end_paragraph()
            del path[len(match.group(1)) - 1:]
            path.append(match.group(2))
            out.append((" > ".join(path), []))
        elif line.strip():
            paragraph.append(line.rstrip())
        else:
            end_paragraph()
    end_paragraph()
    return [(heading, paras) for heading, paras in out if paras]


def chunk_document(doc: Document, count: Counter, max_tokens: int, overlap: int = 0) -> list[Chunk]:
    """The chunks of `doc`, each at most `max_tokens` tokens by `count`, heading path included."""
    chunks: list[Chunk] = []
    for heading, paragraphs in sections(doc.text):
        prefix = f"{heading}\n\n" if heading else ""
        budget = max_tokens - count(prefix)
        if budget < 4:
            raise LmforgeError(f"{doc.doc_id}: the heading {heading!r} leaves {budget} of {max_tokens} tokens for "
                               "text; raise the chunk budget (--max-tokens) or shorten the heading")
        pieces = [p for para in paragraphs for p in _pieces(para, count, budget)]
        for body in pack(pieces, lambda text, prefix=prefix: count(prefix + text), max_tokens, overlap, count):
            chunks.append(Chunk(doc.doc_id, len(chunks), heading, prefix + body))
    return chunks


def pack(pieces: Sequence[str], measure: Counter, max_tokens: int, overlap: int, count: Counter) -> list[str]:
    """Join consecutive pieces into texts of at most `max_tokens` by `measure`; each text after the first
    starts with the previous text's trailing pieces, up to `overlap` tokens by `count`."""
    out: list[str] = []
    current: list[str] = []
    fresh = 0  # pieces of `current` that no earlier text holds
    for piece in pieces:
        if current and measure(_join([*current, piece])) > max_tokens:
            out.append(_join(current))
            current = _tail(current, overlap, count, max_keep=len(current) - 1)
            fresh = 0
            while current and measure(_join([*current, piece])) > max_tokens:
                current.pop(0)
        current.append(piece)
        fresh += 1
    if fresh:
        out.append(_join(current))
    return out


def _tail(pieces: list[str], overlap: int, count: Counter, max_keep: int) -> list[str]:
    """The longest run of trailing pieces within `overlap` tokens, at most `max_keep` of them."""
    kept: list[str] = []
    for piece in reversed(pieces[len(pieces) - max_keep:] if max_keep > 0 else []):
        if count(_join([piece, *kept])) > overlap:
            break
        kept.insert(0, piece)
    return kept


def _join(pieces: Sequence[str]) -> str:
    return "\n\n".join(pieces)


def _pieces(paragraph: str, count: Counter, budget: int) -> list[str]:
    """A paragraph as pieces that each fit `budget`: itself, else its sentences, else word runs."""
    if count(paragraph) <= budget:
        return [paragraph]
    out: list[str] = []
    for sentence in SENTENCE_END.split(paragraph):
        if count(sentence) <= budget:
            out.append(sentence)
        else:
            out += _word_runs(sentence, count, budget)
    return out


def _word_runs(text: str, count: Counter, budget: int) -> list[str]:
    runs: list[str] = []
    current: list[str] = []
    for word in text.split():
        if current and count(" ".join([*current, word])) > budget:
            runs.append(" ".join(current))
            current = []
        if count(word) > budget:  # one "word" longer than the budget (a URL, a hash): cut by characters
            runs += _char_runs(word, count, budget)
            continue
        current.append(word)
    if current:
        runs.append(" ".join(current))
    return runs


def _char_runs(word: str, count: Counter, budget: int) -> list[str]:
    runs, start = [], 0
    while start < len(word):
        end = len(word)
        while end - start > 1 and count(word[start:end]) > budget:
            end = start + max((end - start) // 2, 1)
        runs.append(word[start:end])
        start = end
    return runs


__all__ = ["Chunk", "Document", "chunk_document", "html_to_markdown", "pack", "read_documents", "read_file",
           "sections"]
