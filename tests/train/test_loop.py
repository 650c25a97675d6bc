"""The training loop in one process: schedule, accumulation, guard, eval, outputs, callbacks."""

from __future__ import annotations

import gc
import importlib.util
import io
import json
import logging
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from _ddp_script import ToyLM, ToyLoader, causal_lm, eval_batches, make_batch, save_toy_model
from torch import Tensor, nn

from lmforge.errors import LmforgeError
from lmforge.train import report
from lmforge.train.loop import (
    ObjectiveOutput,
    TrainConfig,
    TrainResult,
    build_optimizer,
    decay_param_groups,
    evaluate_objective,
    lr_at,
    scale_and_clip_,
    train,
)
from lmforge.train.monitor import LossSpikeDetector, NonFiniteGuard
from lmforge.train.report import Callback, LossPlot, ProgressBar, StopTraining, read_metrics


def small_cfg(**overrides: object) -> TrainConfig:
    base = dict(steps=6, lr=1e-2, min_lr=1e-3, warmup_steps=1, eval_every=3, eval_batches=2, save_every=2,
                keep_last=1, log_every=1, seed=0)
    return TrainConfig(**{**base, **overrides})


def train_records(out: Path) -> list[dict]:
    return [r for r in read_metrics(out / "metrics.jsonl") if r["kind"] == "train"]


# ---------------------------------------------------------------------------- schedule and config


def test_lr_schedule_values() -> None:
    cfg = TrainConfig(steps=110, lr=1.0, min_lr=0.1, warmup_steps=10, schedule="cosine")
    assert lr_at(0, cfg) == pytest.approx(0.1)
    assert lr_at(4, cfg) == pytest.approx(0.5)
    assert lr_at(9, cfg) == pytest.approx(1.0)
    assert lr_at(10, cfg) == pytest.approx(1.0)
    assert lr_at(10 + 99 // 2, cfg) == pytest.approx(0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * 49 / 99)))
    assert lr_at(109, cfg) == pytest.approx(0.1)
    assert lr_at(500, cfg) == pytest.approx(0.1)
    linear = TrainConfig(steps=110, lr=1.0, min_lr=0.1, warmup_steps=10, schedule="linear")
    assert lr_at(10 + 33, linear) == pytest.approx(1.0 - 0.9 * 33 / 99)
    constant = TrainConfig(steps=110, lr=1.0, min_lr=0.1, warmup_steps=0, schedule="constant")
    assert [lr_at(s, constant) for s in (0, 50, 109)] == [1.0, 1.0, 1.0]


@pytest.mark.parametrize(
    ("field", "value"),
    [("steps", 0), ("grad_accum", 0), ("lr", 0.0), ("min_lr", 1.0), ("schedule", "step"), ("precision", "fp16"),
     ("beta2", 1.0), ("grad_clip", -1.0), ("max_bad_steps", 0), ("bytes_per_token", 0.0), ("log_every", 0)],
)
def test_config_rejects_bad_values(field: str, value: object) -> None:
    with pytest.raises(LmforgeError, match=f"train.{field} must be"):
        TrainConfig(**{field: value})


# ---------------------------------------------------------------------------- optimizer


def test_decay_groups_and_frozen_params() -> None:
    model = ToyLM()
    groups = decay_param_groups(model, 0.1)
    assert {id(p) for p in groups[0]["params"]} == {id(model.emb.weight), id(model.fc.weight), id(model.head.weight)}
    assert all(p.dim() == 1 for p in groups[1]["params"]) and groups[1]["weight_decay"] == 0.0
    model.emb.weight.requires_grad_(False)
    model.fc.requires_grad_(False)
    optimizer = build_optimizer(model, small_cfg())
    in_optimizer = {id(p) for g in optimizer.param_groups for p in g["params"]}
    assert in_optimizer == {id(p) for p in model.parameters() if p.requires_grad}
    model.requires_grad_(False)
    with pytest.raises(LmforgeError, match="no trainable parameters"):
        build_optimizer(model, small_cfg())


class SliceLoader:
    """Hands out fixed global batches in `parts` consecutive row slices."""

    def __init__(self, batches: list[dict[str, Tensor]], parts: int) -> None:
        self.batches, self.parts, self.i = batches, parts, 0

    def next_batch(self) -> dict[str, Tensor]:
        batch, part = self.batches[self.i // self.parts], self.i % self.parts
        self.i += 1
        rows = batch["input_ids"].shape[0] // self.parts
        return {k: v[part * rows:(part + 1) * rows] for k, v in batch.items()}

    def state_dict(self) -> dict:
        return {"i": self.i}

    def load_state_dict(self, d: dict) -> None:
        self.i = d["i"]


def test_accumulation_equals_one_big_batch(tmp_path: Path) -> None:
    gen = np.random.default_rng(5)
    batches = [make_batch(gen, 8) for _ in range(3)]
    weights = []
    for accum in (1, 4):
        torch.manual_seed(0)
        model = ToyLM(dropout=0.0).double()
        cfg = small_cfg(steps=3, grad_accum=accum, grad_clip=0.5, eval_every=0, save_every=0)
        result = train(model, causal_lm, SliceLoader(batches, accum), cfg, tmp_path / f"a{accum}",
                       save_model=save_toy_model)
        weights.append((result, model.state_dict()))
    (big, big_w), (acc, acc_w) = weights
    assert acc.final_train_loss == pytest.approx(big.final_train_loss, rel=1e-12)
    for name in big_w:
        torch.testing.assert_close(acc_w[name], big_w[name], rtol=1e-12, atol=1e-12)
    big_norms = [r["grad_norm"] for r in train_records(tmp_path / "a1")]
    acc_norms = [r["grad_norm"] for r in train_records(tmp_path / "a4")]
    assert acc_norms == pytest.approx(big_norms, rel=1e-12)


# ---------------------------------------------------------------------------- non-finite guard


def nan_at(steps: set[int]):
    calls = {"n": 0}

    def objective(model: nn.Module, batch: dict[str, Tensor]) -> ObjectiveOutput:
        calls["n"] += 1
        out = causal_lm(model, batch)
        if calls["n"] in steps:
            out.loss_sum = out.loss_sum * float("nan")
        return out

    return objective


def test_non_finite_step_is_skipped(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    torch.manual_seed(0)
    model = ToyLM(dropout=0.0)
    seen: list[dict[str, Tensor]] = []

    class Snapshot(Callback):
        def on_step(self, step: int, metrics: dict[str, float]) -> None:
            seen.append({k: v.clone() for k, v in model.state_dict().items()})

    with caplog.at_level(logging.WARNING):
        result = train(model, nan_at({3}), ToyLoader(4), small_cfg(eval_every=0), tmp_path,
                       save_model=save_toy_model, callbacks=[Snapshot()])
    assert result.step == 6 and math.isfinite(result.final_train_loss)
    records = train_records(tmp_path)
    assert [r["skipped"] for r in records] == [False, False, True, False, False, False]
    assert records[2]["loss"] is None  # NaN is written as null
    assert all(torch.equal(seen[1][k], seen[2][k]) for k in seen[1])  # step 3 changed nothing
    assert not torch.equal(seen[2]["head.weight"], seen[3]["head.weight"])
    assert "not finite" in caplog.text


def test_consecutive_non_finite_steps_stop_the_run(tmp_path: Path) -> None:
    torch.manual_seed(0)
    cfg = small_cfg(steps=20, max_bad_steps=3, save_every=2, eval_every=0)
    with pytest.raises(LmforgeError, match=r"not finite for 3 consecutive steps at step 7; lower the learning rate") as err:
        train(ToyLM(), nan_at({5, 6, 7}), ToyLoader(4), cfg, tmp_path, save_model=save_toy_model)
    assert str(err.value).endswith("step_0000004)")
    assert [p.name for p in (tmp_path / "checkpoints").iterdir()] == ["step_0000004"]  # not pruned by step 6
    assert not (tmp_path / "train_state.json").exists()  # no final checkpoint from a broken run


def test_guard_and_monitor_helpers() -> None:
    guard = NonFiniteGuard(max_bad_steps=2)
    assert guard.check(1.0, 1.0, 1, None)
    assert not guard.check(math.nan, 1.0, 2, None)
    assert guard.check(1.0, 2.0, 3, None) and guard.consecutive == 0
    assert not guard.check(1.0, math.inf, 4, None)
    with pytest.raises(LmforgeError, match=r"2 consecutive steps at step 5.*none was written yet"):
        guard.check(math.nan, math.nan, 5, None)

    detector = LossSpikeDetector(window=10, threshold=3.0, min_history=5)
    assert not any(detector.update(2.0 + 0.01 * (i % 3)) for i in range(10))
    assert detector.update(5.0)
    assert not detector.update(2.01)
    restored = LossSpikeDetector(window=10, threshold=3.0, min_history=5)
    restored.load_state_dict(json.loads(json.dumps(detector.state_dict())))
    assert restored.history == detector.history


# ---------------------------------------------------------------------------- evaluation


def test_evaluate_objective_is_token_weighted() -> None:
    def objective(model: nn.Module, batch: dict[str, Tensor]) -> ObjectiveOutput:
        n = int(batch["n"])
        return ObjectiveOutput(loss_sum=torch.tensor(float(batch["loss"]) * n), n_targets=n, metrics={"acc": 1.0})

    batches = [{"n": torch.tensor(1), "loss": torch.tensor(1.0)}, {"n": torch.tensor(3), "loss": torch.tensor(3.0)}]
    metrics = evaluate_objective(nn.Linear(1, 1), objective, batches, bytes_per_token=4.0)
    assert metrics["eval_loss"] == pytest.approx(2.5)  # (1*1 + 3*3) / 4, not (1 + 3) / 2
    assert metrics["eval_ppl"] == pytest.approx(math.exp(2.5))
    assert metrics["eval_bpb"] == pytest.approx(2.5 / math.log(2) / 4.0)
    assert metrics["eval_acc"] == pytest.approx(1.0) and metrics["eval_tokens"] == 4
    assert evaluate_objective(nn.Linear(1, 1), objective, batches, max_batches=1)["eval_loss"] == pytest.approx(1.0)
    with pytest.raises(LmforgeError, match="no target tokens"):
        evaluate_objective(nn.Linear(1, 1), objective, [])


# ---------------------------------------------------------------------------- outputs and callbacks


class Recorder(Callback):
    def __init__(self, stop_at: int = 0) -> None:
        self.events: list[tuple] = []
        self.stop_at = stop_at

    def on_train_start(self, start_step: int, cfg: TrainConfig) -> None:
        self.events.append(("start", start_step))

    def on_step(self, step: int, metrics: dict[str, float]) -> None:
        self.events.append(("step", step))
        if step == self.stop_at:
            raise StopTraining

    def on_eval(self, step: int, metrics: dict[str, float]) -> None:
        self.events.append(("eval", step))

    def on_save(self, step: int, path: Path) -> None:
        self.events.append(("save", step, path))

    def on_train_end(self, result: TrainResult) -> None:
        self.events.append(("end", result.step))


def test_run_outputs_and_callbacks(tmp_path: Path) -> None:
    torch.manual_seed(0)
    recorder, stream = Recorder(), io.StringIO()
    cfg = small_cfg(bytes_per_token=3.5, log_every=2)
    result = train(ToyLM(), causal_lm, ToyLoader(4), cfg, tmp_path, make_eval_batches=eval_batches,
                   save_model=save_toy_model, callbacks=[recorder, ProgressBar(cfg.steps, file=stream)])
    assert result.step == 6 and not result.stopped_early and result.out_dir == tmp_path
    assert set(result.final_eval) >= {"eval_loss", "eval_ppl", "eval_bpb", "eval_mask_fraction"}
    kinds = [e[0] if e[0] != "save" else ("save", e[1]) for e in recorder.events]
    assert kinds == ["start", "step", "step", ("save", 2), "step", "eval", "step", ("save", 4), "step", "step",
                     "eval", ("save", 6), "end"]
    assert recorder.events[-2][2] == tmp_path

    records = read_metrics(tmp_path / "metrics.jsonl")
    assert [(r["kind"], r["step"]) for r in records] == [("train", 2), ("eval", 3), ("train", 4), ("train", 6),
                                                          ("eval", 6)]
    assert {"loss", "lr", "grad_norm", "tokens_per_s", "step_time_s", "mask_fraction"} <= set(records[0])
    assert records[-1]["eval_loss"] == result.final_eval["eval_loss"]
    assert (tmp_path / "loss.png").read_bytes()[:4] == b"\x89PNG"
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["step_0000004"]  # keep_last=1
    assert {"config.json", "model.safetensors", "train_state.json", "train_state.safetensors"} <= {
        p.name for p in tmp_path.iterdir()}
    assert "loss=" in stream.getvalue() and "6/6" in stream.getvalue()


def test_loss_plot_is_redrawn_at_most_every_interval_and_at_the_end(tmp_path: Path, monkeypatch) -> None:
    """A small model evaluates every few seconds; each drawing costs ~0.1 s (benchmarks/shakespeare.py)."""
    clock = [100.0]
    monkeypatch.setattr(report.time, "monotonic", lambda: clock[0])
    plot = LossPlot(tmp_path / "loss.png", interval_s=30.0)
    plot.update([[1, 2.0]], [])
    assert not plot.path.exists()  # the first drawing waits an interval too
    clock[0] += 30.0
    plot.update([[1, 2.0]], [[1, 2.1]])
    assert plot.path.read_bytes()[:4] == b"\x89PNG"
    plot.path.unlink()
    clock[0] += 29.0
    plot.update([[1, 2.0], [2, 1.9]], [[1, 2.1]])
    assert not plot.path.exists()  # drawn 29 s ago
    plot.update([[1, 2.0], [2, 1.9]], [[1, 2.1]], final=True)
    assert plot.path.read_bytes()[:4] == b"\x89PNG"


def test_the_heap_alive_at_the_start_is_frozen_during_the_run_only(tmp_path: Path) -> None:
    """The garbage collector skips the objects alive at the start while training, and only then."""
    counts: list[int] = []

    class Count(Callback):
        def on_step(self, step: int, metrics: dict[str, float]) -> None:
            counts.append(gc.get_freeze_count())

    train(ToyLM(), causal_lm, ToyLoader(4), small_cfg(steps=2), tmp_path, save_model=save_toy_model, callbacks=[Count()])
    assert min(counts) > 1000 and gc.get_freeze_count() == 0


def test_callback_can_stop_training(tmp_path: Path) -> None:
    torch.manual_seed(0)
    result = train(ToyLM(), causal_lm, ToyLoader(4), small_cfg(steps=50), tmp_path, save_model=save_toy_model,
                   callbacks=[Recorder(stop_at=3)])
    assert result.stopped_early and result.step == 3
    assert json.loads((tmp_path / "train_state.json").read_text())["step"] == 3


def test_bfloat16_autocast_on_cpu(tmp_path: Path) -> None:
    torch.manual_seed(0)
    result = train(ToyLM(), causal_lm, ToyLoader(4), small_cfg(steps=2, precision="bfloat16"), tmp_path,
                   make_eval_batches=eval_batches, save_model=save_toy_model)
    assert math.isfinite(result.final_train_loss) and math.isfinite(result.final_eval["eval_loss"])


def test_tensorboard_missing_is_a_warning(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    if importlib.util.find_spec("tensorboard") is not None:
        pytest.skip("tensorboard is installed")
    torch.manual_seed(0)
    with caplog.at_level(logging.WARNING):
        train(ToyLM(), causal_lm, ToyLoader(4), small_cfg(steps=1, tensorboard=True), tmp_path,
              save_model=save_toy_model)
    assert "tensorboard is not installed" in caplog.text


@pytest.mark.parametrize("max_norm", [0.05, 1e3, math.inf])  # clipped; not clipped; clipping off
def test_scale_and_clip_equals_mean_then_clip_grad_norm(max_norm: float) -> None:
    torch.manual_seed(0)
    ours, ref = ToyLM(dropout=0.0), ToyLM(dropout=0.0)
    ref.load_state_dict(ours.state_dict())
    ids = torch.randint(0, 16, (2, 6))
    for model in (ours, ref):
        model(ids).square().sum().backward()
    next(ours.parameters()).grad = None  # a parameter without a gradient is left alone
    next(ref.parameters()).grad = None
    norm = scale_and_clip_(ours.parameters(), 0.25, max_norm)
    for p in ref.parameters():
        if p.grad is not None:
            p.grad.mul_(0.25)
    ref_norm = torch.nn.utils.clip_grad_norm_(ref.parameters(), max_norm)
    assert float(norm) == pytest.approx(float(ref_norm), rel=1e-6)
    for a, b in zip(ours.parameters(), ref.parameters()):
        assert (a.grad is None) == (b.grad is None)
        if a.grad is not None:
            torch.testing.assert_close(a.grad, b.grad, rtol=1e-6, atol=1e-9)


def test_a_step_waits_for_the_device_once_whatever_the_accumulation(tmp_path: Path, monkeypatch) -> None:
    """Every host read (item, tolist, float, bool of a tensor) stalls a GPU's queue; a step takes one."""
    reads: list[str] = []

    def counting(name: str):
        original = getattr(Tensor, name)

        def read(self: Tensor, *args: object) -> object:
            reads.append(name)
            return original(self, *args)

        return read

    for name in ("item", "tolist", "__float__", "__bool__"):
        monkeypatch.setattr(Tensor, name, counting(name))
    marks: list[int] = []

    class Mark(Callback):
        def on_step(self, step: int, metrics: dict[str, float]) -> None:
            marks.append(len(reads))

    train(ToyLM(dropout=0.0), causal_lm, ToyLoader(4),
          small_cfg(steps=4, grad_accum=3, eval_every=0, save_every=0, log_every=100),
          tmp_path, save_model=save_toy_model, callbacks=[Mark()])
    assert np.diff(marks).tolist() == [1, 1, 2], reads  # the last step logs: its health record is one more read
