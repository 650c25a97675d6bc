"""`lmforge reward | dpo | grpo` as a user runs them: recipes, one-line errors, an end-to-end run."""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from _align_helpers import write_jsonl

from lmforge import cli_align
from lmforge.train.align import DpoConfig, RewardConfig, read_setup
from lmforge.train.grpo import GrpoConfig

CONFIGS = Path(__file__).parents[2] / "configs"
METHODS = {"reward": RewardConfig, "dpo": DpoConfig, "grpo": GrpoConfig}


def lmforge_cli(*args, cwd=None) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}  # see conftest.one_thread
    return subprocess.run([sys.executable, "-m", "lmforge.cli", *map(str, args)], capture_output=True, text=True,
                          timeout=300, cwd=cwd, env=env)


def assert_one_line_error(out: subprocess.CompletedProcess, needle: str) -> None:
    """Exit status 2 and the error as the last line of stderr (a progress bar may come before it)."""
    assert out.returncode == 2, out.stderr
    error = out.stderr[out.stderr.find("lmforge: error:"):]
    assert out.stderr.find("lmforge: error:") >= 0 and error.count("\n") == 1, out.stderr
    assert needle in error, out.stderr


@pytest.mark.parametrize("path", sorted(p for m in METHODS for p in CONFIGS.glob(f"{m}-*.yaml")), ids=lambda p: p.name)
def test_configs_are_valid_recipes(path):
    method = path.name.split("-")[0]
    setup = read_setup(yaml.safe_load(path.read_text()), method, METHODS[method])
    assert setup.method.base and setup.data.train_file


def test_empty_preference_file_is_one_line(tiny_lm_dir, tmp_path):
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n")
    out = lmforge_cli("dpo", "--dpo.base", tiny_lm_dir, "--data.train_file", empty, "--out-dir", tmp_path / "run")
    assert_one_line_error(out, f"{empty} holds no preference pairs")


def test_reward_function_that_does_not_import_is_one_line(tiny_lm_dir, tmp_path):
    out = lmforge_cli("grpo", "--grpo.base", tiny_lm_dir, "--grpo.reward_functions", '["no_such_rewards:score"]',
                      "--data.train_file", tmp_path / "prompts.jsonl", "--out-dir", tmp_path / "run")
    assert_one_line_error(out, "reward function 'no_such_rewards:score': cannot import no_such_rewards (ModuleNotFoundError")


def test_reward_function_that_raises_names_the_prompt(tiny_lm_dir, tmp_path):
    (tmp_path / "strict.py").write_text("def score(prompt, completion):\n    raise KeyError(prompt)\n")
    prompts = write_jsonl(tmp_path / "prompts.jsonl", [{"prompt": "2+2="}, {"prompt": "3+3="}])
    out = lmforge_cli("grpo", "--grpo.base", tiny_lm_dir, "--grpo.reward_functions", '["strict:score"]',
                      "--grpo.group_size", 2, "--grpo.prompts_per_rollout", 1, "--grpo.max_new_tokens", 2,
                      "--train.batch_size", 2, "--train.steps", 1, "--data.train_file", prompts,
                      "--data.val_fraction", 0, "--out-dir", tmp_path / "run", cwd=tmp_path)  # `strict` imports from here
    assert_one_line_error(out, "reward function strict:score raised KeyError")
    assert f"on the prompt at {prompts} line " in out.stderr and "on_reward_error skip" in out.stderr


def test_reward_verb_end_to_end_with_the_config(tiny_lm_dir, prefs_file, tmp_path):
    out = lmforge_cli("reward", "--config", CONFIGS / "reward-tiny.yaml", "--reward.base", tiny_lm_dir,
                      "--data.train_file", prefs_file, "--data.max_len", 0, "--train.steps", 3, "--train.batch_size", 4,
                      "--train.eval_every", 0, "--train.save_every", 0, "--out-dir", tmp_path / "rm")
    assert out.returncode == 0, out.stderr
    assert f"{prefs_file}: 24 rows, 24 pairs kept" in out.stdout and "done: 3 steps" in out.stdout
    assert "eval_accuracy" in out.stdout and (tmp_path / "rm" / "head.json").is_file()


def test_help_documents_the_keys():
    parser = argparse.ArgumentParser(prog="lmforge")
    cli_align.add_verbs(parser.add_subparsers())
    text = parser._subparsers._group_actions[0].choices["grpo"].format_help()
    for flag in ("--grpo.kl_beta", "--grpo.on_reward_error", "--grpo.iterations", "--lora.rank", "--data.val_file"):
        assert flag in text
    assert "k3 KL penalty" in text
