"""The native int8 / int4 decode matmuls, AVX2 (`kernels.c`) and portable (`kernels_portable.c`):
equal to dequantize-then-matmul to float32 rounding for odd shapes, taken by `QuantLinear` for
decode-sized inputs without forming the float weight, and replaced by the dequantizing path where
the kernels are not built."""

from __future__ import annotations

import copy
import pickle
from dataclasses import replace

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.testing import assert_close

from _helpers import BUILDABLE
from lmforge.config import preset
from lmforge.generate.engine import Engine, Request
from lmforge.models import build_model, kernels
from lmforge.quantize import quantize_model
from lmforge.quantize.linear import QuantLinear

FORMATS = [(8, 64), (4, 32), (4, 64), (4, 128)]
# kernels.c at the widest ISA here (AVX-512 where present), kernels.c forced to AVX2, kernels_portable.c
PATHS = ["widest", "avx2", "portable"]


def quantized(n: int, k: int, bits: int, group_size: int, seed: int = 0) -> QuantLinear:
    torch.manual_seed(seed)
    return QuantLinear.from_linear(nn.Linear(k, n), bits, group_size)


@pytest.fixture(params=PATHS)
def matmul(request):
    """One kernel path as `matmul(layer, x, bias=True)`; `matmul.kernels` is the library behind it."""
    quant = request.getfixturevalue("portable" if request.param == "portable" else "native")

    def forward(layer: QuantLinear, x: torch.Tensor, bias: bool = True) -> torch.Tensor:
        return quant.gemv_quant(x, layer.qweight, layer.scales, layer.zeros, layer.bias if bias else None,
                                layer.bits, layer.group_size, request.param == "avx2")

    forward.kernels = quant
    return forward


@pytest.fixture(params=["avx2", "portable"])
def layers_use(request, monkeypatch):
    """`QuantLinear` on one library's matmuls (as on a CPU with AVX2, and on one without); returns it."""
    quant = request.getfixturevalue("native" if request.param == "avx2" else "portable")
    monkeypatch.setattr(kernels, "quantized", lambda: quant)
    return quant


@pytest.mark.parametrize("rows", range(1, kernels.MAX_ROWS + 1))
@pytest.mark.parametrize(("bits", "group_size"), FORMATS)
def test_kernel_matches_dequantize_then_matmul(matmul, rows, bits, group_size):
    # widths: int8 not a multiple of the 8-, 16-wide vectors or partial sums, and longer than the portable
    # kernel's chunk; int4 three groups; outputs past every tile shape
    for k in ((37, 100, 531) if bits == 8 else (3 * group_size,)):
        for n in (1, 13, 203):
            layer = quantized(n, k, bits, group_size, seed=rows)
            x = torch.randn(rows, k)
            weight = layer.dequantize()
            assert_close(matmul(layer, x), F.linear(x, weight, layer.bias), atol=2e-5, rtol=1e-5)
            assert_close(matmul(layer, x, bias=False), F.linear(x, weight), atol=2e-5, rtol=1e-5)


@pytest.mark.parametrize(("bits", "group_size"), [(8, 64), (4, 32)])
def test_a_row_does_not_depend_on_its_batch(matmul, bits, group_size):
    layer = quantized(301, 256, bits, group_size)
    x = torch.randn(8, 256)
    together = matmul(layer, x)
    for i in range(8):  # bitwise: every output is summed in the same order whatever the tile
        assert torch.equal(matmul(layer, x[i : i + 1]), together[i : i + 1])


def test_kernel_rejects_what_it_cannot_read(matmul):
    layer, quant = quantized(8, 64, 4, 32), matmul.kernels
    with pytest.raises(ValueError, match="1 to 8 rows"):
        matmul(layer, torch.randn(9, 64))
    with pytest.raises(ValueError, match="do not fit x with 32 features"):
        matmul(layer, torch.randn(1, 32))
    with pytest.raises(ValueError, match="groups of 48 must divide the width 64"):
        quant.gemv_quant(torch.randn(1, 64), layer.qweight, layer.scales, layer.zeros, None, 4, 48)
    with pytest.raises(ValueError, match="a multiple of 32"):
        quant.gemv_quant(torch.randn(1, 64), layer.qweight, layer.scales[:, :1].repeat(1, 4).contiguous(),
                         layer.zeros[:, :1].repeat(1, 4).contiguous(), None, 4, 16)


@pytest.mark.parametrize(("bits", "group_size"), [(8, 64), (4, 64)])
@pytest.mark.parametrize("rows", [1, 8, 11, 32])
def test_decode_forward_never_forms_the_float_weight(layers_use, monkeypatch, bits, group_size, rows):
    layer = quantized(40, 128, bits, group_size)
    x = torch.randn(rows, 1, 128)  # (B, T=1, dim): a decode step of `rows` sequences
    want = F.linear(x, layer.dequantize(), layer.bias)

    def refuse():
        raise AssertionError("a decode step dequantized the whole weight")

    monkeypatch.setattr(layer, "dequantize", refuse)
    with torch.no_grad():
        assert_close(layer(x), want, atol=2e-5, rtol=1e-5)


def test_the_bound_kernel_follows_the_layers_buffers(layers_use, monkeypatch):
    layer, other = quantized(24, 64, 4, 32), quantized(24, 64, 4, 32, seed=1)
    x = torch.randn(1, 64)
    with torch.no_grad():
        first = layer(x)  # binds the kernel to the layer's buffers
        copied = copy.deepcopy(layer)  # a copy binds its own, to its own tensors
        layer.load_state_dict(other.state_dict())  # in place: the same tensors, new values
        assert_close(layer(x), other(x), atol=0, rtol=0)
        layer.scales = first.new_ones(layer.scales.shape)  # a replaced buffer: bound again
        assert_close(layer(x), F.linear(x, layer.dequantize(), layer.bias), atol=2e-5, rtol=1e-5)
        assert torch.equal(copied(x), first)
        assert torch.equal(pickle.loads(pickle.dumps(copied))(x), first)
        monkeypatch.setattr(kernels, "quantized", lambda: None)  # the library gone: the binding is not used
        monkeypatch.setattr(layer, "dequantize", lambda: pytest.fail("dequantized", pytrace=False))
        with pytest.raises(pytest.fail.Exception, match="dequantized"):
            layer(x)


def test_training_and_long_inputs_take_the_dequantizing_path(layers_use, monkeypatch):
    layer = quantized(16, 64, 4, 32)
    monkeypatch.setattr(layers_use, "quant_matmul", lambda *a: pytest.fail("the kernel has no backward"))
    x = torch.randn(2, 64, requires_grad=True)
    layer(x).sum().backward()
    assert_close(x.grad, layer.dequantize().sum(0).expand(2, -1))
    with torch.no_grad():
        layer(torch.randn(40, 64))  # a prefill: dequantize once, one matmul


@pytest.mark.parametrize("bits", [8, 4])
def test_greedy_decode_same_on_every_path(portable, monkeypatch, bits):
    torch.manual_seed(0)
    model = quantize_model(build_model(replace(preset("tiny-llama"), hidden_dim=192)).eval(), bits, 64)
    requests = [[3, 1, 4, 1, 5], [9, 2, 6]]
    paths = {"portable": portable, "dequantize": None}  # None: as without a compiler, dequantize then matmul
    if BUILDABLE:
        paths["avx2"] = kernels.native()

    def decode(quant: kernels.QuantKernels | None) -> list[list[int]]:
        monkeypatch.setattr(kernels, "quantized", lambda: quant)
        engine = Engine(model, n_slots=2, max_len=32)
        return [r.tokens for r in engine.generate([Request(p, max_new_tokens=12) for p in requests])]

    tokens = {name: decode(quant) for name, quant in paths.items()}
    assert all(t == tokens["dequantize"] for t in tokens.values()), tokens
