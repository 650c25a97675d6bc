"""LoRA: low-rank adapters on linear layers (Hu et al., 2021), a model transform any objective can use.

`apply_lora` swaps each targeted linear layer for a `LoraLinear` that keeps the original layer
as its frozen `base` and adds a trainable low-rank path:

    y = base(x) + (alpha / rank) * B(A(dropout(x)))      A: (rank, in), B: (out, rank)

Design choices:
- A module swap, never a subclass of the model: the same function adapts the decoder, the
  encoder, a classification head wrapper or a quantized model. `merge_lora` folds the adapters
  into the weights and swaps the plain layers back, so a merged model has exactly the original
  module structure and state-dict names (`save_native` / `save_hf` work on it unchanged).
- Module-name patterns are the globs of `models.surgery.matches`: `lm_head`, `*.attn.q` and
  `attn.q` all work, with or without a wrapper prefix such as `backbone.`.
- A = Kaiming-uniform, B = zeros (as in the paper and peft): a freshly adapted model computes
  exactly what the base model computes.
- The base may be an `nn.Linear` or the int8/int4 `quantize.QuantLinear` (QLoRA: any
  linear-like module with `in_features`, `out_features`, `bias` and `to_linear()`). Merging
  into a quantized base yields a float `nn.Linear` holding dequantize(W) + delta: the weights
  the adapter was trained against, with no second rounding error; re-quantize if needed. The
  adapter config records the base's quantization (`quantization`: bits, group size), so a
  later merge quantizes the float base the same way first (`train/setup.py::merged_model`). Adapters take the
  base weight's dtype (float32 on a quantized base); their output is cast to the base's.
- `lora_disabled(model)` turns every adapter off for a block of code, so a LoRA model serves
  as its own frozen reference model (DPO) without a second copy of the weights.
- A layer whose weight is tied to another module (e.g. `lm_head` with tied embeddings) is
  refused as a target: merging would silently change the embeddings too.
- Adapter files: `adapter.safetensors` (the `lora_a` / `lora_b` tensors under the model's
  names, plus the full parameters of `train_modules`) and `adapter_config.json`
  (`format: "lmforge-lora"`, the LoraConfig fields, the wrapped layer names, the base model).
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lmforge.checkpoint.io import load_checked, read_json, read_tensors, write_json, write_tensors
from lmforge.errors import LmforgeError
from lmforge.models.surgery import is_linear, matches, swap_module, tied_modules, unmatched
from lmforge.quantize import quantization_of

ADAPTER_WEIGHTS, ADAPTER_CONFIG, ADAPTER_FORMAT = "adapter.safetensors", "adapter_config.json", "lmforge-lora"


@dataclass
class LoraConfig:
    """Which layers get low-rank adapters, and how big. Becomes the `lora:` YAML section and `--lora.*` flags."""

    rank: int = 0  # rank r of the adapters; 0 = LoRA off (the whole model is trained)
    alpha: float = 16.0  # the adapter output is scaled by alpha / rank
    dropout: float = 0.0  # dropout on the adapter's input during training
    targets: list[str] = field(default_factory=lambda: ["*.attn.q", "*.attn.k", "*.attn.v", "*.attn.o"])  # glob patterns of linear layers to adapt, e.g. "*.mlp.*" for the MLPs (experts too)
    train_modules: list[str] = field(default_factory=list)  # glob patterns of modules trained in full beside the adapters (e.g. "score", a classification head)

    def validate(self) -> None:
        """Raise `LmforgeError` naming the first field out of range."""
        if self.rank < 0:
            raise LmforgeError(f"lora.rank must be >= 0 (0 turns LoRA off); got {self.rank}")
        if self.alpha <= 0:
            raise LmforgeError(f"lora.alpha must be positive; got {self.alpha}")
        if not 0.0 <= self.dropout < 1.0:
            raise LmforgeError(f"lora.dropout must be in [0, 1); got {self.dropout}")
        if self.rank and not self.targets:
            raise LmforgeError("lora.targets is empty; name the layers to adapt, e.g. ['*.attn.q', '*.attn.v']")


# ---------------------------------------------------------------- the adapted layer


class LoraLinear(nn.Module):
    """A frozen linear layer plus a trainable low-rank update: base(x) + scaling * B(A(dropout(x)))."""

    def __init__(self, base: nn.Module, rank: int, alpha: float, dropout: float = 0.0) -> None:
        super().__init__()
        if rank <= 0:
            raise LmforgeError(f"a LoRA layer needs rank >= 1; got {rank}")
        self.base = base
        self.rank, self.scaling, self.disabled = rank, alpha / rank, False
        ref = next(base.parameters(), None)
        ref = ref if ref is not None else next(base.buffers())
        dtype = ref.dtype if ref.is_floating_point() else torch.float32
        self.lora_a = nn.Parameter(torch.empty(rank, base.in_features, device=ref.device, dtype=dtype))
        self.lora_b = nn.Parameter(torch.zeros(base.out_features, rank, device=ref.device, dtype=dtype))
        nn.init.kaiming_uniform_(self.lora_a, a=math.sqrt(5))  # nn.Linear's own init, as in peft
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()

    def forward(self, x: Tensor) -> Tensor:
        y = self.base(x)
        if self.disabled:
            return y
        update = F.linear(F.linear(self.dropout(x).to(self.lora_a.dtype), self.lora_a), self.lora_b)  # (..., out)
        return y + self.scaling * update.to(y.dtype)  # adapters may be float32 on a bf16 or quantized base

    def delta(self) -> Tensor:
        """The weight update scaling * B @ A, (out, in)."""
        return self.scaling * (self.lora_b @ self.lora_a)

    def merged(self) -> nn.Module:
        """The base layer with the update folded into its weight (a float nn.Linear for quantized bases)."""
        with torch.no_grad():
            if isinstance(self.base, nn.Linear):
                self.base.weight += self.delta().to(self.base.weight.dtype)
                return self.base
            plain = self.base.to_linear()
            plain.weight += self.delta().to(plain.weight.dtype)
            return plain

    def extra_repr(self) -> str:
        return f"rank={self.rank}, scaling={self.scaling:g}, disabled={self.disabled}"


@contextlib.contextmanager
def lora_disabled(model: nn.Module) -> Iterator[nn.Module]:
    """Within the block, every LoraLinear of `model` computes its base layer only."""
    layers = [m for m in model.modules() if isinstance(m, LoraLinear)]
    before = [m.disabled for m in layers]
    for m in layers:
        m.disabled = True
    try:
        yield model
    finally:
        for m, was in zip(layers, before):
            m.disabled = was


# ---------------------------------------------------------------- apply / merge


def _linear_names(model: nn.Module) -> list[str]:
    """Names of the linear layers LoRA could target (those already inside a LoraLinear excluded)."""
    inside = {f"{n}.base" for n, m in model.named_modules() if isinstance(m, LoraLinear)}
    return [n for n, m in model.named_modules() if is_linear(m) and n not in inside and n]


def _targets(model: nn.Module, cfg: LoraConfig) -> list[str]:
    """The linear layers `cfg.targets` selects, with errors for patterns that select nothing."""
    if any(isinstance(m, LoraLinear) for m in model.modules()):
        raise LmforgeError("this model already has LoRA adapters; call merge_lora(model) before applying new ones")
    linear = _linear_names(model)
    missing = unmatched(cfg.targets, linear)
    if missing:
        raise LmforgeError(
            f"lora.targets {missing} match no linear layer; available layers include {linear[:8]}"
        )
    chosen = [n for n in linear if matches(n, cfg.targets)]
    tied = sorted(set(chosen) & tied_modules(model))
    if tied:
        raise LmforgeError(
            f"LoRA cannot adapt {tied}: their weights are tied to another module (tie_embeddings); "
            "remove them from lora.targets or list them in lora.train_modules"
        )
    return chosen


def _check_train_modules(model: nn.Module, train_modules: list[str]) -> None:
    names = [n for n, _ in model.named_modules() if n]
    missing = unmatched(train_modules, names)
    if missing:
        raise LmforgeError(f"lora.train_modules {missing} match no module; modules include {names[:8]}")


def _freeze_except(model: nn.Module, train_modules: list[str]) -> None:
    """Freeze every parameter but the adapters and the modules `train_modules` names."""
    model.requires_grad_(False)
    for name, module in model.named_modules():
        if isinstance(module, LoraLinear):
            module.lora_a.requires_grad_(True)
            module.lora_b.requires_grad_(True)
        elif name and matches(name, train_modules):
            module.requires_grad_(True)


def apply_lora(model: nn.Module, cfg: LoraConfig) -> list[str]:
    """Wrap the target layers of `model` in place and freeze the rest; returns the wrapped names.

    With `cfg.rank == 0` LoRA is off: the model is left untouched and `[]` is returned.
    """
    cfg.validate()
    if cfg.rank == 0:
        return []
    wrapped = _targets(model, cfg)
    _check_train_modules(model, cfg.train_modules)  # every check before the first change
    for name in wrapped:
        swap_module(model, name, LoraLinear(model.get_submodule(name), cfg.rank, cfg.alpha, cfg.dropout))
    _freeze_except(model, cfg.train_modules)
    return wrapped


def merge_lora(model: nn.Module) -> nn.Module:
    """Fold every adapter into its base weight and swap the base layer back, in place.

    Afterwards the model has its original module structure and state-dict names.
    `requires_grad` flags are left as they are; `model.requires_grad_(True)` unfreezes all.
    """
    for name, module in list(model.named_modules()):
        if isinstance(module, LoraLinear):
            swap_module(model, name, module.merged())
    return model


# ---------------------------------------------------------------- adapter files


def lora_state_dict(model: nn.Module, train_modules: list[str] | tuple[str, ...] = ()) -> dict[str, Tensor]:
    """The adapter tensors (`*.lora_a`, `*.lora_b`) and the full parameters of `train_modules`.

    A tied parameter is listed once, under the first of its names that is selected.
    """
    trained = tuple(f"{n}." for n, _ in model.named_modules() if n and matches(n, list(train_modules)))
    out: dict[str, Tensor] = {}
    seen: set[int] = set()
    for name, p in model.named_parameters(remove_duplicate=False):
        if id(p) not in seen and (name.endswith((".lora_a", ".lora_b")) or name.startswith(trained)):
            seen.add(id(p))
            out[name] = p.detach()
    return out


def save_adapter(model: nn.Module, cfg: LoraConfig, folder: str | Path, base_model: str | None = None) -> None:
    """Write `adapter.safetensors` and `adapter_config.json` into `folder` (each atomically).

    `base_model` (a path or hub name) is recorded so the adapter can be matched to its base later.
    """
    folder = Path(folder)
    wrapped = [n for n, m in model.named_modules() if isinstance(m, LoraLinear)]
    if not wrapped:
        raise LmforgeError("the model has no LoRA adapters to save; call apply_lora(model, cfg) first")
    write_tensors(folder / ADAPTER_WEIGHTS, lora_state_dict(model, cfg.train_modules), metadata={"format": ADAPTER_FORMAT})
    meta = {"format": ADAPTER_FORMAT, **dataclasses.asdict(cfg), "wrapped": wrapped, "base_model": base_model,
            "quantization": quantization_of(model)}
    write_json(folder / ADAPTER_CONFIG, meta)  # written last: its presence marks a complete adapter


def read_adapter_config(folder: str | Path) -> tuple[LoraConfig, dict[str, Any]]:
    """The LoraConfig of a saved adapter and the whole `adapter_config.json` (wrapped names, base model)."""
    path = Path(folder) / ADAPTER_CONFIG
    if not path.is_file():
        raise LmforgeError(f"{folder} has no {ADAPTER_CONFIG}; is it a folder written by save_adapter?")
    meta = read_json(path)
    if meta.get("format") != ADAPTER_FORMAT:
        raise LmforgeError(f"{path} is not an lmforge LoRA adapter config (format {meta.get('format')!r})")
    fields = {f.name for f in dataclasses.fields(LoraConfig)}
    try:
        cfg = LoraConfig(**{k: v for k, v in meta.items() if k in fields})
    except TypeError as e:
        raise LmforgeError(f"{path} is damaged ({e}); save the adapter again") from None
    cfg.validate()
    return cfg, meta


def load_adapter(model: nn.Module, folder: str | Path) -> LoraConfig:
    """Apply LoRA to `model` with the saved config and load the saved adapter tensors into it.

    On any mismatch the model is left as it was and a LmforgeError names the problem.
    """
    folder = Path(folder)
    cfg, meta = read_adapter_config(folder)
    weights = folder / ADAPTER_WEIGHTS
    if not weights.is_file():
        raise LmforgeError(f"{folder} has {ADAPTER_CONFIG} but no {ADAPTER_WEIGHTS}; copy or save the adapter again")
    tensors = read_tensors(weights)
    saved = meta.get("wrapped")
    if saved is not None and _targets(model, cfg) != saved:
        raise LmforgeError(
            f"{folder} adapts {len(saved)} layers ({saved[:3]} ...) but its targets select other layers in this model; "
            f"load the adapter onto its base model ({meta.get('base_model') or 'not recorded'})"
        )
    trainable = {n: p.requires_grad for n, p in model.named_parameters()}
    apply_lora(model, cfg)
    expected = lora_state_dict(model, cfg.train_modules)
    try:
        load_checked(expected, tensors, weights, hint="was the adapter trained on a different base model?")
    except LmforgeError:
        merge_lora(model)  # B is still zero: the weights are unchanged
        for n, p in model.named_parameters():
            p.requires_grad_(trainable[n])
        raise
    return cfg


__all__ = [
    "LoraConfig",
    "LoraLinear",
    "apply_lora",
    "load_adapter",
    "lora_disabled",
    "lora_state_dict",
    "merge_lora",
    "read_adapter_config",
    "save_adapter",
]
