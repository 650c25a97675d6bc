"""DDP: two torchrun processes on CPU (gloo) train exactly like one process with the same global batch."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import torch
from _ddp_script import run_toy
from safetensors.torch import load_file

from lmforge.train.distributed import DistInfo, gather_json, init_distributed, unwrap_model, wrap_model
from lmforge.train.report import read_metrics

SCRIPT = Path(__file__).with_name("_ddp_script.py")


def test_single_process_helpers() -> None:
    info = init_distributed(device="cpu")
    assert info == DistInfo(rank=0, world_size=1, local_rank=0, device=torch.device("cpu"))
    assert info.is_main and not info.is_distributed
    model = torch.nn.Linear(2, 2)
    assert wrap_model(model, info) is model and unwrap_model(model) is model
    assert gather_json({"a": 1}, info) == [{"a": 1}]


def test_two_ranks_match_one_process(tmp_path: Path) -> None:
    args = ["--steps", "4", "--global-batch", "8", "--grad-accum", "2", "--dropout", "0", "--save-every", "2",
            "--eval-every", "2"]
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    env["OMP_NUM_THREADS"] = "1"
    ddp = subprocess.Popen(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", str(SCRIPT),
         "--out", str(tmp_path / "ddp"), *args],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env,
    )
    single = run_toy(tmp_path / "single", steps=4, global_batch=8, grad_accum=2, dropout=0.0, save_every=2,
                     eval_every=2)  # while the two ranks start up
    output, _ = ddp.communicate(timeout=180)
    assert ddp.returncode == 0, output

    ddp_records, single_records = read_metrics(tmp_path / "ddp" / "metrics.jsonl"), read_metrics(
        tmp_path / "single" / "metrics.jsonl")
    assert [(r["kind"], r["step"]) for r in ddp_records] == [(r["kind"], r["step"]) for r in single_records]
    for ddp_record, single_record in zip(ddp_records, single_records):
        for key in ("loss", "grad_norm", "n_targets", "eval_loss"):
            if key in single_record:
                assert abs(ddp_record[key] - single_record[key]) <= 1e-6, (key, ddp_record, single_record)
    ddp_weights = load_file(tmp_path / "ddp" / "model.safetensors")
    single_weights = load_file(tmp_path / "single" / "model.safetensors")
    for name, tensor in single_weights.items():
        torch.testing.assert_close(ddp_weights[name], tensor, rtol=0, atol=1e-6)
    assert single.step == 4 and single_records[-1]["eval_loss"] == single.final_eval["eval_loss"]
    # One loader position per rank is saved, so the run can be resumed with two processes.
    state = json.loads((tmp_path / "ddp" / "train_state.json").read_text())
    assert state["world_size"] == 2 and len(state["loader"]) == len(state["rng"]) == 2
