"""CPU speed machinery behind the architecture blocks of `layers.py`: each function here computes
exactly what its PyTorch counterpart computes, only faster on float32 CPU tensors.

- `linear` / `Linear`: float32 CPU projections run on the faster of oneDNN and the BLAS behind
  `F.linear` (results agree to float32 rounding): on Intel CPUs that is MKL, Intel's own, and
  elsewhere oneDNN (MKL's sgemm is slow on AMD CPUs). Without gradients and with at most
  `kernels.MAX_ROWS` rows (a decode step) the native matmul of `kernels.py` runs instead: a
  decode step is bound by reading the weights, and that kernel reads each weight once for all
  rows. `benchmarks/train_throughput.py` and `benchmarks/decode.py` measure both.
- `linear_cross_entropy`: the output projection and the summed cross-entropy in one autograd
  function, a chunk of rows at a time, with the gradients computed in the forward, so the
  (N, vocab) logits and their gradient never exist whole. The large buffers (a logits chunk,
  the weight gradient) are kept from one step to the next in per-thread scratch memory
  (`_Scratch`): glibc returns blocks this large to the kernel when they are freed, so fresh ones
  would be page-faulted in again on every step.
- `TiedGradient` / `embedding`: with tied embeddings the output projection hands its dense
  weight gradient to the token lookup, which adds its rows in place, so autograd never adds two
  gradients of the vocabulary-sized weight out of place.
- `gelu`: the tanh form of GELU (GPT-2) runs on the native kernel, forward and backward, where
  it is built: PyTorch's tanh is slow on these CPUs.

Every fast path checks device, dtype and `torch.compile` itself and falls back to the plain
PyTorch op, so callers (`layers.py`, `gpt.py`) choose these components once, when the model is
built, and their `forward`s stay straight-line. This module depends on `kernels.py` only, never
on `layers.py`.
"""

from __future__ import annotations

import threading

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lmforge.models import kernels

# ---------------------------------------------------------------- linear layers


def _intel_cpu() -> bool:
    """Whether this machine's CPU is Intel's (read from /proc/cpuinfo; False where it cannot be read)."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as info:
            return any(line.startswith("vendor_id") and "GenuineIntel" in line for line in info)
    except OSError:
        return False


# oneDNN for float32 CPU matmuls where it beats the BLAS: not on Intel CPUs, where MKL (Intel's
# own) is the faster of the two for every shape of a training step (`benchmarks/train_throughput.py`)
_ONEDNN = (torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_linear_pointwise")
           and not (torch.backends.mkl.is_available() and _intel_cpu()))


def _onednn_linear(x: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
    return torch.ops.mkldnn._linear_pointwise(x, weight, bias, "none", [], "")


class _OneDNNLinear(torch.autograd.Function):
    """y = x W^T + b with a oneDNN forward; the backward is the plain matmuls of F.linear."""

    @staticmethod
    def forward(ctx, x: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
        ctx.save_for_backward(x, weight)
        ctx.has_bias = bias is not None
        return _onednn_linear(x, weight, bias)

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple[Tensor | None, Tensor | None, Tensor | None]:
        x, weight = ctx.saved_tensors
        flat_grad = grad.reshape(-1, grad.shape[-1])  # (N, out)
        grad_x = grad @ weight if ctx.needs_input_grad[0] else None
        grad_w = flat_grad.t() @ x.reshape(-1, x.shape[-1]) if ctx.needs_input_grad[1] else None
        grad_b = flat_grad.sum(0) if ctx.has_bias and ctx.needs_input_grad[2] else None
        return grad_x, grad_w, grad_b


def linear(x: Tensor, weight: Tensor, bias: Tensor | None = None) -> Tensor:
    """`F.linear`, on oneDNN (or the native kernel, for few rows without gradients) for float32
    CPU tensors outside `torch.compile`. Called for every projection of every step, so the checks
    are ordered and written for speed (a decode step makes hundreds of calls)."""
    if (not (x.is_cpu and weight.is_cpu and x.dtype == weight.dtype == torch.float32 and weight.is_contiguous())
            or torch.compiler.is_compiling()):
        return F.linear(x, weight, bias)
    if torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad or (bias is not None and bias.requires_grad)):
        return _OneDNNLinear.apply(x, weight, bias) if _ONEDNN else F.linear(x, weight, bias)
    if (x.numel() <= kernels.MAX_ROWS * x.shape[-1] and (native := kernels.native()) is not None
            and (bias is None or bias.is_contiguous())):
        return native.gemv(x.contiguous(), weight, bias)
    return _onednn_linear(x, weight, bias) if _ONEDNN else F.linear(x, weight, bias)


class Linear(nn.Linear):
    """`nn.Linear` computed by `linear` (same parameters, same state dict)."""

    def forward(self, x: Tensor) -> Tensor:
        return linear(x, self.weight, self.bias)


# ---------------------------------------------------------------- output projection + loss


# Up to this many logits (1 MiB of float32), models compute the plain loss, logits then cross-entropy:
# there a few ops beat the fused path's many; above it the fused path wins (`benchmarks/shakespeare.py`
# has logits this small, `benchmarks/train_throughput.py` far larger ones).
SMALL_LOGITS = 2**18
_SOFTMAX_BLOCK = 2**18  # logits per softmax block (1 MiB of float32): the block's passes stay in a core's L2 cache


def _softmax_(logits: Tensor) -> tuple[Tensor, Tensor]:
    """Overwrite float32 `logits` (n, V) with softmax(logits); return each row's max and sum of
    exp(logit - max), (n, 1) each. On CPU a few rows at a time, so that the four passes over a
    block (max, subtract and exp, sum, divide) read it from cache, not from memory; on a GPU all
    rows at once (a block would cost a kernel launch per pass)."""
    n = logits.shape[0]
    peak, total = logits.new_empty(n, 1), logits.new_empty(n, 1)
    rows = max(1, _SOFTMAX_BLOCK // logits.shape[1]) if logits.is_cpu else max(n, 1)
    for start in range(0, n, rows):
        block, block_peak, block_total = logits[start : start + rows], peak[start : start + rows], total[start : start + rows]
        torch.amax(block, dim=-1, keepdim=True, out=block_peak)
        torch.sum(block.sub_(block_peak).exp_(), dim=-1, keepdim=True, out=block_total)
        block.div_(block_total)
    return peak, total


def _softmax_loss_(logits: Tensor, labels: Tensor, ignore_index: int) -> tuple[Tensor, Tensor]:
    """Cross-entropy summed over the rows of float32 `logits` (n, V), which are overwritten in
    place by softmax(logits) minus the one-hot labels (zero rows where the label is ignored):
    the gradient of that sum. In place, so no chunk-sized buffer is allocated (or page-faulted)."""
    valid = labels != ignore_index
    target = torch.where(valid, labels, 0)[:, None]  # (n, 1)
    picked = logits.gather(1, target).squeeze(1)  # (n,)
    peak, total = _softmax_(logits)  # (n, 1) each
    loss = ((peak.squeeze(1) + total.squeeze(1).log() - picked) * valid).sum()
    logits.scatter_add_(1, target, valid[:, None].to(logits.dtype).neg())
    if not bool(valid.all()):
        logits.index_fill_(0, (~valid).nonzero().squeeze(1), 0.0)  # only the ignored rows are written
    return loss, logits


_VOCAB_BLOCK = 8192  # logits columns per oneDNN call: blocks beat one oneDNN call over a whole large vocabulary


def logits_transient_columns(vocab: int) -> int:
    """Columns of a float32 CPU logits chunk that `linear_cross_entropy` computes apart before
    copying them into the chunk: a oneDNN block; none where one BLAS call writes them in place
    (what the memory planner, `diagnose/plan.py`, counts)."""
    return min(vocab, _VOCAB_BLOCK) if _ONEDNN else 0


_storage_refs = getattr(torch._C, "_storage_Use_Count", None)  # private; without it, nothing is reused


class _Scratch(threading.local):
    """Memory the output projection + loss keeps from one call to the next (per thread).

    glibc hands blocks this large back to the kernel when they are freed, so a fresh one costs a
    page fault per 4 KB page on every step (`benchmarks/train_throughput.py`). The logits buffer
    never leaves the loss. The weight-gradient buffer does (it becomes the weight's `.grad`), so it
    is only reused once nothing but this scratch references its memory: the optimizer's
    `zero_grad()` (set_to_none) released it."""

    logits: Tensor | None = None
    weight_grad: Tensor | None = None
    weight_grad_refs = 0  # storage references of `weight_grad` while no one else holds it


_scratch = _Scratch()


def _logits(h: Tensor, weight: Tensor) -> Tensor:
    """float32 h @ weight^T, (n, V). For float32 CPU tensors it is written into the scratch buffer
    (the caller may overwrite it until the next call): by one BLAS call, or on the oneDNN path a
    block of vocabulary columns at a time."""
    n, vocab = h.shape[0], weight.shape[0]
    if not (h.is_cpu and weight.is_cpu and h.dtype == weight.dtype == torch.float32
            and weight.is_contiguous() and not torch.compiler.is_compiling()):
        return linear(h, weight).float()
    if _scratch.logits is None or _scratch.logits.shape[0] < n or _scratch.logits.shape[1] != vocab:
        _scratch.logits = torch.empty(n, vocab)
    out = _scratch.logits[:n]
    if not _ONEDNN:
        return torch.mm(h, weight.t(), out=out)
    for start in range(0, vocab, _VOCAB_BLOCK):
        out[:, start : start + _VOCAB_BLOCK] = linear(h, weight[start : start + _VOCAB_BLOCK])
    return out


def _weight_grad_buffer(weight: Tensor) -> Tensor:
    """An uninitialised float32 tensor shaped like `weight`; on CPU, last call's memory when no
    one else (a `.grad` still held, an optimizer's reference) is using it any more."""
    if not weight.is_cpu or _storage_refs is None:
        return torch.empty(weight.shape, dtype=torch.float32, device=weight.device)
    kept = _scratch.weight_grad
    if kept is None or kept.shape != weight.shape or _storage_refs(kept.untyped_storage()._cdata) != _scratch.weight_grad_refs:
        kept = _scratch.weight_grad = torch.empty(weight.shape, dtype=torch.float32)
        _scratch.weight_grad_refs = _storage_refs(kept.untyped_storage()._cdata)  # calibrated, not assumed
    # a new tensor on the same memory, not a view: autograd must be able to keep it as .grad
    return torch.empty(0).set_(kept.untyped_storage(), 0, kept.shape, kept.stride())


def _chunked_loss(
    hidden: Tensor, weight: Tensor, labels: Tensor, chunk_rows: int, ignore_index: int, need_h: bool, need_w: bool
) -> tuple[Tensor, Tensor | None, Tensor | None]:
    """The summed loss and, where asked for, its gradients for `hidden` and (float32) `weight`."""
    grad_h = torch.empty_like(hidden) if need_h else None
    grad_w = _weight_grad_buffer(weight) if need_w else None
    total = hidden.new_zeros((), dtype=torch.float32)
    for start in range(0, hidden.shape[0], chunk_rows):
        h, y = hidden[start : start + chunk_rows], labels[start : start + chunk_rows]
        if not (need_h or need_w):  # evaluation: the loss alone, without the softmax gradient's passes
            total += F.cross_entropy(_logits(h, weight), y, ignore_index=ignore_index, reduction="sum")
            continue
        loss, grad = _softmax_loss_(_logits(h, weight), y, ignore_index)  # grad (n, V)
        total += loss
        with torch.autocast(hidden.device.type, enabled=False):  # gradients accumulate in float32
            if need_h:
                grad_h[start : start + chunk_rows] = (grad @ weight.float()).to(hidden.dtype)
            if need_w:
                grad_w.addmm_(grad.t(), h.float(), beta=0.0 if start == 0 else 1.0)
    return total, grad_h, grad_w


class TiedGradient:
    """Carries the output projection's gradient of a weight it shares with the token lookup (tied
    embeddings) to the lookup, during one backward pass. The lookup adds its rows in place and
    returns the sum as the weight's only gradient. Two producers of one gradient would make
    autograd add them out of place (a dense and a sparse gradient always are): a copy of the
    vocabulary-sized buffer into fresh, page-faulted memory on every step."""

    def __init__(self) -> None:
        self.grad: Tensor | None = None


class _LinearCrossEntropy(torch.autograd.Function):
    """sum CE(hidden @ weight^T, labels), a chunk of rows at a time, with the gradients computed
    chunk by chunk in the forward: the (N, vocab) logits and their gradient never exist whole."""

    @staticmethod
    def forward(ctx, hidden: Tensor, weight: Tensor, labels: Tensor, chunk_rows: int, ignore_index: int,
                tied: TiedGradient | None) -> Tensor:
        ctx.weight_dtype, ctx.tied = weight.dtype, tied
        total, grad_h, grad_w = _chunked_loss(hidden, weight, labels, chunk_rows, ignore_index, *ctx.needs_input_grad[:2])
        ctx.grads = (grad_h, grad_w)  # not saved tensors: dropped in backward, so nothing else holds them
        return total

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_total: Tensor) -> tuple[Tensor | None, ...]:
        if ctx.grads is None:
            raise RuntimeError("the fused output projection + loss can be differentiated once per forward")
        grad_h, grad_w = ctx.grads
        ctx.grads = None
        grad_h = grad_h.mul_(grad_total.to(grad_h.dtype)) if grad_h is not None else None  # scaled in place
        grad_w = grad_w.mul_(grad_total).to(ctx.weight_dtype) if grad_w is not None else None
        if ctx.tied is not None:
            ctx.tied.grad, grad_w = grad_w, None  # the token lookup adds its rows and returns the sum
        return grad_h, grad_w, None, None, None, None


def linear_cross_entropy(
    hidden: Tensor, weight: Tensor, labels: Tensor, *, ignore_index: int = -100, chunk_elements: int = 2**25,
    tied: TiedGradient | None = None,
) -> Tensor:
    """sum over rows of cross_entropy(hidden @ weight^T, labels), skipping `ignore_index` labels.

    `hidden` (N, dim), `weight` (V, dim), `labels` (N,). Equal to `F.cross_entropy(F.linear(hidden,
    weight).float(), labels, reduction="sum")`, but computed `chunk_elements // V` rows at a time:
    the full logits (4 bytes x N x V) and their gradient are never held, and no large buffer is
    freshly allocated (and page-faulted) every step. The default chunk (128 MiB of float32 logits)
    is larger than memory alone asks for: with fewer chunks the weight gradient is accumulated in
    fewer passes (`benchmarks/train_throughput.py` measures the choice). With `tied`, the weight's
    gradient goes to the `embedding` that shares it (see `TiedGradient`).
    """
    chunk_rows = max(1, chunk_elements // weight.shape[0])
    if torch.is_grad_enabled() and (hidden.requires_grad or weight.requires_grad):
        return _LinearCrossEntropy.apply(hidden, weight, labels, chunk_rows, ignore_index, tied)
    return _chunked_loss(hidden, weight, labels, chunk_rows, ignore_index, need_h=False, need_w=False)[0]


class _TiedEmbedding(torch.autograd.Function):
    """The token lookup whose weight gradient is the output projection's plus its own rows."""

    @staticmethod
    def forward(ctx, ids: Tensor, weight: Tensor, tied: TiedGradient) -> Tensor:
        ctx.save_for_backward(ids)
        ctx.weight_shape, ctx.tied = weight.shape, tied
        return F.embedding(ids, weight)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad: Tensor) -> tuple[None, Tensor, None]:
        (ids,) = ctx.saved_tensors
        grad_w, ctx.tied.grad = ctx.tied.grad, None
        if grad_w is None:  # the output projection's gradient did not come (its weight was not used)
            grad_w = grad.new_zeros(ctx.weight_shape)
        grad_w.index_add_(0, ids.flatten(), grad.reshape(-1, grad.shape[-1]).to(grad_w.dtype))
        return None, grad_w, None


def embedding(ids: Tensor, weight: Tensor, tied: TiedGradient | None = None) -> Tensor:
    """`F.embedding(ids, weight)`; with `tied`, the weight's gradient also carries the output
    projection's (see `TiedGradient`)."""
    if tied is None or not (torch.is_grad_enabled() and weight.requires_grad):
        return F.embedding(ids, weight)
    return _TiedEmbedding.apply(ids, weight, tied)



# ---------------------------------------------------------------- GELU


class _NativeGeluTanh(torch.autograd.Function):
    """GELU (tanh approximation) on the native kernel, forward and backward."""

    @staticmethod
    def forward(ctx, x: Tensor, native: kernels.Native) -> Tensor:
        ctx.save_for_backward(x)
        ctx.native = native
        return native.gelu_tanh(x)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad: Tensor) -> tuple[Tensor, None]:
        (x,) = ctx.saved_tensors
        return ctx.native.gelu_tanh_backward(grad.contiguous(), x), None


def gelu(x: Tensor, approximate: str) -> Tensor:
    """`F.gelu`; the tanh form of float32 CPU tensors on the native kernel, where it is built:
    PyTorch's tanh is slow on these CPUs, forward and backward (`benchmarks/train_throughput.py`)."""
    if (approximate != "tanh" or x.dtype != torch.float32 or not x.is_cpu or not x.is_contiguous()
            or torch.compiler.is_compiling() or (native := kernels.native()) is None):
        return F.gelu(x, approximate=approximate)
    return _NativeGeluTanh.apply(x, native)
