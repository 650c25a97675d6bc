"""Native CPU kernels, compiled on first use: the decode step's matmuls (float32, int8, int4) and
attention, and GPT-2's GELU.

A decode step multiplies one row per sequence by every weight matrix, so it runs at the speed
at which the weights stream from memory. On the x86 CPUs we measure, neither MKL nor oneDNN
stream at memory speed for a handful of rows (a plain `torch.mv` streams faster than either).
`kernels.c` (AVX2 + FMA, OpenMP; the quantized matmuls also AVX-512, chosen at run time) has a matmul that reads each weight once for all rows. Its
attention stores the step's keys and values and attends over the cache in one call and one
pass, where PyTorch takes two `scatter_`s and a flash-attention kernel built for long queries.
`benchmarks/decode.py` measures the whole effect (with `LMFORGE_NATIVE=0` for the comparison).
The int8 and int4 matmuls read quantized weights (`quantize/linear.py`'s formats) in their packed
form and widen them in registers, so a step streams a quarter or an eighth of the float bytes.
Its GELU (tanh form) is used in training and decoding, forward and backward, because PyTorch's
tanh is slow on these CPUs (`benchmarks/train_throughput.py`).

The C source ships with the package. The first call compiles it with the system C compiler
(`cc`) into `$LMFORGE_CACHE` (default `~/.cache/lmforge`), under a name keyed
by the source and flags, written to a temporary name and renamed. It links the OpenMP runtime
PyTorch has already loaded, so both share one thread pool. Without a compiler, on a CPU without
AVX2/FMA, with `LMFORGE_NATIVE=0`, or when the build or load fails, `native()` is None (logged
once) and callers use `cpu_ops.linear`'s BLAS or oneDNN and PyTorch's own kernels.

Where `kernels.c` cannot run (no AVX2, not x86-64, or its build failed) but a compiler exists,
the int8 / int4 matmuls come from `kernels_portable.c` instead (`quantized()` picks; the float
kernels stay off): plain C99 + OpenMP, compiled for the architecture's baseline and vectorised by
the compiler; it reads the packed weights too, widening a chunk of a row at a time in L1, never
the whole float matrix (`benchmarks/decode_portable.py` measures it). `LMFORGE_NATIVE=portable`
forces that path on any CPU (to measure or test it); `LMFORGE_NATIVE=0` switches both off, and
quantized layers then dequantize their weights on every step.
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
from pathlib import Path

import torch
from torch import Tensor

log = logging.getLogger(__name__)

MAX_ROWS = 8  # the kernel's largest batch of rows; more rows are compute-bound and go to `cpu_ops.linear` (MKL on Intel, oneDNN elsewhere)
_SOURCE = Path(__file__).with_name("kernels.c")
_FLAGS = ["-O3", "-mavx2", "-mfma", "-fopenmp", "-shared", "-fPIC", "-lm"]  # after the source file
_PORTABLE_SOURCE = Path(__file__).with_name("kernels_portable.c")
_X86 = ("x86_64", "amd64")


def cache_dir() -> Path:
    """Where compiled kernels are kept: `$LMFORGE_CACHE`, else `~/.cache/lmforge`."""
    return Path(os.environ.get("LMFORGE_CACHE") or Path.home() / ".cache" / "lmforge")


def _portable_flags() -> list[str]:
    """The portable library's flags: the architecture's baseline (plain x86-64 there: no AVX2), -O3."""
    baseline = ["-march=x86-64"] if platform.machine().lower() in _X86 else []
    return ["-O3", *baseline, "-fopenmp", "-shared", "-fPIC"]


def _switched_off() -> str | None:
    """Why no native code at all may run here (switched off, no compiler), or None."""
    if os.environ.get("LMFORGE_NATIVE", "1") == "0":
        return "LMFORGE_NATIVE=0"
    if shutil.which("cc") is None:
        return "no C compiler (cc) on PATH"
    return None


def _unsupported() -> str | None:
    """Why the AVX2 kernels cannot be used here, or None."""
    if reason := _switched_off():
        return reason
    if os.environ.get("LMFORGE_NATIVE", "1") == "portable":
        return "LMFORGE_NATIVE=portable"
    if platform.machine().lower() not in _X86:
        return f"it is written for x86-64, not {platform.machine()}"
    if torch.backends.cpu.get_cpu_capability() not in ("AVX2", "AVX512"):
        return "this CPU has no AVX2/FMA"
    return None


def _compile(source: Path, flags: list[str]) -> Path:
    """The library compiled from `source` with `flags`, built now unless an identical build is cached."""
    code = source.read_bytes()
    key = hashlib.sha256(code + " ".join(flags).encode()).hexdigest()[:16]
    target = cache_dir() / f"{source.stem}-{key}.so"
    if target.exists():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent) as tmp:
        built = Path(tmp) / target.name
        subprocess.run(["cc", str(source), *flags, "-o", str(built)], check=True, capture_output=True, text=True)
        os.replace(built, target)  # atomic: a concurrent process sees no file or a whole one
    return target


def _load(source: Path, flags: list[str], reason: str | None, instead: str) -> ctypes.CDLL | None:
    """The library built from `source`, or None (logged, with what runs `instead`) where `reason`
    says it cannot be used here or it cannot be built or loaded."""
    if reason is None:
        try:
            library = _compile(source, flags)
        except (OSError, subprocess.CalledProcessError) as e:
            detail = e.stderr.strip().splitlines()[-1] if isinstance(e, subprocess.CalledProcessError) and e.stderr else e
            reason = f"building it failed ({detail})"
        else:
            try:
                return ctypes.CDLL(str(library))
            except OSError as e:
                library.unlink(missing_ok=True)  # unloadable (damaged?): the next process builds it afresh
                reason = f"loading {library} failed ({e})"
    log.info("native kernels (%s) unavailable: %s; %s", source.name, reason, instead)
    return None


def _check_cpu_float32(*tensors: Tensor) -> None:
    for t in tensors:  # the C code trusts all of this
        if t.dtype != torch.float32 or not t.is_cpu or t.stride(-1) != 1:
            raise ValueError(f"the native kernels take float32 CPU tensors with contiguous rows, got {t.dtype} "
                             f"on {t.device}{'' if t.stride(-1) == 1 else ' (rows not contiguous)'}")


def _check_contiguous_cpu_float32(*tensors: Tensor) -> None:
    _check_cpu_float32(*tensors)
    if not all(t.is_contiguous() for t in tensors):
        raise ValueError("this native kernel takes contiguous float32 CPU tensors (one is not contiguous)")


class QuantKernels:
    """The int8 / int4 decode matmuls of a compiled library (`kernels.c` or `kernels_portable.c`)
    behind a checked Python signature."""

    def __init__(self, library: ctypes.CDLL) -> None:
        i64, ptr = ctypes.c_int64, ctypes.c_void_p
        self._gemv_quant = library.lmforge_gemv_quant
        self._gemv_quant.argtypes = [ptr] * 6 + [i64] * 3 + [ctypes.c_int, i64, ptr, ctypes.c_int, ctypes.c_int]
        self._gemv_quant.restype = ctypes.c_int

    def gemv_quant(self, x: Tensor, qweight: Tensor, scales: Tensor, zeros: Tensor | None, bias: Tensor | None,
                   bits: int, group_size: int, avx2_only: bool = False) -> Tensor:
        """`F.linear(x, W, bias)` for 1 to MAX_ROWS rows of x (..., K), with W (N, K) given as
        `quantize.linear`'s int8 rows (`qweight` int8 (N, K), `scales` (N,)) or int4 groups
        (`qweight` uint8 (N, K / 2), `scales` (N, K / group_size), `zeros` uint8 likewise; K a
        multiple of `group_size`, itself a multiple of 32). All contiguous; W is never formed.
        `kernels.c`: AVX-512 where the CPU has it, else AVX2 (`avx2_only` forces the latter, for
        tests); `kernels_portable.c` ignores `avx2_only`."""
        if x.shape[-1] != qweight.shape[1] * (2 if bits == 4 else 1):
            raise ValueError(f"gemv_quant: {bits}-bit weights {qweight.dtype} {tuple(qweight.shape)} do not fit x with {x.shape[-1]} features")
        return self.quant_matmul(qweight, scales, zeros, bias, bits, group_size, avx2_only)(x)

    def quant_matmul(self, qweight: Tensor, scales: Tensor, zeros: Tensor | None, bias: Tensor | None, bits: int,
                     group_size: int, avx2_only: bool = False) -> QuantMatmul:
        """`gemv_quant` for one quantized weight, checked now: a decode step calls it once per
        layer, and the checks cost more than a small layer's matmul."""
        n, packed = qweight.shape
        k = packed * 2 if bits == 4 else packed
        int4 = bits == 4 and qweight.dtype == torch.uint8 and zeros is not None
        if not (int4 or (bits == 8 and qweight.dtype == torch.int8 and scales.shape == (n,))):
            raise ValueError(f"gemv_quant: {bits}-bit weights {qweight.dtype} {tuple(qweight.shape)} are not int8 rows (with a scale each) or packed int4")
        if bits == 4 and (group_size < 32 or group_size % 32 or k % group_size or scales.shape != (n, k // group_size)
                          or zeros.shape != scales.shape or zeros.dtype != torch.uint8):
            raise ValueError(f"gemv_quant: int4 groups of {group_size} must divide the width {k} (and be a multiple of 32), "
                             f"with scales and zeros of shape ({n}, {k // max(group_size, 1)})")
        if bias is not None and bias.shape != (n,):
            raise ValueError(f"gemv_quant: a bias of shape {tuple(bias.shape)} for {n} outputs")
        _check_contiguous_cpu_float32(*(t for t in (scales, bias) if t is not None))
        if not (qweight.is_contiguous() and (zeros is None or zeros.is_contiguous())):
            raise ValueError("gemv_quant takes contiguous packed weights and zero points")
        return QuantMatmul(self, (qweight, scales, zeros, bias), bits, group_size, 2 if avx2_only else 0)


class Native(QuantKernels):
    """The compiled AVX2 kernels (`kernels.c`) behind checked Python signatures."""

    def __init__(self, library: ctypes.CDLL) -> None:
        super().__init__(library)
        i64, ptr = ctypes.c_int64, ctypes.c_void_p
        self._gemv = library.lmforge_gemv
        self._gemv.argtypes = [ptr] * 4 + [i64] * 3 + [ctypes.c_int]
        self._gemv.restype = ctypes.c_int
        self._attend = library.lmforge_decode_attention
        self._attend.argtypes = ([ptr, i64, i64, ptr, ptr, i64, i64, ptr, ptr, i64, ptr, ptr] + [i64] * 5
                                 + [ctypes.c_float, ptr, ctypes.c_int])
        self._attend.restype = ctypes.c_int
        self._gelu = library.lmforge_gelu_tanh
        self._gelu.argtypes = [ptr, ptr, i64, ctypes.c_int]
        self._gelu.restype = None
        self._gelu_backward = library.lmforge_gelu_tanh_backward
        self._gelu_backward.argtypes = [ptr, ptr, ptr, i64, ctypes.c_int]
        self._gelu_backward.restype = None

    def gemv(self, x: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
        """`F.linear(x (..., K), weight (N, K), bias (N,) or None) -> (..., N)` for 1 to MAX_ROWS rows
        of contiguous x, weight and bias."""
        n, k = weight.shape
        if x.shape[-1] != k:
            raise ValueError(f"x has {x.shape[-1]} features but the weight expects {k}")
        _check_contiguous_cpu_float32(*((x, weight) if bias is None else (x, weight, bias)))
        y = x.new_empty((*x.shape[:-1], n))
        b = None if bias is None else bias.data_ptr()
        if self._gemv(x.data_ptr(), weight.data_ptr(), b, y.data_ptr(), x.numel() // k, n, k, torch.get_num_threads()):
            raise ValueError(f"gemv takes 1 to {MAX_ROWS} rows, not {x.numel() // k}")
        return y

    def decode_attention(self, q: Tensor, k: Tensor, v: Tensor, k_cache: Tensor, v_cache: Tensor, columns: Tensor,
                         allowed: Tensor) -> Tensor:
        """Store one new key and value per sequence in its cache, then attend its one query over it.

        `q` (B, H, 1, D); `k`, `v` (B, Hk, 1, D) with H a multiple of Hk (grouped queries); any
        strides with contiguous rows of D. `k_cache`, `v_cache` (B, Hk, C, D) contiguous: the new
        key and value go to column `columns` (B, 1). `allowed` (B, 1, 1, S) bool, S <= C: which
        columns each query may see (the new one included). Returns (B, 1, H * D), the heads side by
        side as the output projection takes them; softmax scale 1/sqrt(D), as `sdpa` uses.
        """
        B, H, T, D = q.shape
        Hk, C = k_cache.shape[1], k_cache.shape[2]
        S = allowed.shape[-1]
        if (T != 1 or k.shape != (B, Hk, 1, D) or v.shape != k.shape or k_cache.shape != (B, Hk, C, D)
                or v_cache.shape != k_cache.shape or columns.shape != (B, 1) or allowed.shape != (B, 1, 1, S)):
            raise ValueError(f"decode_attention got inconsistent shapes: q {tuple(q.shape)}, k {tuple(k.shape)}, "
                             f"cache {tuple(k_cache.shape)}, columns {tuple(columns.shape)}, mask {tuple(allowed.shape)}")
        if H % Hk or S > C:
            raise ValueError(f"decode_attention: {H} query heads must be a multiple of the {Hk} key/value heads, "
                             f"and the mask ({S} columns) no longer than the cache ({C})")
        _check_cpu_float32(q, k, v, k_cache, v_cache)
        if not (k_cache.is_contiguous() and v_cache.is_contiguous()):
            raise ValueError("decode_attention needs contiguous caches")
        if columns.dtype != torch.int64 or allowed.dtype != torch.bool:
            raise ValueError(f"decode_attention takes int64 columns and a bool mask, got {columns.dtype}, {allowed.dtype}")
        columns, allowed = columns.contiguous(), allowed.contiguous()
        out = q.new_empty((B, 1, H * D))
        status = self._attend(q.data_ptr(), q.stride(0), q.stride(1), k.data_ptr(), v.data_ptr(), k.stride(0),
                              k.stride(1), k_cache.data_ptr(), v_cache.data_ptr(), C, columns.data_ptr(),
                              allowed.data_ptr(), S, B, H, Hk, D, D**-0.5, out.data_ptr(), torch.get_num_threads())
        if status:
            raise ValueError("decode_attention: " + ("a cache column is outside the cache" if status == 2
                                                     else "sizes the C code refuses"))
        return out

    def gelu_tanh(self, x: Tensor) -> Tensor:
        """`F.gelu(x, approximate="tanh")` of a contiguous tensor (within a few float32 ulp)."""
        _check_contiguous_cpu_float32(x)
        y = torch.empty_like(x)
        self._gelu(x.data_ptr(), y.data_ptr(), x.numel(), torch.get_num_threads())
        return y

    def gelu_tanh_backward(self, grad: Tensor, x: Tensor) -> Tensor:
        """The gradient of `gelu_tanh` at `x` times `grad` (same shape, both contiguous)."""
        _check_contiguous_cpu_float32(grad, x)
        if grad.shape != x.shape:
            raise ValueError(f"gelu_tanh_backward got a gradient of shape {tuple(grad.shape)} for x {tuple(x.shape)}")
        out = torch.empty_like(x)
        self._gelu_backward(grad.data_ptr(), x.data_ptr(), out.data_ptr(), x.numel(), torch.get_num_threads())
        return out


class QuantMatmul:
    """`F.linear(x, W, bias)` for one quantized weight that `QuantKernels.quant_matmul` has checked: a
    call checks only x. It holds the weight's tensors, so the memory it reads stays alive."""

    def __init__(self, kernels: QuantKernels, weight: tuple[Tensor, Tensor, Tensor | None, Tensor | None],
                 bits: int, group_size: int, isa: int) -> None:
        self.kernels, self.weight = kernels, weight  # the library it runs on; qweight, scales, zeros, bias
        self._function, self._bits, self._group_size, self._isa = kernels._gemv_quant, bits, group_size, isa
        self._n, self._k = weight[0].shape[0], weight[0].shape[1] * (2 if bits == 4 else 1)

    def holds(self, kernels: QuantKernels, qweight: Tensor, scales: Tensor, zeros: Tensor | None, bias: Tensor | None) -> bool:
        """Whether this is the matmul of exactly these tensors (a layer's buffers, replaced by `.to()` or
        assignment) on `kernels` (the library `quantized()` picks now)."""
        q, s, z, b = self.weight
        return self.kernels is kernels and q is qweight and s is scales and z is zeros and b is bias

    def __call__(self, x: Tensor) -> Tensor:
        """x (..., K): 1 to MAX_ROWS rows, contiguous float32 on the CPU -> (..., N)."""
        if x.dtype != torch.float32 or not x.is_cpu or not x.is_contiguous() or x.shape[-1] != self._k:
            raise ValueError(f"a quantized matmul of width {self._k} takes contiguous float32 CPU rows of {self._k} "
                             f"features, got {x.dtype} {tuple(x.shape)} on {x.device}")
        qweight, scales, zeros, bias = self.weight
        rows = x.numel() // max(self._k, 1)
        y = x.new_empty((*x.shape[:-1], self._n))
        scratch = torch.empty_like(x) if self._bits == 4 else None  # where the C code puts x in nibble order
        status = self._function(x.data_ptr(), qweight.data_ptr(), scales.data_ptr(),
                                None if zeros is None else zeros.data_ptr(), None if bias is None else bias.data_ptr(),
                                y.data_ptr(), rows, self._n, self._k, self._bits, self._group_size,
                                None if scratch is None else scratch.data_ptr(), self._isa, torch.get_num_threads())
        if status:
            raise ValueError(f"gemv_quant takes 1 to {MAX_ROWS} rows, not {rows}")
        return y


@functools.cache
def native() -> Native | None:
    """The native (AVX2) kernels; None where they are unavailable (see the module notes)."""
    library = _load(_SOURCE, _FLAGS, _unsupported(), "using PyTorch's own kernels (MKL or oneDNN)")
    return None if library is None else Native(library)


@functools.cache
def portable() -> QuantKernels | None:
    """The portable int8 / int4 matmuls (`kernels_portable.c`); None where no native code may run here."""
    library = _load(_PORTABLE_SOURCE, _portable_flags(), _switched_off(), "quantized layers dequantize per step")
    return None if library is None else QuantKernels(library)


def quantized() -> QuantKernels | None:
    """The int8 / int4 decode matmuls: the AVX2 kernels where they run, else the portable ones, else None."""
    avx2 = native()
    return avx2 if avx2 is not None else portable()
