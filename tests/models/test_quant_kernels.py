"""The native int8 / int4 decode matmuls: equal to dequantize-then-matmul to float32 rounding for
odd shapes, taken by `QuantLinear` for decode-sized inputs without forming the float weight, and
replaced by the dequantizing path where the kernels are not built."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.testing import assert_close

from lmforge.config import preset
from lmforge.generate.engine import Engine, Request
from lmforge.models import build_model, kernels
from lmforge.quantize import quantize_model
from lmforge.quantize.linear import QuantLinear

FORMATS = [(8, 64), (4, 32), (4, 64), (4, 128)]


def quantized(n: int, k: int, bits: int, group_size: int, seed: int = 0) -> QuantLinear:
    torch.manual_seed(seed)
    return QuantLinear.from_linear(nn.Linear(k, n), bits, group_size)


def native_forward(native, layer: QuantLinear, x: torch.Tensor, bias: bool = True, avx2_only: bool = False) -> torch.Tensor:
    return native.gemv_quant(x, layer.qweight, layer.scales, layer.zeros, layer.bias if bias else None,
                             layer.bits, layer.group_size, avx2_only)


@pytest.mark.parametrize("avx2_only", [False, True])  # the widest ISA here (AVX-512 where present), and AVX2
@pytest.mark.parametrize("rows", range(1, kernels.MAX_ROWS + 1))
@pytest.mark.parametrize(("bits", "group_size"), FORMATS)
def test_kernel_matches_dequantize_then_matmul(native, rows, bits, group_size, avx2_only):
    # widths: int8 not a multiple of the 8- or 16-wide vectors; int4 three groups; outputs past every tile shape
    for k in ((37, 100) if bits == 8 else (3 * group_size,)):
        for n in (1, 13, 203):
            layer = quantized(n, k, bits, group_size, seed=rows)
            x = torch.randn(rows, k)
            weight = layer.dequantize()
            got = native_forward(native, layer, x, avx2_only=avx2_only)
            assert_close(got, F.linear(x, weight, layer.bias), atol=2e-5, rtol=1e-5)
            got = native_forward(native, layer, x, bias=False, avx2_only=avx2_only)
            assert_close(got, F.linear(x, weight), atol=2e-5, rtol=1e-5)


@pytest.mark.parametrize("avx2_only", [False, True])
@pytest.mark.parametrize(("bits", "group_size"), [(8, 64), (4, 32)])
def test_a_row_does_not_depend_on_its_batch(native, bits, group_size, avx2_only):
    layer = quantized(301, 256, bits, group_size)
    x = torch.randn(8, 256)
    together = native_forward(native, layer, x, avx2_only=avx2_only)
    for i in range(8):  # bitwise: every output is summed in the same order whatever the tile
        assert torch.equal(native_forward(native, layer, x[i : i + 1], avx2_only=avx2_only), together[i : i + 1])


def test_kernel_rejects_what_it_cannot_read(native):
    layer = quantized(8, 64, 4, 32)
    with pytest.raises(ValueError, match="1 to 8 rows"):
        native_forward(native, layer, torch.randn(9, 64))
    with pytest.raises(ValueError, match="do not fit x with 32 features"):
        native_forward(native, layer, torch.randn(1, 32))
    with pytest.raises(ValueError, match="groups of 48 must divide the width 64"):
        native.gemv_quant(torch.randn(1, 64), layer.qweight, layer.scales, layer.zeros, None, 4, 48)
    with pytest.raises(ValueError, match="a multiple of 32"):
        native.gemv_quant(torch.randn(1, 64), layer.qweight, layer.scales[:, :1].repeat(1, 4).contiguous(),
                          layer.zeros[:, :1].repeat(1, 4).contiguous(), None, 4, 16)


@pytest.mark.parametrize(("bits", "group_size"), [(8, 64), (4, 64)])
@pytest.mark.parametrize("rows", [1, 8, 11, 32])
def test_decode_forward_never_forms_the_float_weight(native, monkeypatch, bits, group_size, rows):
    layer = quantized(40, 128, bits, group_size)
    x = torch.randn(rows, 1, 128)  # (B, T=1, dim): a decode step of `rows` sequences
    want = F.linear(x, layer.dequantize(), layer.bias)

    def refuse():
        raise AssertionError("a decode step dequantized the whole weight")

    monkeypatch.setattr(layer, "dequantize", refuse)
    with torch.no_grad():
        assert_close(layer(x), want, atol=2e-5, rtol=1e-5)


def test_training_and_long_inputs_take_the_dequantizing_path(native, monkeypatch):
    layer = quantized(16, 64, 4, 32)
    monkeypatch.setattr(native, "gemv_quant", lambda *a: pytest.fail("the kernel has no backward"))
    x = torch.randn(2, 64, requires_grad=True)
    layer(x).sum().backward()
    assert_close(x.grad, layer.dequantize().sum(0).expand(2, -1))
    with torch.no_grad():
        layer(torch.randn(40, 64))  # a prefill: dequantize once, one matmul


@pytest.mark.parametrize("bits", [8, 4])
def test_greedy_decode_same_with_and_without_kernels(native, monkeypatch, bits):
    torch.manual_seed(0)
    model = quantize_model(build_model(replace(preset("tiny-llama"), hidden_dim=192)).eval(), bits, 64)
    requests = [[3, 1, 4, 1, 5], [9, 2, 6]]

    def decode() -> list[list[int]]:
        engine = Engine(model, n_slots=2, max_len=32)
        return [r.tokens for r in engine.generate([Request(p, max_new_tokens=12) for p in requests])]

    with_kernels = decode()
    monkeypatch.setattr(kernels, "native", lambda: None)  # as without a compiler: dequantize, then matmul
    assert decode() == with_kernels
