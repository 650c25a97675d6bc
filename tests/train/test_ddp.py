"""DDP: two torchrun processes on CPU (gloo) train exactly like one process with the same global batch."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from _ddp_script import assert_same_run, finish, run_toy, torchrun

from lmforge.train.distributed import DistInfo, gather_json, init_distributed, unwrap_model, wrap_model
from lmforge.train.report import read_metrics


def test_single_process_helpers() -> None:
    info = init_distributed(device="cpu")
    assert info == DistInfo(rank=0, world_size=1, local_rank=0, device=torch.device("cpu"))
    assert info.is_main and not info.is_distributed
    model = torch.nn.Linear(2, 2)
    assert wrap_model(model, info) is model and unwrap_model(model) is model
    assert gather_json({"a": 1}, info) == [{"a": 1}]


def test_two_ranks_match_one_process(tmp_path: Path) -> None:
    ddp = torchrun(tmp_path / "ddp", "--steps", "4", "--global-batch", "8", "--grad-accum", "2", "--dropout", "0",
                   "--save-every", "2", "--eval-every", "2")
    single = run_toy(tmp_path / "single", steps=4, global_batch=8, grad_accum=2, dropout=0.0, save_every=2,
                     eval_every=2)  # while the two ranks start up
    finish(ddp)
    assert_same_run(tmp_path / "ddp", tmp_path / "single", 1e-6)
    single_records = read_metrics(tmp_path / "single" / "metrics.jsonl")
    assert single.step == 4 and single_records[-1]["eval_loss"] == single.final_eval["eval_loss"]
    # One loader position per rank is saved, so the run can be resumed with two processes.
    state = json.loads((tmp_path / "ddp" / "train_state.json").read_text())
    assert state["world_size"] == 2 and len(state["loader"]) == len(state["rng"]) == 2
