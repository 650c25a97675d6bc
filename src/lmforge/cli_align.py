"""`lmforge reward`, `lmforge dpo` and `lmforge grpo`: alignment verbs over train/align.py and train/grpo.py.

Each takes `--config FILE.yaml` plus `--section.key value` overrides generated from the
recipe's dataclasses (sections: the verb's own, `data`, `lora`, `train`), prints what the data
held (rows skipped and why), trains with a progress bar, and prints where the result is.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable
from typing import Any

from lmforge.recipes import add_config_flags, load_recipe

VERBS = {  # verb -> (help, module, its recipe sections, its training function)
    "reward": ("train a reward model on preference pairs (Bradley-Terry)", "lmforge.train.align", "REWARD_SECTIONS", "train_reward"),
    "dpo": ("direct preference optimisation on preference pairs (DPO / IPO)", "lmforge.train.align", "DPO_SECTIONS", "train_dpo"),
    "grpo": ("reinforcement learning with verifiable rewards (GRPO)", "lmforge.train.grpo", "GRPO_SECTIONS", "train_grpo"),
}


def _summary(result: Any) -> str:
    """`done: N steps, checkpoint in DIR (eval_accuracy 0.9100, ...)`."""
    final = result.final_eval or {}
    shown = ", ".join(f"{k} {v:.4f}" for k, v in final.items() if isinstance(v, float))
    return f"done: {result.step} steps, checkpoint in {result.out_dir}" + (f" ({shown})" if shown else "")


def _command(sections: dict[str, type], run: Callable[..., Any]) -> Callable[[argparse.Namespace], None]:
    def command(args: argparse.Namespace) -> None:
        result = run(load_recipe(args, sections), progress=True, report=print)
        print(_summary(result))

    return command


def add_verbs(verbs: argparse._SubParsersAction) -> None:
    """Add `reward`, `dpo` and `grpo` to the `lmforge` parser."""
    import importlib

    for verb, (help_text, module_name, sections_name, run_name) in VERBS.items():
        module = importlib.import_module(module_name)
        sections = getattr(module, sections_name)
        p = verbs.add_parser(verb, help=help_text, formatter_class=argparse.ArgumentDefaultsHelpFormatter)
        add_config_flags(p, sections)
        p.set_defaults(func=_command(sections, getattr(module, run_name)))
