"""QLoRA's cost and saving: peak memory and step time of fine-tuning one model on one batch four
ways: the whole model (float32, AdamW), LoRA on the float32 base, and LoRA on the base quantized
to int8 and to int4 (QLoRA, `--finetune.bits 8|4`).

SmolLM-135M's shape with random weights (`--layers` of its 30 blocks: fewer on a slow host),
batch 2 x 64 tokens, LoRA rank 16 on every attention and
MLP projection, AdamW on what is trained, the causal-LM loss (the model's fused output projection
+ cross-entropy). Each mode runs in its own process. Peak memory is the process's peak resident
set during the training steps: the kernel's high-water mark (VmHWM) is reset
(/proc/self/clear_refs) once the model is built and quantized, so it is the memory the steps
need, the resident weights included. Step time is the median over `--steps` steps after one
warm-up step. A QLoRA step dequantizes each frozen layer in its forward and again in its
backward (rather than keeping float copies alive), so it trades time for memory.

    python benchmarks/qlora_memory.py --steps 3 [--layers 30]
    # last line: full_mib=A lora_mib=B qlora8_mib=C qlora4_mib=D full_step_s=... lora_step_s=... qlora8_step_s=...
    #            qlora4_step_s=... qlora4_mem_vs_lora=M qlora4_mem_vs_full=F qlora4_time_vs_lora=T
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

from lmforge.config import preset
from lmforge.models import build_model
from lmforge.quantize import model_bytes, quantize_model
from lmforge.train.lora import LoraConfig, apply_lora

MODES = ("full", "lora", "qlora8", "qlora4")
TARGETS = ["*.attn.q", "*.attn.k", "*.attn.v", "*.attn.o", "*.mlp.*"]


def peak_rss_mib() -> float:
    """The process's resident high-water mark since the last reset, MiB (Linux)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    raise SystemExit("qlora_memory.py reads /proc/self/status (Linux) for peak memory")


def one_mode(mode: str, steps: int, batch: int, seq: int, layers: int) -> dict[str, float]:
    """Build the model for `mode`, train `steps` + 1 steps, return peak MiB and median step seconds."""
    torch.manual_seed(0)
    model = build_model(preset("smollm-135m", n_layers=layers))
    if mode.startswith("qlora"):
        quantize_model(model, int(mode[5:]), 64)
    if mode != "full":
        apply_lora(model, LoraConfig(rank=16, alpha=32.0, targets=TARGETS))
    model.train()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    ids = torch.randint(0, model.config.vocab_size, (batch, seq + 1))
    resident = model_bytes(model) / 2**20
    Path("/proc/self/clear_refs").write_text("5")  # reset VmHWM: from here on, the training steps' peak
    times = []
    for _ in range(steps + 1):
        start = time.perf_counter()
        loss = model(ids[:, :-1], labels=ids[:, 1:]) / (batch * seq)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        times.append(time.perf_counter() - start)
    return {"peak_mib": peak_rss_mib(), "step_s": statistics.median(times[1:]), "weights_mib": resident}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--steps", type=int, default=3, help="timed steps per mode (after one warm-up)")
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--seq", type=int, default=64)
    parser.add_argument("--layers", type=int, default=30, help="blocks of SmolLM-135M's 30 to keep")
    parser.add_argument("--mode", choices=MODES, help=argparse.SUPPRESS)  # internal: one mode in this process
    args = parser.parse_args()
    if args.mode:
        print(json.dumps(one_mode(args.mode, args.steps, args.batch, args.seq, args.layers)))
        return
    results = {}
    for mode in MODES:
        command = [sys.executable, __file__, "--mode", mode, "--steps", str(args.steps), "--batch", str(args.batch),
                   "--seq", str(args.seq), "--layers", str(args.layers)]
        out = subprocess.run(command, capture_output=True, text=True, check=True).stdout
        results[mode] = json.loads(out.strip().splitlines()[-1])
        r = results[mode]
        print(f"{mode:7s} peak {r['peak_mib']:7.0f} MiB (stored weights {r['weights_mib']:6.0f} MiB)  step {r['step_s']:6.2f} s")
    figures = {f"{m}_mib": f"{results[m]['peak_mib']:.0f}" for m in MODES}
    figures |= {f"{m}_step_s": f"{results[m]['step_s']:.2f}" for m in MODES}
    q4, lora, full = results["qlora4"], results["lora"], results["full"]
    figures |= {"qlora4_mem_vs_lora": f"{q4['peak_mib'] / lora['peak_mib']:.2f}",
                "qlora4_mem_vs_full": f"{q4['peak_mib'] / full['peak_mib']:.2f}",
                "qlora4_time_vs_lora": f"{q4['step_s'] / lora['step_s']:.2f}"}
    print(" ".join(f"{k}={v}" for k, v in figures.items()))


if __name__ == "__main__":
    main()
