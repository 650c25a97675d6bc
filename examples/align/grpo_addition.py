"""GRPO raises a tiny model's verifiable reward on single-digit addition, on CPU in a few minutes.

1. Pretrain a tiny byte-level model on lines "a+b=c" whose answer is right only 30% of the time
   and one too many 50% of the time (random otherwise): sampling is right about a third of the
   time, and greedy decoding mostly answers a+b+1.
2. GRPO (`run_grpo`, what `lmforge grpo` runs) on 80 of the 100 prompts "a+b=", with the
   verifiable reward `addition_reward.py:correct` (1 for the right sum), 8 completions per prompt.
3. Print the mean reward before and after: sampled on the training prompts, greedy on the 20
   held-out prompts; the run folder holds reward.png (the reward curve) and metrics.jsonl.

    python examples/align/grpo_addition.py [--out runs/align-example/addition] [--steps 100]
"""

from __future__ import annotations

import argparse
import json
import random
import time
from pathlib import Path

import torch
from addition_reward import correct
from tiny_base import pretrain_tiny

import lmforge
from lmforge.train.grpo import run_grpo

PROMPTS = [f"{a}+{b}=" for a in range(10) for b in range(10)]


def corpus(rng: random.Random, n: int) -> list[str]:
    """Sums that are right 30% of the time, off by one 50%, random 20%."""
    lines = []
    for _ in range(n):
        a, b = rng.randrange(10), rng.randrange(10)
        roll = rng.random()
        answer = a + b if roll < 0.3 else a + b + 1 if roll < 0.8 else rng.randrange(19)
        lines.append(f"{a}+{b}={answer}")
    return lines


def mean_reward(model_dir: Path, prompts: list[str], samples: int, temperature: float) -> float:
    """Mean of `correct` over `samples` completions of every prompt."""
    lm = lmforge.load(model_dir)
    scores = [correct(p, lm.generate(p, max_new_tokens=4, temperature=temperature, seed=s))
              for p in prompts for s in range(samples)]
    return sum(scores) / len(scores)


def write_prompts(path: Path, prompts: list[str]) -> Path:
    path.write_text("".join(json.dumps({"prompt": p}) + "\n" for p in prompts))
    return path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=Path("runs/align-example/addition"))
    parser.add_argument("--steps", type=int, default=100, help="GRPO steps (one batch of rollouts each)")
    args = parser.parse_args()
    torch.set_num_threads(1)  # a tiny model gains nothing from more threads, and loses much when cores are shared
    start = time.monotonic()
    rng = random.Random(0)
    held_out = set(rng.sample(PROMPTS, 20))
    train_prompts = [p for p in PROMPTS if p not in held_out]

    print("[1/3] pretraining a tiny model on mostly wrong sums")
    base = pretrain_tiny(corpus(rng, 20_000), args.out, steps=400)
    before = mean_reward(base, train_prompts, 4, 1.0), mean_reward(base, sorted(held_out), 1, 0.0)

    print("[2/3] GRPO with the reward addition_reward.py:correct")
    recipe = {
        "finetune": {"base": str(base)},
        "grpo": {"reward_functions": [f"{Path(__file__).with_name('addition_reward.py')}:correct"],
                 "group_size": 8, "prompts_per_rollout": 8, "max_new_tokens": 4, "kl_beta": 0.04},
        "data": {"train": str(write_prompts(args.out / "prompts.jsonl", train_prompts)),
                 "eval": str(write_prompts(args.out / "held_out.jsonl", sorted(held_out)))},
        "train": {"steps": args.steps, "batch_size": 16, "grad_accum": 4, "lr": 2e-4, "min_lr": 2e-5, "warmup_steps": 5,
                  "eval_every": 20, "save_every": 0, "log_every": 1, "resume": "never", "seed": 0},
        "out_dir": str(args.out / "grpo"),
    }
    run_grpo(recipe, progress=True, report=print)
    after = mean_reward(args.out / "grpo", train_prompts, 4, 1.0), mean_reward(args.out / "grpo", sorted(held_out), 1, 0.0)

    print("[3/3] mean reward (1 = right sum)")
    print(f"      sampled, training prompts (T=1, 4 each): {before[0]:.3f} -> {after[0]:.3f}")
    print(f"      greedy, 20 held-out prompts:            {before[1]:.3f} -> {after[1]:.3f}")
    print(f"      reward curve: {args.out / 'grpo' / 'reward.png'}; done in {time.monotonic() - start:.0f} s")
    print(f"reward_before={before[0]:.3f} reward_after={after[0]:.3f} "
          f"greedy_held_out_before={before[1]:.3f} greedy_held_out_after={after[1]:.3f}")


if __name__ == "__main__":
    main()
