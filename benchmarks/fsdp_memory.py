"""Memory per rank with DDP against FSDP2 (`train.parallel fsdp`), two torchrun ranks, and their losses.

Each rank starts as the loop does (the model built under `sharded_init`, so that with FSDP2 only rank 0
builds it and the others build on the meta device; then `shard_model`, `wrap_model`), takes `--steps`
optimizer steps (objective, `scale_and_clip_` by the global target count, AdamW) on the same data in
both runs, and reports:
- start-up: the peak memory each rank added while building and placing the model (resident memory on
  CPU; on CUDA also the GPU's allocated peak), after a tiny model went through the same steps, so that
  what torch loads on first use is not counted; under FSDP2 only rank 0 ever holds the whole model;
- the bytes of the training state it holds (weights, gradients, AdamW moments: the local shards under
  FSDP2) and its peak resident memory over the run (Python/torch runtime, activations and
  communication buffers included; on CUDA, the GPU's allocated peak);
- the loss of every step over both ranks' batches: DDP and FSDP2 train the same model on the same data,
  so they must agree to float32 rounding.

    python benchmarks/fsdp_memory.py [--layers 6]   # CPU (gloo); last line: state_ratio=R ... loss_diff=D ...
    python benchmarks/fsdp_memory.py --device cuda --layers 12 --steps 5   # two GPUs (NCCL); adds fsdp+offload
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

from lmforge.config import preset
from lmforge.models import build_model
from lmforge.train.distributed import (
    DistInfo,
    all_reduce_sum,
    init_distributed,
    scale_and_clip_,
    shard_model,
    sharded_init,
    wrap_model,
)
from lmforge.train.loop import TrainConfig, build_optimizer
from lmforge.train.objectives import causal_lm

VOCAB, SEQ, BATCH = 8192, 128, 2


def _local_bytes(t: torch.Tensor) -> int:
    local = t.to_local() if isinstance(t, torch.distributed.tensor.DTensor) else t
    return local.numel() * local.element_size()


def _resident_mb(field: str) -> float:
    """This process's resident memory from /proc/self/status: "VmRSS" now, "VmHWM" its peak (Linux), MiB."""
    line = next(line for line in Path("/proc/self/status").read_text().splitlines() if line.startswith(field + ":"))
    return int(line.split()[1]) / 1024


def _reset_peaks(info: DistInfo) -> None:
    Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM
    if info.device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(info.device)


def _gpu_peak_mb(info: DistInfo) -> float:
    return torch.cuda.max_memory_allocated(info.device) / 2**20 if info.device.type == "cuda" else 0.0


def _start(parallel: str, offload: bool, info: DistInfo, layers: int) -> torch.nn.Module:
    """The model as the loop starts it: built (only on rank 0 under FSDP2, seeded), then placed or sharded."""
    torch.manual_seed(0)
    with sharded_init(info, parallel):
        model = build_model(preset("gpt2", vocab_size=VOCAB, n_layers=layers))
    return shard_model(model, info, parallel, "float32", cpu_offload=offload)


def rank_main(mode: str, layers: int, steps: int, device: str, out: Path) -> None:
    """One rank: start, `steps` steps, write this rank's figures to `out`/rank<r>.json."""
    torch.set_num_threads(1)
    info = init_distributed(device=device)
    parallel, offload = mode.split("+")[0], mode.endswith("+offload")
    _start(parallel, offload, info, 1)  # warm-up: what torch loads on first use is not start-up memory
    before = _resident_mb("VmRSS")
    _reset_peaks(info)
    model = _start(parallel, offload, info, layers)
    startup = {"startup_mb": _resident_mb("VmHWM") - before, "startup_gpu_mb": _gpu_peak_mb(info)}
    optimizer = build_optimizer(model, TrainConfig(lr=1e-4, warmup_steps=0))
    params = [p for g in optimizer.param_groups for p in g["params"]]
    trained, losses = wrap_model(model, info), []
    for step in range(steps):
        optimizer.zero_grad(set_to_none=True)
        ids = torch.randint(0, VOCAB, (BATCH, SEQ + 1), generator=torch.Generator().manual_seed(step * 97 + info.rank))
        ids = ids.to(info.device)
        result = causal_lm(trained, {"input_ids": ids, "labels": ids.clone()})
        result.loss_sum.backward()
        n_targets = torch.as_tensor(result.n_targets).double().to(info.device)
        sums = all_reduce_sum(torch.stack([result.loss_sum.detach().double(), n_targets]), info)
        scale_and_clip_(params, info.world_size / sums[1], 1.0)  # as the loop: DDP and FSDP2 average over ranks
        optimizer.step()
        losses.append(float(sums[0] / sums[1]))
    moments = [t for state in optimizer.state.values() for t in state.values() if t.dim() > 0]
    state_bytes = sum(_local_bytes(t) for t in [*params, *(p.grad for p in params), *moments])
    figures = {"rank": info.rank, **startup, "state_mb": state_bytes / 2**20, "rss_mb": _resident_mb("VmHWM"),
               "gpu_mb": _gpu_peak_mb(info), "losses": losses, "params_m": sum(p.numel() for p in params) / 1e6}
    (out / f"rank{info.rank}.json").write_text(json.dumps(figures))  # DTensor numel above: the global count
    torch.distributed.destroy_process_group()


def run_ranks(mode: str, args: argparse.Namespace) -> list[dict]:
    """Each rank's figures (in rank order) from a 2-rank torchrun of this script."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MALLOC_MMAP_THRESHOLD_": "131072"}  # freed blocks back to the kernel
    with tempfile.TemporaryDirectory() as out:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", __file__,
               "--rank-run", mode, "--layers", str(args.layers), "--steps", str(args.steps), "--device", args.device,
               "--rank-out", out]
        done = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=900)
        if done.returncode:
            raise SystemExit(f"{mode} ranks failed:\n{done.stdout[-3000:]}{done.stderr[-3000:]}")
        return [json.loads((Path(out) / f"rank{rank}.json").read_text()) for rank in (0, 1)]


def describe(mode: str, ranks: list[dict]) -> str:
    """One line of a mode's figures per rank."""
    gpu = any(r["gpu_mb"] for r in ranks)
    start = ", ".join(f"rank {r['rank']} {r['startup_mb']:.0f} MB" + (f" (GPU {r['startup_gpu_mb']:.0f} MB)" if gpu else "")
                      for r in ranks)
    peak = f"peak RSS {ranks[0]['rss_mb']:.0f} MB" + (f", GPU peak {ranks[0]['gpu_mb']:.0f} MB" if gpu else "")
    return f"{mode}: training state {ranks[0]['state_mb']:.0f} MB per rank, {peak}; start-up added {start}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, default=6, help="GPT-2-small blocks (768 wide, vocab 8192)")
    parser.add_argument("--steps", type=int, default=2, help="optimizer steps; their losses are compared")
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu", help="cuda: one GPU per rank, NCCL")
    parser.add_argument("--tolerance", type=float, default=1e-4, help="largest loss difference DDP/FSDP2 accepted")
    parser.add_argument("--rank-run", help=argparse.SUPPRESS)
    parser.add_argument("--rank-out", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.rank_run:
        rank_main(args.rank_run, args.layers, args.steps, args.device, args.rank_out)
        return
    modes = ("ddp", "fsdp", "fsdp+offload") if args.device == "cuda" else ("ddp", "fsdp")
    runs = {mode: run_ranks(mode, args) for mode in modes}
    ddp, fsdp = runs["ddp"], runs["fsdp"]
    name = torch.cuda.get_device_name() if args.device == "cuda" else "CPU gloo"
    print(f"model: GPT-2 shape, {args.layers} blocks, {ddp[0]['params_m']:.1f}M parameters, 2 ranks, {name}, fp32 AdamW")
    for mode, ranks in runs.items():
        print(describe(mode, ranks))
        print(f"  losses: {' '.join(f'{x:.5f}' for x in ranks[0]['losses'])}")
    loss_diff = max(abs(a - b) for mode in modes[1:] for a, b in zip(runs[mode][0]["losses"], ddp[0]["losses"]))
    startup_key = "startup_gpu_mb" if args.device == "cuda" else "startup_mb"
    print(f"state_ratio={fsdp[0]['state_mb'] / ddp[0]['state_mb']:.3f} rss_ratio={fsdp[0]['rss_mb'] / ddp[0]['rss_mb']:.3f} "
          f"startup_rank1_ratio={fsdp[1][startup_key] / ddp[1][startup_key]:.3f} loss_diff={loss_diff:.1e} "
          f"ddp_state_mb={ddp[0]['state_mb']:.0f} fsdp_state_mb={fsdp[0]['state_mb']:.0f} "
          f"ddp_startup_rank1_mb={ddp[1][startup_key]:.0f} fsdp_startup_rank1_mb={fsdp[1][startup_key]:.0f} "
          f"weights_mb={ddp[0]['params_m'] * 4e6 / 2**20:.0f} params_m={ddp[0]['params_m']:.1f}")
    if loss_diff > args.tolerance:
        raise SystemExit(f"FSDP2 and DDP losses differ by {loss_diff:.2e} > --tolerance {args.tolerance}")


if __name__ == "__main__":
    main()
