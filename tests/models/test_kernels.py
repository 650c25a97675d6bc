"""The native decode kernels: the matmul equal to `F.linear` and used by `linear` for few rows,
the attention equal to PyTorch's cache write + `sdpa` and used for one-token steps, and a clean
fallback (no kernels, no half-written file) when they cannot be built."""

from __future__ import annotations

import logging
import shutil

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor
from torch.testing import assert_close

from _helpers import BUILDABLE
from lmforge.config import preset
from lmforge.generate.engine import Engine, Request
from lmforge.models import build_model, kernels
from lmforge.models.cpu_ops import gelu, linear
from lmforge.models.layers import sdpa


@pytest.fixture
def gemv(native):
    return native.gemv


@pytest.mark.parametrize("rows", range(1, kernels.MAX_ROWS + 1))
@pytest.mark.parametrize(("n", "k"), [(40, 24), (13, 37), (3, 5), (1029, 96)])  # tails of the 8-wide loop and the tiles
def test_gemv_matches_f_linear(gemv, rows, n, k):
    torch.manual_seed(rows)
    x, w, b = torch.randn(rows, k), torch.randn(n, k), torch.randn(n)
    assert_close(gemv(x, w, b), F.linear(x, w, b), atol=1e-5, rtol=1e-5)
    assert_close(gemv(x, w, None), F.linear(x, w), atol=1e-5, rtol=1e-5)


def test_gemv_row_does_not_depend_on_its_batch(gemv):
    torch.manual_seed(0)
    x, w = torch.randn(8, 200), torch.randn(301, 200)
    together = gemv(x, w, None)
    for i in range(8):
        assert torch.equal(gemv(x[i : i + 1], w, None), together[i : i + 1])  # bitwise: same order of sums


def test_gemv_rejects_bad_shapes(gemv):
    with pytest.raises(ValueError, match="1 to 8 rows"):
        gemv(torch.randn(9, 4), torch.randn(3, 4), None)
    with pytest.raises(ValueError, match="5 features but the weight expects 4"):
        gemv(torch.randn(2, 5), torch.randn(3, 4), None)  # checked before any memory is read
    with pytest.raises(ValueError, match="float32 CPU"):
        gemv(torch.randn(2, 4, dtype=torch.float64), torch.randn(3, 4), None)
    with pytest.raises(ValueError, match="not contiguous"):
        gemv(torch.randn(2, 4), torch.randn(4, 3).t(), None)


def test_linear_takes_the_kernel_for_few_rows_without_gradients(native, monkeypatch):
    calls, gemv = [], native.gemv

    def spy(x, w, b):
        calls.append(x.shape)
        return gemv(x, w, b)

    monkeypatch.setattr(native, "gemv", spy)
    torch.manual_seed(0)
    w, b = torch.randn(40, 24), torch.randn(40)
    with torch.inference_mode():
        for shape in [(1, 24), (2, 3, 24), (8, 1, 24)]:
            x = torch.randn(shape)
            assert_close(linear(x, w, b), F.linear(x, w, b), atol=1e-5, rtol=1e-5)
        linear(torch.randn(9, 24), w, b)  # more rows than the kernel takes: oneDNN
    x = torch.randn(2, 24, requires_grad=True)
    linear(x, w, b).sum().backward()  # training: the differentiable path
    assert calls == [(1, 24), (2, 3, 24), (8, 1, 24)]


def test_no_kernel_when_switched_off(monkeypatch, caplog):
    monkeypatch.setenv("LMFORGE_NATIVE", "0")
    with caplog.at_level(logging.INFO, logger=kernels.__name__):
        assert kernels.native.__wrapped__() is None
    assert "LMFORGE_NATIVE=0" in caplog.text


@pytest.mark.parametrize(("source", "library"), [("_SOURCE", "native"), ("_PORTABLE_SOURCE", "portable")])
def test_failed_build_falls_back_and_leaves_no_file(tmp_path, monkeypatch, caplog, source, library):
    if shutil.which("cc") is None or not (BUILDABLE or library == "portable"):
        pytest.skip("needs a C compiler to fail")
    broken = tmp_path / "kernels.c"
    broken.write_text("this is not C\n")
    monkeypatch.setattr(kernels, source, broken)
    monkeypatch.setenv("LMFORGE_CACHE", str(tmp_path / "cache"))
    with caplog.at_level(logging.INFO, logger=kernels.__name__):
        assert getattr(kernels, library).__wrapped__() is None
    assert "building it failed" in caplog.text
    assert list((tmp_path / "cache").iterdir()) == []  # no half-written library for the next run to load


def test_build_is_cached(gemv, tmp_path, monkeypatch):
    monkeypatch.setenv("LMFORGE_CACHE", str(tmp_path))
    built = kernels._compile(kernels._SOURCE, kernels._FLAGS)
    assert built.parent == tmp_path and built.suffix == ".so"
    stamp = built.stat().st_mtime_ns
    assert kernels._compile(kernels._SOURCE, kernels._FLAGS) == built and built.stat().st_mtime_ns == stamp  # not rebuilt


def test_damaged_cached_build_is_removed(tmp_path, monkeypatch, caplog):
    if not BUILDABLE:
        pytest.skip("needs a buildable kernel")
    monkeypatch.setenv("LMFORGE_CACHE", str(tmp_path))
    built = kernels._compile(kernels._SOURCE, kernels._FLAGS)
    built.write_bytes(b"not a shared library")
    with caplog.at_level(logging.INFO, logger=kernels.__name__):
        assert kernels.native.__wrapped__() is None
    assert "loading" in caplog.text and not built.exists()
    assert kernels.native.__wrapped__() is not None  # rebuilt


def uncached_choice(monkeypatch) -> None:
    """`kernels.quantized()` deciding afresh (as a new process does) rather than from the cached libraries."""
    monkeypatch.setattr(kernels, "native", kernels.native.__wrapped__)
    monkeypatch.setattr(kernels, "portable", kernels.portable.__wrapped__)


def test_portable_quantized_matmuls_where_avx2_cannot_run(portable, tmp_path, monkeypatch, caplog):
    uncached_choice(monkeypatch)
    monkeypatch.setenv("LMFORGE_NATIVE", "portable")  # forced, as on a CPU without AVX2
    with caplog.at_level(logging.INFO, logger=kernels.__name__):
        chosen = kernels.quantized()
    assert kernels.native() is None and "LMFORGE_NATIVE=portable" in caplog.text  # the float kernels stay off
    assert type(chosen) is kernels.QuantKernels
    monkeypatch.setenv("LMFORGE_NATIVE", "1")
    monkeypatch.setenv("LMFORGE_CACHE", str(tmp_path))
    monkeypatch.setattr(kernels.platform, "machine", lambda: "aarch64")  # not x86: built with the default flags
    chosen = kernels.quantized()
    assert type(chosen) is kernels.QuantKernels and "-march=x86-64" not in kernels._portable_flags()
    assert [p.name.split("-")[0] for p in tmp_path.iterdir()] == ["kernels_portable"]
    x, q, scales = torch.randn(3, 40), torch.randint(-127, 128, (5, 40), dtype=torch.int8), torch.rand(5)
    assert_close(chosen.gemv_quant(x, q, scales, None, None, 8, 64), x @ (q.float() * scales[:, None]).T)


def test_no_quantized_kernels_when_switched_off(monkeypatch):
    uncached_choice(monkeypatch)
    monkeypatch.setenv("LMFORGE_NATIVE", "0")
    assert kernels.quantized() is None  # quantized layers dequantize on every step


def reference_decode_attention(q, k, v, k_cache, v_cache, columns, allowed):
    """PyTorch's way: write the new key/value at `columns`, then sdpa over the first S columns."""
    idx = columns[:, None, :, None].expand(-1, k.shape[1], -1, k.shape[3])
    k_cache.scatter_(2, idx, k)
    v_cache.scatter_(2, idx, v)
    S = allowed.shape[-1]
    y = sdpa(q, k_cache[:, :, :S], v_cache[:, :, :S], allowed, 0.0, False)  # (B, H, 1, D)
    return y.transpose(1, 2).reshape(q.shape[0], 1, -1)


@pytest.mark.parametrize(("B", "H", "Hk", "D", "C", "S"), [
    (1, 12, 12, 64, 40, 17),  # GPT-2 heads
    (8, 12, 12, 64, 40, 40),  # a batch, the whole cache
    (3, 9, 3, 64, 30, 11),  # grouped queries (SmolLM: 3 per key/value head)
    (2, 4, 1, 12, 9, 5),  # multi-query; head size with an 8-wide tail
    (2, 2, 2, 5, 6, 6),  # head size below 8
])
def test_decode_attention_matches_scatter_and_sdpa(native, B, H, Hk, D, C, S):
    torch.manual_seed(B * 100 + D)
    q = torch.randn(B, 1, H, D).transpose(1, 2)  # the layout Attention makes: (B, H, 1, D) views
    k, v = (torch.randn(B, 1, Hk, D).transpose(1, 2) for _ in range(2))
    k_cache, v_cache = torch.randn(B, Hk, C, D), torch.randn(B, Hk, C, D)
    columns = torch.randint(0, S, (B, 1))
    allowed = torch.rand(B, 1, 1, S) < 0.6
    allowed[torch.arange(B), 0, 0, columns[:, 0]] = True  # a query always sees its own key
    want_k, want_v = k_cache.clone(), v_cache.clone()
    want = reference_decode_attention(q, k, v, want_k, want_v, columns, allowed)
    got = native.decode_attention(q, k, v, k_cache, v_cache, columns, allowed)
    assert got.shape == (B, 1, H * D)
    assert_close(got, want, atol=1e-5, rtol=1e-5)
    assert torch.equal(k_cache, want_k) and torch.equal(v_cache, want_v)  # stored exactly where scatter_ stores


def test_decode_attention_rejects_bad_input_before_writing(native):
    q, k, v = torch.randn(2, 4, 1, 8), torch.randn(2, 2, 1, 8), torch.randn(2, 2, 1, 8)
    k_cache, v_cache = torch.zeros(2, 2, 6, 8), torch.zeros(2, 2, 6, 8)
    allowed = torch.ones(2, 1, 1, 6, dtype=torch.bool)
    with pytest.raises(ValueError, match="outside the cache"):
        native.decode_attention(q, k, v, k_cache, v_cache, torch.tensor([[1], [6]]), allowed)
    assert not k_cache.any() and not v_cache.any()  # nothing written, not even for the valid row
    with pytest.raises(ValueError, match="no longer than the cache"):
        native.decode_attention(q, k, v, k_cache, v_cache, torch.tensor([[1], [2]]), torch.ones(2, 1, 1, 7, dtype=torch.bool))
    with pytest.raises(ValueError, match="inconsistent shapes"):
        native.decode_attention(q, k[:1], v, k_cache, v_cache, torch.tensor([[1], [2]]), allowed)
    with pytest.raises(ValueError, match="multiple of the 2 key/value heads"):
        native.decode_attention(torch.randn(2, 3, 1, 8), k, v, k_cache, v_cache, torch.tensor([[1], [2]]), allowed)
    with pytest.raises(ValueError, match="float32 CPU"):
        native.decode_attention(q.double(), k, v, k_cache, v_cache, torch.tensor([[1], [2]]), allowed)
    with pytest.raises(ValueError, match="contiguous caches"):
        native.decode_attention(q, k, v, torch.zeros(2, 6, 2, 8).transpose(1, 2), v_cache, torch.tensor([[1], [2]]), allowed)


@pytest.mark.parametrize("name", ["tiny-gpt2", "tiny-llama", "tiny-mistral"])  # plain, grouped queries, rolling cache
def test_decode_steps_take_the_native_attention_and_match_pytorch(native, monkeypatch, name):
    torch.manual_seed(0)
    model = build_model(preset(name)).eval()
    prompts = [torch.randint(0, 256, (n,)).tolist() for n in (5, 9, 9)]  # ragged: masks differ per slot

    def run() -> tuple[list[list[int]], Tensor]:
        engine = Engine(model, n_slots=3, max_len=48)
        results = engine.generate([Request(p, max_new_tokens=30, logprobs=0) for p in prompts])  # past the 16-token window
        return [r.tokens for r in results], torch.tensor([r.logprobs for r in results])

    calls, attend = [], native.decode_attention
    monkeypatch.setattr(native, "decode_attention", lambda *a: calls.append(a[0].shape) or attend(*a))
    tokens, logprobs = run()
    assert len(calls) == 29 * model.config.n_layers and all(shape[2] == 1 for shape in calls)  # every decode step
    monkeypatch.setattr(kernels, "native", lambda: None)
    want_tokens, want_logprobs = run()
    assert tokens == want_tokens
    assert_close(logprobs, want_logprobs, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("n", [5, 13, 4096, 100_003])  # the scalar tail, one thread, several threads
def test_gelu_tanh_matches_pytorch_forward_and_backward(native, n):
    torch.manual_seed(n)
    x = torch.cat([torch.randn(n) * 4, torch.tensor([0.0, -0.0, 1e-30, 30.0, -30.0, 100.0, -100.0])])
    grad = torch.randn_like(x)
    exact = x.double().requires_grad_()
    want = F.gelu(exact, approximate="tanh")
    (want_grad,) = torch.autograd.grad(want, exact, grad.double())
    assert_close(native.gelu_tanh(x).double(), want.detach(), atol=2e-6, rtol=2e-6)
    assert_close(native.gelu_tanh_backward(grad, x).double(), want_grad, atol=2e-5, rtol=2e-5)


def test_gelu_takes_the_kernel_in_training_and_inference(native, monkeypatch):
    calls, forward = [], native.gelu_tanh
    monkeypatch.setattr(native, "gelu_tanh", lambda x: calls.append(x.shape) or forward(x))
    torch.manual_seed(0)
    x = torch.randn(3, 7, 40, requires_grad=True)
    y = gelu(x, "tanh")
    (got,) = torch.autograd.grad(y, x, torch.ones_like(y))
    (want,) = torch.autograd.grad(F.gelu(x, approximate="tanh"), x, torch.ones_like(y))
    assert_close(y, F.gelu(x, approximate="tanh"), atol=2e-6, rtol=2e-6)
    assert_close(got, want, atol=2e-5, rtol=2e-5)
    with torch.inference_mode():
        gelu(x.detach(), "tanh")
    gelu(x, "none")  # the exact GELU (BERT) stays on PyTorch
    assert calls == [(3, 7, 40), (3, 7, 40)]
