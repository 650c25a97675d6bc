"""The health record: per-layer gradient norms and update ratios, expert load, attention entropy in metrics.jsonl."""

from __future__ import annotations

import math

import pytest
import torch

from health_runs import run, tiny_model
from lmforge.train.health import HealthRecorder, layer_of
from lmforge.train.loop import scale_and_clip_
from lmforge.train.report import read_metrics


def test_parameter_names_map_to_layers() -> None:
    assert layer_of("embed.weight") == "embeddings" and layer_of("positions.weight") == "embeddings"
    assert layer_of("layers.3.attn.q.weight") == "block.3" and layer_of("base.layers.0.mlp.up.weight") == "block.0"
    assert layer_of("lm_head.weight") == "head" and layer_of("norm.weight") == "head"
    assert layer_of("base.embed.weight") == "embeddings" and layer_of("base.pooler.weight") == "head"


@pytest.mark.parametrize("clip", [0.0, 1e-3])
def test_layer_norms_add_up_to_the_total_and_undo_clipping(clip: float) -> None:
    model = tiny_model()
    params = list(model.parameters())
    recorder = HealthRecorder(model, params)
    assert recorder.groups == ["embeddings", "block.0", "block.1", "head"]
    ids = torch.randint(0, 64, (2, 12))
    model(ids, labels=ids).backward()
    expected = {g: math.sqrt(sum(float(p.grad.norm()) ** 2 for n, p in model.named_parameters() if layer_of(n) == g))
                for g in recorder.groups}
    total = float(scale_and_clip_(params, 1.0, clip or math.inf))
    before = recorder.snapshot()
    weights = [p.detach().clone() for p in params]
    with torch.no_grad():
        for p in params:
            p.add_(torch.randn_like(p), alpha=1e-3)  # a stand-in for the optimizer step
    record = recorder.measure(before, total, clip)
    assert record["clipped"] is (clip > 0)
    assert record["layer_grad_norm"] == pytest.approx(expected, rel=1e-4)
    assert math.sqrt(sum(v**2 for v in record["layer_grad_norm"].values())) == pytest.approx(total, rel=1e-4)
    block0 = [(w, p) for w, (n, p) in zip(weights, model.named_parameters(), strict=True) if layer_of(n) == "block.0"]
    change = math.sqrt(sum(float((p.detach() - w).norm()) ** 2 for w, p in block0))
    size = math.sqrt(sum(float(p.detach().norm()) ** 2 for _, p in block0))
    assert record["layer_update_ratio"]["block.0"] == pytest.approx(change / size, rel=1e-4)


def test_expert_tokens_count_every_routed_token() -> None:
    model = tiny_model("tiny-mixtral")
    recorder = HealthRecorder(model, list(model.parameters()))
    model(torch.randint(0, 64, (2, 10)))
    load = recorder.expert_load()["expert_tokens"]
    assert len(load) == 2 and all(len(layer) == 4 and sum(layer) == 2 * 10 * 2 for layer in load)


def test_the_loop_writes_the_health_record(tmp_path, one_thread) -> None:
    out = run(tmp_path / "run", tiny_model("tiny-mixtral"), steps=6, log_every=3, eval_every=3)
    records = read_metrics(out / "metrics.jsonl")
    train = [r for r in records if r["kind"] == "train"]
    evals = [r for r in records if r["kind"] == "eval"]
    assert [r["step"] for r in train] == [3, 6] and all("lr" in r for r in train)
    assert set(train[0]["layer_grad_norm"]) == {"embeddings", "block.0", "block.1", "head"}
    assert all(v > 0 for r in train for v in r["layer_update_ratio"].values())
    assert all(sum(layer) == 8 * 32 * 2 for layer in train[-1]["expert_tokens"])
    assert [len(layer) for layer in evals[-1]["attn_entropy"]] == [4, 4]
    assert all(0 < h <= 1 for layer in evals[-1]["attn_entropy"] for h in layer)
