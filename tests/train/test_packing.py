"""Packed rows never attend to each other: each gets the loss it gets alone (decoders, every position kind)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch.testing import assert_close

from lmforge.config import preset
from lmforge.data import IGNORE_INDEX
from lmforge.data.sft import SftExample, collate_sft, encode_sft_file, sequences
from lmforge.models import build_model
from lmforge.models.layers import attention_mask
from lmforge.train.objectives import sft


def per_row_losses(model, batch, lengths_per_row):
    """Summed next-token loss of every example, in the order the rows hold them."""
    logits = model(batch["input_ids"], attention_mask=batch["attention_mask"], positions=batch.get("positions"),
                   document_ids=batch.get("document_ids"))  # (B, T, V)
    token_loss = F.cross_entropy(logits.flatten(0, 1), batch["labels"].flatten(), ignore_index=IGNORE_INDEX,
                                 reduction="none").view(batch["labels"].shape)  # (B, T)
    out = []
    for row, lengths in enumerate(lengths_per_row):
        start = 0
        for n in lengths:
            out.append(token_loss[row, start : start + n].sum())
            start += n
    return torch.stack(out)


@pytest.mark.parametrize("name", ["tiny-llama", "tiny-gpt2", "tiny-mistral"])
def test_packed_rows_give_the_same_loss_as_unpacked(name, tiny_tokenizer, capitals_jsonl):
    torch.manual_seed(0)
    model = build_model(preset(name, vocab_size=tiny_tokenizer.vocab_size)).eval()  # mistral: a 16-token window
    examples, _ = encode_sft_file(capitals_jsonl, tiny_tokenizer, 128, "drop")
    packed = sequences(examples, 128, packed=True, seed=0)[:4]
    assert all(len(seq) >= 2 for seq in packed)
    order = [e for seq in packed for e in seq]
    pad = tiny_tokenizer.pad_id
    with torch.no_grad():
        together = per_row_losses(model, collate_sft(packed, pad, packed=True), [[len(e) for e in s] for s in packed])
        alone = per_row_losses(model, collate_sft([[e] for e in order], pad, packed=False), [[len(e)] for e in order])
    assert_close(together, alone, atol=1e-4, rtol=1e-5)
    # and through the objective: the same summed loss and target count
    out_packed = sft(model, collate_sft(packed, pad, packed=True))
    out_alone = sft(model, collate_sft([[e] for e in order], pad, packed=False))
    assert int(out_packed.n_targets) == int(out_alone.n_targets)
    assert_close(out_packed.loss_sum, out_alone.loss_sum, atol=1e-3, rtol=1e-5)


def test_packed_gradients_match_unpacked(tiny_tokenizer):
    torch.manual_seed(0)
    model = build_model(preset("tiny-llama", vocab_size=tiny_tokenizer.vocab_size))
    rows = [SftExample([1, 2, 3, 4], [2, 3, IGNORE_INDEX, 5]), SftExample([7, 8, 9], [IGNORE_INDEX, 9, 10])]
    grads = []
    for batch in (collate_sft([rows], 0, packed=True), collate_sft([[r] for r in rows], 0, packed=False)):
        model.zero_grad()
        sft(model, batch).loss_sum.backward()
        grads.append(torch.cat([p.grad.flatten() for p in model.parameters()]))
    assert_close(grads[0], grads[1], atol=1e-5, rtol=1e-4)


def test_document_ids_block_attention_across_documents():
    pos = torch.tensor([[0, 1, 2, 0, 1]])
    docs = torch.tensor([[0, 0, 0, 1, 1]])
    mask = attention_mask(pos, pos, causal=True, window=None, q_doc=docs, k_doc=docs)[0, 0]  # (T, S)
    want = torch.tensor([[1, 0, 0, 0, 0], [1, 1, 0, 0, 0], [1, 1, 1, 0, 0], [0, 0, 0, 1, 0], [0, 0, 0, 1, 1]]).bool()
    assert torch.equal(mask, want)
