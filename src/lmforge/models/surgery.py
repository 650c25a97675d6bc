"""Module surgery: finding submodules by name pattern and swapping them in place.

LoRA (`train/lora.py`) and quantization (`quantize/`) are module swaps, never subclasses of the
model; both select layers and replace them with the helpers here, which know nothing of either.

Design choices:
- Module-name patterns are shell globs (`fnmatch`, where `*` also crosses dots). A pattern
  matches a module if it matches its full name or any dotted suffix of it, so `lm_head`,
  `*.attn.q` and `attn.q` all work, with or without a wrapper prefix such as `backbone.`.
- "Linear" means `nn.Linear` or any linear-like module that stores its weight in another form
  and gives it back through `dequantize()` (the int8/int4 `quantize.QuantLinear`), so a swap
  that reads weights works on a quantized model too.
- Tied weights are found by parameter identity: a module listed by `tied_modules` shares a
  weight with another, and swapping it breaks (or silently extends) the tie.
"""

from __future__ import annotations

from fnmatch import fnmatchcase

from torch import nn


def matches(name: str, patterns: list[str] | tuple[str, ...]) -> bool:
    """True if a glob pattern matches the module name or one of its dotted suffixes."""
    parts = name.split(".")
    suffixes = [".".join(parts[i:]) for i in range(len(parts))]
    return any(fnmatchcase(s, p) for p in patterns for s in suffixes)


def unmatched(patterns: list[str], names: list[str]) -> list[str]:
    """The patterns that match none of `names` (for errors that name them)."""
    return [p for p in patterns if not any(matches(n, [p]) for n in names)]


def is_linear(module: nn.Module) -> bool:
    """nn.Linear, or a linear-like module that stores its weight in another form (QuantLinear)."""
    return isinstance(module, nn.Linear) or callable(getattr(module, "dequantize", None))


def tied_modules(model: nn.Module) -> set[str]:
    """Modules whose weight is shared with another module (tied embeddings)."""
    owners: dict[int, list[str]] = {}
    for name, p in model.named_parameters(remove_duplicate=False):
        owners.setdefault(id(p), []).append(name.rpartition(".")[0])
    return {n for names in owners.values() if len(names) > 1 for n in names}


def swap_module(model: nn.Module, name: str, new: nn.Module) -> None:
    """Replace the submodule called `name` (dotted) by `new`."""
    parent_name, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent_name) if parent_name else model, child, new)
