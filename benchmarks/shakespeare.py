"""Byte-level char model on tinyshakespeare with nanoGPT's CPU-example shape.

4 layers, 4 heads, 128 wide, context 64, batch 12, 2000 steps (as nanoGPT's
`train_shakespeare_char.py` CPU run), validation on the last 10% of the file. nanoGPT
reports validation loss 1.88 nats/char there, i.e. 2.71 bits per byte.

    python benchmarks/shakespeare.py --data ../shared/data/tinyshakespeare/input.txt
    # last line: val_bpb=X wall_s=T
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import yaml

from lmforge.data import prepare
from lmforge.tokenizer import train_tokenizer
from lmforge.train.loop import TrainResult
from lmforge.train.pretrain import run_pretrain


def train_char_model(data: str, steps: int, work: Path) -> TrainResult:
    """Train the byte-level char model of configs/shakespeare-char.yaml on `data` for `steps` steps
    in `work` (tokenizer in work/tok, shards in work/data, the run in work/run)."""
    tok = train_tokenizer([data], 256)  # pure bytes: char-level for ASCII
    tok.save(work / "tok")
    prepare([data], tok, work / "data", val_fraction=0.1)  # the last 10% of the file
    recipe = yaml.safe_load((Path(__file__).parents[1] / "configs" / "shakespeare-char.yaml").read_text())
    recipe["out_dir"] = str(work / "run")
    recipe["data"].update(shards=str(work / "data"), tokenizer=str(work / "tok"))
    recipe["train"].update(steps=steps, eval_batches=200, resume="never")
    return run_pretrain(recipe, progress=True).train


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--data", required=True, help="tinyshakespeare input.txt")
    parser.add_argument("--steps", type=int, default=2000)
    parser.add_argument("--out-dir", default=None)
    args = parser.parse_args()
    start = time.monotonic()
    result = train_char_model(args.data, args.steps, Path(args.out_dir or tempfile.mkdtemp(prefix="shakespeare-")))
    bpb = result.final_eval["eval_bpb"]
    print(f"validation: {result.final_eval['eval_loss']:.3f} nats/token, {bpb:.3f} bits/byte (nanoGPT: 2.71)")
    print(f"val_bpb={bpb:.3f} wall_s={time.monotonic() - start:.0f}")


if __name__ == "__main__":
    main()
