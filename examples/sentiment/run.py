"""Sentiment classification on SST-2 (`label<TAB>sentence`), with accuracy before and after (CPU, a few minutes).

    python examples/sentiment/run.py --data ../shared/data/sst2

1. Build a base model, since nothing can be downloaded: `lmforge quickstart` (a byte-level BPE
   tokenizer and a small LLaMA-style decoder, next-token prediction) run briefly on the training
   sentences as plain text, their labels left out.
2. Score the dev split with that base and a freshly initialised classification head: the
   "before" figure (chance, about 50%).
3. Train the classifier with `configs/classify-sst2.yaml` (last-token pooling; `--lora` trains
   LoRA adapters and the head instead of the whole model) and score the dev split again:
   accuracy, macro-F1 and the confusion matrix.
4. Label a few new sentences, as `lmforge classify --predict` does.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch
import yaml

import lmforge
from lmforge.checkpoint import load_model
from lmforge.data.classification import collate_classification, encode_labelled, read_labelled
from lmforge.data.rows import iter_row_batches
from lmforge.evaluate.classification import evaluate_classifier, predict
from lmforge.models.heads import SequenceClassifier
from lmforge.quickstart import quickstart
from lmforge.tokenizer import Tokenizer
from lmforge.train.finetune import run_classify

CONFIG = Path(__file__).resolve().parents[2] / "configs" / "classify-sst2.yaml"
EXAMPLES = ["a gorgeous , witty and moving film", "the plot is dull and the jokes fall flat",
            "not the best , but worth seeing", "i wanted my two hours back"]


def build_base(out: Path, train_tsv: Path, steps: int) -> Path:
    """What `lmforge quickstart --data sentences.jsonl` makes from the training sentences (no labels)."""
    out.mkdir(parents=True, exist_ok=True)
    text = out / "sentences.jsonl"
    rows = read_labelled(train_tsv, "1", "0")
    text.write_text("".join(json.dumps({"text": r.text}) + "\n" for r in rows), encoding="utf-8")
    return quickstart(data=text, out_dir=out / "base", steps=steps, report=lambda _: None)


def accuracy_before(base: Path, dev_tsv: Path, seed: int) -> float:
    """Dev accuracy of the base with an untrained head (what training starts from)."""
    backbone, _ = load_model(base)
    tokenizer = Tokenizer.from_dir(base)
    torch.manual_seed(seed)
    model = SequenceClassifier(backbone, 2, labels=["0", "1"])
    examples, _ = encode_labelled(read_labelled(dev_tsv, "1", "0"), tokenizer, ["0", "1"], 64)
    batches = iter_row_batches(examples, lambda b: collate_classification(b, tokenizer.padding_id), 64)
    return evaluate_classifier(model, batches, ["0", "1"]).accuracy


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", default="../shared/data/sst2", help="folder with train.tsv and dev.tsv")
    parser.add_argument("--out", default="runs/sentiment", help="working folder")
    parser.add_argument("--base-steps", type=int, default=150, help="pretraining steps of the base model")
    parser.add_argument("--steps", type=int, default=None, help="classifier steps (default: the config's)")
    parser.add_argument("--lora", type=int, default=0, metavar="RANK", help="train LoRA adapters of this rank")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (one is fastest for a model this small)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    start, out, data = time.monotonic(), Path(args.out), Path(args.data)

    base = build_base(out, data / "train.tsv", args.base_steps)
    print(f"base model pretrained on the SST-2 training sentences ({time.monotonic() - start:.0f} s)")
    recipe = yaml.safe_load(CONFIG.read_text())
    recipe["finetune"]["base"], recipe["out_dir"] = str(base), str(out / "classifier")
    recipe["data"].update(train=str(data / "train.tsv"), eval=str(data / "dev.tsv"))
    recipe["train"].update(resume="never", **({"steps": args.steps} if args.steps else {}))
    recipe["lora"] = {"rank": args.lora, "alpha": 2.0 * args.lora, "targets": ["*.attn.*", "*.mlp.*"]} if args.lora else {}
    before = accuracy_before(base, data / "dev.tsv", recipe["train"].get("seed", 1337))

    result = run_classify(recipe, progress=True, report=print)
    report = result.eval_report
    print(f"dev accuracy: before {before:.3f}, after {report.accuracy:.3f} (macro-F1 {report.macro_f1:.3f}, "
          f"{report.n} sentences; {time.monotonic() - start:.0f} s in all)\n{report.table()}")
    classifier = lmforge.load(out / "classifier")
    model, tokenizer = classifier.model, classifier.tokenizer
    for text, p in zip(EXAMPLES, predict(model, tokenizer, EXAMPLES)):
        print(f"  {p.label} ({p.probability:.2f})  {text}")
    print(f"accuracy_before={before:.3f} accuracy_after={report.accuracy:.3f} macro_f1_after={report.macro_f1:.3f}")


if __name__ == "__main__":
    main()
