"""A native matmul for decode steps, compiled on first use.

A decode step multiplies one row per sequence by every weight matrix, so it runs at the speed
at which the weights stream from memory. On the x86 CPUs we measure, neither MKL nor oneDNN
stream at memory speed for 1-8 rows: oneDNN reads 7-9 GB/s at 8 rows (11-14 at one) where a
plain `torch.mv` reaches 15-17. `gemv.c` (AVX2 + FMA, OpenMP) reads each weight once for all
rows: 14-22 GB/s at one row, 13-18 at 8 (`benchmarks/decode.py` measures the end-to-end effect).

The C source ships with the package. The first call compiles it with the system C compiler
(`cc`, about a second) into `$LMFORGE_CACHE` (default `~/.cache/lmforge`), under a name keyed
by the source and flags, written to a temporary name and renamed. It links the OpenMP runtime
PyTorch has already loaded, so both share one thread pool. Without a compiler, on a CPU without
AVX2/FMA, with `LMFORGE_NATIVE=0`, or when the build or load fails, `gemv_kernel()` is None
(logged once) and callers use oneDNN.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import logging
import os
import platform
import shutil
import subprocess
import tempfile
from collections.abc import Callable
from pathlib import Path

import torch
from torch import Tensor

log = logging.getLogger(__name__)

MAX_ROWS = 8  # the kernel's largest batch of rows; more rows are compute-bound and go to oneDNN
_SOURCE = Path(__file__).with_name("gemv.c")
_FLAGS = ["-O3", "-mavx2", "-mfma", "-fopenmp", "-shared", "-fPIC"]

Gemv = Callable[[Tensor, Tensor, Tensor | None], Tensor]


def cache_dir() -> Path:
    """Where compiled kernels are kept: `$LMFORGE_CACHE`, else `~/.cache/lmforge`."""
    return Path(os.environ.get("LMFORGE_CACHE") or Path.home() / ".cache" / "lmforge")


def _unsupported() -> str | None:
    """Why the kernel cannot be used here, or None."""
    if os.environ.get("LMFORGE_NATIVE", "1") == "0":
        return "LMFORGE_NATIVE=0"
    if platform.machine().lower() not in ("x86_64", "amd64"):
        return f"it is written for x86-64, not {platform.machine()}"
    if torch.backends.cpu.get_cpu_capability() not in ("AVX2", "AVX512"):
        return "this CPU has no AVX2/FMA"
    if shutil.which("cc") is None:
        return "no C compiler (cc) on PATH"
    return None


def _compile() -> Path:
    """The compiled library, built now unless an identical build is cached."""
    source = _SOURCE.read_bytes()
    key = hashlib.sha256(source + " ".join(_FLAGS).encode()).hexdigest()[:16]
    target = cache_dir() / f"gemv-{key}.so"
    if target.exists():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent) as tmp:
        built = Path(tmp) / target.name
        subprocess.run(["cc", *_FLAGS, "-o", str(built), str(_SOURCE)], check=True, capture_output=True, text=True)
        os.replace(built, target)  # atomic: a concurrent process sees no file or a whole one
    return target


@functools.cache
def gemv_kernel() -> Gemv | None:
    """`gemv(x (..., K), weight (N, K), bias (N,) or None) -> (..., N)` for contiguous float32 CPU
    tensors and 1 to MAX_ROWS rows of x; None where the kernel is unavailable (see the module notes)."""
    reason = _unsupported()
    if reason is None:
        try:
            library = _compile()
        except (OSError, subprocess.CalledProcessError) as e:
            detail = e.stderr.strip().splitlines()[-1] if isinstance(e, subprocess.CalledProcessError) and e.stderr else e
            reason = f"building it failed ({detail})"
        else:
            try:
                lib = ctypes.CDLL(str(library))
            except OSError as e:
                library.unlink(missing_ok=True)  # unloadable (damaged?): the next process builds it afresh
                reason = f"loading {library} failed ({e})"
    if reason is not None:
        log.info("native decode matmul unavailable: %s; using oneDNN", reason)
        return None
    fn = lib.lmforge_gemv
    fn.argtypes = [ctypes.c_void_p] * 4 + [ctypes.c_int64] * 3 + [ctypes.c_int]
    fn.restype = ctypes.c_int

    def gemv(x: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
        n, k = weight.shape
        if x.shape[-1] != k:
            raise ValueError(f"x has {x.shape[-1]} features but the weight expects {k}")
        for t in (x, weight) if bias is None else (x, weight, bias):  # the C code trusts all of this
            if t.dtype != torch.float32 or not t.is_cpu or not t.is_contiguous():
                raise ValueError(f"gemv takes contiguous float32 CPU tensors, got {t.dtype} on {t.device}"
                                 f"{'' if t.is_contiguous() else ' (not contiguous)'}")
        y = x.new_empty((*x.shape[:-1], n))
        b = None if bias is None else bias.data_ptr()
        if fn(x.data_ptr(), weight.data_ptr(), b, y.data_ptr(), x.numel() // k, n, k, torch.get_num_threads()) != 0:
            raise ValueError(f"gemv takes 1 to {MAX_ROWS} rows, not {x.numel() // k}")
        return y

    return gemv
