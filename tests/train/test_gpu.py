"""The loop's GPU path: bf16 autocast, pinned non-blocking batch copies, one host read per step; with two
GPUs, FSDP2 with its shards offloaded to CPU memory (`train.fsdp_cpu_offload`, GPU-only) trains like one GPU.

Marked `cuda` and skipped without a GPU (the offload test without two); `benchmarks/gpu_check.sh` runs them
on a machine with GPUs.
"""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from _ddp_script import (
    ToyLM,
    ToyLoader,
    assert_same_run,
    causal_lm,
    finish,
    run_toy,
    save_toy_model,
    torchrun,
)

from lmforge.train.distributed import DistInfo
from lmforge.train.loop import TrainConfig, train
from lmforge.train.report import read_metrics

pytestmark = [pytest.mark.cuda, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]


def losses(out: Path, device: str, precision: str) -> list[float]:
    torch.manual_seed(0)
    cfg = TrainConfig(steps=5, lr=1e-2, min_lr=1e-3, warmup_steps=1, eval_every=0, save_every=0, log_every=1,
                      seed=0, precision=precision)
    info = DistInfo(rank=0, world_size=1, local_rank=0, device=torch.device(device))
    train(ToyLM(dropout=0.0), causal_lm, ToyLoader(4), cfg, out, save_model=save_toy_model, dist_info=info)
    return [r["loss"] for r in read_metrics(out / "metrics.jsonl") if r["kind"] == "train"]


def test_cuda_float32_follows_cpu_and_bf16_stays_close(tmp_path: Path) -> None:
    cpu = losses(tmp_path / "cpu", "cpu", "float32")
    gpu = losses(tmp_path / "gpu", "cuda", "float32")
    bf16 = losses(tmp_path / "bf16", "cuda", "bfloat16")
    assert gpu == pytest.approx(cpu, rel=1e-4)  # TF32 is off by default for matmuls in float32
    assert all(math.isfinite(x) for x in bf16) and bf16 == pytest.approx(cpu, rel=5e-2)


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="FSDP2 across GPUs needs two")
def test_fsdp_with_cpu_offload_on_two_gpus_trains_like_one(tmp_path: Path) -> None:
    two = torchrun(tmp_path / "offload", "--steps", "4", "--global-batch", "8", "--dropout", "0", "--save-every", "2",
                   "--eval-every", "2", "--parallel", "fsdp", "--model", "tiny-llama", "--device", "cuda", "--cpu-offload")
    run_toy(tmp_path / "one", steps=4, global_batch=8, dropout=0.0, save_every=2, eval_every=2, model_name="tiny-llama")
    finish(two)
    assert_same_run(tmp_path / "offload", tmp_path / "one", 1e-4)  # float32, reductions in another order
