"""`lmforge quickstart`: the whole life of a small model in a few minutes, with no downloads.

It trains a byte-level BPE tokenizer and a small LLaMA-style decoder (RoPE, RMSNorm,
SwiGLU, grouped-query attention) on text every machine with Python has — the standard
library's own source files — or on `--data PATH`, then prints samples from the result. The
run folder is a normal checkpoint: `lmforge.load(out_dir)` opens it.
"""

from __future__ import annotations

import sys
import sysconfig
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from lmforge.errors import LmforgeError

CORPUS_BYTES = 6_000_000  # enough text that a few minutes of training never repeats much
VOCAB_SIZE = 2048
MODEL = dict(preset="tiny-llama", dim=128, n_layers=4, n_heads=4, n_kv_heads=2, hidden_dim=384, max_seq_len=256)
TRAIN = dict(steps=340, batch_size=16, lr=4e-3, min_lr=4e-4, warmup_steps=40, eval_every=100, eval_batches=4,
             save_every=200, log_every=10, weight_decay=0.1, resume="never")
PROMPTS = ("def ", "import os\n", "class ")


def stdlib_files(limit_bytes: int = CORPUS_BYTES) -> list[Path]:
    """Top-level modules of this Python's standard library, largest first, up to `limit_bytes`."""
    root = Path(sysconfig.get_paths()["stdlib"])
    files = sorted((p for p in root.glob("*.py") if p.is_file()), key=lambda p: (-p.stat().st_size, p.name))
    if not files:
        raise LmforgeError(f"no standard-library sources under {root}; pass --data PATH with text to train on")
    chosen, total = [], 0
    for path in files:
        if total >= limit_bytes:
            break
        chosen.append(path)
        total += path.stat().st_size
    return sorted(chosen)


def prepare_with_bar(inputs: list[str], tokenizer: Any, out: str | Path, **kwargs: Any) -> Any:
    """`data.prepare` with a progress bar over the input bytes (shown on a terminal only)."""
    from tqdm import tqdm

    from lmforge.data import list_input_files, prepare

    total = sum(p.stat().st_size for p in list_input_files(inputs))
    with tqdm(total=total, unit="B", unit_scale=True, desc="tokenizing", file=sys.stderr,
              disable=not sys.stderr.isatty()) as bar:
        return prepare(inputs, tokenizer, out, progress=bar.update, **kwargs)


def quickstart(
    data: str | Path | None = None,
    out_dir: str | Path = "runs/quickstart",
    steps: int | None = None,
    report: Callable[[str], None] = print,
) -> Path:
    """Tokenizer → shards → pretraining → samples. Returns the run folder."""
    import lmforge
    from lmforge.tokenizer import train_tokenizer
    from lmforge.train.pretrain import run_pretrain

    start = time.monotonic()
    out = Path(out_dir)
    inputs = [Path(data)] if data is not None else stdlib_files()
    if data is not None and not Path(data).exists():
        raise LmforgeError(f"--data {data} does not exist; pass a text file or a folder of text files")
    report(f"[1/4] training a {VOCAB_SIZE}-token byte-level BPE tokenizer on {len(inputs)} input(s)")
    tokenizer = train_tokenizer(inputs, VOCAB_SIZE)
    tokenizer.save(out / "tokenizer")
    report("[2/4] tokenizing into shards (5% held out for validation)")
    stats = prepare_with_bar([str(p) for p in inputs], tokenizer, out / "data", val_fraction=0.05)
    report(f"      {stats.train.tokens:,} train tokens, {stats.val.tokens:,} validation tokens")
    report("[3/4] pretraining a small LLaMA-style model (RoPE, RMSNorm, SwiGLU, grouped-query attention)")
    recipe = {"model": MODEL, "data": {"shards": str(out / "data"), "tokenizer": str(out / "tokenizer")},
              "train": {**TRAIN, **({"steps": steps} if steps else {})}, "out_dir": str(out)}
    result = run_pretrain(recipe, progress=True)
    final = result.train.final_eval or {}
    report(f"      validation loss {final.get('eval_loss', float('nan')):.3f}, "
           f"bits per byte {final.get('eval_bpb', float('nan')):.3f}; loss curve in {out / 'loss.png'}")
    report("[4/4] samples (temperature 0.8):")
    lm = lmforge.load(out)
    for i, prompt in enumerate(PROMPTS):
        text = lm.generate(prompt, max_new_tokens=80, temperature=0.8, top_p=0.95, seed=i)
        report(f"--- {prompt!r}\n{prompt}{text}")
    report(f"done in {time.monotonic() - start:.0f} s. Next: "
           f"`lmforge generate {out} --prompt 'def '`, or `lmforge serve {out}` and open http://127.0.0.1:8000")
    return out
