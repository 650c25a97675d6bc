"""FSDP2 (`train.parallel fsdp`) on two torchrun processes on CPU (gloo): a sharded start-up in which
only rank 0 ever holds the whole model, the same training as one
process with the same global batch (a tiny Llama: every block sharded on its own), sharded DCP
checkpoints that resume bit-exactly on two ranks and on one process (a different world size) and
survive an interrupted save, LoRA on a sharded frozen base, and a consolidated model folder that
transformers loads (after `convert --to hf`); `lmforge sft` and `lmforge classify` with LoRA under fsdp end
with the merged model (and classify's final scores) of one process."""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import pytest
import torch
import transformers
from _ddp_script import VOCAB, assert_same_run, finish, run_toy, torchrun, torchrun_cli

import lmforge
from lmforge.checkpoint.hf import save_hf
from lmforge.checkpoint.native import load_native
from lmforge.errors import LmforgeError
from lmforge.train import sharded
from lmforge.train.distributed import PARALLELS, init_distributed, shard_model
from lmforge.train.finetune import EVAL_REPORT, run_classify, run_sft
from lmforge.train.loop import TrainConfig
from lmforge.train.report import Callback
from lmforge.train.sharded import SHARDED_DIR

ARGS = ["--steps", "4", "--global-batch", "8", "--grad-accum", "2", "--dropout", "0", "--save-every", "2",
        "--eval-every", "2", "--parallel", "fsdp", "--model", "tiny-llama"]
TOY = {"steps": 4, "global_batch": 8, "grad_accum": 2, "dropout": 0.0, "save_every": 2, "eval_every": 2,
       "model_name": "tiny-llama"}  # the same run in this process
# Two ranks sum the gradient shards in another order than one process: float32 rounding only.
TOLERANCE = 1e-5


def torchrun_fsdp(out: Path, *extra: str) -> subprocess.Popen:
    return torchrun(out, *ARGS, *extra)


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
    full = torchrun_fsdp(tmp_path / "fsdp", "--check-sharded-start")
    killed = torchrun_fsdp(tmp_path / "resumed", "--kill-after-save", "2")
    run_toy(tmp_path / "single", **TOY)
    finish(full)
    finish(killed, ok=False)  # SIGKILLed right after the step-2 checkpoint
    _assert_only_rank0_holds_the_model(tmp_path / "fsdp")

    # Two FSDP2 ranks train like one process; the run folder holds a consolidated model and the shards.
    assert_same_run(tmp_path / "fsdp", tmp_path / "single", TOLERANCE)
    state = json.loads((tmp_path / "fsdp" / "train_state.json").read_text())
    assert state["world_size"] == 2 and state["optimizer"] == {"sharded": SHARDED_DIR}
    assert len(list((tmp_path / "fsdp" / SHARDED_DIR).glob("*.distcp"))) == 2  # one file per rank

    _assert_transformers_loads(tmp_path / "fsdp", tmp_path / "hf")

    # The checkpoint saved by two ranks resumes on one process (not sharded at all): same trajectory.
    checkpoint = tmp_path / "resumed" / "checkpoints" / "step_0000002"
    assert json.loads((checkpoint / "train_state.json").read_text())["step"] == 2
    shutil.copytree(tmp_path / "resumed", tmp_path / "one_rank")
    resume_two = torchrun_fsdp(tmp_path / "resumed")
    run_toy(tmp_path / "one_rank", **TOY, parallel="fsdp")
    assert_same_run(tmp_path / "one_rank", tmp_path / "fsdp", TOLERANCE)
    # ... and on two ranks bit for bit.
    finish(resume_two)
    assert_same_run(tmp_path / "resumed", tmp_path / "fsdp", 0.0)


def test_fsdp_settings_are_checked_and_one_process_resumes_a_ddp_checkpoint(tmp_path: Path) -> None:
    run_toy(tmp_path, steps=2, save_every=0)
    with pytest.raises(LmforgeError, match="parallel"):
        TrainConfig(parallel="zero3")
    # CPU offload moves shards off a GPU: on CPU, or without fsdp, one line says so and how to fix it.
    cpu = init_distributed(device="cpu")
    for parallel in PARALLELS:
        with pytest.raises(LmforgeError, match=r"^train.fsdp_cpu_offload .* needs train.parallel fsdp and a GPU; drop it"):
            shard_model(torch.nn.Linear(2, 2), cpu, parallel, "float32", cpu_offload=True)
    # One process is never sharded, so a ddp checkpoint still resumes under parallel fsdp there.
    result = run_toy(tmp_path, steps=3, save_every=0, parallel="fsdp")
    assert result.step == 3 and (tmp_path / SHARDED_DIR).is_dir()


def _lora_recipe(recipe, base: Path, data: Path, out: Path, **train: object) -> dict:
    """Three LoRA steps of a global batch of 8 rows, a quarter of the rows held out for the final evaluation."""
    return recipe(base, data, out, data={"eval_fraction": 0.25}, lora={"rank": 4, "alpha": 8.0},
                  train={"steps": 3, "batch_size": 4, "lr": 1e-2, "warmup_steps": 1, **train})


def test_lora_verbs_under_fsdp_end_with_the_merged_model_and_scores_of_one_process(recipe, tiny_lm_dir, capitals_jsonl,
                                                                                    jsonl, tmp_path: Path) -> None:
    """The end of a LoRA run (the merged export, classify's final scores) needs the whole model: under fsdp every
    rank gathers it for rank 0. Two ranks of 4 rows through the CLI against one process with 2 micro-batches of 4."""
    words = ["good", "great", "bad", "awful", "the", "film", "plot"]
    reviews = jsonl("reviews.jsonl", [{"text": " ".join(words[(i * k) % 7] for k in (1, 2, 3)), "label": "pos" if i % 2 else "neg"}
                                      for i in range(32)])
    data = {"sft": capitals_jsonl, "classify": reviews}
    launches = []
    for verb, rows in data.items():
        config = tmp_path / f"{verb}.yaml"  # JSON is YAML
        config.write_text(json.dumps(_lora_recipe(recipe, tiny_lm_dir, rows, tmp_path / verb / "fsdp", parallel="fsdp")))
        launches.append(torchrun_cli(verb, "--config", str(config)))
    run_sft(_lora_recipe(recipe, tiny_lm_dir, capitals_jsonl, tmp_path / "sft" / "single", grad_accum=2))
    single = run_classify(_lora_recipe(recipe, tiny_lm_dir, reviews, tmp_path / "classify" / "single", grad_accum=2))
    for launch in launches:
        finish(launch)

    for verb in data:
        for weights in ("adapter.safetensors", "model.safetensors"):  # trained adapters on a sharded frozen base; merged
            assert_same_run(tmp_path / verb / "fsdp", tmp_path / verb / "single", TOLERANCE, weights=weights)
    assert_same_run(tmp_path / "classify" / "fsdp", tmp_path / "classify" / "single", TOLERANCE, weights="head.safetensors")
    report = json.loads((tmp_path / "classify" / "fsdp" / EVAL_REPORT).read_text())
    assert report["n"] == single.eval_report.n == 8 and report["confusion"] == single.eval_report.confusion
    ids = torch.randint(1, 300, (2, 9), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        got, want = (lmforge.load(tmp_path / "sft" / run).model.eval()(ids) for run in ("fsdp", "single"))
    torch.testing.assert_close(got, want, rtol=0, atol=1e-4)  # float32 sums in another order, through 2 layers


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
    assert_same_run(tmp_path / "run", tmp_path / "whole", 0.0)
