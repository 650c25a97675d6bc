"""Checkpoints: lmforge's own format (native.py) and Hugging Face folders (hf.py)."""

from pathlib import Path

from torch import nn

from lmforge.checkpoint.hf import is_hf_folder, load_hf, save_hf
from lmforge.checkpoint.native import is_native_folder, load_native, save_native
from lmforge.config import ModelConfig
from lmforge.errors import LmforgeError


def load_model(path: str | Path) -> tuple[nn.Module, ModelConfig]:
    """Load an lmforge checkpoint folder or a Hugging Face folder, telling them apart by config.json."""
    folder = Path(path)
    if not folder.exists():
        raise LmforgeError(f"{folder} does not exist; pass a run folder (e.g. runs/quickstart) or a Hugging Face model folder")
    if not folder.is_dir():
        raise LmforgeError(f"{folder} is a file; pass the folder that holds config.json and the weights")
    if not (folder / "config.json").is_file():
        raise LmforgeError(f"{folder} has no config.json; is it a model folder (lmforge run or Hugging Face download)?")
    if is_native_folder(folder):
        return load_native(folder)
    if is_hf_folder(folder):
        return load_hf(folder)
    raise LmforgeError(f"{folder}/config.json is neither an lmforge config nor a Hugging Face one (no model_type)")


__all__ = ["load_hf", "load_model", "load_native", "save_hf", "save_native"]
