"""The native kernels, where this machine can build them (else the test is skipped, saying why)."""

from __future__ import annotations

import shutil

import pytest

from _helpers import BUILDABLE
from lmforge.models import kernels


@pytest.fixture
def native() -> kernels.Native:
    if not BUILDABLE:
        pytest.skip("the kernels need an x86-64 CPU with AVX2 and a C compiler")
    built = kernels.native()
    assert built is not None, "a C compiler and AVX2 are here, so the kernels must build"
    return built


@pytest.fixture
def portable() -> kernels.QuantKernels:
    if shutil.which("cc") is None:
        pytest.skip("the portable int8 / int4 kernels need a C compiler")
    built = kernels.portable()
    assert built is not None, "a C compiler is here, so the portable kernels must build"
    return built
