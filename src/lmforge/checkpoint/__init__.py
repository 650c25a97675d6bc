"""Checkpoints: lmforge's own format (native.py) and Hugging Face folders (hf.py)."""

from pathlib import Path

import torch
from torch import nn

from lmforge.checkpoint.hf import config_from_hf, is_hf_folder, load_hf, save_hf
from lmforge.checkpoint.io import first_float_dtype, read_json, weight_files
from lmforge.checkpoint.native import is_native_folder, load_config, load_native, save_native
from lmforge.config import ModelConfig
from lmforge.errors import LmforgeError


def load_model(path: str | Path) -> tuple[nn.Module, ModelConfig]:
    """Load an lmforge checkpoint folder or a Hugging Face folder, telling them apart by config.json."""
    folder = _model_folder(path)
    return load_native(folder) if is_native_folder(folder) else load_hf(folder)


def load_model_config(path: str | Path) -> ModelConfig:
    """The architecture of an lmforge or Hugging Face model folder, without reading its weights."""
    folder = _model_folder(path)
    return load_config(folder) if is_native_folder(folder) else config_from_hf(read_json(folder / "config.json"), folder / "config.json")


def _model_folder(path: str | Path) -> Path:
    """`path` checked to be an lmforge or Hugging Face model folder, with a one-line error otherwise."""
    folder = Path(path)
    if not folder.exists():
        raise LmforgeError(f"{folder} does not exist; pass a run folder (e.g. runs/quickstart), a Hugging Face model folder or a GGUF file")
    if not folder.is_dir():
        raise LmforgeError(f"{folder} is a file; pass the folder that holds config.json and the weights")
    if not (folder / "config.json").is_file():
        raise LmforgeError(f"{folder} has no config.json; is it a model folder (lmforge run or Hugging Face download)?")
    if not (is_native_folder(folder) or is_hf_folder(folder)):
        raise LmforgeError(f"{folder}/config.json is neither an lmforge config nor a Hugging Face one (no model_type)")
    return folder


def float_dtype(name: str, source: str = "dtype") -> torch.dtype:
    """torch's floating-point dtype called `name` ("bfloat16", "float16", "float32", ...)."""
    dtype = getattr(torch, name, None) if not name.startswith("_") else None
    if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
        raise LmforgeError(f"{source} {name!r} is not a floating-point dtype; use 'bfloat16', 'float16' or 'float32'")
    return dtype


def stored_dtype(folder: str | Path) -> torch.dtype:
    """The dtype a model folder was saved in, as transformers' `dtype="auto"` reads it: config.json's
    `dtype` (transformers 4 wrote `torch_dtype`), else the dtype of the first floating-point tensor
    of the weights; float32 when neither says."""
    folder = Path(folder)
    config = read_json(folder / "config.json") if (folder / "config.json").is_file() else {}
    named = config.get("dtype") or config.get("torch_dtype")
    if isinstance(named, str) and named != "auto":
        return float_dtype(named, f"{folder / 'config.json'} has the dtype")
    if not any((folder / f).is_file() for f in ("model.safetensors", "model.safetensors.index.json")):
        return torch.float32
    found = (first_float_dtype(path) for path in weight_files(folder))
    return next((d for d in found if d is not None), torch.float32)


__all__ = ["float_dtype", "load_hf", "load_model", "load_model_config", "load_native", "save_hf", "save_native", "stored_dtype"]
