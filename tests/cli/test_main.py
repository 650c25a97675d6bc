"""The `lmforge` command's front door: every verb listed, and `--help` without loading torch."""

from __future__ import annotations

import subprocess
import sys

from lmforge.cli.main import VERBS, build_parser

DESIGN_VERBS = {"quickstart", "tokenizer", "prepare", "pretrain", "sft", "classify", "reward", "dpo", "grpo", "lora",
                "generate", "chat", "serve", "convert", "export", "quantize", "doctor", "attention", "eval", "drift", "plan",
                "rag", "support"}


def test_help_lists_every_verb_and_loads_no_torch():
    probe = ("import sys; from lmforge.cli.main import main\n"
             "try:\n    main(['--help'])\nexcept SystemExit as e:\n    code = e.code\n"
             "print('torch' in sys.modules, code)")
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=120)
    assert out.stdout.strip().splitlines()[-1] == "False 0", out.stdout + out.stderr
    assert all(verb in out.stdout for verb in DESIGN_VERBS)


def test_only_the_chosen_verb_gets_its_flags():
    assert set(VERBS) >= DESIGN_VERBS
    parser = build_parser(["sft"])
    choices = parser._subparsers._group_actions[0].choices
    assert "--finetune.base" in choices["sft"].format_help()
    assert "--finetune.base" not in choices["dpo"].format_help()  # built only when dpo runs
