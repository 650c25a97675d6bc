"""GRPO: reward functions and their failures, the rollout loader, a short run with exact resume."""

from __future__ import annotations

import json
import logging
import math
import re

import pytest
import torch

import lmforge
from _helpers import quick_train, write_jsonl
from lmforge.data import IGNORE_INDEX
from lmforge.data.preference import PromptRow
from lmforge.errors import LmforgeError
from lmforge.train import grpo as grpo_module
from lmforge.train.distributed import DistInfo
from lmforge.train.grpo import GrpoConfig, RewardFunction, Rewards, RolloutLoader, run_grpo
from lmforge.train.loop import TrainConfig
from lmforge.train.objectives import grpo
from lmforge.train.report import read_metrics
from lmforge.train.setup import FinetuneConfig, load_base

REWARDS_PY = '''
import math

def has_digit(prompt, completion):
    return any(c.isdigit() for c in completion)

def exact(prompt, completion, answer):
    return float(completion.strip() == answer)

def every_field(prompt, completion, **fields):
    return float(len(fields))

def flaky(prompt, completion):
    if prompt.startswith("2"):
        raise ValueError("cannot parse\\nsecond line")
    return 1.0

def wordy(prompt, completion):
    return "abc"

def undefined(prompt, completion):
    return math.nan
'''

ROWS = [PromptRow("1+1=", {"answer": "2", "id": 7}, "p.jsonl line 1"), PromptRow("2+2=", {"answer": "4"}, "p.jsonl line 2")]


@pytest.fixture
def rewards_py(tmp_path):
    path = tmp_path / "my_rewards.py"
    path.write_text(REWARDS_PY)
    return path


@pytest.mark.parametrize(("spec", "needle"), [
    ("no_such_module_xyz:f", "cannot import no_such_module_xyz (ModuleNotFoundError"),
    ("{file}:missing", "has no function 'missing'"),
    ("just_a_name", "is not 'module:function'"),
    ("{dir}/absent.py:f", "absent.py does not exist"),
    ("{dir}/broken.py:f", "cannot import .*broken.py (SyntaxError"),
])
def test_bad_reward_function_paths_are_one_line(rewards_py, spec, needle):
    (rewards_py.parent / "broken.py").write_text("def f(:\n")
    with pytest.raises(LmforgeError, match=needle.replace("(", r"\(")) as info:
        RewardFunction.load(spec.format(file=rewards_py, dir=rewards_py.parent))
    assert "\n" not in str(info.value)


def test_module_names_import_from_the_working_folder(rewards_py, monkeypatch):
    monkeypatch.chdir(rewards_py.parent)
    assert RewardFunction.load("my_rewards:has_digit")(ROWS[0], "it is 2") == 1.0


def test_row_fields_reach_the_functions_that_name_them(rewards_py):
    exact, every, plain = (RewardFunction.load(f"{rewards_py}:{name}") for name in ("exact", "every_field", "has_digit"))
    assert exact(ROWS[0], " 2") == 1.0 and exact(ROWS[1], "5") == 0.0
    assert every(ROWS[0], "") == 2.0  # answer and id
    assert plain(ROWS[0], "none") == 0.0  # bool rewards count as numbers; no unexpected keywords


@pytest.mark.parametrize(("name", "problem"), [
    ("flaky", "raised ValueError: cannot parse on the prompt at p.jsonl line 2 ('2+2=')"),
    ("wordy", "returned 'abc' (str), not a number on the prompt at p.jsonl line 1"),
    ("undefined", "returned nan on the prompt at p.jsonl line 1"),
])
def test_failing_reward_functions_stop_or_skip(rewards_py, caplog, name, problem):
    function = RewardFunction.load(f"{rewards_py}:{name}")
    with pytest.raises(LmforgeError, match=re.escape(problem)) as info:
        Rewards([function], None, "stop").score(ROWS, ["2", "4"])
    assert "\n" not in str(info.value) and "on_reward_error skip" in str(info.value)
    with caplog.at_level(logging.WARNING):
        rewards, stats = Rewards([function], None, "skip").score(ROWS, ["2", "4"])
    assert problem in caplog.text and "leaving this prompt's group out of the step" in caplog.text
    assert rewards.isnan().any() and stats["reward_errors"] >= 1


def prompts_file(tmp_path, n: int = 12):
    return write_jsonl(tmp_path / "prompts.jsonl", [{"prompt": f"{i % 10}+1=", "answer": str(i % 10 + 1)} for i in range(n)])


def loader_for(tiny_lm_dir, rewards: Rewards, **cfg) -> RolloutLoader:
    model, tok = load_base(FinetuneConfig(base=str(tiny_lm_dir)))
    config = GrpoConfig(group_size=4, prompts_per_rollout=2, max_new_tokens=6, iterations=2, kl_beta=0.1, **cfg)
    rows = [PromptRow(f"{i}+1=", {"answer": str(i + 1)}, f"p line {i + 1}") for i in range(5)]
    reference = lmforge.load(tiny_lm_dir).model
    return RolloutLoader(model.train(), tok, rows, rewards, config, TrainConfig(batch_size=4, seed=3), reference=reference)


def test_rollout_loader_samples_groups_and_replays_them(tiny_lm_dir, rewards_py):
    loader = loader_for(tiny_lm_dir, Rewards([RewardFunction.load(f"{rewards_py}:has_digit")], None, "stop"))
    first = loader.next_batch()
    assert loader.model.training  # generation switched to eval mode and back
    assert first["input_ids"].shape[0] == 4 and first["advantages"].shape == (4,)
    out = grpo(clip_eps=0.2, kl_beta=0.1)(loader.model, first)
    assert out.metrics["clip_fraction"] == 0.0 and out.metrics["kl"] == pytest.approx(0.0, abs=1e-6)  # ratio 1, policy = reference
    stop = loader.tokenizer.eos_id
    for row, labels in zip(first["input_ids"], first["labels"]):
        reply = row[(labels != IGNORE_INDEX).nonzero()[:, 0] + 1].tolist()
        assert len(reply) == 6 or reply[-1] == stop  # ran to the limit, or stopped with its stop token kept
    state = json.loads(json.dumps(loader.state_dict()))  # mid-buffer, through JSON as in a checkpoint
    rest = [loader.next_batch() for _ in range(3)]  # 2 micro-batches x 2 iterations per buffer
    assert loader.rollouts_done == 1 and torch.equal(rest[1]["input_ids"], first["input_ids"])  # the second pass
    loader.next_batch()
    assert loader.rollouts_done == 2
    resumed = loader_for(tiny_lm_dir, loader.rewards)
    resumed.load_state_dict(state)
    again = resumed.next_batch()
    assert all(torch.equal(again[k], rest[0][k]) for k in rest[0])


def test_a_skipped_group_is_left_out_of_the_loss(tiny_lm_dir, rewards_py):
    loader = loader_for(tiny_lm_dir, Rewards([RewardFunction.load(f"{rewards_py}:wordy")], None, "skip"))
    batch = loader.next_batch()
    assert (batch["labels"] == IGNORE_INDEX).all() and (batch["advantages"] == 0).all()
    assert math.isnan(loader.buffer.stats["reward_mean"]) and loader.buffer.stats["reward_errors"] == 8


def grpo_recipe(base, prompts, rewards_py, out, steps: int) -> dict:
    return {"finetune": {"base": str(base)},
            "grpo": {"reward_functions": [f"{rewards_py}:has_digit"], "group_size": 4, "prompts_per_rollout": 2,
                     "max_new_tokens": 6, "kl_beta": 0.1},
            "data": {"train": str(prompts), "eval_fraction": 0.25}, "lora": {"rank": 4},
            "train": quick_train(steps), "out_dir": str(out)}


def test_grpo_refuses_to_shard_the_policy_it_samples_from(tiny_lm_dir, rewards_py, tmp_path, monkeypatch):
    two_ranks = DistInfo(rank=0, world_size=2, local_rank=0, device=torch.device("cpu"))  # no process group needed:
    monkeypatch.setattr(grpo_module, "init_distributed", lambda: two_ranks)  # the check comes before any collective
    recipe = grpo_recipe(tiny_lm_dir, prompts_file(tmp_path), rewards_py, tmp_path / "run", 1)
    with pytest.raises(LmforgeError, match=r"^grpo samples its rollouts .* every rank; train.parallel fsdp shards it: use --train.parallel ddp$"):
        run_grpo({**recipe, "train": {**recipe["train"], "parallel": "fsdp"}})


def test_grpo_run_logs_everything_and_resumes_mid_buffer_exactly(tiny_lm_dir, rewards_py, tmp_path):
    prompts = prompts_file(tmp_path)
    whole = run_grpo(grpo_recipe(tiny_lm_dir, prompts, rewards_py, tmp_path / "whole", 4))
    run_grpo(grpo_recipe(tiny_lm_dir, prompts, rewards_py, tmp_path / "split", 3))  # stops halfway through buffer 2
    split = run_grpo(grpo_recipe(tiny_lm_dir, prompts, rewards_py, tmp_path / "split", 4))
    assert split.train.step == whole.train.step == 4
    weights = [lmforge.load(tmp_path / name).model.state_dict() for name in ("whole", "split")]
    assert all(torch.equal(v, weights[1][k]) for k, v in weights[0].items())
    records = read_metrics(tmp_path / "whole" / "metrics.jsonl")
    train = [r for r in records if r["kind"] == "train"]
    assert {"reward_mean", "reward_std", "kl", "completion_len", "clip_fraction", "reward_errors"} <= set(train[0])
    assert "eval_reward_mean" in whole.train.final_eval
    assert (tmp_path / "whole" / "reward.png").stat().st_size > 1000
