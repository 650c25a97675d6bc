"""A toy language model, loader and objective for the training-loop tests, plus a runnable entry.

The tests import the pieces directly; the subprocess tests (kill-and-resume, torchrun DDP)
run this file as a script:

    python tests/train/_ddp_script.py --out DIR --steps 8 [--kill-after-save 4] ...
    python -m torch.distributed.run --nproc_per_node 2 tests/train/_ddp_script.py --out DIR ...

Under torchrun each rank draws the same global batch and keeps its slice of the rows, so a
2-process run sees exactly the data of a 1-process run with the same global batch.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_model
from torch import Tensor, nn
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

from lmforge.train.distributed import DistInfo, cleanup, init_distributed, sharded_init
from lmforge.train.loop import ObjectiveOutput, TrainConfig, TrainResult, train
from lmforge.train.report import Callback, read_metrics

VOCAB = 23
SEQ_LEN = 9


class ToyLM(nn.Module):
    """Embedding -> dropout -> MLP -> norm -> head: enough to have 1-D and 2-D parameters."""

    def __init__(self, vocab: int = VOCAB, dim: int = 16, dropout: float = 0.1) -> None:
        super().__init__()
        self.emb = nn.Embedding(vocab, dim)
        self.drop = nn.Dropout(dropout)
        self.fc = nn.Linear(dim, dim)
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, vocab)

    def forward(self, ids: Tensor) -> Tensor:
        x = self.drop(self.emb(ids))  # (B, T, dim)
        x = x + torch.tanh(self.fc(x))
        return self.head(self.norm(x))  # (B, T, vocab)


def causal_lm(model: nn.Module, batch: dict[str, Tensor]) -> ObjectiveOutput:
    """Next-token cross-entropy summed over the unmasked targets."""
    ids, mask = batch["input_ids"], batch["loss_mask"]
    logits = model(ids[:, :-1])  # (B, T-1, V)
    targets = ids[:, 1:].masked_fill(mask[:, 1:] == 0, -100)  # (B, T-1)
    loss_sum = F.cross_entropy(logits.flatten(0, 1), targets.flatten(), ignore_index=-100, reduction="sum")
    n = (targets != -100).sum()
    return ObjectiveOutput(loss_sum=loss_sum, n_targets=n, metrics={"mask_fraction": n / targets.numel()})


def make_batch(rng: np.random.Generator, rows: int) -> dict[str, Tensor]:
    """Random token rows with a random loss mask, so micro-batches hold different target counts."""
    ids = torch.from_numpy(rng.integers(0, VOCAB, size=(rows, SEQ_LEN)))
    mask = torch.from_numpy((rng.random((rows, SEQ_LEN)) < 0.7).astype(np.int64))
    return {"input_ids": ids, "loss_mask": mask}


class ToyLoader:
    """Draws a global batch of `global_rows` per call and returns this rank's slice of it."""

    def __init__(self, global_rows: int, seed: int = 0, rank: int = 0, world_size: int = 1) -> None:
        self.rng = np.random.default_rng(seed)
        per_rank = global_rows // world_size
        self.rows = slice(rank * per_rank, (rank + 1) * per_rank)
        self.global_rows = global_rows

    def next_batch(self) -> dict[str, Tensor]:
        batch = make_batch(self.rng, self.global_rows)
        return {k: v[self.rows] for k, v in batch.items()}

    def state_dict(self) -> dict[str, Any]:
        return {"rng": self.rng.bit_generator.state}

    def load_state_dict(self, d: dict[str, Any]) -> None:
        self.rng.bit_generator.state = d["rng"]


def eval_batches(n: int = 3, rows: int = 4) -> Iterator[dict[str, Tensor]]:
    """The same `n` validation batches on every call."""
    rng = np.random.default_rng(1234)
    for _ in range(n):
        yield make_batch(rng, rows)


def save_toy_model(model: nn.Module, folder: Path) -> None:
    """What a real save_model does: config.json + model.safetensors."""
    (folder / "config.json").write_text(json.dumps({"vocab": VOCAB}))
    save_model(model, str(folder / "model.safetensors"))


class KillAfterSave(Callback):
    """SIGKILLs this process right after the checkpoint of `step` is complete."""

    def __init__(self, step: int) -> None:
        self.step = step

    def on_save(self, step: int, path: Path) -> None:
        if step == self.step:
            os.kill(os.getpid(), signal.SIGKILL)


def make_model(name: str, dropout: float, lora_rank: int = 0) -> tuple[nn.Module, Callable[[nn.Module, Path], None]]:
    """The model to train and its save function: "toy" (ToyLM), or an lmforge preset such as
    "tiny-llama" (a real decoder whose blocks FSDP2 shards one by one), saved as an lmforge folder
    (or, with `lora_rank`, as LoRA adapters on the frozen preset)."""
    if name == "toy":
        return ToyLM(dropout=dropout), save_toy_model
    from lmforge.checkpoint.native import save_native
    from lmforge.config import preset
    from lmforge.models import build_model
    from lmforge.train.lora import LoraConfig, apply_lora, save_adapter

    model = build_model(preset(name, vocab_size=VOCAB))
    if not lora_rank:
        return model, save_native
    lora = LoraConfig(rank=lora_rank)
    apply_lora(model, lora)
    return model, lambda m, folder: save_adapter(m, lora, folder)


def resident_kib(field: str) -> int:
    """This process's resident memory from /proc/self/status: "VmRSS" now, "VmHWM" its peak (Linux)."""
    line = next(line for line in Path("/proc/self/status").read_text().splitlines() if line.startswith(field + ":"))
    return int(line.split()[1])


def check_sharded_start(out: Path, info: DistInfo) -> None:
    """Rank 0 saves a tied Qwen2-style model (rotary tables, 72 MB of weights); every rank then loads it as a
    fine-tuning base and FSDP2-shards it, as `setup.load_base` and the loop do. Writes the peak resident
    memory this rank added meanwhile, the weights' size and whether the shards hold the saved weights to
    `start_rank<r>.json`. A tiny model goes through the same steps first, so that what torch loads on
    first use (meta-device kernels, FSDP2) is not counted."""
    from lmforge.checkpoint.native import save_native
    from lmforge.config import preset
    from lmforge.models import build_model
    from lmforge.train.distributed import barrier, shard_model
    from lmforge.train.setup import base_on_main

    for name, size in (("tiny", {}), ("big", dict(dim=512, hidden_dim=1024, n_layers=8, n_heads=8, n_kv_heads=4))):
        folder = out / f"start_{name}"
        if info.is_main:
            torch.manual_seed(0)
            save_native(build_model(preset("tiny-qwen2", vocab_size=VOCAB, **size)), folder)
        barrier(info)
        before = resident_kib("VmRSS")
        Path("/proc/self/clear_refs").write_text("5")  # reset VmHWM: from here on, the start-up's peak
        model = shard_model(base_on_main(folder, info), info, "fsdp", "float32", cpu_offload=False)
        peak_mb = (resident_kib("VmHWM") - before) / 1024
    full = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    saved = load_file(folder / "model.safetensors")
    equal = not info.is_main or (full.keys() >= saved.keys() and all(torch.equal(full[k], v) for k, v in saved.items()))
    weights_mb = sum(p.numel() * p.element_size() for p in model.parameters()) / 2**20  # DTensors: global sizes
    (out / f"start_rank{info.rank}.json").write_text(json.dumps({"peak_mb": peak_mb, "weights_mb": weights_mb,
                                                                 "equal_to_saved": equal}))


def torchrun(out: Path, *args: str, nproc: int = 2) -> subprocess.Popen:
    """This script under `torchrun --standalone` with `nproc` ranks, writing into `out` (call `finish` on it)."""
    return _launch([__file__, "--out", str(out), *args], nproc)


def torchrun_cli(*args: str, nproc: int = 2) -> subprocess.Popen:
    """`lmforge ARGS...` under `torchrun --standalone` with `nproc` ranks, as a user launches it (call `finish` on it)."""
    return _launch(["-m", "lmforge.cli", *args], nproc)


def _launch(target: list[str], nproc: int) -> subprocess.Popen:
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    env["OMP_NUM_THREADS"] = "1"
    env["MALLOC_MMAP_THRESHOLD_"] = "131072"  # freed blocks go back to the kernel: resident memory follows live tensors
    return subprocess.Popen(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(nproc), *target],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env,
    )


def finish(proc: subprocess.Popen, ok: bool = True) -> None:
    """Wait for a `torchrun` launch; it must succeed (or, with `ok` False, fail); its output is the message."""
    output, _ = proc.communicate(timeout=180)
    assert (proc.returncode == 0) == ok, output


def assert_same_run(got: Path, want: Path, tolerance: float, weights: str = "model.safetensors") -> None:
    """The two run folders logged the same records (losses, norms, counts, eval losses within `tolerance`)
    and saved the same weights (within `tolerance`)."""
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


def run_toy(
    out: str | Path, *, steps: int = 8, global_batch: int = 8, grad_accum: int = 1, dropout: float = 0.1,
    save_every: int = 2, eval_every: int = 3, callbacks: list[Callback] | None = None,
    dist_info: DistInfo | None = None, parallel: str = "ddp", resume: str = "auto", model_name: str = "toy",
    lora_rank: int = 0, cpu_offload: bool = False,
) -> TrainResult:
    """Train a fresh model (same initial weights every time) for `steps` steps into `out`."""
    torch.manual_seed(0)  # identical initial weights in every run
    with sharded_init(dist_info or DistInfo(0, 1, 0, torch.device("cpu")), parallel):  # fsdp: rank 0 builds alone
        model, save = make_model(model_name, dropout, lora_rank)
    rank, world_size = (dist_info.rank, dist_info.world_size) if dist_info else (0, 1)
    loader = ToyLoader(global_batch, seed=7, rank=rank, world_size=world_size)
    cfg = TrainConfig(steps=steps, grad_accum=grad_accum, lr=1e-2, min_lr=1e-3, warmup_steps=2,
                      eval_every=eval_every, eval_batches=2, save_every=save_every, keep_last=2,
                      log_every=1, seed=3, parallel=parallel, resume=resume, fsdp_cpu_offload=cpu_offload)
    return train(model, causal_lm, loader, cfg, out, make_eval_batches=eval_batches, save_model=save,
                 callbacks=callbacks or [], dist_info=dist_info)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", required=True)
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--global-batch", type=int, default=8)
    parser.add_argument("--grad-accum", type=int, default=1)
    parser.add_argument("--dropout", type=float, default=0.1)
    parser.add_argument("--save-every", type=int, default=2)
    parser.add_argument("--eval-every", type=int, default=3)
    parser.add_argument("--kill-after-save", type=int, default=0)
    parser.add_argument("--parallel", default="ddp")
    parser.add_argument("--model", default="toy")
    parser.add_argument("--lora-rank", type=int, default=0)
    parser.add_argument("--check-sharded-start", action="store_true")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--cpu-offload", action="store_true")
    args = parser.parse_args()

    torch.set_num_threads(1)
    info = init_distributed(device=args.device)
    if args.check_sharded_start:
        check_sharded_start(Path(args.out), info)
    run_toy(args.out, steps=args.steps, global_batch=args.global_batch, grad_accum=args.grad_accum,
            dropout=args.dropout, save_every=args.save_every, eval_every=args.eval_every,
            callbacks=[KillAfterSave(args.kill_after_save)] if args.kill_after_save else None, dist_info=info,
            parallel=args.parallel, model_name=args.model, lora_rank=args.lora_rank, cpu_offload=args.cpu_offload)
    cleanup()


if __name__ == "__main__":
    main()
