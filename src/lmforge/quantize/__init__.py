"""Weight-only quantization: swap `nn.Linear` layers for int8 / int4 `QuantLinear` modules.

Design choices:
- A module swap, never a change to the model classes: `quantize_model` walks the model and
  replaces every linear layer that no `skip` pattern names (default: `lm_head`, whose error
  the logits feel most). Patterns are the same globs as LoRA's (`models.surgery.matches`).
  Embeddings and norms stay in float. A layer whose weight is tied to another module
  (tied `lm_head`) loses the tie when quantized: the embedding keeps its float copy.
- A quantized folder is an lmforge checkpoint (`config.json`, `model.safetensors` holding the
  packed integers, scales and zero points under `<layer>.qweight / .scales / .zeros / .bias`)
  plus `quantization.json` (`format: "lmforge-quant"`, bits, group_size, quantized layer
  names). `load_quantized` builds the float model from the config, swaps in empty QuantLinear
  layers of the recorded names and loads the tensors, checking every name and shape.
- `model_bytes` counts what the model stores (parameters and persistent buffers, tied tensors
  once): the number a user compares before and after quantizing.
"""

from __future__ import annotations

from pathlib import Path

from torch import nn

from lmforge.checkpoint.io import load_checked, read_json, read_tensors, unique_state, write_json
from lmforge.checkpoint.native import WEIGHTS_FILE, load_config, save_native
from lmforge.errors import LmforgeError
from lmforge.models import build_model
from lmforge.models.surgery import matches, swap_module
from lmforge.quantize.linear import QuantLinear, check_settings, check_width

QUANT_CONFIG, QUANT_FORMAT = "quantization.json", "lmforge-quant"


def quantize_model(
    model: nn.Module, bits: int = 8, group_size: int = 64, skip: list[str] | tuple[str, ...] = ("lm_head",)
) -> nn.Module:
    """Replace every `nn.Linear` not named by `skip` with a QuantLinear, in place; returns `model`.

    `bits` is 8 (per-channel, `group_size` unused) or 4 (groups of `group_size` = 32, 64 or 128).
    """
    check_settings(bits, group_size)
    names = [n for n, m in model.named_modules() if isinstance(m, nn.Linear) and not matches(n, list(skip))]
    if not names:
        raise LmforgeError(f"no linear layer is left to quantize after skipping {list(skip)}; shorten the skip list")
    for name in names:  # every width is checked before any layer is swapped
        check_width(model.get_submodule(name).in_features, bits, group_size, name)
    for name in names:
        swap_module(model, name, QuantLinear.from_linear(model.get_submodule(name), bits, group_size))
    return model


def quantized_layers(model: nn.Module) -> list[str]:
    return [n for n, m in model.named_modules() if isinstance(m, QuantLinear)]


def quantization_of(model: nn.Module) -> dict[str, int] | None:
    """`{"bits", "group_size"}` of the model's quantized layers; None when it has none."""
    layer = next((m for m in model.modules() if isinstance(m, QuantLinear)), None)
    return None if layer is None else {"bits": layer.bits, "group_size": layer.group_size}


def quantization_name(model: nn.Module) -> str | None:
    """"int8" / "int4" for a model with quantized layers, None for a float one (`/v1/models` reports it)."""
    quantization = quantization_of(model)
    return None if quantization is None else f"int{quantization['bits']}"


def dequantize_model(model: nn.Module) -> nn.Module:
    """Swap every QuantLinear for a float `Linear` holding its dequantized weight, in place; returns `model`."""
    for name in quantized_layers(model):
        swap_module(model, name, model.get_submodule(name).to_linear())
    return model


def model_bytes(model: nn.Module) -> int:
    """Bytes the model stores: parameters and persistent buffers, tied tensors counted once."""
    return sum(t.numel() * t.element_size() for t in unique_state(model).values())


def save_quantized(model: nn.Module, folder: str | Path) -> None:
    """Write a quantized model as an lmforge checkpoint plus `quantization.json` (each file atomically)."""
    layers = [m for m in model.modules() if isinstance(m, QuantLinear)]
    if not layers:
        raise LmforgeError("the model has no quantized layers; call quantize_model(model, bits=...) first")
    save_native(model, folder)
    meta = {"format": QUANT_FORMAT, "bits": layers[0].bits, "group_size": layers[0].group_size,
            "layers": quantized_layers(model)}
    write_json(Path(folder) / QUANT_CONFIG, meta)


def is_quantized_folder(folder: str | Path) -> bool:
    return (Path(folder) / QUANT_CONFIG).is_file()


def load_quantized(folder: str | Path) -> nn.Module:
    """Build the model `folder` describes, with QuantLinear layers where it was quantized, and load its tensors."""
    folder = Path(folder)
    if not is_quantized_folder(folder):
        raise LmforgeError(f"{folder} has no {QUANT_CONFIG}; it is not a quantized model (load it with load_model)")
    meta = read_json(folder / QUANT_CONFIG)
    if meta.get("format") != QUANT_FORMAT or not isinstance(meta.get("layers"), list):
        raise LmforgeError(f"{folder / QUANT_CONFIG} is not an lmforge quantization record; save the model again")
    check_settings(meta.get("bits"), meta.get("group_size"))
    model = build_model(load_config(folder))
    for name in meta["layers"]:
        linear = dict(model.named_modules()).get(name)
        if not isinstance(linear, nn.Linear):
            raise LmforgeError(f"{folder / QUANT_CONFIG} names layer {name!r}, which is not a linear layer of config.json's model")
        swap_module(model, name, QuantLinear(linear.in_features, linear.out_features, linear.bias is not None,
                                       meta["bits"], meta["group_size"]))
    weights = folder / WEIGHTS_FILE
    load_checked(unique_state(model), read_tensors(weights), weights)
    return model


__all__ = [
    "QuantLinear",
    "dequantize_model",
    "is_quantized_folder",
    "load_quantized",
    "model_bytes",
    "quantization_name",
    "quantization_of",
    "quantize_model",
    "quantized_layers",
    "save_quantized",
]
