"""`lmforge quickstart` plumbing on a small text (the full run is CI's last step)."""

from __future__ import annotations

import subprocess
import sys

import lmforge
from lmforge.quickstart import stdlib_files


def test_stdlib_corpus_exists():
    files = stdlib_files(200_000)
    assert files and all(f.suffix == ".py" for f in files)


def test_quickstart_on_given_data(tmp_path):
    (tmp_path / "data.txt").write_text("def add(a, b):\n    return a + b\n\n" * 2000)
    out = subprocess.run([sys.executable, "-m", "lmforge.cli", "quickstart", "--data", str(tmp_path / "data.txt"),
                          "--steps", "3", "--out-dir", str(tmp_path / "run")], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    assert "[4/4] samples" in out.stdout and "lmforge generate" in out.stdout
    assert (tmp_path / "run" / "loss.png").is_file()
    lm = lmforge.load(tmp_path / "run")
    assert lm.config.n_kv_heads < lm.config.n_heads  # grouped-query attention, as advertised


def test_quickstart_missing_data_is_one_line(tmp_path):
    out = subprocess.run([sys.executable, "-m", "lmforge.cli", "quickstart", "--data", str(tmp_path / "nope")],
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 2 and out.stderr.count("\n") == 1 and "does not exist" in out.stderr
