"""Task heads: pooling picks the right tokens, padding changes nothing, save/load round trip."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn
from torch.testing import assert_close

from lmforge.config import preset
from lmforge.errors import LmforgeError
from lmforge.models import build_model
from lmforge.models.heads import (
    RewardModel,
    SequenceClassifier,
    pool_hidden,
    sentence_embeddings,
)


def backbone(name: str, **overrides) -> nn.Module:
    torch.manual_seed(0)
    return build_model(preset(name, **overrides)).eval()


def padded_batch(rows: list[torch.Tensor], side: str, pad_id: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """(ids, mask) with every row padded to the longest on `side`."""
    T = max(len(r) for r in rows)
    ids = torch.full((len(rows), T), pad_id)
    mask = torch.zeros(len(rows), T, dtype=torch.long)
    for i, r in enumerate(rows):
        span = slice(T - len(r), T) if side == "left" else slice(0, len(r))
        ids[i, span], mask[i, span] = r, 1
    return ids, mask


ROWS = [torch.randint(1, 256, (n,), generator=torch.Generator().manual_seed(n)) for n in (9, 4, 6)]


def test_last_pooling_picks_last_real_token():
    hidden = torch.arange(2 * 5, dtype=torch.float32).view(2, 5, 1)  # value = flat position
    right = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]])
    left = torch.tensor([[0, 0, 1, 1, 1], [0, 1, 1, 1, 1]])
    assert pool_hidden(hidden, right, "last").flatten().tolist() == [2, 9]
    assert pool_hidden(hidden, left, "last").flatten().tolist() == [4, 9]
    assert pool_hidden(hidden, None, "last").flatten().tolist() == [4, 9]
    assert pool_hidden(hidden, left, "cls").flatten().tolist() == [2, 6]  # first real token
    assert pool_hidden(hidden, right, "cls").flatten().tolist() == [0, 5]


def test_mean_pooling_ignores_pads():
    hidden = torch.randn(2, 6, 3)
    mask = torch.tensor([[1, 1, 0, 0, 0, 0], [0, 1, 1, 1, 0, 0]])
    want = torch.stack([hidden[0, :2].mean(0), hidden[1, 1:4].mean(0)])
    assert_close(pool_hidden(hidden, mask, "mean"), want)
    changed = hidden.clone()
    changed[mask == 0] = 1e3
    assert_close(pool_hidden(changed, mask, "mean"), want)


@pytest.mark.parametrize("name", ["tiny-llama", "tiny-gpt2", "tiny-bert"])
@pytest.mark.parametrize("side", ["left", "right"])
def test_padded_batch_scores_like_each_row_alone(name, side):
    classifier = SequenceClassifier(backbone(name), n_labels=3).eval()
    reward = RewardModel(copy.deepcopy(classifier.backbone)).eval()
    ids, mask = padded_batch(ROWS, side)
    with torch.no_grad():
        for head in (classifier, reward):
            batch = head(ids, attention_mask=mask)
            alone = torch.cat([head(r[None]) for r in ROWS])
            assert_close(batch, alone, atol=1e-5, rtol=1e-5)
    assert batch.shape == (3,)  # reward: one scalar per row


def test_default_pooling_per_kind():
    assert SequenceClassifier(backbone("tiny-llama"), 2).pooling == "last"
    assert SequenceClassifier(backbone("tiny-bert"), 2).pooling == "cls"
    assert SequenceClassifier(backbone("tiny-bert", pooler=False), 2).pooling == "mean"
    with pytest.raises(LmforgeError, match="cls"):
        SequenceClassifier(backbone("tiny-llama"), 2, pooling="cls")
    with pytest.raises(LmforgeError, match="pooling"):
        SequenceClassifier(backbone("tiny-llama"), 2, pooling="max")


def test_encoder_with_pooler_uses_it():
    head = SequenceClassifier(backbone("tiny-bert"), n_labels=2).eval()
    ids = torch.randint(1, 256, (2, 7))
    with torch.no_grad():
        hidden = head.backbone.hidden_states(ids)[-1]
        want = head.score(torch.tanh(head.backbone.pooler(hidden[:, 0])))
        assert_close(head(ids), want)
        head.backbone.pooler.weight.zero_()
        head.backbone.pooler.bias.zero_()
        assert_close(head(ids), head.score.bias.expand(2, 2))  # tanh(0) = 0: only the bias is left


def test_parameter_names_and_deepcopy():
    head = SequenceClassifier(backbone("tiny-llama"), n_labels=2)
    names = [n for n, _ in head.named_parameters()]
    assert "backbone.layers.0.attn.q.weight" in names and {"score.weight", "score.bias"} <= set(names)
    assert "score.bias" not in dict(RewardModel(backbone("tiny-llama")).named_parameters())
    twin = copy.deepcopy(head)
    with torch.no_grad():
        twin.backbone.norm.weight.zero_()  # a copy pools with its own backbone
        ids = torch.randint(0, 256, (1, 5))
        assert not torch.equal(head(ids), twin(ids))


def test_sentence_embeddings_are_unit_mean_pooled():
    model = backbone("tiny-bert")
    ids, mask = padded_batch(ROWS, "right")
    with torch.no_grad():
        emb = sentence_embeddings(model, ids, mask)
        alone = sentence_embeddings(model, ROWS[1][None])
    assert emb.shape == (3, 64)
    assert_close(emb.norm(dim=-1), torch.ones(3))
    assert_close(emb[1:2], alone, atol=1e-5, rtol=1e-5)


def test_label_names_must_match_the_label_count():
    with pytest.raises(LmforgeError, match="label names"):
        SequenceClassifier(backbone("tiny-gpt2"), 2, labels=["a", "b", "c"])
