"""What weight-only quantization costs in quality: perplexity on the tinyshakespeare validation text
of a trained model in float32, int8 (per-channel) and int4 (groups of 64), every linear layer
quantized as in `benchmarks/decode.py` (the output projection too).

The model is the byte-level char model of `benchmarks/shakespeare.py` (nanoGPT's CPU shape),
trained here for `--steps` steps, or an already trained run folder (`--model runs/shakespeare`,
with its tokenizer). The validation text is the last 10% of the file (the split `prepare` holds
out), scored in non-overlapping windows of the model's context; perplexity is per token (here a
byte). The issue's bar: int8 within 1% of float32, int4 within 5%.

    python benchmarks/quant_quality.py --data ../shared/data/tinyshakespeare/input.txt
    # last line: ppl_float32=P ppl_int8=P8 ppl_int4=P4 int8_increase=I8 int4_increase=I4 (fractions of ppl_float32)
"""

from __future__ import annotations

import argparse
import copy
import math
import tempfile
from pathlib import Path

import torch
from shakespeare import train_char_model
from torch import nn

from lmforge.checkpoint import load_model
from lmforge.quantize import quantize_model
from lmforge.tokenizer import Tokenizer


def perplexity(model: nn.Module, ids: torch.Tensor, window: int, batch: int = 64) -> float:
    """exp(mean next-token cross-entropy) over non-overlapping windows of `ids`."""
    n = (ids.numel() - 1) // window
    inputs = ids[: n * window].view(n, window)  # (n, window)
    labels = ids[1 : n * window + 1].view(n, window)
    total = 0.0
    with torch.no_grad():
        for start in range(0, n, batch):
            total += float(model(inputs[start : start + batch], labels=labels[start : start + batch]))
    return math.exp(total / labels.numel())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--data", required=True, help="tinyshakespeare input.txt")
    parser.add_argument("--steps", type=int, default=1000, help="training steps when no --model is given")
    parser.add_argument("--model", default=None, help="a trained run folder (with tokenizer.json) instead of training")
    parser.add_argument("--group-size", type=int, default=64, help="int4 group size")
    args = parser.parse_args()
    folder = Path(args.model) if args.model else None
    if folder is None:
        folder = train_char_model(args.data, args.steps, Path(tempfile.mkdtemp(prefix="quant-quality-"))).out_dir
    model, _ = load_model(folder)
    model.eval()
    text = Path(args.data).read_text(encoding="utf-8")
    ids = torch.tensor(Tokenizer.from_dir(folder).encode(text[int(len(text) * 0.9):]))
    window = model.config.max_seq_len
    ppl = {"float32": perplexity(model, ids, window)}
    for name, bits in (("int8", 8), ("int4", 4)):
        ppl[name] = perplexity(quantize_model(copy.deepcopy(model), bits, args.group_size, skip=()), ids, window)
    for name, value in ppl.items():
        print(f"{name:8s} perplexity {value:.4f}  ({value / ppl['float32'] - 1:+.2%} against float32)")
    increase = {f"{name}_increase": f"{ppl[name] / ppl['float32'] - 1:.4f}" for name in ("int8", "int4")}
    print(" ".join([*(f"ppl_{k}={v:.4f}" for k, v in ppl.items()), *(f"{k}={v}" for k, v in increase.items())]))


if __name__ == "__main__":
    main()
