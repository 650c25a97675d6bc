"""Building blocks shared by every architecture: norms, positions, attention, MLPs, experts.

Design choices:
- Components are chosen when a module is built (`make_norm`, `make_positions`, `make_mlp`),
  so every `forward` below is straight-line code.
- Attention goes through PyTorch's fused `scaled_dot_product_attention`. Causality,
  padding, sliding windows and the KV cache are all expressed the same way: each query and
  each key carries its absolute position, and `attention_mask` turns positions into a boolean
  mask. When nothing but plain causality applies, no mask is built and the fused kernel's
  `is_causal` path is used. The one exception is a float32 CPU decode step (one query per
  sequence, no gradient): the native kernel of `kernels.py` stores the new keys/values and
  attends over the cache with the same mask in one call.
- GPT-2's GELU (tanh form) of float32 CPU tensors runs on the native kernel, forward and
  backward: PyTorch's tanh is slow on these CPUs.
- Rotary embeddings use the "rotate half" layout of Hugging Face checkpoints, so LLaMA-family
  weights load without permuting q/k rows.
- Grouped-query attention never copies keys/values per query head (`enable_gqa`).
- Every projection is a `Linear`: an `nn.Linear` whose float32 CPU forward runs on oneDNN
  instead of the BLAS behind `F.linear`. On the AMD EPYC CPUs we measure on, per matmul, that
  is 1.1-2x faster for few rows and 1.5x for the 50k-wide output projection of a training
  batch (`benchmarks/train_throughput.py`); results agree with `F.linear` to float32 rounding.
  Without gradients and with at most 8 rows (a decode step) the native kernel of `kernels.py`
  runs instead, reading the weights about twice as fast as oneDNN at 8 rows
  (`benchmarks/decode.py`). Other devices and dtypes use `F.linear`.
"""

from __future__ import annotations

import math
import threading
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lmforge.config import ModelConfig
from lmforge.models import kernels
from lmforge.models.kv_cache import CacheView

Rope = tuple[Tensor, Tensor] | None  # (cos, signed sin), each (B, 1, T, head_dim); None without rotary positions


# ---------------------------------------------------------------- linear layers


_ONEDNN = torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_linear_pointwise")


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
    if (not (_ONEDNN and x.is_cpu and weight.is_cpu and x.dtype == weight.dtype == torch.float32 and weight.is_contiguous())
            or torch.compiler.is_compiling()):
        return F.linear(x, weight, bias)
    if torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad or (bias is not None and bias.requires_grad)):
        return _OneDNNLinear.apply(x, weight, bias)
    if (x.numel() <= kernels.MAX_ROWS * x.shape[-1] and (native := kernels.native()) is not None
            and (bias is None or bias.is_contiguous())):
        return native.gemv(x.contiguous(), weight, bias)
    return _onednn_linear(x, weight, bias)


class Linear(nn.Linear):
    """`nn.Linear` computed by `linear` (same parameters, same state dict)."""

    def forward(self, x: Tensor) -> Tensor:
        return linear(x, self.weight, self.bias)


# ---------------------------------------------------------------- output projection + loss


def _softmax_loss_(logits: Tensor, labels: Tensor, ignore_index: int) -> tuple[Tensor, Tensor]:
    """Cross-entropy summed over the rows of float32 `logits` (n, V), which are overwritten in
    place by softmax(logits) minus the one-hot labels (zero rows where the label is ignored):
    the gradient of that sum. In place, so no chunk-sized buffer is allocated (or page-faulted)."""
    valid = labels != ignore_index
    target = torch.where(valid, labels, 0)[:, None]  # (n, 1)
    picked = logits.gather(1, target).squeeze(1)  # (n,)
    peak = logits.amax(dim=-1, keepdim=True)  # (n, 1)
    total = logits.sub_(peak).exp_().sum(dim=-1, keepdim=True)  # (n, 1)
    logits.div_(total)
    loss = ((peak.squeeze(1) + total.squeeze(1).log() - picked) * valid).sum()
    logits.scatter_add_(1, target, valid[:, None].to(logits.dtype).neg())
    if not bool(valid.all()):
        logits.index_fill_(0, (~valid).nonzero().squeeze(1), 0.0)  # only the ignored rows are written
    return loss, logits


_VOCAB_BLOCK = 8192  # logits columns per oneDNN call: 15-29% faster than one call over 50k (166-256 rows)
_storage_refs = getattr(torch._C, "_storage_Use_Count", None)  # private; without it, nothing is reused


class _Scratch(threading.local):
    """Memory the output projection + loss keeps from one call to the next (per thread).

    glibc hands blocks this large back to the kernel when they are freed, so a fresh one costs a
    page fault per 4 KB on every step: ~55k faults a GPT-2 (50257 x 768) step. The logits buffer
    never leaves the loss. The weight-gradient buffer does (it becomes the weight's `.grad`), so it
    is only reused once nothing but this scratch references its memory: the optimizer's
    `zero_grad()` (set_to_none) released it."""

    logits: Tensor | None = None
    weight_grad: Tensor | None = None
    weight_grad_refs = 0  # storage references of `weight_grad` while no one else holds it


_scratch = _Scratch()


def _logits(h: Tensor, weight: Tensor) -> Tensor:
    """float32 h @ weight^T, (n, V). On the oneDNN path it is written, a block of vocabulary
    columns at a time, into the scratch buffer (the caller may overwrite it until the next call)."""
    n, vocab = h.shape[0], weight.shape[0]
    if not (_ONEDNN and h.is_cpu and weight.is_cpu and h.dtype == weight.dtype == torch.float32
            and weight.is_contiguous() and not torch.compiler.is_compiling()):
        return linear(h, weight).float()
    if _scratch.logits is None or _scratch.logits.shape[0] < n or _scratch.logits.shape[1] != vocab:
        _scratch.logits = torch.empty(n, vocab)
    out = _scratch.logits[:n]
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
    vocabulary-sized buffer into fresh memory, ~0.2 s of an 8 s GPT-2 step, mostly page faults."""

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
    the full logits (4 bytes x N x V: 200 MB for 1024 tokens of GPT-2) and their gradient are never
    held, and no large buffer is freshly allocated (and page-faulted) every step. The default chunk
    (128 MiB of float32 logits, 667 GPT-2 rows) beat 32 MiB on our CPU (1024 GPT-2 tokens, forward
    and backward: 2.41 -> 2.15 s, paired rounds): the weight gradient is accumulated over fewer
    chunks. With `tied`, the weight's gradient goes to the `embedding` that shares it (see
    `TiedGradient`).
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


# ---------------------------------------------------------------- norms


class RMSNorm(nn.Module):
    """Root-mean-square norm (LLaMA), computed in float32 like the reference implementation."""

    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: Tensor) -> Tensor:
        if x.dtype == torch.float32:  # one fused op, bitwise equal to the formula below; other dtypes
            # keep the formula: normalise in float32, cast back, then scale (as the HF reference does)
            return F.rms_norm(x, self.weight.shape, self.weight, self.eps)
        xf = x.float()
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * xf.to(x.dtype)


def make_norm(config: ModelConfig) -> nn.Module:
    if config.norm == "rmsnorm":
        return RMSNorm(config.dim, config.norm_eps)
    return nn.LayerNorm(config.dim, eps=config.norm_eps, bias=config.norm_bias)


# ---------------------------------------------------------------- positions


class NoPositions(nn.Module):
    """Position-free models: nothing added, nothing rotated."""

    def add(self, x: Tensor, positions: Tensor) -> Tensor:
        return x

    def angles(self, positions: Tensor) -> Rope:
        return None


class LearnedPositions(NoPositions):
    """A trained table of position vectors added to the token embeddings (GPT-2, BERT)."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(config.max_seq_len, config.dim))

    def add(self, x: Tensor, positions: Tensor) -> Tensor:
        return x + F.embedding(positions, self.weight)  # (B, T, dim)


class SinusoidalPositions(NoPositions):
    """The fixed sine/cosine table of Vaswani et al. (2017), added to the embeddings."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        pos = torch.arange(config.max_seq_len, dtype=torch.float32)[:, None]
        freq = torch.exp(torch.arange(0, config.dim, 2, dtype=torch.float32) * (-math.log(10000.0) / config.dim))
        table = torch.zeros(config.max_seq_len, config.dim)
        table[:, 0::2] = torch.sin(pos * freq)
        table[:, 1::2] = torch.cos(pos * freq[: config.dim // 2])
        self.register_buffer("table", table, persistent=False)

    def add(self, x: Tensor, positions: Tensor) -> Tensor:
        return x + self.table[positions].to(x.dtype)  # (B, T, dim)


def rope_frequencies(config: ModelConfig) -> Tensor:
    """Inverse frequencies of rotary embeddings, with optional linear or LLaMA-3 scaling."""
    dim = config.head_dim
    inv_freq = 1.0 / (config.rope_theta ** (torch.arange(0, dim, 2, dtype=torch.int64).float() / dim))
    scaling = config.rope_scaling or {}
    if scaling.get("type") == "linear":
        return inv_freq / scaling["factor"]
    if scaling.get("type") == "llama3":
        return _llama3_scaled(inv_freq, scaling)
    return inv_freq


def _llama3_scaled(inv_freq: Tensor, s: dict) -> Tensor:
    """LLaMA 3.1 frequency scaling: long wavelengths slowed by `factor`, a smooth ramp between."""
    factor, low, high, old_len = s["factor"], s["low_freq_factor"], s["high_freq_factor"], s["original_max_seq_len"]
    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > old_len / low, inv_freq / factor, inv_freq)
    smooth = (old_len / wavelen - low) / (high - low)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    medium = (wavelen >= old_len / high) & (wavelen <= old_len / low)
    return torch.where(medium, smoothed, scaled)


class RotaryPositions(NoPositions):
    """Rotary position embeddings (Su et al., 2021): q and k are rotated by position-dependent angles."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.register_buffer("inv_freq", rope_frequencies(config), persistent=False)

    def angles(self, positions: Tensor) -> Rope:
        freqs = positions[..., None].float() * self.inv_freq.float()  # (B, T, head_dim / 2)
        cos, sin = freqs.cos(), freqs.sin()
        return torch.cat((cos, cos), dim=-1)[:, None], torch.cat((-sin, sin), dim=-1)[:, None]  # (B, 1, T, head_dim)


def make_positions(config: ModelConfig) -> NoPositions:
    kinds = {"learned": LearnedPositions, "sinusoidal": SinusoidalPositions, "rotary": RotaryPositions}
    return kinds[config.positions](config) if config.positions in kinds else NoPositions()


def apply_rotary(q: Tensor, k: Tensor, rope: Rope) -> tuple[Tensor, Tensor]:
    """x * cos + rotate_half(x) * sin, where rotate_half(x1, x2) = (-x2, x1). The sign lives in
    `sin` (its first half negated by `angles`), so the rotation is a roll: three ops, not six."""
    cos, sin = rope
    cos, sin = cos.to(q.dtype), sin.to(q.dtype)
    half = q.shape[-1] // 2
    return torch.addcmul(q * cos, q.roll(half, -1), sin), torch.addcmul(k * cos, k.roll(half, -1), sin)


def no_rotation(q: Tensor, k: Tensor, rope: Rope) -> tuple[Tensor, Tensor]:
    return q, k


# ---------------------------------------------------------------- attention


def attention_mask(
    q_pos: Tensor,
    k_pos: Tensor,
    *,
    causal: bool,
    window: int | None,
    k_valid: Tensor | None = None,
    q_doc: Tensor | None = None,
    k_doc: Tensor | None = None,
) -> Tensor:
    """Boolean mask (B, 1, T, S), True where query t may attend key s.

    `q_pos` (B, T) and `k_pos` (B, S) are absolute positions; a key position of -1 marks an
    empty cache slot. `k_valid` (B, S) marks padding keys as False. Document ids `q_doc` (B, T)
    and `k_doc` (B, S) of packed sequences allow a query only the keys of its own document;
    positions then restart per document, and causality by position is causality within it.
    """
    q = q_pos[:, None, :, None]  # (B, 1, T, 1)
    k = k_pos[:, None, None, :]  # (B, 1, 1, S)
    allowed = k >= 0
    if causal:
        allowed = allowed & (k <= q)
    if window is not None:
        allowed = allowed & (q - k < window)
    if k_valid is not None:
        allowed = allowed & k_valid[:, None, None, :].bool()
    if q_doc is not None and k_doc is not None:
        allowed = allowed & (q_doc[:, None, :, None] == k_doc[:, None, None, :])
    return allowed


def _sdpa_gqa(q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None, dropout: float, causal: bool) -> Tensor:
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout, is_causal=causal, enable_gqa=True)


def _sdpa_repeat(q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None, dropout: float, causal: bool) -> Tensor:
    groups = q.shape[1] // k.shape[1]  # torch < 2.5 has no enable_gqa: repeat kv heads
    k, v = k.repeat_interleave(groups, dim=1), v.repeat_interleave(groups, dim=1)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout, is_causal=causal)


_SDPA_HAS_GQA = "enable_gqa" in (F.scaled_dot_product_attention.__doc__ or "")
sdpa: Callable[..., Tensor] = _sdpa_gqa if _SDPA_HAS_GQA else _sdpa_repeat


def _native_attention(q: Tensor, cache: CacheView | None, mask: Tensor | None, training: bool) -> kernels.Native | None:
    """The native kernels when they can run this attention: a decode step (one float32 CPU query
    per sequence, attending over a cache with a mask), without gradients or training."""
    if (cache is None or mask is None or training or q.shape[2] != 1 or q.dtype != torch.float32 or not q.is_cpu
            or torch.is_grad_enabled() or torch.compiler.is_compiling()):
        return None
    return kernels.native()


class Attention(nn.Module):
    """Multi-head attention with grouped-query heads, optional rotary positions and a KV cache."""

    def __init__(self, config: ModelConfig, layer_idx: int) -> None:
        super().__init__()
        self.layer_idx = layer_idx
        self.n_heads, self.n_kv_heads, self.head_dim = config.n_heads, config.n_kv_heads, config.head_dim
        self.causal = config.causal
        self.dropout = config.dropout
        bias = config.attn_bias
        self.q = Linear(config.dim, self.n_heads * self.head_dim, bias=bias)
        self.k = Linear(config.dim, self.n_kv_heads * self.head_dim, bias=bias)
        self.v = Linear(config.dim, self.n_kv_heads * self.head_dim, bias=bias)
        self.o = Linear(self.n_heads * self.head_dim, config.dim, bias=bias)
        self.rotate = apply_rotary if config.positions == "rotary" else no_rotation
        self.resid_drop = nn.Dropout(config.dropout)

    def forward(self, x: Tensor, rope: Rope, mask: Tensor | None, cache=None) -> Tensor:
        B, T, _ = x.shape
        q = self.q(x).view(B, T, self.n_heads, self.head_dim).transpose(1, 2)  # (B, n_heads, T, head_dim)
        k = self.k(x).view(B, T, self.n_kv_heads, self.head_dim).transpose(1, 2)  # (B, n_kv_heads, T, head_dim)
        v = self.v(x).view(B, T, self.n_kv_heads, self.head_dim).transpose(1, 2)  # (B, n_kv_heads, T, head_dim)
        q, k = self.rotate(q, k, rope)
        if (native := _native_attention(q, cache, mask, self.training)) is not None:
            # one decode token per sequence: store and attend in one native call
            y = native.decode_attention(q, k, v, *cache.buffers(self.layer_idx), cache.columns, mask)
        else:
            if cache is not None:
                k, v = cache.update(self.layer_idx, k, v)  # (B, n_kv_heads, S, head_dim)
            dropout = self.dropout if self.training else 0.0
            y = sdpa(q, k, v, mask, dropout, self.causal and mask is None)  # (B, n_heads, T, head_dim)
            y = y.transpose(1, 2).reshape(B, T, self.n_heads * self.head_dim)  # (B, T, n_heads * head_dim)
        return self.resid_drop(self.o(y))


# ---------------------------------------------------------------- feed-forward


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
    PyTorch's tanh is slow on these CPUs (3-4x the kernel's time, forward and backward)."""
    if (approximate != "tanh" or x.dtype != torch.float32 or not x.is_cpu or not x.is_contiguous()
            or torch.compiler.is_compiling() or (native := kernels.native()) is None):
        return F.gelu(x, approximate=approximate)
    return _NativeGeluTanh.apply(x, native)


class GeluMLP(nn.Module):
    """Two projections with a GELU between (GPT-2 uses the tanh approximation, BERT the exact one)."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.up = Linear(config.dim, config.hidden_dim, bias=config.mlp_bias)
        self.down = Linear(config.hidden_dim, config.dim, bias=config.mlp_bias)
        self.approximate = "tanh" if config.mlp == "gelu_tanh" else "none"
        self.drop = nn.Dropout(config.dropout)

    def forward(self, x: Tensor) -> Tensor:
        return self.drop(self.down(gelu(self.up(x), self.approximate)))


class SwiGLU(nn.Module):
    """The gated MLP of LLaMA (Shazeer, 2020): down(silu(gate(x)) * up(x))."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.gate = Linear(config.dim, config.hidden_dim, bias=config.mlp_bias)
        self.up = Linear(config.dim, config.hidden_dim, bias=config.mlp_bias)
        self.down = Linear(config.hidden_dim, config.dim, bias=config.mlp_bias)
        self.drop = nn.Dropout(config.dropout)

    def forward(self, x: Tensor) -> Tensor:
        return self.drop(self.down(F.silu(self.gate(x)) * self.up(x)))


class MoE(nn.Module):
    """Sparse mixture of SwiGLU experts with top-k routing (Mixtral).

    Router probabilities are a softmax over all experts; the chosen top-k are renormalised
    to sum to one. After each forward, `aux_loss` holds the Switch-Transformer load-balancing
    loss, n_experts * sum_e (fraction of routed tokens to e) * (mean router probability of e),
    which training objectives add with `router_aux_loss_coef`.
    """

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.top_k = config.n_experts_per_token
        self.router = Linear(config.dim, config.n_experts, bias=False)
        self.experts = nn.ModuleList(SwiGLU(config) for _ in range(config.n_experts))
        self.aux_loss = torch.zeros(())

    def forward(self, x: Tensor) -> Tensor:
        B, T, D = x.shape
        flat = x.reshape(-1, D)  # (N, dim)
        probs = F.softmax(self.router(flat).float(), dim=-1)  # (N, n_experts)
        weights, chosen = probs.topk(self.top_k, dim=-1)  # (N, top_k)
        weights = (weights / weights.sum(-1, keepdim=True)).to(x.dtype)
        out = torch.zeros_like(flat)
        for e, expert in enumerate(self.experts):
            token, slot = torch.where(chosen == e)
            if token.numel():
                out.index_add_(0, token, expert(flat[token]) * weights[token, slot, None])
        self.aux_loss = self._balance_loss(probs, chosen)
        return out.view(B, T, D)

    def _balance_loss(self, probs: Tensor, chosen: Tensor) -> Tensor:
        n_experts = probs.shape[-1]
        routed = F.one_hot(chosen, n_experts).float().sum(1).mean(0)  # (n_experts,) tokens routed per token
        return n_experts * (routed * probs.mean(0)).sum()


def make_mlp(config: ModelConfig) -> nn.Module:
    if config.n_experts:
        return MoE(config)
    return SwiGLU(config) if config.mlp == "swiglu" else GeluMLP(config)


class Block(nn.Module):
    """A pre-norm transformer block: x + attn(norm(x)), then x + mlp(norm(x))."""

    def __init__(self, config: ModelConfig, layer_idx: int) -> None:
        super().__init__()
        self.attn_norm = make_norm(config)
        self.attn = Attention(config, layer_idx)
        self.mlp_norm = make_norm(config)
        self.mlp = make_mlp(config)

    def forward(self, x: Tensor, rope: Rope, mask: Tensor | None, cache=None) -> Tensor:
        x = x + self.attn(self.attn_norm(x), rope, mask, cache)
        return x + self.mlp(self.mlp_norm(x))


def init_weights(model: nn.Module, config: ModelConfig) -> None:
    """Normal(0, init_std) weights, zero biases, unit norms; residual projections scaled by 1/sqrt(2L) (GPT-2)."""
    for name, module in model.named_modules():
        if isinstance(module, nn.Linear):
            std = config.init_std
            if name.endswith((".o", ".down")):
                std = std / math.sqrt(2 * config.n_layers)
            nn.init.normal_(module.weight, mean=0.0, std=std)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, (nn.Embedding, LearnedPositions)):
            nn.init.normal_(module.weight, mean=0.0, std=config.init_std)
