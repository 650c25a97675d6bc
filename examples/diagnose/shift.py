"""Data drift and tokenizer fit on real text: Shakespeare vs SST-2 movie reviews vs French (CPU, about a minute).

    python examples/diagnose/shift.py --data ../shared/data

1. The quickstart's tokenizer: `runs/quickstart/tokenizer` if `lmforge quickstart` ran, else the
   same 2,048-token byte-level BPE trained here on the same Python standard-library source.
2. Drift (`lmforge drift`), counted in that tokenizer's tokens, of two corpora against
   tinyshakespeare: the SST-2 training sentences (English, another register) and the French side
   of eng-fra (another language). Expected: both drift, French far more (a larger Jensen-Shannon
   divergence, more new tokens, more byte fallbacks). The pictures go to `--out`.
3. Tokenizer statistics (`lmforge tokenizer stats`) of the quickstart tokenizer on the English and
   the French side of eng-fra, side by side with a 2,048-token BPE trained on eng-fra itself.

The last line holds the figures (run_all.py copies it into benchmarks/RESULTS.md): the divergences
(bits) and verdicts of the two drifts, and tokens per word and fallback shares of the quickstart
tokenizer on English and French.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from lmforge.diagnose.corpus import read_corpus
from lmforge.diagnose.drift import compare_corpora, plot_drift
from lmforge.diagnose.tokenizer_stats import plot_stats, stats_table, tokenizer_stats
from lmforge.quickstart import VOCAB_SIZE, stdlib_files
from lmforge.tokenizer import Tokenizer, train_tokenizer


def write_column(source: Path, column: int, out: Path, skip_header: bool = False) -> Path:
    """One tab-separated column of `source` as a text file, one line each."""
    lines = source.read_text(encoding="utf-8").splitlines()[1 if skip_header else 0:]
    out.write_text("\n".join(line.split("\t")[column] for line in lines if "\t" in line) + "\n", encoding="utf-8")
    return out


def quickstart_tokenizer(out: Path) -> Tokenizer:
    existing = Path("runs/quickstart/tokenizer")
    if (existing / "tokenizer.json").is_file():
        return Tokenizer.from_dir(existing)
    tokenizer = train_tokenizer(stdlib_files(), VOCAB_SIZE)
    tokenizer.save(out / "quickstart-tokenizer")
    return tokenizer


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", default="../shared/data", help="folder with tinyshakespeare/, sst2/, eng-fra/")
    parser.add_argument("--out", default="runs/diagnose", help="folder for the corpora and pictures")
    args = parser.parse_args()
    data, out = Path(args.data), Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    sst2 = write_column(data / "sst2" / "train.tsv", 1, out / "sst2.txt", skip_header=True)
    english = write_column(data / "eng-fra" / "eng-fra.txt", 0, out / "english.txt")
    french = write_column(data / "eng-fra" / "eng-fra.txt", 1, out / "french.txt")
    tokenizer = quickstart_tokenizer(out)

    reference = read_corpus(data / "tinyshakespeare" / "input.txt")
    figures = {}
    for name, path in (("sst2", sst2), ("french", french)):
        report = compare_corpora(reference, read_corpus(path), tokenizer)
        plot_drift(report, out / f"drift_{name}.png")
        print(f"--- drift: tinyshakespeare -> {name}\n" + "\n".join(report.lines()))
        figures[f"jsd_{name}"] = f"{report.js_divergence:.3f}"
        figures[f"verdict_{name}"] = report.verdict.replace(" ", "_")
        figures[f"new_tokens_{name}"] = f"{report.new_token_rate:.3f}"

    corpora = [read_corpus(english), read_corpus(french)]
    own = train_tokenizer([english, french], VOCAB_SIZE)
    stats = [tokenizer_stats(tokenizer, corpora, "quickstart-2048"), tokenizer_stats(own, corpora, "eng-fra-2048")]
    plot_stats(stats, out / "tokenizer_stats.png")
    print("--- tokenizer statistics on eng-fra\n" + "\n".join(stats_table(stats)))
    en, fr = stats[0].files
    figures.update(en_tokens_per_word=f"{en.tokens_per_word:.2f}", fr_tokens_per_word=f"{fr.tokens_per_word:.2f}",
                   fr_fallback=f"{fr.fallback_share:.3f}",
                   fr_tokens_per_word_own=f"{stats[1].files[1].tokens_per_word:.2f}")
    print(" ".join(f"{k}={v}" for k, v in figures.items()))


if __name__ == "__main__":
    main()
