"""Checkpoints and resume: atomic folders, discovery, train-state round trips, exact resume after SIGKILL."""

from __future__ import annotations

import json
import random
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from _ddp_script import ToyLM, ToyLoader, causal_lm, run_toy, save_toy_model
from safetensors.torch import load_file

from lmforge.errors import LmforgeError
from lmforge.train import checkpointing as ckpt
from lmforge.train.loop import TrainConfig, build_optimizer, train
from lmforge.train.report import read_metrics

SCRIPT = Path(__file__).with_name("_ddp_script.py")


def fake_checkpoint(folder: Path, step: int, complete: bool = True) -> None:
    folder.mkdir(parents=True)
    (folder / "model.safetensors").write_bytes(b"")
    if complete:
        (folder / ckpt.TRAIN_STATE_TENSORS).write_bytes(b"")
        (folder / ckpt.TRAIN_STATE_JSON).write_text(json.dumps({"step": step}))


def test_discovery_skips_tmp_and_incomplete_folders(tmp_path: Path) -> None:
    assert ckpt.find_resume_checkpoint(tmp_path) is None
    fake_checkpoint(ckpt.periodic_checkpoint_dir(tmp_path, 20), 20)
    fake_checkpoint(ckpt.periodic_checkpoint_dir(tmp_path, 10), 10)
    fake_checkpoint(tmp_path / "checkpoints" / "step_0000030.tmp", 30)
    fake_checkpoint(ckpt.periodic_checkpoint_dir(tmp_path, 40), 40, complete=False)
    assert ckpt.find_resume_checkpoint(tmp_path) == ckpt.periodic_checkpoint_dir(tmp_path, 20)
    (tmp_path / ckpt.TRAIN_STATE_TENSORS).write_bytes(b"")
    (tmp_path / ckpt.TRAIN_STATE_JSON).write_text(json.dumps({"step": 25}))
    assert ckpt.find_resume_checkpoint(tmp_path) == tmp_path  # the final checkpoint is newer

    assert ckpt.prune_checkpoints(tmp_path, keep_last=1) == [ckpt.periodic_checkpoint_dir(tmp_path, 10)]
    ckpt.remove_stale_tmp(tmp_path)
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["step_0000020", "step_0000040"]


def test_rng_state_round_trips_through_json() -> None:
    state = json.loads(json.dumps(ckpt.rng_state()))
    expected = (random.random(), np.random.rand(), torch.rand(3))
    random.random(), np.random.rand(), torch.rand(5)  # move every generator on
    ckpt.set_rng_state(state)
    got = (random.random(), np.random.rand(), torch.rand(3))
    assert got[:2] == expected[:2] and torch.equal(got[2], expected[2])


def test_optimizer_state_round_trips_through_safetensors(tmp_path: Path) -> None:
    torch.manual_seed(0)
    model, cfg = ToyLM(dropout=0.0), TrainConfig(steps=3, warmup_steps=0)
    optimizer = build_optimizer(model, cfg)
    batch = ToyLoader(4).next_batch()
    causal_lm(model, batch).loss_sum.backward()
    optimizer.step()
    tensors, meta = ckpt.optimizer_state_to_flat(optimizer, model)
    assert "optimizer.0.exp_avg" in tensors and meta["params"][0] == ["emb.weight", [23, 16]]
    fresh = build_optimizer(model, cfg)
    ckpt.load_optimizer_state(fresh, model, tmp_path, tensors, json.loads(json.dumps(meta)))
    for (a_param, a), (b_param, b) in zip(optimizer.state.items(), fresh.state.items()):
        assert a_param is b_param
        assert all(torch.equal(a[k], b[k]) for k in a)


def test_resume_with_a_different_model_names_the_tensor(tmp_path: Path) -> None:
    torch.manual_seed(0)
    cfg = TrainConfig(steps=2, warmup_steps=0, save_every=0, eval_every=0)
    train(ToyLM(dim=16), causal_lm, ToyLoader(4), cfg, tmp_path / "x", save_model=save_toy_model)
    with pytest.raises(LmforgeError, match=r"x was trained with a different model shape: .*emb.weight \(23, 16\)"):
        train(ToyLM(dim=8), causal_lm, ToyLoader(4), TrainConfig(steps=4, warmup_steps=0, resume=str(tmp_path / "x")),
              tmp_path / "y", save_model=save_toy_model)
    with pytest.raises(LmforgeError, match="does not exist"):
        train(ToyLM(), causal_lm, ToyLoader(4), TrainConfig(steps=4, resume=str(tmp_path / "nope")), tmp_path / "z",
              save_model=save_toy_model)
    model = ToyLM()
    del model.norm  # a checkpoint tensor the model lacks
    with pytest.raises(LmforgeError, match=r"x was trained with a different model shape: unexpected norm\.bias, norm\.weight"):
        ckpt.load_model_weights(model, tmp_path / "x")
    model = ToyLM()
    model.emb.weight.requires_grad_(False)  # a frozen tensor may be absent (a rebuilt LoRA base) ...
    ckpt.load_model_weights(model, tmp_path / "x")
    del model.norm.bias
    with pytest.raises(LmforgeError, match=r"unexpected norm\.bias"):  # ... an unknown one may not
        ckpt.load_model_weights(model, tmp_path / "x")


def test_resume_auto_continues_and_never_restarts(tmp_path: Path) -> None:
    first = run_toy(tmp_path, steps=4, dropout=0.0, eval_every=0)
    again = run_toy(tmp_path, steps=4, dropout=0.0, eval_every=0)  # finished: nothing to do
    assert again.step == 4 and again.final_train_loss == first.final_train_loss
    longer = run_toy(tmp_path, steps=6, dropout=0.0, eval_every=0)
    assert longer.step == 6
    assert [r["step"] for r in read_metrics(tmp_path / "metrics.jsonl") if r["kind"] == "train"] == list(range(1, 7))

    torch.manual_seed(0)
    cfg = TrainConfig(steps=2, warmup_steps=0, save_every=0, eval_every=0, log_every=1, resume="never")
    train(ToyLM(), causal_lm, ToyLoader(4), cfg, tmp_path, save_model=save_toy_model)
    assert not (tmp_path / "checkpoints").exists()
    assert [r["step"] for r in read_metrics(tmp_path / "metrics.jsonl")] == [1, 2]


def test_killed_run_resumes_bit_for_bit(tmp_path: Path) -> None:
    full, killed = tmp_path / "full", tmp_path / "killed"
    proc = subprocess.Popen([sys.executable, str(SCRIPT), "--out", str(killed), "--steps", "8", "--kill-after-save", "4"],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # the script's setting, so both processes compute alike
    try:
        run_toy(full, steps=8)  # the uninterrupted reference, while the subprocess runs
        output, _ = proc.communicate(timeout=120)
        assert proc.returncode == -signal.SIGKILL, output
        assert ckpt.is_complete(killed / "checkpoints" / "step_0000004")
        assert not (killed / ckpt.TRAIN_STATE_JSON).exists()
        # Debris an interrupted write could leave: neither may be taken for the newest checkpoint.
        fake_checkpoint(killed / "checkpoints" / "step_0000006.tmp", 6)
        fake_checkpoint(killed / "checkpoints" / "step_0000007", 7, complete=False)
        resumed = run_toy(killed, steps=8)  # a fresh model and loader, resume="auto"
    finally:
        torch.set_num_threads(threads)

    full_records, resumed_records = read_metrics(full / "metrics.jsonl"), read_metrics(killed / "metrics.jsonl")
    assert [(r["kind"], r["step"]) for r in resumed_records] == [(r["kind"], r["step"]) for r in full_records]
    for key in ("loss", "grad_norm", "lr", "eval_loss"):
        assert [r.get(key) for r in resumed_records] == [r.get(key) for r in full_records], key
    assert len({r["loss"] for r in full_records if r["kind"] == "train"}) == 8
    full_weights, resumed_weights = load_file(full / "model.safetensors"), load_file(killed / "model.safetensors")
    assert all(torch.equal(full_weights[k], resumed_weights[k]) for k in full_weights)
    full_opt = load_file(full / ckpt.TRAIN_STATE_TENSORS)
    resumed_opt = load_file(killed / ckpt.TRAIN_STATE_TENSORS)
    assert all(torch.equal(full_opt[k], resumed_opt[k]) for k in full_opt)
    assert resumed.step == 8 and not (killed / "checkpoints" / "step_0000006.tmp").exists()
