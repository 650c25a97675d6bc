"""DPO teaches a tiny model to end its answers politely, on CPU in a few minutes.

1. Pretrain a tiny byte-level model on answers "Q: Can you pass the salt?\nA: Here is the salt, ..."
   that end politely ("thank you.") or rudely ("go away.") equally often.
2. DPO (`run_dpo`, what `lmforge dpo` runs) with LoRA (attention and MLP layers) on pairs that
   prefer the polite ending, for 24 of the 30 objects; the reference is the same model with its
   adapters disabled.
3. On held-out pairs (the 6 other objects), print before and after: how often the model gives
   the polite reply the higher log-probability (preference accuracy), the mean log-probability
   margin, and how many sampled answers end politely, rudely, or neither (malformed).

    python examples/align/dpo_polite.py [--out runs/align-example/polite] [--steps 120]
"""

from __future__ import annotations

import argparse
import json
import random
import time
from pathlib import Path

import torch
from tiny_base import pretrain_tiny

import lmforge
from lmforge.data.preference import PreferencePair
from lmforge.evaluate.preference import log_prob_preference
from lmforge.train.align import run_dpo

ITEMS = ["salt", "pepper", "book", "pen", "cup", "plate", "spoon", "fork", "knife", "bread", "butter", "map",
         "phone", "key", "lamp", "chair", "towel", "soap", "brush", "comb", "ball", "card", "coin", "bag",
         "hat", "scarf", "glove", "shoe", "sock", "ring"]
POLITE = [", thank you.", ", please enjoy.", ", you are welcome."]
RUDE = [", go away.", ", whatever.", ", do not ask again."]  # first letters differ from the polite ones


def prompt(item: str) -> str:
    return f"Q: Can you pass the {item}?\nA:"


def reply(item: str, ending: str) -> str:
    return f" Here is the {item}{ending}"


def pairs_for(items: list[str]) -> list[PreferencePair]:
    return [PreferencePair(prompt(i), reply(i, p), reply(i, r)) for i in items for p in POLITE for r in RUDE]


def preference(model_dir: Path, pairs: list[PreferencePair]) -> tuple[float, float]:
    """(share of pairs where the polite reply is more likely, mean log-prob margin polite - rude)."""
    lm = lmforge.load(model_dir)
    scores = log_prob_preference(lm.model, lm.tokenizer, pairs)
    return scores["accuracy"], scores["margin"]


def ending_shares(model_dir: Path, items: list[str], samples: int = 8) -> tuple[float, float]:
    """Shares of sampled answers (temperature 1) that end politely and rudely; the rest is malformed text."""
    lm = lmforge.load(model_dir)
    answers = [lm.generate(prompt(i), max_new_tokens=40, temperature=1.0, seed=s) for i in items for s in range(samples)]
    return (sum(a.endswith(tuple(POLITE)) for a in answers) / len(answers),
            sum(a.endswith(tuple(RUDE)) for a in answers) / len(answers))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=Path("runs/align-example/polite"))
    parser.add_argument("--steps", type=int, default=120, help="DPO steps")
    args = parser.parse_args()
    torch.set_num_threads(1)  # a tiny model gains nothing from more threads, and loses much when cores are shared
    start = time.monotonic()
    rng = random.Random(0)
    held_out = rng.sample(ITEMS, 6)
    train_items = [i for i in ITEMS if i not in held_out]

    print("[1/3] pretraining a tiny model on answers that end politely or rudely, half and half")
    lines = [prompt(i) + reply(i, rng.choice(POLITE + RUDE)) for i in (rng.choice(ITEMS) for _ in range(12_000))]
    base = pretrain_tiny(lines, args.out, steps=500)
    val_pairs = pairs_for(held_out)
    before = (*preference(base, val_pairs), *ending_shares(base, held_out))

    print("[2/3] DPO with LoRA on pairs that prefer the polite ending")
    data = args.out / "prefs.jsonl"
    data.write_text("".join(json.dumps(p.__dict__) + "\n" for p in pairs_for(train_items)))
    val = args.out / "held_out.jsonl"
    val.write_text("".join(json.dumps(p.__dict__) + "\n" for p in val_pairs))
    recipe = {"finetune": {"base": str(base)}, "dpo": {"beta": 0.1}, "data": {"train": str(data), "eval": str(val)},
              "lora": {"rank": 8, "targets": ["*.attn.q", "*.attn.k", "*.attn.v", "*.attn.o", "*.mlp.*"]}, "out_dir": str(args.out / "dpo"),
              "train": {"steps": args.steps, "batch_size": 8, "lr": 1e-4, "min_lr": 1e-5, "warmup_steps": 10,
                        "eval_every": 40, "save_every": 0, "log_every": 5, "resume": "never", "seed": 0}}
    result = run_dpo(recipe, progress=True, report=print)
    after = (*preference(args.out / "dpo", val_pairs), *ending_shares(args.out / "dpo", held_out))

    print("[3/3] held-out objects (54 pairs, 48 sampled answers)")
    print(f"      preference accuracy (log p polite > log p rude): {before[0]:.3f} -> {after[0]:.3f}")
    print(f"      mean log-prob margin (polite - rude):            {before[1]:+.3f} -> {after[1]:+.3f}")
    print(f"      sampled answers ending politely / rudely:        {before[2]:.3f} / {before[3]:.3f} -> "
          f"{after[2]:.3f} / {after[3]:.3f} (the rest is malformed)")
    final = result.train.final_eval or {}
    print(f"      DPO implicit reward on held-out pairs: accuracy {final.get('eval_accuracy', float('nan')):.3f}, "
          f"margin {final.get('eval_margin', float('nan')):+.3f}; done in {time.monotonic() - start:.0f} s")
    print(f"pref_accuracy_before={before[0]:.3f} pref_accuracy_after={after[0]:.3f} "
          f"margin_before={before[1]:+.3f} margin_after={after[1]:+.3f} "
          f"polite_before={before[2]:.3f} polite_after={after[2]:.3f}")


if __name__ == "__main__":
    main()
