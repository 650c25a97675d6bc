"""Memory per rank with DDP against FSDP2 (`train.parallel fsdp`), two torchrun ranks on CPU (gloo).

Each rank builds the same GPT-2-shaped model, wraps it as the loop does (`shard_model`, then
`wrap_model`), takes one optimizer step (objective, `scale_and_clip_`, AdamW) and reports the
bytes of the training state it holds (its weights, gradients and AdamW moments: the local shards
under FSDP2) and its peak resident memory (which also counts the Python/torch runtime,
activations and communication buffers). Both runs use the same model and batch; the ratios
FSDP2/DDP are the figures (rank 0's).

    python benchmarks/fsdp_memory.py [--layers 6]   # last line: state_ratio=R rss_ratio=S ddp_state_mb=...
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys

import torch

from lmforge.config import preset
from lmforge.models import build_model
from lmforge.train.distributed import init_distributed, scale_and_clip_, shard_model, wrap_model
from lmforge.train.loop import TrainConfig, build_optimizer
from lmforge.train.objectives import causal_lm


def _local_bytes(t: torch.Tensor) -> int:
    local = t.to_local() if isinstance(t, torch.distributed.tensor.DTensor) else t
    return local.numel() * local.element_size()


def rank_main(parallel: str, layers: int) -> None:
    """One rank: build, wrap, one step, print this rank's figures as JSON."""
    torch.set_num_threads(1)
    info = init_distributed(device="cpu")
    torch.manual_seed(0)
    model = build_model(preset("gpt2", vocab_size=8192, n_layers=layers))
    model = shard_model(model, info, parallel, "float32", cpu_offload=False)
    optimizer = build_optimizer(model, TrainConfig(lr=1e-4, warmup_steps=0))
    params = [p for g in optimizer.param_groups for p in g["params"]]
    trained = wrap_model(model, info)
    ids = torch.randint(0, 8192, (2, 129), generator=torch.Generator().manual_seed(info.rank))
    out = causal_lm(trained, {"input_ids": ids, "labels": ids.clone()})
    out.loss_sum.backward()
    scale_and_clip_(params, 1.0 / float(out.n_targets), 1.0)
    optimizer.step()
    moments = [t for state in optimizer.state.values() for t in state.values() if t.dim() > 0]
    state_bytes = sum(_local_bytes(t) for t in [*params, *(p.grad for p in params), *moments])
    peak_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB
    if info.is_main:
        n_params = sum(p.numel() for p in params)  # DTensor numel is the global count
        print(json.dumps({"state_mb": state_bytes / 2**20, "rss_mb": peak_rss / 2**20, "params_m": n_params / 1e6}))
    torch.distributed.destroy_process_group()


def run_ranks(parallel: str, layers: int) -> dict[str, float]:
    """Rank 0's figures from a 2-rank torchrun of this script."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", __file__,
           "--rank-run", parallel, "--layers", str(layers)]
    done = subprocess.run(cmd, capture_output=True, text=True, env=env, check=True, timeout=900)
    return json.loads([line for line in done.stdout.splitlines() if line.startswith("{")][-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, default=6, help="GPT-2-small blocks (768 wide, vocab 8192)")
    parser.add_argument("--rank-run", choices=("ddp", "fsdp"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.rank_run:
        rank_main(args.rank_run, args.layers)
        return
    ddp, fsdp = run_ranks("ddp", args.layers), run_ranks("fsdp", args.layers)
    print(f"model: GPT-2 shape, {args.layers} blocks, {ddp['params_m']:.1f}M parameters, 2 ranks, CPU gloo, fp32 AdamW")
    for name, figures in (("ddp", ddp), ("fsdp", fsdp)):
        print(f"{name}: training state {figures['state_mb']:.0f} MB per rank, peak RSS {figures['rss_mb']:.0f} MB")
    print(f"state_ratio={fsdp['state_mb'] / ddp['state_mb']:.3f} rss_ratio={fsdp['rss_mb'] / ddp['rss_mb']:.3f} "
          f"ddp_state_mb={ddp['state_mb']:.0f} fsdp_state_mb={fsdp['state_mb']:.0f} params_m={ddp['params_m']:.1f}")


if __name__ == "__main__":
    main()
