"""FSDP2 (`train.parallel fsdp`) on two torchrun processes on CPU (gloo): a sharded start-up in which
only rank 0 ever holds the whole model, the same training as one
process with the same global batch (a tiny Llama: every block sharded on its own), sharded DCP
checkpoints that resume bit-exactly on two ranks and on one process (a different world size) and
survive an interrupted save, LoRA on a sharded frozen base, and a consolidated model folder that
transformers loads (after `convert --to hf`)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import transformers
from _ddp_script import VOCAB, run_toy
from safetensors.torch import load_file

from lmforge.checkpoint.hf import save_hf
from lmforge.checkpoint.native import load_native
from lmforge.errors import LmforgeError
from lmforge.train import sharded
from lmforge.train.distributed import init_distributed, shard_model
from lmforge.train.loop import TrainConfig
from lmforge.train.report import Callback, read_metrics
from lmforge.train.sharded import SHARDED_DIR

SCRIPT = Path(__file__).with_name("_ddp_script.py")
ARGS = ["--steps", "4", "--global-batch", "8", "--grad-accum", "2", "--dropout", "0", "--save-every", "2",
        "--eval-every", "2", "--parallel", "fsdp", "--model", "tiny-llama"]
TOY = {"steps": 4, "global_batch": 8, "grad_accum": 2, "dropout": 0.0, "save_every": 2, "eval_every": 2,
       "model_name": "tiny-llama"}  # the same run in this process
# Two ranks sum the gradient shards in another order than one process: float32 rounding only.
TOLERANCE = 1e-5


def _torchrun(out: Path, *extra: str) -> subprocess.Popen:
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    env["OMP_NUM_THREADS"] = "1"
    env["MALLOC_MMAP_THRESHOLD_"] = "131072"  # freed blocks go back to the kernel: resident memory follows live tensors
    return subprocess.Popen(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", str(SCRIPT),
         "--out", str(out), *ARGS, *extra],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env,
    )


def _finish(proc: subprocess.Popen, ok: bool = True) -> None:
    output, _ = proc.communicate(timeout=180)
    assert (proc.returncode == 0) == ok, output


def _assert_same_run(got: Path, want: Path, tolerance: float, weights: str = "model.safetensors") -> None:
    got_records, want_records = read_metrics(got / "metrics.jsonl"), read_metrics(want / "metrics.jsonl")
    assert [(r["kind"], r["step"]) for r in got_records] == [(r["kind"], r["step"]) for r in want_records]
    for got_record, want_record in zip(got_records, want_records):
        for key in ("loss", "grad_norm", "n_targets", "eval_loss"):
            if key in want_record:
                assert abs(got_record[key] - want_record[key]) <= tolerance, (key, got_record, want_record)
    want_weights, got_weights = load_file(want / weights), load_file(got / weights)
    assert got_weights.keys() == want_weights.keys()
    for name, tensor in want_weights.items():
        torch.testing.assert_close(got_weights[name], tensor, rtol=0, atol=tolerance)


def _assert_transformers_loads(folder: Path, hf_folder: Path) -> None:
    """The consolidated folder loads in lmforge, and its Hugging Face export in transformers with the same logits."""
    model, _ = load_native(folder)
    save_hf(model, hf_folder)
    hf = transformers.AutoModelForCausalLM.from_pretrained(hf_folder).eval()
    ids = torch.randint(0, VOCAB, (2, 7), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(hf(ids).logits, model.eval()(ids), rtol=1e-4, atol=1e-4)


def _assert_only_rank0_holds_the_model(folder: Path) -> None:
    """What `check_sharded_start` measured: rank 0 reads the whole model; rank 1 only ever adds its half
    (plus one tensor in flight), and both end with the saved weights."""
    rank0, rank1 = (json.loads((folder / f"start_rank{rank}.json").read_text()) for rank in (0, 1))
    assert rank0["equal_to_saved"] and rank1["equal_to_saved"]
    assert rank0["peak_mb"] >= rank0["weights_mb"], rank0  # the measure sees a whole model where there is one
    assert rank1["peak_mb"] < 0.75 * rank1["weights_mb"], rank1


def test_fsdp_matches_one_process_and_resumes_on_two_and_one_rank(tmp_path: Path) -> None:
    full = _torchrun(tmp_path / "fsdp", "--check-sharded-start")
    killed = _torchrun(tmp_path / "resumed", "--kill-after-save", "2")
    run_toy(tmp_path / "single", **TOY)
    _finish(full)
    _finish(killed, ok=False)  # SIGKILLed right after the step-2 checkpoint
    _assert_only_rank0_holds_the_model(tmp_path / "fsdp")

    # Two FSDP2 ranks train like one process; the run folder holds a consolidated model and the shards.
    _assert_same_run(tmp_path / "fsdp", tmp_path / "single", TOLERANCE)
    state = json.loads((tmp_path / "fsdp" / "train_state.json").read_text())
    assert state["world_size"] == 2 and state["optimizer"] == {"sharded": SHARDED_DIR}
    assert len(list((tmp_path / "fsdp" / SHARDED_DIR).glob("*.distcp"))) == 2  # one file per rank

    _assert_transformers_loads(tmp_path / "fsdp", tmp_path / "hf")

    # The checkpoint saved by two ranks resumes on one process (not sharded at all): same trajectory.
    checkpoint = tmp_path / "resumed" / "checkpoints" / "step_0000002"
    assert json.loads((checkpoint / "train_state.json").read_text())["step"] == 2
    shutil.copytree(tmp_path / "resumed", tmp_path / "one_rank")
    resume_two = _torchrun(tmp_path / "resumed")
    run_toy(tmp_path / "one_rank", **TOY, parallel="fsdp")
    _assert_same_run(tmp_path / "one_rank", tmp_path / "fsdp", TOLERANCE)
    # ... and on two ranks bit for bit.
    _finish(resume_two)
    _assert_same_run(tmp_path / "resumed", tmp_path / "fsdp", 0.0)


def test_fsdp_settings_are_checked_and_one_process_resumes_a_ddp_checkpoint(tmp_path: Path) -> None:
    run_toy(tmp_path, steps=2, save_every=0)
    with pytest.raises(LmforgeError, match="parallel"):
        TrainConfig(parallel="zero3")
    with pytest.raises(LmforgeError, match="fsdp_cpu_offload"):
        shard_model(torch.nn.Linear(2, 2), init_distributed(device="cpu"), "fsdp", "float32", cpu_offload=True)
    # One process is never sharded, so a ddp checkpoint still resumes under parallel fsdp there.
    result = run_toy(tmp_path, steps=3, save_every=0, parallel="fsdp")
    assert result.step == 3 and (tmp_path / SHARDED_DIR).is_dir()


def test_fsdp_trains_lora_adapters_on_a_sharded_frozen_base(tmp_path: Path) -> None:
    two_ranks = _torchrun(tmp_path / "fsdp", "--lora-rank", "4")
    run_toy(tmp_path / "single", **TOY, lora_rank=4)
    _finish(two_ranks)
    _assert_same_run(tmp_path / "fsdp", tmp_path / "single", TOLERANCE, weights="adapter.safetensors")
    assert not (tmp_path / "fsdp" / "model.safetensors").exists()  # adapters only, as without FSDP2


class _Crash(Exception):
    """Stands for the process dying between writing the shards and putting the folder in place."""


class _StartStep(Callback):
    def __init__(self) -> None:
        self.step = -1

    def on_train_start(self, start_step: int, cfg: TrainConfig) -> None:
        self.step = start_step


def test_interrupted_sharded_save_resumes_from_the_previous_checkpoint(tmp_path: Path,
                                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    run_toy(tmp_path / "whole", steps=6, save_every=2, parallel="fsdp")
    publish = sharded.publish

    def crash_at_step_4(tmp: Path, dest: Path, in_place: bool) -> Path:
        if dest.name == "step_0000004":
            raise _Crash
        return publish(tmp, dest, in_place)

    monkeypatch.setattr(sharded, "publish", crash_at_step_4)
    with pytest.raises(_Crash):
        run_toy(tmp_path / "run", steps=6, save_every=2, parallel="fsdp")
    assert (tmp_path / "run" / "checkpoints" / "step_0000004.tmp" / SHARDED_DIR).is_dir()  # shards, not in place
    monkeypatch.undo()
    start = _StartStep()
    run_toy(tmp_path / "run", steps=6, save_every=2, parallel="fsdp", callbacks=[start])
    assert start.step == 2
    assert not (tmp_path / "run" / "checkpoints" / "step_0000004.tmp").exists()
    _assert_same_run(tmp_path / "run", tmp_path / "whole", 0.0)
