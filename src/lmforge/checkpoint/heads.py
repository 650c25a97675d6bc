"""Task-head models on disk: a classifier or reward model as an lmforge folder.

The backbone is an ordinary lmforge checkpoint (`config.json` + `model.safetensors`, loadable
alone with `load_model`); the head's own tensors go to `head.safetensors` (`score.weight`,
`score.bias`) and its description to `head.json` (`format: "lmforge-head"`, kind, n_labels,
labels, pooling), written last so that its presence marks a complete save. LoRA adapters are
merged (`merge_lora`) before saving.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from torch import nn

from lmforge.checkpoint.io import (
    load_checked,
    read_json,
    read_tensors,
    unique_state,
    write_json,
    write_tensors,
)
from lmforge.checkpoint.native import load_native, save_native
from lmforge.errors import LmforgeError
from lmforge.models.heads import PooledHead, build_head

HEAD_CONFIG, HEAD_WEIGHTS, HEAD_FORMAT = "head.json", "head.safetensors", "lmforge-head"


def head_only(model: PooledHead) -> nn.Module:
    """The head's own layers without the backbone (names as in the head: `score.weight`, ...)."""
    view = nn.Module()
    for name, child in model.named_children():
        if name != "backbone":
            view.add_module(name, child)
    return view


def write_head_record(model: PooledHead, folder: Path) -> None:
    """`head.json`: what `build_head` needs to rebuild the head around a backbone."""
    write_json(folder / HEAD_CONFIG, {"format": HEAD_FORMAT, **model.head_config()})


def read_head_record(folder: str | Path) -> dict[str, Any] | None:
    """The head description in `folder/head.json`, or None when the folder holds no head."""
    path = Path(folder) / HEAD_CONFIG
    if not path.is_file():
        return None
    spec = read_json(path)
    if spec.get("format") != HEAD_FORMAT:
        raise LmforgeError(f"{path} is not an lmforge head record (format {spec.get('format')!r})")
    return spec


def save_head_model(model: PooledHead, folder: str | Path) -> None:
    """Write the backbone (lmforge checkpoint), `head.safetensors` and `head.json` into `folder`."""
    transformed = [k for k in model.backbone.state_dict() if k.endswith((".lora_a", ".qweight"))]
    if transformed:
        raise LmforgeError(
            f"the backbone holds LoRA adapters or quantized layers ({transformed[0]}); "
            "call merge_lora(model) first (quantized heads cannot be saved)"
        )
    folder = Path(folder)
    save_native(model.backbone, folder)
    write_tensors(folder / HEAD_WEIGHTS, unique_state(head_only(model)), metadata={"format": HEAD_FORMAT})
    write_head_record(model, folder)


def load_head_weights(model: PooledHead, folder: Path) -> None:
    """Load `folder/head.safetensors` into the head's own layers, checking every name and shape."""
    weights = folder / HEAD_WEIGHTS
    if not weights.is_file():
        raise LmforgeError(f"{folder} has {HEAD_CONFIG} but no {HEAD_WEIGHTS}; save the model again")
    load_checked(unique_state(head_only(model)), read_tensors(weights), weights)


def load_head_model(folder: str | Path) -> PooledHead:
    """Rebuild the head model saved in `folder` by `save_head_model`."""
    folder = Path(folder)
    spec = read_head_record(folder)
    if spec is None:
        raise LmforgeError(f"{folder} has no {HEAD_CONFIG}; it holds no task head (load a plain model with load_model)")
    model = build_head(load_native(folder)[0], spec)
    load_head_weights(model, folder)
    return model


__all__ = ["HEAD_CONFIG", "HEAD_FORMAT", "HEAD_WEIGHTS", "load_head_model", "load_head_weights", "read_head_record",
           "save_head_model", "write_head_record"]
