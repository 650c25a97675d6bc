"""Measure the peak memory of one training step on CPU, in a fresh process: `python peak_rss.py JSON`.

JSON: a list of {"model": {ModelConfig fields}, "batch_size": B, "seq_len": T, "activation_checkpointing": bool}.
Prints a JSON list of peaks in bytes, one per shape: the peak resident set size during the second
training step (the first allocates the optimizer state and the loss's scratch buffers), above the
resident size of the process just before the model was built. Between shapes every tensor of the
previous one is released (the fused loss's scratch buffers included). glibc's malloc is told (MALLOC_MMAP_THRESHOLD_, set
by the caller) to give every block above 128 KiB back to the kernel when freed, so that the
resident size follows the live tensors; the peak is the kernel's high-water mark (VmHWM), reset
through /proc/self/clear_refs just before the measured step.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path


def _status_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"/proc/self/status has no {field}")


def main() -> None:
    specs = json.loads(sys.argv[1])
    first = specs[0]
    tiny = {**first, "batch_size": 1, "seq_len": 8, "model": {**first["model"], "dim": 64, "hidden_dim": 64,
                                                                "n_heads": 2, "n_kv_heads": 1, "vocab_size": 64}}
    _train_steps(tiny, 2, lambda step: None)  # loads the code paths the steps run (libraries' pages count too)
    peaks = []
    for spec in specs:
        _release_scratch()
        before = _status_kib("VmRSS")
        _train_steps(spec, 2, lambda step: step == 1 and Path("/proc/self/clear_refs").write_text("5"))  # reset VmHWM
        peaks.append((_status_kib("VmHWM") - before) * 1024)
    print(json.dumps(peaks))


def _release_scratch() -> None:
    """Drop the fused loss's per-thread buffers, collect garbage and hand freed heap back to the kernel
    (malloc_trim), so the next shape starts from the live memory only."""
    import ctypes
    import gc

    from lmforge.models import cpu_ops

    cpu_ops._scratch.__dict__.clear()
    gc.collect()
    ctypes.CDLL("libc.so.6").malloc_trim(0)


def _train_steps(spec: dict, steps: int, before_step) -> None:
    import torch

    from lmforge.config import model_config
    from lmforge.models import build_model
    from lmforge.models.layers import set_activation_checkpointing
    from lmforge.train.loop import TrainConfig, build_optimizer

    torch.manual_seed(0)
    ids = torch.randint(0, spec["model"]["vocab_size"], (spec["batch_size"], spec["seq_len"] + 1))
    model = build_model(model_config(spec["model"]))
    model.train()
    set_activation_checkpointing(model, spec["activation_checkpointing"])
    optimizer = build_optimizer(model, TrainConfig(steps=steps, warmup_steps=0))
    for step in range(steps):
        before_step(step)
        model(ids[:, :-1], labels=ids[:, 1:]).backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)


if __name__ == "__main__":
    main()
