"""Memory planner: estimates against the measured peak of real steps, checkpointing, the verb and the refusal."""

from __future__ import annotations

import copy
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from lmforge.config import model_config, preset
from lmforge.diagnose import plan as planner
from lmforge.diagnose.plan import PlanRequest, plan_memory
from lmforge.models import build_model
from lmforge.models.layers import set_activation_checkpointing

SHAPES = [  # (model, batch, seq_len): a GQA LLaMA, a GPT-2 (learned positions, GELU), a long-sequence LLaMA
    ({"preset": "tiny-llama", "vocab_size": 2048, "dim": 64, "n_layers": 4, "n_heads": 4, "n_kv_heads": 2,
      "hidden_dim": 192, "max_seq_len": 512}, 8, 512),
    ({"preset": "tiny-gpt2", "vocab_size": 1024, "dim": 96, "n_layers": 3, "n_heads": 3, "hidden_dim": 384,
      "max_seq_len": 256}, 16, 256),
    ({"preset": "tiny-llama", "vocab_size": 512, "dim": 128, "n_layers": 2, "n_heads": 4, "n_kv_heads": 1,
      "hidden_dim": 256, "max_seq_len": 2048}, 2, 2048),
]


@pytest.fixture(scope="module")
def measured() -> list[int]:
    """Peak memory of a steady-state training step for each shape, checkpointing off then on (tests/diagnose/peak_rss.py)."""
    specs = [{"model": m, "batch_size": b, "seq_len": t, "activation_checkpointing": ac} for m, b, t in SHAPES for ac in (False, True)]
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "131072", "OMP_NUM_THREADS": "1",
           "PYTHONPATH": os.pathsep.join([str(Path(planner.__file__).parents[2]), os.environ.get("PYTHONPATH", "")])}
    out = subprocess.run([sys.executable, str(Path(__file__).with_name("peak_rss.py")), json.dumps(specs)],
                         capture_output=True, text=True, timeout=600, env=env)
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout)


@pytest.mark.parametrize("shape", range(len(SHAPES)))
def test_estimate_within_15_percent_of_measured_peak(measured, shape):
    model, batch, seq_len = SHAPES[shape]
    for i, checkpointed in enumerate((False, True)):
        plan = plan_memory(PlanRequest(model_config(model), batch, seq_len, activation_checkpointing=checkpointed))
        peak = measured[2 * shape + i]
        assert abs(plan.total / peak - 1) <= 0.15, (checkpointed, plan.total, peak)
    assert measured[2 * shape + 1] < 0.8 * measured[2 * shape]  # checkpointing lowers the measured peak


@pytest.mark.parametrize("name", ["tiny-llama", "tiny-gpt2", "tiny-mixtral", "tiny-bert"])
def test_checkpointing_gives_identical_gradients(name):
    torch.manual_seed(0)
    plain = build_model(preset(name, vocab_size=96, dropout=0.1)).train()
    checkpointed = copy.deepcopy(plain)
    set_activation_checkpointing(checkpointed)
    ids = torch.randint(0, 96, (2, 24))
    for model in (plain, checkpointed):
        torch.manual_seed(1)  # the same dropout masks: checkpointing replays the random state
        model(ids).float().square().mean().backward()
    for (name_, a), b in zip(plain.named_parameters(), checkpointed.parameters()):
        assert (a.grad is None and b.grad is None) or torch.equal(a.grad, b.grad), name_
    set_activation_checkpointing(checkpointed, False)
    assert not checkpointed.layers.checkpointed


def test_checkpointing_needs_lmforge_blocks():
    with pytest.raises(Exception, match="no lmforge block stack"):
        set_activation_checkpointing(torch.nn.Linear(2, 2))


def test_counts_match_the_built_model():
    from lmforge.train.lora import LoraConfig, apply_lora

    config = preset("tiny-llama", vocab_size=300)
    model = build_model(config)
    plan = plan_memory(PlanRequest(config, 2, 32), free=10**12, device="cpu")
    assert plan.n_params == sum(p.numel() for p in model.parameters())
    assert plan.optimizer == 2 * plan.gradients == 8 * plan.n_params
    lora = plan_memory(PlanRequest(config, 2, 32, lora_rank=4), free=10**12, device="cpu")
    apply_lora(model, LoraConfig(rank=4))
    assert lora.n_trainable == sum(p.numel() for p in model.parameters() if p.requires_grad)
    assert lora.total < plan.total
    qlora = plan_memory(PlanRequest(config, 2, 32, lora_rank=4, bits=4), free=10**12, device="cpu")
    assert qlora.weights < lora.weights
    assert plan.kv_cache_per_token == 2 * config.n_layers * config.n_kv_heads * config.head_dim * 4


def test_does_not_fit_gives_suggestions_that_help():
    request = PlanRequest(preset("tiny-llama", vocab_size=300), 16, 128)
    plan = plan_memory(request, free=plan_memory(request, free=10**12, device="cpu").total // 2, device="cpu")
    assert not plan.fits and "does NOT fit" in "\n".join(plan.lines())
    assert any("activation checkpointing" in s for s in plan.suggestions)
    assert any("grad_accum: 2" in s for s in plan.suggestions)
    assert any("(fits)" in s for s in plan.suggestions)


def test_bad_requests_are_one_line_errors():
    config = preset("tiny-llama", vocab_size=300)
    for kwargs, message in [({"bits": 4}, "add --lora"), ({"precision": "fp16"}, "precision must be"),
                            ({"batch_size": 0}, "must be >= 1")]:
        with pytest.raises(Exception, match=message):
            PlanRequest(**{"config": config, "batch_size": 2, "seq_len": 32, **kwargs})
    with pytest.raises(Exception, match="longer than the model's max_seq_len"):
        plan_memory(PlanRequest(config, 2, config.max_seq_len + 1))


def test_plan_cli(run_verb, tiny_lm_dir, tmp_path, recipe, capitals_jsonl):
    code, out, err = run_verb("plan", tiny_lm_dir, "--batch-size", 4, "--seq-len", 64, "--plot", tmp_path / "plan.png")
    assert code == 0, err
    assert "total at the peak of a step" in out and "verdict: fits" in out
    assert (tmp_path / "plan.png").read_bytes()[:4] == b"\x89PNG"
    path = tmp_path / "sft.yaml"
    path.write_text(yaml.safe_dump(recipe(tiny_lm_dir, capitals_jsonl, tmp_path / "run", data={"seq_len": 64},
                                          train={"activation_checkpointing": True})))
    code, out, err = run_verb("plan", "--config", path, "--plot", tmp_path / "plan2.png")
    assert code == 0, err
    assert "micro-batch 8 x 64 tokens" in out and "activations (checkpointing on)" in out
    for args, message in [((tmp_path / "nope",), "does not exist"), ((), "nothing to plan"),
                          (("--config", tmp_path / "missing.yaml"), "missing.yaml")]:
        code, _, err = run_verb("plan", *args, "--plot", tmp_path / "x.png")
        assert code == 2 and message in err and err.count("\n") == 1, err
    assert not (tmp_path / "x.png").exists()
    code, out, _ = run_verb("plan", "--help")
    assert code == 0 and "--activation-checkpointing" in out


def test_training_verb_refuses_a_run_that_cannot_fit(run_verb, monkeypatch, tiny_lm_dir, tmp_path, recipe, capitals_jsonl):
    monkeypatch.setattr(planner, "free_memory", lambda: ("cpu", 1_000_000))
    path = tmp_path / "sft.yaml"
    path.write_text(yaml.safe_dump(recipe(tiny_lm_dir, capitals_jsonl, tmp_path / "run")))
    code, _, err = run_verb("sft", "--config", path)
    assert code == 2 and err.count("\n") == 1, err
    assert "needs about" in err and "free on cpu" in err and "activation checkpointing" in err
    assert "train.check_memory: false" in err
    assert not (tmp_path / "run").exists()  # refused before anything was loaded or written
