"""`lmforge reward | dpo | grpo` as a user runs them: recipes, one-line errors, an end-to-end run."""

from __future__ import annotations

import logging
import subprocess
from pathlib import Path

import pytest
import yaml

from _helpers import run_cli as lmforge_cli
from _helpers import write_jsonl
from lmforge.cli.main import build_parser
from lmforge.train.align import DPO_SECTIONS, REWARD_SECTIONS
from lmforge.train.grpo import GRPO_SECTIONS
from lmforge.train.setup import FinetuneConfig, read_recipe

CONFIGS = Path(__file__).parents[2] / "configs"
METHODS = {"reward": REWARD_SECTIONS, "dpo": DPO_SECTIONS, "grpo": GRPO_SECTIONS}


def assert_one_line_error(out: subprocess.CompletedProcess, needle: str) -> None:
    """Exit status 2 and the error as the last line of stderr (a progress bar may come before it)."""
    assert out.returncode == 2, out.stderr
    error = out.stderr[out.stderr.find("lmforge: error:"):]
    assert out.stderr.find("lmforge: error:") >= 0 and error.count("\n") == 1, out.stderr
    assert needle in error, out.stderr


@pytest.mark.parametrize("path", sorted(p for m in METHODS for p in CONFIGS.glob(f"{m}-*.yaml")), ids=lambda p: p.name)
def test_configs_are_valid_recipes(path, caplog):
    method = path.name.split("-")[0]
    with caplog.at_level(logging.WARNING):
        finetune, data, *_ = read_recipe(yaml.safe_load(path.read_text()), METHODS[method])
    assert isinstance(finetune, FinetuneConfig) and finetune.base and data.train
    assert "deprecated" not in caplog.text  # the shipped recipes use today's keys


def test_old_recipe_keys_still_work_with_a_one_line_warning(caplog):
    old = {"dpo": {"base": "runs/sft", "beta": 0.2}, "data": {"train_file": "p.jsonl", "val_file": "v.jsonl",
                                                            "val_fraction": 0.1, "max_len": 64}}
    with caplog.at_level(logging.WARNING):
        finetune, data, dpo, *_ = read_recipe(old, DPO_SECTIONS)
    assert (finetune.base, dpo.beta) == ("runs/sft", 0.2)
    assert (data.train, data.eval, data.eval_fraction, data.seq_len) == ("p.jsonl", "v.jsonl", 0.1, 64)
    warnings = [r.getMessage() for r in caplog.records]
    assert len(warnings) == 5 and all("\n" not in w for w in warnings)
    assert "recipe key dpo.base is deprecated; use finetune.base" in warnings
    assert "recipe key data.max_len is deprecated; use data.seq_len" in warnings
    finetune, _, head, *_ = read_recipe({"reward": {"base": "b", "pooling": "mean"}}, REWARD_SECTIONS)  # a whole section moves
    assert (finetune.base, head.pooling) == ("b", "mean")
    finetune, *_ = read_recipe({"finetune": None, "dpo": {"base": "old"}}, DPO_SECTIONS)  # `finetune:` left empty in YAML
    assert finetune.base == "old"
    finetune, *_ = read_recipe({"finetune": {"base": "new"}, "dpo": {"base": "old"}}, DPO_SECTIONS)
    assert finetune.base == "new"  # today's key wins over the old one


def test_unknown_section_is_one_line():
    with pytest.raises(Exception, match=r"unknown sections \['dpoo'\]"):
        read_recipe({"dpoo": {"beta": 1}}, DPO_SECTIONS)


def test_empty_preference_file_is_one_line(tiny_lm_dir, tmp_path):
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n")
    out = lmforge_cli("dpo", "--finetune.base", tiny_lm_dir, "--data.train", empty, "--out-dir", tmp_path / "run")
    assert_one_line_error(out, f"{empty} holds no preference pairs")


def test_reward_function_that_does_not_import_is_one_line(tiny_lm_dir, tmp_path):
    out = lmforge_cli("grpo", "--finetune.base", tiny_lm_dir, "--grpo.reward_functions", '["no_such_rewards:score"]',
                      "--data.train", tmp_path / "prompts.jsonl", "--out-dir", tmp_path / "run")
    assert_one_line_error(out, "reward function 'no_such_rewards:score': cannot import no_such_rewards (ModuleNotFoundError")


def test_reward_function_that_raises_names_the_prompt(tiny_lm_dir, tmp_path):
    (tmp_path / "strict.py").write_text("def score(prompt, completion):\n    raise KeyError(prompt)\n")
    prompts = write_jsonl(tmp_path / "prompts.jsonl", [{"prompt": "2+2="}, {"prompt": "3+3="}])
    out = lmforge_cli("grpo", "--finetune.base", tiny_lm_dir, "--grpo.reward_functions", '["strict:score"]',
                      "--grpo.group_size", 2, "--grpo.prompts_per_rollout", 1, "--grpo.max_new_tokens", 2,
                      "--train.batch_size", 2, "--train.steps", 1, "--data.train", prompts,
                      "--data.eval_fraction", 0, "--out-dir", tmp_path / "run", cwd=tmp_path)  # `strict` imports from here
    assert_one_line_error(out, "reward function strict:score raised KeyError")
    assert f"on the prompt at {prompts} line " in out.stderr and "on_reward_error skip" in out.stderr


def test_reward_verb_end_to_end_with_the_config(tiny_lm_dir, prefs_file, tmp_path):
    out = lmforge_cli("reward", "--config", CONFIGS / "reward-tiny.yaml", "--finetune.base", tiny_lm_dir,
                      "--data.train", prefs_file, "--data.seq_len", 0, "--train.steps", 3, "--train.batch_size", 4,
                      "--train.eval_every", 0, "--train.save_every", 0, "--out-dir", tmp_path / "rm")
    assert out.returncode == 0, out.stderr
    assert f"{prefs_file}: 24 rows, 24 pairs kept" in out.stdout and "done: 3 steps" in out.stdout
    assert "eval_accuracy" in out.stdout and (tmp_path / "rm" / "head.json").is_file()


def test_old_flags_still_work_with_a_warning(tiny_lm_dir, tmp_path):
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n")
    out = lmforge_cli("dpo", "--dpo.base", tiny_lm_dir, "--data.train_file", empty, "--out-dir", tmp_path / "run")
    assert_one_line_error(out, f"{empty} holds no preference pairs")  # the old flags reached the data
    assert "recipe key dpo.base is deprecated; use finetune.base" in out.stderr
    assert "recipe key data.train_file is deprecated; use data.train" in out.stderr


def test_help_documents_the_keys():
    parser = build_parser(["grpo"])
    text = parser._subparsers._group_actions[0].choices["grpo"].format_help()
    for flag in ("--grpo.kl_beta", "--grpo.on_reward_error", "--grpo.iterations", "--lora.rank", "--data.eval",
                 "--finetune.base", "--data.eval_fraction"):
        assert flag in text
    assert "k3 KL penalty" in text
    assert "--data.val_file" not in text and "--grpo.base" not in text  # old names are accepted, not advertised
