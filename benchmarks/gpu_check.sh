#!/usr/bin/env bash
# On a machine with a CUDA GPU: the GPU-marked tests, GPT-2-124M training MFU against the GPU's bf16
# matmul peak, and decode tokens/s at batch 1 and 64. Run from the repository root:
#   bash benchmarks/gpu_check.sh            # DEVICE=cpu and a tiny model check the script itself on a CPU
# Not yet here: 2-GPU FSDP vs DDP losses (train.parallel: fsdp is not built yet).
set -euo pipefail
DEVICE="${DEVICE:-cuda}"
export PYTHONPATH="$(pwd)/src${PYTHONPATH:+:$PYTHONPATH}"

if [ "$DEVICE" = cuda ]; then
  python -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 'no CUDA GPU visible to torch')"
  python -m pytest -q -m cuda -p no:cacheprovider
  python benchmarks/train_throughput.py --device cuda --batch 16 --seq-len 1024 --steps 10
  PRESET=gpt2 NEW=128
else
  PRESET=tiny-gpt2 NEW=8
fi

DEVICE="$DEVICE" PRESET="$PRESET" NEW="$NEW" python - <<'PY'
"""Decode tokens/s of lmforge's engine at batch 1 and 64 (random weights, greedy, synchronised timing)."""
import os
import time

import torch

from lmforge.config import preset
from lmforge.generate.engine import Engine, Request
from lmforge.models import build_model

device, new = torch.device(os.environ["DEVICE"]), int(os.environ["NEW"])
dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
torch.manual_seed(0)
model = build_model(preset(os.environ["PRESET"])).to(device, dtype).eval()
figures = []
for batch in (1, 64):
    prompts = [torch.randint(0, model.config.vocab_size, (16,)).tolist() for _ in range(batch)]
    engine = Engine(model, n_slots=batch, max_len=16 + new + 1)
    engine.generate([Request(p, max_new_tokens=4) for p in prompts])  # warm-up
    if device.type == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    results = engine.generate([Request(p, max_new_tokens=new) for p in prompts])
    if device.type == "cuda":
        torch.cuda.synchronize()
    tokens = sum(len(r.tokens) for r in results)
    figures.append(f"decode_b{batch}_tok_s={tokens / (time.perf_counter() - start):.0f}")
name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
print(f"{os.environ['PRESET']} on {name}, {dtype}, {new} new tokens per sequence")
print(" ".join(figures))
PY
