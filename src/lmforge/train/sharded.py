"""Sharded checkpoints of FSDP2 runs, through `torch.distributed.checkpoint` (DCP).

A checkpoint of a `train.parallel fsdp` run is an ordinary lmforge checkpoint folder
(config.json, a consolidated model.safetensors that `lmforge.load` and `lmforge convert`
read, train_state.json) plus `sharded/`: the DCP files of the model and optimizer state,
one file per rank, which is what resuming reads. `train_state.json["optimizer"]` is then
`{"sharded": "sharded"}` and train_state.safetensors is empty.

Design choices:
- Every rank writes its own shards into the same temporary folder (`step_XXXXXXX.tmp/`, or
  `final.tmp/` for the run folder); the main rank adds the consolidated model and the JSON
  state, and only then puts the folder in place, so an interrupted save leaves the previous
  checkpoint as the newest complete one, as for DDP checkpoints. The folder must be on a
  file system every rank sees (a shared one across nodes).
- DCP reshards on load: a checkpoint saved by N ranks resumes on M ranks (or one process,
  where the model is not sharded at all) with the same weights and optimizer moments.
- The consolidated weights are gathered with `full_state_dict=True, cpu_offload=True` (only
  the main rank keeps them) into a meta-device copy of the model taken before sharding, so the
  caller's `save_model` sees a plain module of the right class. `full_model_on_main` is that
  gather on its own: whatever rank-0-only work needs the whole trained model (the merged LoRA
  export, classify's final scores; `setup.Run.trained_model`) goes through it, on every rank,
  since gathering shards is a collective that deadlocks or fails when one rank calls it alone.
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

import torch
import torch.distributed.checkpoint as dcp
from torch import nn
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_state_dict,
    set_state_dict,
)

from lmforge.errors import LmforgeError
from lmforge.train.checkpointing import ModelIO, checkpoint_tmp, publish, write_files
from lmforge.train.distributed import DistInfo, barrier, is_sharded, meta_copy, replace_tensors_

SHARDED_DIR = "sharded"


def _own_storage(t: torch.Tensor) -> torch.Tensor:
    """`t`, copied when it is a view into a larger gathered buffer (safetensors refuses to save those)."""
    return t if t.untyped_storage().nbytes() == t.numel() * t.element_size() else t.clone()


def save_sharded_checkpoint(
    dest: Path, *, model: nn.Module, skeleton: nn.Module | None, save_model: ModelIO,
    optimizer: torch.optim.Optimizer, state: dict[str, Any], info: DistInfo, in_place: bool = False,
) -> Path:
    """Write a sharded checkpoint to `dest` atomically (a collective: every rank calls it).

    `skeleton` is `meta_copy` of the model before sharding (needed on the main rank only);
    `state` is the JSON train state without the optimizer, as for `save_checkpoint`.
    """
    tmp = checkpoint_tmp(dest, in_place)
    if info.is_main:
        if tmp.exists():
            shutil.rmtree(tmp)
        tmp.mkdir(parents=True)
    barrier(info)
    model_state, optimizer_state = get_state_dict(model, optimizer)
    dcp.save({"model": model_state, "optimizer": optimizer_state}, checkpoint_id=tmp / SHARDED_DIR)
    whole = full_model_on_main(model, skeleton, info)
    if whole is not None:
        write_files(tmp, whole, save_model, {}, {**state, "optimizer": {"sharded": SHARDED_DIR}})
        del whole  # drop the consolidated weights before the next step
        publish(tmp, dest, in_place)
    barrier(info)
    return dest


def full_model_on_main(model: nn.Module, skeleton: nn.Module | None, info: DistInfo) -> nn.Module | None:
    """The whole of `model` as a plain module on the main rank, None on the others.

    Unsharded (one process, DDP) that is `model` itself. FSDP2-sharded it is a collective every
    rank must call: the full weights are gathered into the main rank's CPU memory
    (`full_state_dict=True, cpu_offload=True`) and put into a fresh `meta_copy` of `skeleton` (the
    meta copy of the model taken before sharding, needed on the main rank only), with the
    buffers every rank holds whole; the caller owns it (merging LoRA into it changes nothing else).
    """
    if not is_sharded(model):
        return model if info.is_main else None
    full = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    if not info.is_main:
        return None
    assert skeleton is not None, "the main rank needs the meta copy of the model to gather the whole model"
    buffers = dict(model.named_buffers(remove_duplicate=False))
    return replace_tensors_(meta_copy(skeleton),
                            lambda name, t: _own_storage(full[name]) if name in full else buffers[name].cpu())


def is_sharded_checkpoint(state: dict[str, Any]) -> bool:
    """True for the train state of a checkpoint written by `save_sharded_checkpoint`."""
    return "sharded" in state["optimizer"]


def load_sharded_checkpoint(model: nn.Module, optimizer: torch.optim.Optimizer, folder: Path) -> None:
    """Load the model and optimizer state of a sharded checkpoint, resharded to this run's ranks."""
    model_state, optimizer_state = get_state_dict(model, optimizer)
    target = {"model": model_state, "optimizer": optimizer_state}
    try:
        dcp.load(target, checkpoint_id=folder / SHARDED_DIR)
    except Exception as err:  # DCP wraps per-rank failures; say which checkpoint and what to do
        raise LmforgeError(f"checkpoint {folder} could not be loaded from {SHARDED_DIR}/ ({type(err).__name__}); "
                           "resume with the model settings and LoRA setup it was trained with") from None
    set_state_dict(model, optimizer, model_state_dict=target["model"], optim_state_dict=target["optimizer"])


def resume_rank(folder: Path, state: dict[str, Any], model: nn.Module, info: DistInfo) -> int:
    """The rank whose saved loader position and RNG state this rank resumes from.

    A DDP checkpoint resumes only with the same number of processes and not sharded. A
    sharded one resumes on any number: rank r takes the saved state of rank r mod (saved world
    size), so loaders that draw the same global batch on every rank and keep their own slice
    continue with the same data order.
    """
    saved = int(state["world_size"])
    if is_sharded_checkpoint(state):
        return info.rank % saved
    if is_sharded(model):
        raise LmforgeError(f"checkpoint {folder} was written by a ddp run; resume it with --train.parallel ddp")
    if saved != info.world_size:
        raise LmforgeError(f"checkpoint {folder} was written by {saved} processes; "
                           f"resume it with the same number (torchrun --nproc_per_node {saved})")
    return info.rank
