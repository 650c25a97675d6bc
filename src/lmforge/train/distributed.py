"""Data-parallel training under `torchrun`: process-group set-up, DDP wrapping, collectives.

Design choices:
- `init_distributed` reads the environment `torchrun` sets (RANK, WORLD_SIZE, LOCAL_RANK).
  Without it the run is a single process and no process group is created, so the same
  training code runs unchanged under `python` and under `torchrun`.
- The backend follows the device: NCCL on CUDA, gloo on CPU.
- `DistInfo` is an immutable value passed to whoever needs the rank; nothing here keeps
  module-level state besides the process group torch itself owns.
- Small objects (loader positions, RNG states) are gathered as JSON bytes in uint8
  tensors, never with `all_gather_object`, which pickles.
- Only rank 0 writes files; `barrier` lets the other ranks wait for a save to finish.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from lmforge.errors import LmforgeError

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class DistInfo:
    """Where this process sits in the job."""

    rank: int  # global rank, 0 .. world_size-1
    world_size: int  # number of processes in the job
    local_rank: int  # rank on this machine; picks the GPU
    device: torch.device  # the device this process trains on

    @property
    def is_main(self) -> bool:
        """True on the one process that writes checkpoints, metrics and plots."""
        return self.rank == 0

    @property
    def is_distributed(self) -> bool:
        """True when there is more than one process."""
        return self.world_size > 1


def _env_int(name: str, default: int) -> int:
    value = os.environ.get(name)
    if value is None:
        return default
    try:
        return int(value)
    except ValueError:
        raise LmforgeError(f"environment variable {name}={value!r} is not an integer; launch with torchrun") from None


def init_distributed(device: str | None = None) -> DistInfo:
    """Set up the process group from torchrun's environment (or return a single-process info).

    `device` forces "cpu" or "cuda"; by default CUDA is used when available. The process
    group is created only once: calling this again in the same process reuses it.
    """
    rank = _env_int("RANK", 0)
    world_size = _env_int("WORLD_SIZE", 1)
    local_rank = _env_int("LOCAL_RANK", 0)
    use_cuda = torch.cuda.is_available() if device is None else device.startswith("cuda")
    if use_cuda and not torch.cuda.is_available():
        raise LmforgeError("device cuda was requested but no CUDA GPU is available; use device cpu")
    if use_cuda:
        torch.cuda.set_device(local_rank)
        dev = torch.device("cuda", local_rank)
    else:
        dev = torch.device("cpu")
    if world_size > 1 and not dist.is_initialized():
        backend = "nccl" if use_cuda else "gloo"
        dist.init_process_group(backend=backend, rank=rank, world_size=world_size)
        log.info("initialised %s process group: rank %d of %d", backend, rank, world_size)
    return DistInfo(rank=rank, world_size=world_size, local_rank=local_rank, device=dev)


def wrap_model(model: nn.Module, info: DistInfo) -> nn.Module:
    """Wrap `model` (already on `info.device`) in DDP when there is more than one process."""
    if not info.is_distributed:
        return model
    device_ids = [info.local_rank] if info.device.type == "cuda" else None
    return DistributedDataParallel(model, device_ids=device_ids)


def unwrap_model(model: nn.Module) -> nn.Module:
    """The plain module under DDP and torch.compile wrappers."""
    while True:
        if isinstance(model, DistributedDataParallel):
            model = model.module
        elif hasattr(model, "_orig_mod"):  # torch.compile's OptimizedModule
            model = model._orig_mod
        else:
            return model


@contextlib.contextmanager
def maybe_no_sync(model: nn.Module, sync: bool) -> Iterator[None]:
    """Skip DDP's gradient all-reduce unless `sync` (use sync=True on the last micro-batch)."""
    if sync or not isinstance(model, DistributedDataParallel):
        yield
    else:
        with model.no_sync():
            yield


def all_reduce_sum(tensor: torch.Tensor, info: DistInfo) -> torch.Tensor:
    """Sum `tensor` over all ranks in place (a no-op for one process) and return it."""
    if info.is_distributed:
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return tensor


def any_rank(flag: bool, info: DistInfo) -> bool:
    """True when `flag` is true on at least one rank."""
    if not info.is_distributed:
        return flag
    t = torch.tensor([1.0 if flag else 0.0], device=info.device)
    return bool(all_reduce_sum(t, info).item() > 0)


def gather_json(obj: Any, info: DistInfo) -> list[Any]:
    """Every rank's JSON-serialisable `obj`, in rank order, on every rank."""
    if not info.is_distributed:
        return [obj]
    data = torch.tensor(list(json.dumps(obj).encode()), dtype=torch.uint8, device=info.device)
    sizes = [torch.zeros(1, dtype=torch.long, device=info.device) for _ in range(info.world_size)]
    dist.all_gather(sizes, torch.tensor([data.numel()], device=info.device))
    longest = max(int(s.item()) for s in sizes)
    padded = torch.zeros(longest, dtype=torch.uint8, device=info.device)
    padded[: data.numel()] = data
    chunks = [torch.empty_like(padded) for _ in range(info.world_size)]
    dist.all_gather(chunks, padded)
    return [
        json.loads(bytes(chunk[: int(size.item())].tolist()).decode())
        for chunk, size in zip(chunks, sizes, strict=True)
    ]


def barrier(info: DistInfo) -> None:
    """Wait for every rank (a no-op for one process)."""
    if info.is_distributed:
        dist.barrier()


def cleanup() -> None:
    """Destroy the process group if one exists."""
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
