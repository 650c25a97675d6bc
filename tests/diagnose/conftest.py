"""Corpora the diagnose tests write themselves: English-like, shifted English, and French-like sentences."""

from __future__ import annotations

import random
from pathlib import Path

import pytest

ENGLISH = (
    "the cat sat on a mat and the dog ran to the park while birds sang in tall green trees "
    "every morning people walk their dogs near the river before work"
)
REVIEWS = (
    "this film is a great movie with fine acting but the plot is dull and the ending feels rushed "
    "critics loved it while audiences found the story slow"
)
FRENCH = (
    "le chat était assis sur le tapis et le chien a couru au parc pendant que les oiseaux chantaient "
    "dans les grands arbres verts chaque matin les gens promènent leurs chiens près de la rivière"
)


def sentences(words_text: str, n: int, seed: int, length: tuple[int, int] = (6, 14)) -> str:
    """`n` lines of the words of `words_text` drawn with Zipf-like weights, one sentence per line."""
    vocabulary = words_text.split()
    rng = random.Random(seed)
    weights = [1 / (rank + 1) for rank in range(len(vocabulary))]
    lines = []
    for _ in range(n):
        words = rng.choices(vocabulary, weights, k=rng.randint(*length))
        lines.append(" ".join(words).capitalize() + ".")
    return "\n".join(lines) + "\n"


@pytest.fixture(scope="module")
def corpora(tmp_path_factory) -> dict[str, Path]:
    """english (reference), english2 (same source, other sample), reviews (shifted topic), french."""
    folder = tmp_path_factory.mktemp("corpora")
    texts = {"english": sentences(ENGLISH, 600, 0), "english2": sentences(ENGLISH, 600, 1),
             "reviews": sentences(" ".join(ENGLISH.split()[:20]) + " " + REVIEWS, 600, 2, (3, 8)), "french": sentences(FRENCH, 600, 3)}
    paths = {}
    for name, text in texts.items():
        paths[name] = folder / f"{name}.txt"
        paths[name].write_text(text, encoding="utf-8")
    return paths


@pytest.fixture(scope="module")
def english_tokenizer(corpora, tmp_path_factory):
    """A 300-token byte-level BPE trained on the English corpus only, saved to a folder."""
    from lmforge.tokenizer import train_tokenizer

    folder = tmp_path_factory.mktemp("tok")
    train_tokenizer([corpora["english"]], vocab_size=300).save(folder)
    return folder


@pytest.fixture
def run_verb(capsys):
    """`lmforge ARGS...` in this process (fast): returns (exit status, stdout, stderr)."""
    from lmforge.cli.main import main

    def run(*args: object) -> tuple[int, str, str]:
        try:
            code = main([str(a) for a in args])
        except SystemExit as stop:  # argparse: --help, usage errors
            code = int(stop.code or 0)
        out = capsys.readouterr()
        return code, out.out, out.err

    return run


@pytest.fixture(autouse=True)
def _single_thread(one_thread):
    """Tiny models run fastest on one thread, and far faster when other processes share the cores."""
