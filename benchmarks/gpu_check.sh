#!/usr/bin/env bash
# On a machine with CUDA GPUs: the GPU-marked tests, GPT-2-124M training MFU against the GPU's bf16 matmul
# peak, decode tokens/s at batch 1 and 64, and, when `nvidia-smi -L` lists two GPUs or more, FSDP2 against
# DDP on two GPUs (the losses of 5 steps must agree; memory per rank for DDP, FSDP2 and FSDP2 with CPU
# offload; start-up memory per rank). One prepared run of a few minutes; from the repository root:
#   bash benchmarks/gpu_check.sh             # on the GPU machine
#   DEVICE=cpu bash benchmarks/gpu_check.sh  # every command of the script on a CPU with tiny sizes (FSDP2 on
#                                            # two gloo processes): checks the script itself, measures nothing
set -euo pipefail
DEVICE="${DEVICE:-cuda}"
export PYTHONPATH="$(pwd)/src${PYTHONPATH:+:$PYTHONPATH}"

if [ "$DEVICE" = cuda ]; then
  python -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 'no CUDA GPU visible to torch')"
  GPUS=$(nvidia-smi -L 2>/dev/null | grep -c '^GPU ' || true)
  python -m pytest -q -m cuda -p no:cacheprovider
  python benchmarks/train_throughput.py --device cuda --batch 16 --seq-len 1024 --steps 10
  PRESET=gpt2 NEW=128 FSDP_ARGS="--device cuda --layers 12 --steps 5 --tolerance 1e-3"
else
  GPUS=2  # FSDP2 against DDP on two gloo processes
  python -m pytest -q -m cuda -p no:cacheprovider tests/train/test_gpu.py  # collected, then skipped without CUDA
  python benchmarks/train_throughput.py --device cpu --batch 1 --seq-len 32 --steps 1 --layers 1
  PRESET=tiny-gpt2 NEW=8 FSDP_ARGS="--device cpu --layers 1 --steps 2"
fi

if [ "$GPUS" -ge 2 ]; then
  python benchmarks/fsdp_memory.py $FSDP_ARGS
else
  echo "FSDP2 against DDP: skipped, it needs two GPUs (nvidia-smi -L lists $GPUS)"
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
