"""The fast paths are exact: oneDNN `linear` against `F.linear`, and the chunked output
projection + cross-entropy against materialised logits and `F.cross_entropy`."""

from __future__ import annotations

import dataclasses

import pytest
import torch
import torch.nn.functional as F
from torch.testing import assert_close

from lmforge.config import preset
from lmforge.models import build_model, cpu_ops, gpt
from lmforge.models.cpu_ops import linear, linear_cross_entropy

HAS_ONEDNN = torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_linear_pointwise")


@pytest.fixture(params=["blas", pytest.param("onednn", marks=pytest.mark.skipif(not HAS_ONEDNN, reason="no oneDNN"))])
def matmuls(request, monkeypatch) -> str:
    """Each float32 CPU matmul path, whichever this machine's CPU would choose (MKL on Intel, oneDNN elsewhere)."""
    monkeypatch.setattr(cpu_ops, "_ONEDNN", request.param == "onednn")
    return request.param


@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("shape", [(1, 24), (8, 24), (2, 5, 24)])
def test_linear_matches_f_linear_with_gradients(shape, bias, matmuls):
    torch.manual_seed(0)
    x = torch.randn(shape, requires_grad=True)
    w = torch.randn(40, 24, requires_grad=True)
    b = torch.randn(40, requires_grad=True) if bias else None
    inputs = [t for t in (x, w, b) if t is not None]
    out = linear(x, w, b)
    grad = torch.randn_like(out)
    ours = torch.autograd.grad(out, inputs, grad)
    ref_out = F.linear(x, w, b)
    ref = torch.autograd.grad(ref_out, inputs, grad)
    assert_close(out, ref_out, atol=1e-5, rtol=1e-5)
    for a, r in zip(ours, ref):
        assert_close(a, r, atol=1e-5, rtol=1e-5)
    with torch.inference_mode():
        assert_close(linear(x, w, b), ref_out.detach(), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("chunk_elements", [2**22, 3 * 50])  # one chunk; chunks of 3 rows, the last one short
@pytest.mark.parametrize("freeze_weight", [False, True])
def test_linear_cross_entropy_matches_materialised_logits(chunk_elements, freeze_weight):
    torch.manual_seed(0)
    hidden = torch.randn(20, 16, requires_grad=True)
    weight = torch.randn(50, 16, requires_grad=not freeze_weight)
    labels = torch.randint(0, 50, (20,))
    labels[::4] = -100  # ignored targets contribute neither loss nor gradient
    loss = linear_cross_entropy(hidden, weight, labels, chunk_elements=chunk_elements)
    ref = F.cross_entropy(hidden @ weight.t(), labels, reduction="sum")
    assert_close(loss, ref, atol=1e-4, rtol=1e-5)
    inputs = [hidden] if freeze_weight else [hidden, weight]
    ours = torch.autograd.grad(2.5 * loss, inputs)  # a scaled upstream gradient is applied
    theirs = torch.autograd.grad(2.5 * ref, inputs)
    for a, r in zip(ours, theirs):
        assert_close(a, r, atol=1e-5, rtol=1e-5)
    with torch.no_grad():
        assert_close(linear_cross_entropy(hidden, weight, labels, chunk_elements=chunk_elements), ref.detach(),
                     atol=1e-4, rtol=1e-5)


def test_softmax_a_few_rows_at_a_time_equals_all_rows_at_once(monkeypatch):
    """The loss's softmax runs in blocks of rows (here 3 of 20, the last block short) with the
    result of one pass over all rows, ignored labels included."""
    torch.manual_seed(0)
    hidden = torch.randn(20, 16, requires_grad=True)
    weight = torch.randn(50, 16, requires_grad=True)
    labels = torch.randint(0, 50, (20,))
    labels[[1, 19]] = -100
    monkeypatch.setattr(cpu_ops, "_SOFTMAX_BLOCK", 3 * 50)
    loss = linear_cross_entropy(hidden, weight, labels)
    ref = F.cross_entropy(hidden @ weight.t(), labels, reduction="sum")
    assert_close(loss, ref, atol=1e-4, rtol=1e-5)
    for a, r in zip(torch.autograd.grad(loss, [hidden, weight]), torch.autograd.grad(ref, [hidden, weight])):
        assert_close(a, r, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("small_logits", [0, cpu_ops.SMALL_LOGITS])  # the fused loss; the plain one (small here)
@pytest.mark.parametrize("tied", [True, False])
@pytest.mark.parametrize("name", ["tiny-gpt2", "tiny-llama"])
def test_decoder_loss_from_labels_equals_loss_of_logits(name, tied, small_logits, monkeypatch):
    monkeypatch.setattr(gpt, "SMALL_LOGITS", small_logits)
    fused = []
    monkeypatch.setattr(cpu_ops._LinearCrossEntropy, "apply", counting(cpu_ops._LinearCrossEntropy.apply, fused))
    torch.manual_seed(0)
    model = build_model(dataclasses.replace(preset(name), tie_embeddings=tied))
    ids = torch.randint(0, model.config.vocab_size, (3, 12))
    labels = ids.roll(-1, dims=1)
    labels[:, -1] = -100
    loss = model(ids, labels=labels)
    ref = F.cross_entropy(model(ids).flatten(0, 1), labels.flatten(), reduction="sum")
    assert_close(loss, ref, atol=1e-4, rtol=1e-5)
    loss.backward()  # through .grad, as training does: a tied weight's gradient must come out dense
    grads = [p.grad for p in model.parameters()]
    assert not any(g.is_sparse for g in grads)
    ref_grads = torch.autograd.grad(ref, list(model.parameters()))
    for a, r in zip(grads, ref_grads):
        assert_close(a, r, atol=1e-5, rtol=1e-4)
    assert len(fused) == (small_logits == 0)


def counting(fn, calls: list):
    """`fn`, appending to `calls` on every call."""
    def wrapped(*args, **kwargs):
        calls.append(1)
        return fn(*args, **kwargs)
    return wrapped


def test_linear_cross_entropy_under_bf16_autocast_keeps_float32_gradients():
    torch.manual_seed(0)
    hidden = torch.randn(24, 16, requires_grad=True)
    weight = torch.randn(40, 16, requires_grad=True)
    labels = torch.randint(0, 40, (24,))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = linear_cross_entropy(hidden, weight, labels, chunk_elements=8 * 40)
        ref = F.cross_entropy(F.linear(hidden, weight).float(), labels, reduction="sum")
    assert_close(loss, ref, atol=0.05, rtol=1e-2)  # same bf16 logits, so close
    ours = torch.autograd.grad(loss, [hidden, weight])
    theirs = torch.autograd.grad(ref, [hidden, weight])
    for a, r in zip(ours, theirs):
        assert a.dtype == torch.float32
        assert_close(a, r, atol=0.05, rtol=2e-2)


def test_tied_weight_gradient_is_built_in_one_buffer(monkeypatch):
    """The output projection's gradient buffer becomes the tied weight's .grad, with the token
    lookup's rows added in place: no vocabulary-sized copy (gradient accumulation adds into it)."""
    monkeypatch.setattr(gpt, "SMALL_LOGITS", 0)  # these logits are small: take the fused loss anyway
    model = build_model(preset("tiny-gpt2"))
    assert model.lm_head.weight is model.embed.weight
    addresses, chunked = [], cpu_ops._chunked_loss  # addresses only: holding the buffer would force a copy

    def spy(*args, **kwargs):
        out = chunked(*args, **kwargs)
        addresses.append(out[2].data_ptr())
        return out

    monkeypatch.setattr(cpu_ops, "_chunked_loss", spy)
    ids = torch.randint(0, model.config.vocab_size, (2, 12))
    model(ids, labels=ids).backward()
    assert model.embed.weight.grad.data_ptr() == addresses[0]
    first = model.embed.weight.grad.clone()
    model(ids, labels=ids).backward()  # a second micro-batch accumulates
    assert_close(model.embed.weight.grad, 2 * first)


def test_linear_cross_entropy_over_several_vocabulary_blocks(matmuls):
    """Logits wider than one oneDNN block (`_VOCAB_BLOCK` columns), the last block short."""
    torch.manual_seed(0)
    vocab = 2 * cpu_ops._VOCAB_BLOCK + 37
    hidden = torch.randn(6, 8, requires_grad=True)
    weight = torch.randn(vocab, 8, requires_grad=True)
    labels = torch.tensor([0, vocab - 1, cpu_ops._VOCAB_BLOCK, cpu_ops._VOCAB_BLOCK - 1, -100, 5])
    loss = linear_cross_entropy(hidden, weight, labels, chunk_elements=4 * vocab)  # chunks of 4 and 2 rows
    ref = F.cross_entropy(hidden @ weight.t(), labels, reduction="sum")
    assert_close(loss, ref, atol=1e-4, rtol=1e-5)
    for a, r in zip(torch.autograd.grad(loss, [hidden, weight]), torch.autograd.grad(ref, [hidden, weight])):
        assert_close(a, r, atol=1e-5, rtol=1e-5)


def test_weight_gradient_memory_is_reused_only_once_released():
    """Step after step, the output projection's gradient lands in the same memory (no fresh
    vocabulary-sized allocation to page-fault), but never in memory someone still holds."""
    torch.manual_seed(0)
    hidden = torch.randn(10, 8)
    weight = torch.randn(300, 8, requires_grad=True)
    labels = torch.randint(0, 300, (10,))

    def step() -> int:
        linear_cross_entropy(hidden, weight, labels).backward()
        address = weight.grad.data_ptr()
        weight.grad = None  # what zero_grad() does
        return address

    first = step()
    taken = [torch.empty_like(weight) for _ in range(3)]  # would take the memory, had it been freed
    assert first not in {t.data_ptr() for t in taken}
    assert step() == first == step()
    linear_cross_entropy(hidden, weight, labels).backward()
    held = weight.grad  # the caller keeps this step's gradient
    expected = held.clone()
    weight.grad = None
    assert step() != held.data_ptr()
    assert torch.equal(held, expected)
