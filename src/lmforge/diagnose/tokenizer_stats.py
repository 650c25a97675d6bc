"""Tokenizer statistics: how well a vocabulary fits some text, per file and per writing system.

`tokenizer_stats(tokenizer, corpora)` measures, for each corpus (file or folder):
- fertility: tokens per word (words as `corpus.WORD_PATTERN` cuts them) and tokens per UTF-8 byte;
- the share of fallback tokens (pieces of characters the vocabulary has no merge for, and the
  unknown token; `corpus.py`), and of the unknown token alone;
and over all corpora together: the tokens per word of each writing system (the Unicode script of a
word's first letter, each distinct word encoded once with a leading space, as it appears
mid-sentence), how much of the vocabulary the text uses, and the longest tokens. Several
tokenizers' statistics print side by side (`stats_table`) and plot together (`plot_stats`).
"""

from __future__ import annotations

import unicodedata
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from lmforge.diagnose.corpus import Corpus, display, fallback_ids, token_bytes, token_counts, words
from lmforge.tokenizer import Tokenizer

LONGEST = 8  # longest tokens listed


@dataclass
class FileStats:
    """One corpus under one tokenizer."""

    name: str
    n_bytes: int
    n_words: int
    n_tokens: int
    n_fallback: int
    n_unknown: int

    @property
    def tokens_per_word(self) -> float:
        return self.n_tokens / max(self.n_words, 1)

    @property
    def tokens_per_byte(self) -> float:
        return self.n_tokens / max(self.n_bytes, 1)

    @property
    def fallback_share(self) -> float:
        return self.n_fallback / max(self.n_tokens, 1)


@dataclass
class TokenizerStats:
    """A tokenizer's statistics over a set of corpora."""

    name: str
    vocab_size: int
    files: list[FileStats]
    scripts: dict[str, float]  # writing system -> tokens per word (words with letters only)
    script_words: dict[str, int]  # writing system -> word occurrences
    n_used: int  # distinct ids the text uses
    longest: list[str]  # the longest learned tokens (special ones left out), by bytes

    @property
    def never_used_share(self) -> float:
        return 1 - self.n_used / max(self.vocab_size, 1)


def script_of(word: str) -> str | None:
    """The Unicode script of the word's first letter ("LATIN", "CYRILLIC", "CJK", ...); None without letters."""
    for char in word:
        if char.isalpha():
            name = unicodedata.name(char, "")
            return name.split(" ")[0] if name else "OTHER"
    return None


def tokenizer_stats(tokenizer: Tokenizer, corpora: Sequence[Corpus], name: str = "") -> TokenizerStats:
    """Fertility, fallbacks, script fertility, vocabulary usage and longest tokens (see the module doc)."""
    pieces = token_bytes(tokenizer)
    fallback = fallback_ids(tokenizer, pieces)
    unknown = tokenizer.token_to_id(tokenizer.unk_token) if tokenizer.unk_token else None
    used: set[int] = set()
    files = []
    for corpus in corpora:
        counts, _ = token_counts(corpus, tokenizer)
        used |= counts.keys()
        files.append(FileStats(corpus.name, corpus.n_bytes, corpus.n_words, sum(counts.values()),
                               sum(counts[i] for i in fallback), counts.get(unknown, 0) if unknown is not None else 0))
    scripts, script_words = _script_fertility(tokenizer, corpora)
    added = set(tokenizer.backend.get_added_tokens_decoder())  # special tokens are not learned pieces
    longest = sorted((i for i in range(len(pieces)) if i not in added), key=lambda i: (-len(pieces[i]), i))[:LONGEST]
    return TokenizerStats(name or tokenizer.backend.model.__class__.__name__, tokenizer.vocab_size, files, scripts,
                          script_words, len(used), [display(pieces[i]) for i in longest])


def _script_fertility(tokenizer: Tokenizer, corpora: Sequence[Corpus]) -> tuple[dict[str, float], dict[str, int]]:
    """Tokens per word of each writing system, each distinct word encoded once as " word"."""
    occurrences: Counter = Counter(w for corpus in corpora for d in corpus.documents for w in words(d))
    distinct = [w for w in occurrences if script_of(w)]
    lengths = [len(ids) for ids in tokenizer.encode_batch([" " + w for w in distinct])]
    tokens: Counter = Counter()
    count: Counter = Counter()
    for word, n in zip(distinct, lengths):
        script = script_of(word)
        tokens[script] += n * occurrences[word]
        count[script] += occurrences[word]
    ranked = sorted(count, key=lambda s: -count[s])
    return {s: tokens[s] / count[s] for s in ranked}, {s: count[s] for s in ranked}


# ---------------------------------------------------------------- reports


def stats_table(stats: Sequence[TokenizerStats]) -> list[str]:
    """The statistics as plain text, one column per tokenizer."""
    width = 18
    head = lambda label, values: f"{label:34}" + "".join(f"{v[:width - 1]:>{width}}" for v in values)  # noqa: E731
    out = [head("", [s.name for s in stats]), head("vocabulary", [f"{s.vocab_size:,}" for s in stats])]
    for i, file in enumerate(stats[0].files):
        out.append(f"{file.name} ({file.n_bytes:,} bytes, {file.n_words:,} words)")
        out.append(head("  tokens per word", [f"{s.files[i].tokens_per_word:.3f}" for s in stats]))
        out.append(head("  tokens per byte", [f"{s.files[i].tokens_per_byte:.3f}" for s in stats]))
        out.append(head("  fallback tokens", [f"{s.files[i].fallback_share:.2%}" for s in stats]))
        out.append(head("  unknown tokens", [f"{s.files[i].n_unknown / max(s.files[i].n_tokens, 1):.2%}" for s in stats]))
    for script, n in stats[0].script_words.items():
        out.append(head(f"{script.lower()} words ({n:,}): tokens/word", [f"{s.scripts.get(script, float('nan')):.3f}" for s in stats]))
    out.append(head("vocabulary never used", [f"{s.never_used_share:.1%}" for s in stats]))
    for s in stats:
        out.append(f"longest tokens of {s.name}: " + ", ".join(repr(t) for t in s.longest))
    return out


def plot_stats(stats: Sequence[TokenizerStats], path: str | Path) -> None:
    """Tokens per word for each file and each writing system, and vocabulary usage, per tokenizer."""
    from lmforge.figures import new_figure, save_figure

    fig = new_figure((12, 4.5))
    per_file, per_script, usage = fig.subplots(1, 3, gridspec_kw={"width_ratios": [3, 2, 1]})
    width = 0.8 / len(stats)
    scripts = list(stats[0].script_words)[:6]
    for k, s in enumerate(stats):
        x = np.arange(len(s.files)) + k * width
        per_file.bar(x, [f.tokens_per_word for f in s.files], width, label=s.name)
        per_script.bar(np.arange(len(scripts)) + k * width, [s.scripts.get(c, 0.0) for c in scripts], width, label=s.name)
    per_file.set(xticks=np.arange(len(stats[0].files)) + 0.4 - width / 2, ylabel="tokens per word", title="fertility per file")
    per_file.set_xticklabels([f.name for f in stats[0].files], rotation=20, fontsize=8)
    per_script.set(xticks=np.arange(len(scripts)) + 0.4 - width / 2, title="tokens per word per script")
    per_script.set_xticklabels([c.lower() for c in scripts], fontsize=8)
    usage.bar([s.name for s in stats], [100 * (1 - s.never_used_share) for s in stats], color="gray")
    usage.set(ylabel="% of the vocabulary used", ylim=(0, 100), title="vocabulary usage")
    usage.tick_params(axis="x", labelsize=8, rotation=20)
    per_file.legend(fontsize=8)
    save_figure(fig, Path(path))
