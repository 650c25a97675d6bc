"""English -> French translation as instruction SFT, with BLEU before and after (CPU, a few minutes).

    python examples/translation/run.py --data ../shared/data/eng-fra/eng-fra.txt

1. Split the tab-separated pairs (`en<TAB>fr<TAB>attribution`) by English sentence: a seeded
   sample of English sentences, with every French translation of each as references, is held
   out for testing; the model never sees them.
2. Build a base model, since nothing can be downloaded: `lmforge quickstart` (a byte-level BPE
   tokenizer and a small LLaMA-style decoder) run briefly on the training sentences as plain,
   unpaired text (English and French lines shuffled). It knows both languages a little but was
   never shown a translation.
3. Fine-tune it with `configs/sft-translation.yaml`: rows `{"instruction": "Translate to French.",
   "input": EN, "output": FR}` rendered through the chat template, loss on the French reply only,
   rows packed with document masking.
4. Translate the held-out sentences greedily with the base and the fine-tuned model and print
   corpus BLEU (`evaluate.corpus_metrics.corpus_bleu`: sacrebleu, all references per sentence).
"""

from __future__ import annotations

import argparse
import json
import random
import time
from collections import defaultdict
from pathlib import Path

import torch
import yaml

import lmforge
from lmforge.evaluate.corpus_metrics import corpus_bleu
from lmforge.quickstart import quickstart
from lmforge.train.finetune import run_sft

CONFIG = Path(__file__).resolve().parents[2] / "configs" / "sft-translation.yaml"
INSTRUCTION = "Translate to French."


def read_pairs(path: Path) -> dict[str, list[str]]:
    """English sentence -> its French translations, in file order."""
    pairs: dict[str, list[str]] = defaultdict(list)
    for line in path.read_text(encoding="utf-8").splitlines():
        fields = line.split("\t")
        if len(fields) >= 2:
            pairs[fields[0].strip()].append(fields[1].strip())
    return pairs


def split(pairs: dict[str, list[str]], n_test: int, seed: int) -> tuple[list[tuple[str, str]], dict[str, list[str]]]:
    english = sorted(pairs)
    random.Random(seed).shuffle(english)
    test = {en: pairs[en] for en in english[:n_test]}
    train = [(en, fr) for en in english[n_test:] for fr in pairs[en]]
    return train, test


def write_data(out: Path, train: list[tuple[str, str]], seed: int) -> tuple[Path, Path]:
    """train.jsonl (instruction rows) and mono.jsonl (the same sentences, unpaired, as plain text)."""
    out.mkdir(parents=True, exist_ok=True)
    rows = [{"instruction": INSTRUCTION, "input": en, "output": fr} for en, fr in train]
    sentences = sorted({en for en, _ in train} | {fr for _, fr in train})
    random.Random(seed).shuffle(sentences)
    for path, items in ((out / "train.jsonl", rows), (out / "mono.jsonl", [{"text": s} for s in sentences])):
        path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in items), encoding="utf-8")
    return out / "train.jsonl", out / "mono.jsonl"


def build_base(out: Path, mono: Path, steps: int) -> Path:
    """What `lmforge quickstart --data mono.jsonl` makes: a BPE tokenizer and a small decoder pretrained on it."""
    return quickstart(data=mono, out_dir=out / "base", steps=steps, report=lambda _: None)


def translate(lm: lmforge.api.LM, english: list[str]) -> list[str]:
    prompts = [[{"role": "user", "content": f"{INSTRUCTION}\n\n{en}"}] for en in english]
    return [lm.chat(p, max_new_tokens=40, temperature=0).strip() for p in prompts]


def bleu(model_dir: Path, test: dict[str, list[str]]) -> tuple[float, list[str]]:
    """Corpus BLEU of greedy translations against every reference of each sentence."""
    english = list(test)
    hypotheses = translate(lmforge.load(model_dir), english)
    return corpus_bleu(hypotheses, [test[en] for en in english]), hypotheses


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", default="../shared/data/eng-fra/eng-fra.txt", help="en<TAB>fr<TAB>... pairs")
    parser.add_argument("--out", default="runs/translation", help="working folder")
    parser.add_argument("--test-sentences", type=int, default=150, help="English sentences held out for BLEU")
    parser.add_argument("--base-steps", type=int, default=100, help="pretraining steps of the base model")
    parser.add_argument("--sft-steps", type=int, default=None, help="SFT steps (default: the config's)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1, help="torch threads (one is fastest for a model this small)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    start, out = time.monotonic(), Path(args.out)

    train, test = split(read_pairs(Path(args.data)), args.test_sentences, args.seed)
    train_file, mono = write_data(out, train, args.seed)
    print(f"{len(train)} training pairs, {len(test)} held-out English sentences "
          f"({sum(map(len, test.values()))} references)")
    base = build_base(out, mono, args.base_steps)
    print(f"base model pretrained on unpaired sentences ({time.monotonic() - start:.0f} s)")

    recipe = yaml.safe_load(CONFIG.read_text())
    recipe["finetune"]["base"], recipe["data"]["train"], recipe["out_dir"] = str(base), str(train_file), str(out / "sft")
    recipe["train"].update(resume="never", **({"steps": args.sft_steps} if args.sft_steps else {}))
    result = run_sft(recipe, progress=True, report=print)
    print(f"SFT: {result.train.step} steps, eval loss {result.train.final_eval['eval_loss']:.3f} "
          f"({time.monotonic() - start:.0f} s)")

    before, _ = bleu(base, test)
    after, hypotheses = bleu(out / "sft", test)
    for en, fr in list(zip(test, hypotheses))[:5]:
        print(f"  {en!r} -> {fr!r}   (references: {test[en][:2]})")
    print(f"BLEU on {len(test)} held-out sentences: before {before:.1f}, after {after:.1f} "
          f"({time.monotonic() - start:.0f} s in all)")
    print(f"bleu_before={before:.1f} bleu_after={after:.1f}")


if __name__ == "__main__":
    main()
