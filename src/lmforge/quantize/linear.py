"""Weight-only int8 / int4 linear layers, swapped in for `nn.Linear` as modules.

Design choices:
- int8: symmetric, one scale per output channel (row): scale = absmax(row) / 127,
  q = round(w / scale) in [-127, 127], stored as int8 (out, in). Zero is exact.
- int4: asymmetric, groups of `group_size` (32, 64 or 128) consecutive input weights of a row,
  each with its own float32 scale and uint8 zero point: scale = (max - min) / 15,
  zero = round(-min / scale), q = clamp(round(w / scale) + zero, 0, 15); the range always
  includes 0 so zero weights stay exact. Two 4-bit values share a byte (even index in the low
  nibble, odd in the high one): `qweight` is uint8 (out, in / 2). The group size must divide
  the layer's width (a one-line error names the sizes that do): every group is whole, so the
  native kernel needs no ragged edge.
- Everything a QuantLinear stores is a buffer (`qweight`, `scales`, `zeros`, `bias`), so the
  model has no trainable parameters there, its state dict holds the packed tensors as they
  are, and safetensors saves them like any other tensor.
- The forward of a decode step (float32 CPU input of at most `kernels.MAX_ROWS` rows per call,
  no gradient) runs the native int8 / int4 matmul of `models/kernels.py`, which reads the packed
  weights directly: a step streams a quarter (int8) or an eighth (int4) of the float bytes
  (`benchmarks/decode.py` measures it). The layer binds the kernel to its buffers once
  (`kernels.QuantKernels.quant_matmul`), since checking the weights on every call cost more than
  a small layer's matmul; it binds again when a buffer is replaced or `kernels.quantized()` picks
  another library. Everything else (prefill, training, no compiler) dequantises the weight and
  runs an ordinary matmul in the input's dtype. Both agree to float32 rounding
  (`tests/models/test_quant_kernels.py`). When the input needs a gradient (QLoRA trains
  adapters around a frozen QuantLinear) the backward dequantises the weight again instead of
  keeping the float copy alive until then: only the packed weights stay resident.
- `QuantLinear` is linear-like (`in_features`, `out_features`, `bias`, `dequantize()`), so
  LoRA can wrap it as a frozen base (QLoRA).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lmforge.errors import LmforgeError
from lmforge.models import kernels
from lmforge.models.cpu_ops import Linear

BITS = (4, 8)
GROUP_SIZES = (32, 64, 128)
INT4_MAX = 15
_NATIVE_ROWS = 4 * kernels.MAX_ROWS  # rows up to which the native kernel (a weight pass per 8 rows) beats dequantizing


def check_settings(bits: int, group_size: int) -> None:
    """Raise `LmforgeError` unless `bits` and `group_size` name a supported format."""
    if bits not in BITS:
        raise LmforgeError(f"quantize bits must be 8 or 4; got {bits}")
    if bits == 4 and group_size not in GROUP_SIZES:
        raise LmforgeError(f"int4 group_size must be one of {GROUP_SIZES}; got {group_size}")


def check_width(in_features: int, bits: int, group_size: int, name: str = "") -> None:
    """Raise `LmforgeError` unless int4 groups of `group_size` tile a row of `in_features` exactly."""
    if bits == 4 and in_features % group_size:
        fits = [g for g in GROUP_SIZES if in_features % g == 0]
        layer = f"layer {name!r}" if name else "a layer"
        fix = f"use group size {' or '.join(map(str, fits))}" if fits else "leave it in float (skip it) or use 8 bits"
        raise LmforgeError(f"int4 group_size {group_size} does not divide the width {in_features} of {layer}; {fix}")


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


def pack_int4(q: Tensor) -> Tensor:
    """(..., 2n) values in 0..15 -> (..., n) uint8, even index in the low nibble."""
    q = q.to(torch.uint8)
    return q[..., 0::2] | (q[..., 1::2] << 4)


def unpack_int4(packed: Tensor) -> Tensor:
    """(..., n) uint8 -> (..., 2n) uint8 values in 0..15."""
    return torch.stack((packed & 0x0F, packed >> 4), dim=-1).flatten(-2)


def quantize_int4(weight: Tensor, group_size: int) -> tuple[Tensor, Tensor, Tensor]:
    """Group-wise asymmetric: (packed uint8 (out, in / 2), scales float32 (out, n_groups), zeros uint8 (out, n_groups))."""
    check_width(weight.shape[1], 4, group_size)
    g = weight.detach().float().view(weight.shape[0], -1, group_size)  # (out, n_groups, group_size)
    lo, hi = g.amin(-1).clamp(max=0), g.amax(-1).clamp(min=0)  # (out, n_groups), range includes 0
    scales = ((hi - lo) / INT4_MAX).clamp(min=torch.finfo(torch.float32).tiny)
    zeros = torch.round(-lo / scales).clamp(0, INT4_MAX)
    q = (torch.round(g / scales[..., None]) + zeros[..., None]).clamp(0, INT4_MAX)  # (out, n_groups, group_size)
    return pack_int4(q.flatten(1)), scales, zeros.to(torch.uint8)


def dequantize_int4(packed: Tensor, scales: Tensor, zeros: Tensor) -> Tensor:
    out_features, n_groups = scales.shape
    q = unpack_int4(packed).view(out_features, n_groups, -1).float()  # (out, n_groups, group_size)
    w = (q - zeros[..., None].float()) * scales[..., None]
    return w.flatten(1)  # (out, in)


# ---------------------------------------------------------------- the layer


class _FrozenQuantMatmul(torch.autograd.Function):
    """x @ dequantize(W).T + b with a gradient for x only; the float weight is formed again in the
    backward rather than saved, so training on a quantized base keeps only the packed weights."""

    @staticmethod
    def forward(ctx, x: Tensor, layer: QuantLinear) -> Tensor:
        ctx.layer = layer
        bias = None if layer.bias is None else layer.bias.to(x.dtype)
        return F.linear(x, layer.dequantize().to(x.dtype), bias)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad: Tensor) -> tuple[Tensor, None]:
        return grad @ ctx.layer.dequantize().to(grad.dtype), None


class QuantLinear(nn.Module):
    """y = x @ dequantize(W).T + b, with W stored as int8 rows or packed int4 groups (all buffers)."""

    def __init__(self, in_features: int, out_features: int, bias: bool, bits: int = 8, group_size: int = 64,
                 device: torch.device | str | None = None) -> None:
        """An empty layer of the given shape; fill it with `from_linear` or `load_state_dict`."""
        super().__init__()
        check_settings(bits, group_size)
        check_width(in_features, bits, group_size)
        self.in_features, self.out_features, self.bits, self.group_size = in_features, out_features, bits, group_size
        if bits == 8:
            self.register_buffer("qweight", torch.zeros(out_features, in_features, dtype=torch.int8, device=device))
            self.register_buffer("scales", torch.ones(out_features, device=device))
            self.register_buffer("zeros", None)
        else:
            n_groups = in_features // group_size
            packed = torch.zeros(out_features, in_features // 2, dtype=torch.uint8, device=device)
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
        return dequantize_int4(self.qweight, self.scales, self.zeros)

    def to_linear(self) -> Linear:
        """A float32 `Linear` (frozen) holding the dequantized weight and the bias."""
        weight = self.dequantize()
        plain = Linear(self.in_features, self.out_features, bias=self.bias is not None, device=weight.device)
        with torch.no_grad():
            plain.weight.copy_(weight)
            if self.bias is not None:
                plain.bias.copy_(self.bias)
        return plain.requires_grad_(False)

    def forward(self, x: Tensor) -> Tensor:
        rows = x.numel() // self.in_features
        if (0 < rows <= _NATIVE_ROWS and x.dtype == torch.float32 and x.is_cpu
                and not (torch.is_grad_enabled() and x.requires_grad) and not torch.compiler.is_compiling()
                and (matmul := self._native_matmul()) is not None):
            if rows <= kernels.MAX_ROWS:
                return matmul(x.contiguous())
            flat = x.reshape(rows, self.in_features).contiguous()
            parts = [matmul(flat[i : i + kernels.MAX_ROWS]) for i in range(0, rows, kernels.MAX_ROWS)]
            return torch.cat(parts).view(*x.shape[:-1], self.out_features)
        if torch.is_grad_enabled() and x.requires_grad:
            return _FrozenQuantMatmul.apply(x, self)
        bias = None if self.bias is None else self.bias.to(x.dtype)
        return F.linear(x, self.dequantize().to(x.dtype), bias)

    def _native_matmul(self) -> kernels.QuantMatmul | None:
        """The native kernel checked against this layer's buffers once, and again after one is
        replaced (`.to()`, assignment) or the library changes; None where no kernels are built."""
        if (quant := kernels.quantized()) is None:
            return None
        matmul, buffers = self.__dict__.get("_matmul"), self._buffers  # not self.qweight...: Module.__getattr__ is slow
        if matmul is None or not matmul.holds(quant, buffers["qweight"], buffers["scales"], buffers["zeros"], buffers["bias"]):
            matmul = self.__dict__["_matmul"] = quant.quant_matmul(self.qweight, self.scales, self.zeros, self.bias,
                                                                 self.bits, self.group_size)
        return matmul

    def __getstate__(self) -> dict:
        """Copies and pickles leave the bound kernel out (it holds C pointers); they bind their own."""
        state = self.__dict__.copy()
        state.pop("_matmul", None)
        return state

    def extra_repr(self) -> str:
        group = f", group_size={self.group_size}" if self.bits == 4 else ""
        return f"in_features={self.in_features}, out_features={self.out_features}, bits={self.bits}{group}"
