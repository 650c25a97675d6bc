"""MB/s of `lmforge prepare` (workers 1 and N) against the `tokenizers` library's own batch encoding.

The corpus: every text file under `--data` (../shared/data: Shakespeare, SST-2, GSM8K, English-French;
the .gz ones skipped) read as plain text, concatenated and repeated up to `--mb` MB, written as
`--files` text files. The tokenizer: a GPT-2-sized byte-level BPE (`--vocab` tokens, GPT-2's
regex) trained here with `lmforge tokenizer train`'s function on the corpus' distinct text.

Both sides start from the files on disk and end with uint16 token files written:
- lmforge: `prepare(files, tokenizer, out, workers=W)` with its defaults (1 MB chunks, 1% held out,
  bos/eos around each document, atomic folder, meta.json), once with workers=1 (the tokenizer's own
  batch encoding on every core, in this process) and once with workers=N (N processes, one core each).
- tokenizers (the peer): for each file, read it, cut it into the same ~1 MB pieces at line breaks,
  `tokenizers.Tokenizer.encode_batch(pieces)` (Rust, parallel over every core: its RAYON threads),
  then `np.array(encoding.ids, np.uint16)` of each piece written to one .bin file per input.
The token counts are checked to agree (lmforge's, less its bos/eos per document, equal the peer's).
The sides alternate, `--rounds` times; each side's best time counts. MB/s = input MB / seconds.

    python benchmarks/prepare_speed.py   # last line: ratio=R lmforge_mb_s=A tokenizers_mb_s=B workers=N
                                         #            ratio_workers1=R1 lmforge_workers1_mb_s=A1 corpus_mb=M
`ratio` = lmforge with N workers / the peer; `ratio_workers1` = lmforge with workers=1 / the peer.
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

import numpy as np

from lmforge.data import prepare
from lmforge.tokenizer import Tokenizer, train_tokenizer

TEXT_SUFFIXES = {".txt", ".tsv", ".jsonl", ".csv"}
PIECE_BYTES = 1 << 20  # prepare's default chunk_bytes


def write_corpus(data: Path, folder: Path, megabytes: int, n_files: int) -> tuple[list[Path], Path]:
    """`n_files` text files holding `megabytes` MB in all, and one file of the distinct text."""
    sources = sorted(p for p in data.rglob("*") if p.is_file() and p.suffix in TEXT_SUFFIXES)
    if not sources:
        raise SystemExit(f"prepare_speed.py: no text files under {data}; pass --data")
    distinct = "".join(p.read_text(encoding="utf-8", errors="replace") for p in sources)
    (folder / "distinct.txt").write_text(distinct)
    per_file = megabytes * 2**20 // n_files
    files = []
    for i in range(n_files):
        text = (distinct * (per_file // len(distinct) + 1))[:per_file]
        files.append(folder / f"corpus_{i}.txt")
        files[-1].write_text(text[: text.rfind("\n") + 1])
    return files, folder / "distinct.txt"


def pieces_of(text: str, size: int) -> list[str]:
    """`text` cut at the first line break after every `size` characters."""
    pieces, start = [], 0
    while start < len(text):
        end = text.find("\n", start + size)
        end = len(text) if end < 0 else end + 1
        pieces.append(text[start:end])
        start = end
    return pieces


def peer(files: list[Path], tokenizer: Tokenizer, out: Path) -> int:
    """The tokenizers library alone: read, batch-encode, write uint16 ids. Returns the token count."""
    backend, tokens = tokenizer.backend, 0
    out.mkdir(exist_ok=True)
    for path in files:
        encodings = backend.encode_batch(pieces_of(path.read_text(encoding="utf-8"), PIECE_BYTES),
                                         add_special_tokens=False)
        with (out / f"{path.stem}.bin").open("wb") as handle:
            for encoding in encodings:
                ids = np.array(encoding.ids, dtype=np.uint16)
                handle.write(ids.tobytes())
                tokens += ids.size
    return tokens


def lmforge_side(files: list[Path], tokenizer: Tokenizer, out: Path, workers: int) -> int:
    """`prepare` with its defaults; returns its token count less the bos/eos it adds per document."""
    stats = prepare(files, tokenizer, out, workers=workers)
    documents = stats.train.documents + stats.val.documents
    return stats.train.tokens + stats.val.tokens - 2 * documents


def main() -> None:
    from eval_speed import best_of  # the sides alternate, best of rounds (the host is shared and drifts)

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, default=Path("../shared/data"), help="folder of text files")
    parser.add_argument("--mb", type=int, default=32, help="corpus size in MB")
    parser.add_argument("--files", type=int, default=4, help="the corpus is split into this many files")
    parser.add_argument("--vocab", type=int, default=50257, help="tokenizer size (GPT-2's by default)")
    parser.add_argument("--workers", type=int, default=os.cpu_count() or 1, help="N for lmforge's workers=N")
    parser.add_argument("--rounds", type=int, default=3, help="alternating runs of each side; the best counts")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        files, distinct = write_corpus(args.data, folder, args.mb, args.files)
        start = time.perf_counter()
        tokenizer = train_tokenizer([distinct], args.vocab)
        print(f"corpus: {len(files)} files, {args.mb} MB; tokenizer: {tokenizer.vocab_size} tokens, "
              f"trained in {time.perf_counter() - start:.0f} s; host cores: {os.cpu_count()}", flush=True)
        sides = {
            "tokenizers": lambda: peer(files, tokenizer, folder / "peer"),
            "lmforge_workers1": lambda: lmforge_side(files, tokenizer, folder / "w1", 1),
            "lmforge": lambda: lmforge_side(files, tokenizer, folder / "wn", args.workers),
        }
        best = best_of(args.rounds, sides)
        corpus_mb = sum(path.stat().st_size for path in files) / 2**20
    counts = {name: tokens for name, (tokens, _) in best.items()}
    if len(set(counts.values())) != 1:
        raise SystemExit(f"prepare_speed.py: the sides disagree on the token count: {counts}")
    mb_s = {name: corpus_mb / seconds for name, (_, seconds) in best.items()}
    for name, speed in mb_s.items():
        print(f"{name:18s} {speed:8.2f} MB/s  ({counts[name]:,} tokens)")
    print(f"ratio={mb_s['lmforge'] / mb_s['tokenizers']:.3f} lmforge_mb_s={mb_s['lmforge']:.2f} "
          f"tokenizers_mb_s={mb_s['tokenizers']:.2f} workers={args.workers} "
          f"ratio_workers1={mb_s['lmforge_workers1'] / mb_s['tokenizers']:.3f} "
          f"lmforge_workers1_mb_s={mb_s['lmforge_workers1']:.2f} corpus_mb={corpus_mb:.1f}")


if __name__ == "__main__":
    main()
