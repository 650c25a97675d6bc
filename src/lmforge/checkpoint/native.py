"""The lmforge checkpoint: `config.json` (a ModelConfig marked `"format": "lmforge"`) and
`model.safetensors` under lmforge's own parameter names, beside the tokenizer files.

Tied weights are stored once. Each file is written under a temporary name and renamed into
place. Pickle is never read or written.
"""

from __future__ import annotations

from pathlib import Path

from torch import nn

from lmforge.checkpoint.io import (
    load_checked,
    read_json,
    read_tensors,
    unique_state,
    write_json,
    write_tensors,
)
from lmforge.config import ModelConfig
from lmforge.errors import LmforgeError
from lmforge.models import build_model

CONFIG_FILE, WEIGHTS_FILE = "config.json", "model.safetensors"


def is_native_folder(folder: Path) -> bool:
    cfg = folder / CONFIG_FILE
    return cfg.is_file() and read_json(cfg).get("format") == "lmforge"


def save_native(model: nn.Module, folder: str | Path) -> None:
    """Write the model's config and weights into `folder` (created if needed)."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    write_tensors(folder / WEIGHTS_FILE, unique_state(model), metadata={"format": "lmforge"})
    write_json(folder / CONFIG_FILE, {"format": "lmforge", **model.config.to_dict()})


def load_config(folder: str | Path) -> ModelConfig:
    data = read_json(Path(folder) / CONFIG_FILE)
    data.pop("format", None)
    return ModelConfig.from_dict(data)


def load_native(folder: str | Path) -> tuple[nn.Module, ModelConfig]:
    """Build the model described by `folder/config.json` and load `folder/model.safetensors` into it."""
    folder = Path(folder)
    config = load_config(folder)
    weights = folder / WEIGHTS_FILE
    if not weights.is_file():
        raise LmforgeError(f"{folder} has no {WEIGHTS_FILE}; was training interrupted before the first save?")
    model = build_model(config)
    load_checked(unique_state(model), read_tensors(weights), weights)
    return model, config
