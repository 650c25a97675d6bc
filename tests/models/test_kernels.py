"""The native decode matmul: equal to `F.linear`, used by `linear` for few rows, and a clean
fallback (no kernel, no half-written file) when it cannot be built."""

from __future__ import annotations

import logging
import platform
import shutil

import pytest
import torch
import torch.nn.functional as F
from torch.testing import assert_close

from lmforge.models import kernels
from lmforge.models.layers import linear

BUILDABLE = (platform.machine().lower() in ("x86_64", "amd64") and shutil.which("cc") is not None
             and torch.backends.cpu.get_cpu_capability() in ("AVX2", "AVX512"))


@pytest.fixture
def gemv():
    if not BUILDABLE:
        pytest.skip("the kernel needs an x86-64 CPU with AVX2 and a C compiler")
    kernel = kernels.gemv_kernel()
    assert kernel is not None, "a C compiler and AVX2 are here, so the kernel must build"
    return kernel


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
    with pytest.raises(ValueError, match="contiguous float32 CPU"):
        gemv(torch.randn(2, 4, dtype=torch.float64), torch.randn(3, 4), None)
    with pytest.raises(ValueError, match="not contiguous"):
        gemv(torch.randn(2, 4), torch.randn(4, 3).t(), None)


def test_linear_takes_the_kernel_for_few_rows_without_gradients(gemv, monkeypatch):
    calls = []

    def spy(x, w, b):
        calls.append(x.shape)
        return gemv(x, w, b)

    monkeypatch.setattr(kernels, "gemv_kernel", lambda: spy)
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
        assert kernels.gemv_kernel.__wrapped__() is None
    assert "LMFORGE_NATIVE=0" in caplog.text


def test_failed_build_falls_back_and_leaves_no_file(tmp_path, monkeypatch, caplog):
    if shutil.which("cc") is None or not BUILDABLE:
        pytest.skip("needs a C compiler to fail")
    broken = tmp_path / "gemv.c"
    broken.write_text("this is not C\n")
    monkeypatch.setattr(kernels, "_SOURCE", broken)
    monkeypatch.setenv("LMFORGE_CACHE", str(tmp_path / "cache"))
    with caplog.at_level(logging.INFO, logger=kernels.__name__):
        assert kernels.gemv_kernel.__wrapped__() is None
    assert "building it failed" in caplog.text
    assert list((tmp_path / "cache").iterdir()) == []  # no half-written library for the next run to load


def test_build_is_cached(gemv, tmp_path, monkeypatch):
    monkeypatch.setenv("LMFORGE_CACHE", str(tmp_path))
    built = kernels._compile()
    assert built.parent == tmp_path and built.suffix == ".so"
    stamp = built.stat().st_mtime_ns
    assert kernels._compile() == built and built.stat().st_mtime_ns == stamp  # not rebuilt


def test_damaged_cached_build_is_removed(tmp_path, monkeypatch, caplog):
    if not BUILDABLE:
        pytest.skip("needs a buildable kernel")
    monkeypatch.setenv("LMFORGE_CACHE", str(tmp_path))
    built = kernels._compile()
    built.write_bytes(b"not a shared library")
    with caplog.at_level(logging.INFO, logger=kernels.__name__):
        assert kernels.gemv_kernel.__wrapped__() is None
    assert "loading" in caplog.text and not built.exists()
    assert kernels.gemv_kernel.__wrapped__() is not None  # rebuilt
