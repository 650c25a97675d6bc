"""The doctor at work: a small run that goes wrong on purpose, its diagnosis, doctor.png and an attention map.

A byte-level GPT-2-shaped model is pretrained on the first 5 kB of tinyshakespeare only, with a
high learning rate and no warm-up, for long enough to memorise it: validation loss turns up and
gradients are clipped on most steps. `train.watch_attention` records attention entropy at each
evaluation. The README's pictures come from this script:

    python examples/diagnose/run.py    # writes docs/images/doctor.png and docs/images/attention.png
    lmforge doctor runs/diagnose/run   # the same diagnosis from the command line

Last line: findings=CODES n_findings=N
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import lmforge
from lmforge.data.prepare import prepare
from lmforge.diagnose.attention import plot_attention
from lmforge.diagnose.doctor import diagnose
from lmforge.diagnose.plots import plot_doctor
from lmforge.diagnose.run import read_run
from lmforge.tokenizer import train_tokenizer
from lmforge.train.pretrain import run_pretrain

ROOT = Path(__file__).resolve().parents[2]
TEXT = "ROMEO:\nBut, soft! what light"


def recipe(work: Path, out: Path, steps: int) -> dict:
    return {"out_dir": str(out),
            "model": {"preset": "tiny-gpt2", "dim": 128, "n_layers": 4, "n_heads": 4, "hidden_dim": 512, "max_seq_len": 64},
            "data": {"shards": str(work / "data"), "tokenizer": str(work / "tokenizer"), "seq_len": 64},
            "train": {"steps": steps, "batch_size": 12, "lr": 1e-2, "min_lr": 1e-3, "warmup_steps": 0, "eval_every": 50,
                      "eval_batches": 10, "save_every": 0, "log_every": 5, "resume": "never", "watch_attention": True}}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--data", default=str(ROOT.parent / "shared/data/tinyshakespeare/input.txt"), help="a text file")
    parser.add_argument("--train-bytes", type=int, default=5_000, help="train on this much of it (small: it overfits)")
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--out", default="runs/diagnose", help="working folder")
    parser.add_argument("--images", default=str(ROOT / "docs/images"), help="where the pictures go")
    args = parser.parse_args()

    work, images = Path(args.out), Path(args.images)
    images.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        corpus = Path(tmp) / "slice.txt"
        corpus.write_text(Path(args.data).read_text(encoding="utf-8")[: args.train_bytes], encoding="utf-8")
        tokenizer = train_tokenizer([corpus], vocab_size=256)
        tokenizer.save(work / "tokenizer")
        prepare([corpus], tokenizer, work / "data", val_fraction=0.1)
    run_pretrain(recipe(work, work / "run", args.steps))

    run = read_run(work / "run")
    findings = diagnose(run)
    plot_doctor(run, images / "doctor.png")
    for f in findings:
        print(f"[{f.severity}] {f.code}: {f.evidence}\n  -> {f.advice}")
    entropy = run.with_key("attn_entropy", "eval")[-1]["attn_entropy"]
    layer, head = min(((i, j) for i, row in enumerate(entropy) for j in range(len(row))), key=lambda ij: entropy[ij[0]][ij[1]])
    plot_attention(lmforge.load(work / "run").attention(TEXT), images / "attention.png", layer=layer, head=head)
    print(f"wrote {images / 'doctor.png'} and {images / 'attention.png'} (layer {layer} head {head}, the most focused)")
    print(f"findings={','.join(f.code for f in findings) or 'none'} n_findings={len(findings)}")


if __name__ == "__main__":
    main()
