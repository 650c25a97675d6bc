"""Train-state checkpoints: atomic folders, resume discovery, pruning, exact RNG restore.

A checkpoint folder holds what the caller's `save_model` writes (config.json,
model.safetensors, the tokenizer) plus two files written here:

- `train_state.safetensors`: the optimizer state tensors, flattened as
  `optimizer.{param_index}.{name}` (e.g. `optimizer.3.exp_avg`), where `param_index` is the
  parameter's position in the optimizer (the order of `train_state.json["optimizer"]["params"]`).
- `train_state.json`: everything else, plain JSON: `format`, `version`, `step`, `config`,
  `scheduler`, `loader` and `rng` (lists with one entry per rank), `optimizer` (parameter
  names and shapes, group sizes, non-tensor per-parameter state), `history`, `monitor`,
  `world_size`.

Design choices:
- Pickle is never written or loaded: tensors go to safetensors, the rest to JSON. RNG states
  are JSON too (torch's byte states as base64).
- Writes are atomic: a periodic checkpoint is written into `step_XXXXXXX.tmp/` and renamed
  into place once complete. The final checkpoint lands in the run folder itself, which cannot
  be renamed, so its files are moved in one by one with `train_state.json` removed first and
  moved last. Either way a folder counts as a checkpoint only when `train_state.json` is
  present, so an interrupted write is never taken for the newest checkpoint.
- Resuming checks that the model matches the checkpoint tensor by tensor and names the first
  mismatch, instead of letting `load_state_dict` fail with a wall of text.
"""

from __future__ import annotations

import base64
import json
import logging
import os
import random
import re
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file, save_file
from torch import nn

from lmforge.checkpoint.io import load_checked, read_tensors
from lmforge.errors import LmforgeError

log = logging.getLogger(__name__)

TRAIN_STATE_JSON = "train_state.json"
TRAIN_STATE_TENSORS = "train_state.safetensors"
MODEL_FILE = "model.safetensors"
CHECKPOINTS_DIR = "checkpoints"
FINAL_TMP = "final.tmp"
FORMAT = "lmforge-train-state"
VERSION = 1
_STEP_DIR = re.compile(r"step_(\d{7,})")

ModelIO = Callable[[nn.Module, Path], None]  # save_model / load_model: (model, folder) -> None


# ---------------------------------------------------------------------------- folders


def periodic_checkpoint_dir(out_dir: Path, step: int) -> Path:
    """`out_dir/checkpoints/step_{step:07d}`."""
    return out_dir / CHECKPOINTS_DIR / f"step_{step:07d}"


def is_complete(folder: Path) -> bool:
    """True when `folder` holds a fully written train state."""
    return (folder / TRAIN_STATE_JSON).is_file() and (folder / TRAIN_STATE_TENSORS).is_file()


def _checkpoint_step(folder: Path) -> int | None:
    try:
        return int(json.loads((folder / TRAIN_STATE_JSON).read_text())["step"])
    except (OSError, ValueError, KeyError, TypeError) as err:
        log.warning("ignoring unreadable checkpoint %s: %s", folder, err)
        return None


def periodic_checkpoints(out_dir: Path) -> list[tuple[int, Path]]:
    """Complete periodic checkpoints under `out_dir`, oldest first."""
    root = out_dir / CHECKPOINTS_DIR
    if not root.is_dir():
        return []
    found = []
    for folder in root.iterdir():
        match = _STEP_DIR.fullmatch(folder.name)
        if match and folder.is_dir() and is_complete(folder):
            found.append((int(match.group(1)), folder))
    return sorted(found)


def find_resume_checkpoint(out_dir: Path) -> Path | None:
    """The newest complete checkpoint in `out_dir` (the final one or a periodic one), or None."""
    candidates = [folder for _, folder in periodic_checkpoints(out_dir)]
    if is_complete(out_dir):
        candidates.append(out_dir)
    best: tuple[int, Path] | None = None
    for folder in candidates:
        step = _checkpoint_step(folder)
        if step is not None and (best is None or step >= best[0]):
            best = (step, folder)
    return None if best is None else best[1]


def prune_checkpoints(out_dir: Path, keep_last: int) -> list[Path]:
    """Delete all but the newest `keep_last` periodic checkpoints (0 keeps all); return the deleted."""
    if keep_last <= 0:
        return []
    old = [folder for _, folder in periodic_checkpoints(out_dir)][:-keep_last]
    for folder in old:
        shutil.rmtree(folder)
    return old


def remove_stale_tmp(out_dir: Path) -> None:
    """Delete half-written checkpoint folders left by an interrupted run."""
    stale = [*(out_dir / CHECKPOINTS_DIR).glob("*.tmp"), out_dir / FINAL_TMP]
    for folder in stale:
        if folder.is_dir():
            log.info("removing interrupted checkpoint write %s", folder)
            shutil.rmtree(folder)


# ---------------------------------------------------------------------------- RNG


def _b64(t: torch.Tensor) -> str:
    return base64.b64encode(t.cpu().numpy().tobytes()).decode()


def _from_b64(text: str) -> torch.Tensor:
    return torch.frombuffer(bytearray(base64.b64decode(text)), dtype=torch.uint8)


def rng_state() -> dict[str, Any]:
    """The python, numpy, torch CPU (and CUDA) RNG states as JSON-serialisable data."""
    np_state = np.random.get_state(legacy=False)
    np_state["state"]["key"] = np_state["state"]["key"].tolist()
    state: dict[str, Any] = {
        "python": [random.getstate()[0], list(random.getstate()[1]), random.getstate()[2]],
        "numpy": np_state,
        "torch": _b64(torch.get_rng_state()),
    }
    if torch.cuda.is_available():
        state["cuda"] = [_b64(s) for s in torch.cuda.get_rng_state_all()]
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    """Restore the RNG states captured by `rng_state`."""
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    np_state = dict(state["numpy"])
    np_state["state"] = {**np_state["state"], "key": np.array(np_state["state"]["key"], dtype=np.uint32)}
    np.random.set_state(np_state)
    torch.set_rng_state(_from_b64(state["torch"]))
    if "cuda" in state and torch.cuda.is_available():
        cuda_states = [_from_b64(s) for s in state["cuda"]]
        if len(cuda_states) == torch.cuda.device_count():
            torch.cuda.set_rng_state_all(cuda_states)
        else:
            log.warning("checkpoint has CUDA RNG states for %d devices, not %d; not restored",
                        len(cuda_states), torch.cuda.device_count())


# ---------------------------------------------------------------------------- optimizer


def named_optimizer_params(optimizer: torch.optim.Optimizer, model: nn.Module) -> list[tuple[str, list[int]]]:
    """(name, shape) of every parameter in the optimizer, in optimizer order."""
    names = {id(p): n for n, p in model.named_parameters()}
    return [
        (names.get(id(p), f"<unnamed {i}>"), list(p.shape))
        for i, p in enumerate(p for group in optimizer.param_groups for p in group["params"])
    ]


def optimizer_state_to_flat(
    optimizer: torch.optim.Optimizer, model: nn.Module
) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Split the optimizer state into safetensors-ready tensors and JSON metadata."""
    tensors: dict[str, torch.Tensor] = {}
    scalars: dict[str, dict[str, Any]] = {}
    for index, param_state in optimizer.state_dict()["state"].items():
        for key, value in param_state.items():
            if isinstance(value, torch.Tensor):
                tensors[f"optimizer.{index}.{key}"] = value.detach().cpu().contiguous()
            else:
                scalars.setdefault(str(index), {})[key] = value
    meta = {
        "params": [[name, shape] for name, shape in named_optimizer_params(optimizer, model)],
        "group_sizes": [len(group["params"]) for group in optimizer.param_groups],
        "scalars": scalars,
    }
    return tensors, meta


def check_model_matches(folder: Path, expected: list[tuple[str, list[int]]], saved: list[list[Any]]) -> None:
    """Raise LmforgeError naming the first parameter that differs between checkpoint and model."""
    for (name, shape), (saved_name, saved_shape) in zip(expected, saved):
        if name != saved_name or list(shape) != list(saved_shape):
            raise LmforgeError(
                f"checkpoint {folder} was trained with a different model shape: it has {saved_name} "
                f"{tuple(saved_shape)} where this model has {name} {tuple(shape)}"
            )
    if len(expected) != len(saved):
        longer = expected if len(expected) > len(saved) else saved
        name, shape = longer[min(len(expected), len(saved))]
        where = "this model" if longer is expected else "the checkpoint"
        raise LmforgeError(
            f"checkpoint {folder} was trained with a different model shape: only {where} has "
            f"{name} {tuple(shape)}"
        )


def load_optimizer_state(
    optimizer: torch.optim.Optimizer, model: nn.Module, folder: Path,
    tensors: dict[str, torch.Tensor], meta: dict[str, Any],
) -> None:
    """Restore the optimizer state saved by `optimizer_state_to_flat` (hyper-parameters stay current)."""
    check_model_matches(folder, named_optimizer_params(optimizer, model), meta["params"])
    current = optimizer.state_dict()
    if [len(g["params"]) for g in current["param_groups"]] != meta["group_sizes"]:
        raise LmforgeError(
            f"checkpoint {folder} groups its parameters differently ({meta['group_sizes']}); "
            "resume with the same param_groups and frozen parameters it was trained with"
        )
    state: dict[int, dict[str, Any]] = {}
    for key, value in tensors.items():
        if key.startswith("optimizer."):
            _, index, name = key.split(".", 2)
            state.setdefault(int(index), {})[name] = value
    for index, values in meta["scalars"].items():
        state.setdefault(int(index), {}).update(values)
    optimizer.load_state_dict({"state": state, "param_groups": current["param_groups"]})


# ---------------------------------------------------------------------------- model weights


def load_model_weights(model: nn.Module, folder: Path) -> None:
    """Load `folder/model.safetensors` into `model`, checking every name and shape first.

    Tensors missing from the file are accepted when they are tied to one that is there or are
    not trained (a frozen LoRA base the caller rebuilt, buffers); a missing trained tensor, an
    unknown one, or a different shape raises LmforgeError naming it.
    """
    path = folder / MODEL_FILE
    if not path.is_file():
        raise LmforgeError(f"checkpoint {folder} has no {MODEL_FILE}; was training interrupted before the first save?")
    saved = read_tensors(path)
    params: dict[str, torch.Tensor] = {}
    seen: set[int] = set()
    for name, t in model.state_dict(keep_vars=True).items():
        if id(t) not in seen or name in saved:  # a tied second name counts only when the file has it
            params[name] = t.detach()
            seen.add(id(t))
    trained = {name for name, p in model.named_parameters() if p.requires_grad}
    load_checked(params, saved, f"checkpoint {folder}", optional=[n for n in params if n not in trained],
                 problem="was trained with a different model shape",
                 hint="resume with the model settings it was trained with")


# ---------------------------------------------------------------------------- write / read


def _write_folder(
    folder: Path, model: nn.Module, save_model: ModelIO, tensors: dict[str, torch.Tensor], state: dict[str, Any]
) -> None:
    if folder.exists():
        shutil.rmtree(folder)
    folder.mkdir(parents=True)
    write_files(folder, model, save_model, tensors, state)


def write_files(
    folder: Path, model: nn.Module, save_model: ModelIO, tensors: dict[str, torch.Tensor], state: dict[str, Any]
) -> None:
    """Write the model, the optimizer tensors and the JSON train state into the existing `folder`."""
    save_model(model, folder)
    save_file(tensors, str(folder / TRAIN_STATE_TENSORS))
    (folder / TRAIN_STATE_JSON).write_text(json.dumps({"format": FORMAT, "version": VERSION, **state}, indent=1))


def _move_into(tmp: Path, dest: Path) -> None:
    """Move the files of `tmp` into the existing folder `dest`, the train-state JSON last."""
    (dest / TRAIN_STATE_JSON).unlink(missing_ok=True)
    names = [*sorted(p.name for p in tmp.iterdir() if p.name != TRAIN_STATE_JSON), TRAIN_STATE_JSON]
    for name in names:
        target = dest / name
        if target.is_dir():
            shutil.rmtree(target)
        os.replace(tmp / name, target)
    tmp.rmdir()


def checkpoint_tmp(dest: Path, in_place: bool) -> Path:
    """The folder a checkpoint for `dest` is written into before `publish` puts it in place."""
    return dest / FINAL_TMP if in_place else dest.with_name(dest.name + ".tmp")


def publish(tmp: Path, dest: Path, in_place: bool) -> Path:
    """Put the complete checkpoint written in `tmp` in place at `dest` (replacing an older one) and return `dest`."""
    if in_place:
        _move_into(tmp, dest)
    else:
        if dest.exists():
            shutil.rmtree(dest)
        os.replace(tmp, dest)
    return dest


def save_checkpoint(
    dest: Path, *, model: nn.Module, save_model: ModelIO,
    optimizer: torch.optim.Optimizer, state: dict[str, Any], in_place: bool = False,
) -> Path:
    """Write model + train state to `dest` atomically and return `dest`.

    `state` is the JSON part without the optimizer (the loop builds it). With
    `in_place=True`, `dest` is an existing run folder that keeps its other files.
    """
    tensors, optimizer_meta = optimizer_state_to_flat(optimizer, model)
    tmp = checkpoint_tmp(dest, in_place)
    _write_folder(tmp, model, save_model, tensors, {**state, "optimizer": optimizer_meta})
    return publish(tmp, dest, in_place)


def read_train_state(folder: Path) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """The JSON train state and the optimizer tensors of a checkpoint folder."""
    if not folder.is_dir():
        raise LmforgeError(f"checkpoint {folder} does not exist; pass resume=auto, never, or an existing checkpoint folder")
    if not is_complete(folder):
        raise LmforgeError(f"checkpoint {folder} has no {TRAIN_STATE_JSON} and {TRAIN_STATE_TENSORS}; "
                           "was its write interrupted? resume from an earlier checkpoint")
    try:
        state = json.loads((folder / TRAIN_STATE_JSON).read_text())
    except ValueError as err:
        raise LmforgeError(f"checkpoint {folder} has a corrupt {TRAIN_STATE_JSON}: {err}") from None
    if state.get("format") != FORMAT or state.get("version") != VERSION:
        raise LmforgeError(f"checkpoint {folder} has train state format {state.get('format')} "
                           f"v{state.get('version')}; this lmforge reads {FORMAT} v{VERSION}")
    return state, load_file(str(folder / TRAIN_STATE_TENSORS), device="cpu")
