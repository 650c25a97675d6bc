"""What the training health record costs: a step that records it against one that does not.

The loop measures per-layer gradient norms and update/weight ratios (`train/health.py`) only on
the steps that write a metrics line, every `log_every` steps: a copy of the weights before the
optimizer step and three fused `torch._foreach_norm` passes after it. This script takes the
loop's own step (objective, `scale_and_clip_`, fused AdamW) on a GPT-2-shaped model, with and
without the record, in alternation so both see the same machine, and reports the extra time of
a recording step and, spread over `log_every` steps, of an average step (the goal: under 3%).

    python benchmarks/health_overhead.py   # last line: overhead_avg=R overhead_recording_step=S log_every=N ...
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

import torch

from lmforge.config import preset
from lmforge.models import build_model
from lmforge.train.health import HealthRecorder
from lmforge.train.loop import TrainConfig, build_optimizer, scale_and_clip_
from lmforge.train.objectives import causal_lm


def make_step(model: torch.nn.Module, batch: dict, recorder: HealthRecorder | None) -> Callable[[], None]:
    """One optimizer step as the loop takes it; with `recorder`, also the health record."""
    opt = build_optimizer(model, TrainConfig(lr=1e-4, warmup_steps=0))
    params = [p for g in opt.param_groups for p in g["params"]]

    def step() -> None:
        out = causal_lm(model, batch)
        out.loss_sum.backward()
        norm = scale_and_clip_(params, 1.0 / float(out.n_targets), 1.0)
        before = recorder.snapshot() if recorder else None
        opt.step()
        if recorder and before is not None:
            recorder.measure(before, norm, 1.0)
        opt.zero_grad(set_to_none=True)

    return step


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--preset", default="gpt2", help="model shape (an lmforge preset)")
    parser.add_argument("--layers", type=int, default=6, help="blocks (fewer than the preset's keeps it quick)")
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--rounds", type=int, default=6, help="alternating rounds of both steps")
    parser.add_argument("--log-every", type=int, default=10, help="the loop's train.log_every (its default)")
    args = parser.parse_args()

    torch.manual_seed(0)
    model = build_model(preset(args.preset, n_layers=args.layers))
    ids = torch.randint(0, model.config.vocab_size, (args.batch_size, args.seq_len))
    batch = {"input_ids": ids, "labels": ids.roll(-1, dims=1)}
    steps = {"plain": make_step(model, batch, None),
             "recording": make_step(model, batch, HealthRecorder(model, list(model.parameters())))}
    times: dict[str, list[float]] = {name: [] for name in steps}
    for step in steps.values():
        step()  # warm-up
    for _ in range(args.rounds):
        for name, step in steps.items():
            start = time.perf_counter()
            step()
            times[name].append(time.perf_counter() - start)
    plain, recording = (statistics.median(times[name]) for name in ("plain", "recording"))
    extra = (recording - plain) / plain
    n_params = sum(p.numel() for p in model.parameters())
    print(f"{args.preset} x {args.layers} layers ({n_params / 1e6:.0f}M parameters), batch {args.batch_size} x "
          f"{args.seq_len}: plain step {plain:.3f}s, recording step {recording:.3f}s")
    print(f"overhead_avg={extra / args.log_every:.4f} overhead_recording_step={extra:.4f} log_every={args.log_every} "
          f"plain_s={plain:.3f} recording_s={recording:.3f} params_M={n_params / 1e6:.0f}")


if __name__ == "__main__":
    main()
