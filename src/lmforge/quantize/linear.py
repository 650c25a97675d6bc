"""Weight-only int8 / int4 linear layers, swapped in for `nn.Linear` as modules.

Design choices:
- int8: symmetric, one scale per output channel (row): scale = absmax(row) / 127,
  q = round(w / scale) in [-127, 127], stored as int8 (out, in). Zero is exact.
- int4: asymmetric, groups of `group_size` (32, 64 or 128) consecutive input weights of a row,
  each with its own float32 scale and uint8 zero point: scale = (max - min) / 15,
  zero = round(-min / scale), q = clamp(round(w / scale) + zero, 0, 15); the range always
  includes 0 so zero weights stay exact. Two 4-bit values share a byte (even index in the low
  nibble, odd in the high one): `qweight` is uint8 (out, padded_in / 2). Rows whose width is
  not a multiple of `group_size` are padded with zeros, which the forward slices off.
- Everything a QuantLinear stores is a buffer (`qweight`, `scales`, `zeros`, `bias`), so the
  model has no trainable parameters there, its state dict holds the packed tensors as they
  are, and safetensors saves them like any other tensor.
- The forward dequantises the whole weight and runs an ordinary matmul in the input's dtype:
  simple and exactly reproducible; the memory saving is in storage, not in kernels.
- `QuantLinear` is linear-like (`in_features`, `out_features`, `bias`, `dequantize()`), so
  LoRA can wrap it as a frozen base (QLoRA).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lmforge.errors import LmforgeError

BITS = (4, 8)
GROUP_SIZES = (32, 64, 128)
INT4_MAX = 15


def check_settings(bits: int, group_size: int) -> None:
    """Raise `LmforgeError` unless `bits` and `group_size` name a supported format."""
    if bits not in BITS:
        raise LmforgeError(f"quantize bits must be 8 or 4; got {bits}")
    if bits == 4 and group_size not in GROUP_SIZES:
        raise LmforgeError(f"int4 group_size must be one of {GROUP_SIZES}; got {group_size}")


# ---------------------------------------------------------------- int8


def quantize_int8(weight: Tensor) -> tuple[Tensor, Tensor]:
    """Per-row absmax: (q int8 (out, in), scales float32 (out,))."""
    w = weight.detach().float()
    scales = (w.abs().amax(dim=1) / 127).clamp(min=torch.finfo(torch.float32).tiny)  # (out,)
    q = torch.round(w / scales[:, None]).clamp(-127, 127).to(torch.int8)  # (out, in)
    return q, scales


def dequantize_int8(q: Tensor, scales: Tensor) -> Tensor:
    return q.float() * scales[:, None]  # (out, in)


# ---------------------------------------------------------------- int4


def _groups(weight: Tensor, group_size: int) -> Tensor:
    """(out, in) -> (out, n_groups, group_size), zero-padded on the right."""
    out_features, in_features = weight.shape
    pad = -in_features % group_size
    return F.pad(weight, (0, pad)).view(out_features, -1, group_size)


def pack_int4(q: Tensor) -> Tensor:
    """(..., 2n) values in 0..15 -> (..., n) uint8, even index in the low nibble."""
    q = q.to(torch.uint8)
    return q[..., 0::2] | (q[..., 1::2] << 4)


def unpack_int4(packed: Tensor) -> Tensor:
    """(..., n) uint8 -> (..., 2n) uint8 values in 0..15."""
    return torch.stack((packed & 0x0F, packed >> 4), dim=-1).flatten(-2)


def quantize_int4(weight: Tensor, group_size: int) -> tuple[Tensor, Tensor, Tensor]:
    """Group-wise asymmetric: (packed uint8 (out, padded_in / 2), scales float32 (out, n_groups), zeros uint8 (out, n_groups))."""
    g = _groups(weight.detach().float(), group_size)  # (out, n_groups, group_size)
    lo, hi = g.amin(-1).clamp(max=0), g.amax(-1).clamp(min=0)  # (out, n_groups), range includes 0
    scales = ((hi - lo) / INT4_MAX).clamp(min=torch.finfo(torch.float32).tiny)
    zeros = torch.round(-lo / scales).clamp(0, INT4_MAX)
    q = (torch.round(g / scales[..., None]) + zeros[..., None]).clamp(0, INT4_MAX)  # (out, n_groups, group_size)
    return pack_int4(q.flatten(1)), scales, zeros.to(torch.uint8)


def dequantize_int4(packed: Tensor, scales: Tensor, zeros: Tensor, in_features: int) -> Tensor:
    out_features, n_groups = scales.shape
    q = unpack_int4(packed).view(out_features, n_groups, -1).float()  # (out, n_groups, group_size)
    w = (q - zeros[..., None].float()) * scales[..., None]
    return w.flatten(1)[:, :in_features]  # (out, in)


# ---------------------------------------------------------------- the layer


class QuantLinear(nn.Module):
    """y = x @ dequantize(W).T + b, with W stored as int8 rows or packed int4 groups (all buffers)."""

    def __init__(self, in_features: int, out_features: int, bias: bool, bits: int = 8, group_size: int = 64,
                 device: torch.device | str | None = None) -> None:
        """An empty layer of the given shape; fill it with `from_linear` or `load_state_dict`."""
        super().__init__()
        check_settings(bits, group_size)
        self.in_features, self.out_features, self.bits, self.group_size = in_features, out_features, bits, group_size
        if bits == 8:
            self.register_buffer("qweight", torch.zeros(out_features, in_features, dtype=torch.int8, device=device))
            self.register_buffer("scales", torch.ones(out_features, device=device))
            self.register_buffer("zeros", None)
        else:
            n_groups = -(-in_features // group_size)
            packed = torch.zeros(out_features, n_groups * group_size // 2, dtype=torch.uint8, device=device)
            self.register_buffer("qweight", packed)
            self.register_buffer("scales", torch.ones(out_features, n_groups, device=device))
            self.register_buffer("zeros", torch.zeros(out_features, n_groups, dtype=torch.uint8, device=device))
        self.register_buffer("bias", torch.zeros(out_features, device=device) if bias else None)

    @classmethod
    def from_linear(cls, linear: nn.Linear, bits: int = 8, group_size: int = 64) -> QuantLinear:
        """Quantize the weight of `linear` (its bias is kept in its own dtype)."""
        layer = cls(linear.in_features, linear.out_features, linear.bias is not None, bits, group_size,
                    device=linear.weight.device)
        if bits == 8:
            layer.qweight, layer.scales = quantize_int8(linear.weight)
        else:
            layer.qweight, layer.scales, layer.zeros = quantize_int4(linear.weight, group_size)
        if linear.bias is not None:
            layer.bias = linear.bias.detach().clone()
        return layer

    def dequantize(self) -> Tensor:
        """The float32 weight (out, in) the stored integers stand for."""
        if self.bits == 8:
            return dequantize_int8(self.qweight, self.scales)
        return dequantize_int4(self.qweight, self.scales, self.zeros, self.in_features)

    def forward(self, x: Tensor) -> Tensor:
        bias = None if self.bias is None else self.bias.to(x.dtype)
        return F.linear(x, self.dequantize().to(x.dtype), bias)

    def extra_repr(self) -> str:
        group = f", group_size={self.group_size}" if self.bits == 4 else ""
        return f"in_features={self.in_features}, out_features={self.out_features}, bits={self.bits}{group}"
