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
- Only rank 0 writes files; `barrier` lets the other ranks wait for a save to finish
  (sharded FSDP2 checkpoints excepted: there every rank writes its own shards).
- `train.parallel fsdp` shards with FSDP2 (`fully_shard`) each transformer block, then the
  root, in place: the module keeps its class and parameter names, its parameters become
  DTensors, and the optimizer must be built after sharding (the loop does). With one
  process there is nothing to shard and the model is trained as it is.
- Sharded start-up: only the main rank ever holds the whole model, on CPU. The other ranks
  build theirs on the meta device (`sharded_init`; no memory, their weights are never read);
  `shard_model` turns every rank's model to meta, shards it, allocates only the local shards
  (`to_empty`) and fills them from the main rank's full state dict, broadcast one tensor at a
  time (`set_model_state_dict(..., broadcast_from_rank0=True)`, torch's documented way). The
  weights are thus exactly those the main rank built: a seeded fresh model equals the
  one-process run's, and a pretrained base is read from disk by the main rank only.
- Gradients under FSDP2 are DTensor shards: `scale_and_clip_` takes the norm of the local
  shards and adds the squares over ranks, so clipping sees the norm of the whole gradient.
"""

from __future__ import annotations

import contextlib
import copy
import hashlib
import json
import logging
import os
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import CPUOffloadPolicy, FSDPModule, MixedPrecisionPolicy, fully_shard
from torch.distributed.tensor import DTensor
from torch.nn.parallel import DistributedDataParallel

from lmforge.errors import LmforgeError
from lmforge.models.layers import Blocks

PARALLELS = ("ddp", "fsdp")

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


def shards_on_start(info: DistInfo, parallel: str) -> bool:
    """True when this run shards its model with FSDP2 (`parallel` "fsdp" on several processes)."""
    return parallel == "fsdp" and info.is_distributed


@contextlib.contextmanager
def sharded_init(info: DistInfo, parallel: str) -> Iterator[None]:
    """Within the block a non-main rank of a sharded run builds on the meta device (no memory):
    `shard_model` fills its shards from the main rank, so its own weights are never needed."""
    with torch.device("meta") if shards_on_start(info, parallel) and not info.is_main else contextlib.nullcontext():
        yield


def _on_meta(tensor: Tensor) -> Tensor:
    """An uninitialised twin of `tensor` on the meta device (a parameter if `tensor` is one)."""
    twin = torch.empty_like(tensor, device="meta")
    return nn.Parameter(twin, requires_grad=tensor.requires_grad) if isinstance(tensor, nn.Parameter) else twin


def replace_tensors_(model: nn.Module, twin: Callable[[str, Tensor], Tensor]) -> nn.Module:
    """Replace every parameter and buffer of `model` in place by `twin(name, tensor)` (wrapped as a
    parameter where `tensor` is one, unless `twin` returns `tensor` itself), called once per tensor:
    one shared by several modules (tied weights) stays shared, where `Module.to` and
    `load_state_dict(assign=True)` untie them."""
    done: dict[int, Tensor] = {}
    for prefix, module in model.named_modules():
        for tensors in (module._parameters, module._buffers):
            for name, tensor in tensors.items():
                if tensor is not None and id(tensor) not in done:
                    value = twin(f"{prefix}.{name}" if prefix else name, tensor)
                    if value is not tensor and isinstance(tensor, nn.Parameter):
                        value = nn.Parameter(value, requires_grad=tensor.requires_grad)
                    done[id(tensor)] = value
                if tensor is not None:
                    tensors[name] = done[id(tensor)]
    return model


def to_meta_(model: nn.Module) -> nn.Module:
    """`model` with its parameters and buffers moved to the meta device in place (freed), ties kept."""
    return replace_tensors_(model, lambda _, t: torch.empty_like(t, device="meta"))


def meta_copy(model: nn.Module) -> nn.Module:
    """A copy of `model` whose parameters and buffers live on the meta device (no memory); ties kept."""
    return copy.deepcopy(model, {id(t): _on_meta(t) for t in (*model.parameters(), *model.buffers())})


def shard_model(model: nn.Module, info: DistInfo, parallel: str, precision: str, cpu_offload: bool) -> nn.Module:
    """`model` on `info.device`; with `parallel` "fsdp" and several processes, FSDP2-sharded in place:
    every block of each `Blocks` stack, then the root (embeddings, final norm and head).

    Sharded, the weights are the main rank's (the others may pass a meta-device model, see
    `sharded_init`); `precision` "bfloat16" computes in bf16 parameters and reduces gradients in
    float32 (the sharded master weights stay float32); `cpu_offload` keeps the shards in CPU memory.
    """
    if cpu_offload and (parallel != "fsdp" or info.device.type == "cpu"):
        raise LmforgeError("train.fsdp_cpu_offload moves FSDP2 shards from the GPU to CPU memory: it needs "
                           "train.parallel fsdp and a GPU; drop it on CPU, where the shards already live in CPU memory")
    if not shards_on_start(info, parallel):
        return model.to(info.device)
    _check_same_model(model, info)
    full = dict(model.state_dict()) if info.is_main else {}  # the only full copy, on the main rank's CPU
    buffers = dict(model.named_buffers(remove_duplicate=False)) if info.is_main else {}
    to_meta_(model)  # frees the full weights but for `full`
    options: dict[str, Any] = {"mesh": init_device_mesh(info.device.type, (info.world_size,))}
    if precision == "bfloat16":
        options["mp_policy"] = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
    if cpu_offload:
        options["offload_policy"] = CPUOffloadPolicy()
    for stack in [m for m in model.modules() if isinstance(m, Blocks)]:
        for block in stack:
            fully_shard(block, **options)
    fully_shard(model, **options)
    model.to_empty(device="cpu" if cpu_offload else info.device)  # only the local shards are allocated
    set_model_state_dict(model, full, options=StateDictOptions(full_state_dict=True, broadcast_from_rank0=True))
    _broadcast_buffers(model, buffers, info)
    return model


def _check_same_model(model: nn.Module, info: DistInfo) -> None:
    """Fail in one line unless every rank built the same parameter names, shapes and dtypes as the main rank."""
    layout = [(name, list(p.shape), str(p.dtype)) for name, p in model.named_parameters()]
    digest = hashlib.sha256(json.dumps(layout).encode()).hexdigest()
    digests = gather_json(digest, info)
    differ = [rank for rank, d in enumerate(digests) if d != digests[0]]
    if differ:
        raise LmforgeError(f"ranks {differ} built another model than rank 0 (parameter names, shapes or dtypes "
                           "differ); every rank must run the same recipe and model settings")


def _broadcast_buffers(model: nn.Module, main_buffers: dict[str, Tensor], info: DistInfo) -> None:
    """Give every rank the main rank's buffers (rotary tables and the like: FSDP2 does not shard
    buffers, and `to_empty` left them uninitialised) on `info.device`."""
    def received(name: str, tensor: Tensor) -> Tensor:
        if isinstance(tensor, nn.Parameter):
            return tensor
        value = main_buffers[name].to(info.device) if info.is_main else torch.empty_like(tensor, device=info.device)
        dist.broadcast(value, src=0)
        return value

    replace_tensors_(model, received)


def is_sharded(model: nn.Module) -> bool:
    """True when `model` (or the module under its compile wrapper) is FSDP2-sharded."""
    return isinstance(unwrap_model(model), FSDPModule)


def wrap_model(model: nn.Module, info: DistInfo) -> nn.Module:
    """Wrap `model` (already on `info.device`) in DDP when there is more than one process
    (an FSDP2-sharded model is returned as it is: it synchronises itself)."""
    if not info.is_distributed or is_sharded(model):
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
    """Skip DDP's gradient all-reduce (FSDP2's reduce-scatter) unless `sync` (use sync=True on the last micro-batch)."""
    if is_sharded(model):
        unwrap_model(model).set_requires_gradient_sync(sync)  # type: ignore[operator]
        yield
    elif sync or not isinstance(model, DistributedDataParallel):
        yield
    else:
        with model.no_sync():
            yield


def scale_and_clip_(params: Iterable[nn.Parameter], scale: Tensor | float, max_norm: float) -> Tensor:
    """Multiply the gradients by `scale`, then clip them to total norm `max_norm` (as
    `clip_grad_norm_`), with one multiply of each: the norm is taken before scaling. Each pass over
    the gradients is ~1 GB of memory traffic for GPT-2 small. Returns the norm of the scaled
    gradients before clipping, as a float64 tensor on the gradients' device: nothing here waits
    for the device (`scale` may be a tensor too), and the foreach kernels make it two calls
    whatever the number of parameters. FSDP2 gradient shards add their squares over ranks."""
    grads = [p.grad for p in params if p.grad is not None]
    if not grads:
        return torch.zeros((), dtype=torch.float64)
    sharded = isinstance(grads[0], DTensor)
    if sharded:
        grads = [g.to_local() for g in grads]  # views: scaling them scales the shards
    raw = torch.linalg.vector_norm(torch.stack(torch._foreach_norm(grads)).double())  # one cast, not one per tensor
    if sharded:
        squares = raw.square()
        dist.all_reduce(squares, op=dist.ReduceOp.SUM)
        raw = squares.sqrt()
    norm = raw * scale
    factor = scale * (max_norm / (norm + 1e-6)).clamp(max=1.0)  # float64, on the device
    torch._foreach_mul_(grads, factor.to(grads[0].dtype))
    return norm


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
