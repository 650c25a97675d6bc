"""Writes shakespeare_val.jsonl: the held-out end of tinyshakespeare as documents for `shakespeare_bpb`.

The tail is what `lmforge prepare --val-fraction 0.1` (and nanoGPT) hold out: from the first line
boundary past 90% of the file's bytes to the end. It is cut at blank lines (between speeches) into
documents of at least DOC_CHARS characters, so every document is a few speeches and joined with
blank lines they give the tail back.

    python tasks/data/shakespeare_val.py ../shared/data/tinyshakespeare/input.txt
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

VAL_FRACTION = 0.1
DOC_CHARS = 4000


def held_out_tail(text: str) -> str:
    data = text.encode("utf-8")
    mark = int(len(data) * (1 - VAL_FRACTION))
    start = data.index(b"\n", mark) + 1
    return data[start:].decode("utf-8").strip("\n")


def documents(tail: str) -> list[str]:
    docs, current = [], []
    for speech in tail.split("\n\n"):
        current.append(speech)
        if sum(len(s) for s in current) >= DOC_CHARS:
            docs.append("\n\n".join(current))
            current = []
    if current:
        docs.append("\n\n".join(current))
    return docs


def main() -> None:
    source = Path(sys.argv[1] if len(sys.argv) > 1 else "../shared/data/tinyshakespeare/input.txt")
    out = Path(__file__).with_name("shakespeare_val.jsonl")
    docs = documents(held_out_tail(source.read_text(encoding="utf-8")))
    out.write_text("".join(json.dumps({"text": d}) + "\n" for d in docs), encoding="utf-8")
    print(f"{out}: {len(docs)} documents, {sum(map(len, docs)):,} characters")


if __name__ == "__main__":
    main()
