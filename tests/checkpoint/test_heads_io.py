"""Task-head models on disk: classifier and reward round trips, damaged folders, adapters merged first."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from lmforge.api import pad_batch
from lmforge.checkpoint import load_model
from lmforge.checkpoint.heads import load_head_model, save_head_model
from lmforge.config import preset
from lmforge.errors import LmforgeError
from lmforge.models import build_model
from lmforge.models.heads import RewardModel, SequenceClassifier


def backbone(name: str) -> nn.Module:
    torch.manual_seed(0)
    return build_model(preset(name)).eval()


@pytest.mark.parametrize("name", ["tiny-llama", "tiny-bert"])
def test_save_load_round_trip(tmp_path, name):
    head = SequenceClassifier(backbone(name), n_labels=3, labels=["neg", "neu", "pos"]).eval()
    with torch.no_grad():
        head.score.bias.normal_()
    save_head_model(head, tmp_path / "clf")
    loaded = load_head_model(tmp_path / "clf").eval()
    assert isinstance(loaded, SequenceClassifier)
    assert loaded.labels == ["neg", "neu", "pos"] and loaded.pooling == head.pooling
    ids, mask = pad_batch([[5, 6, 7, 8], [9, 10]], 0)
    with torch.no_grad():
        assert torch.equal(loaded(ids, attention_mask=mask), head(ids, attention_mask=mask))
    plain, _ = load_model(tmp_path / "clf")  # the backbone alone is an ordinary checkpoint
    assert type(plain) is type(head.backbone)


def test_reward_round_trip_and_errors(tmp_path):
    reward = RewardModel(backbone("tiny-gpt2")).eval()
    save_head_model(reward, tmp_path / "rm")
    loaded = load_head_model(tmp_path / "rm").eval()
    ids = torch.randint(0, 256, (2, 6))
    with torch.no_grad():
        assert torch.equal(loaded(ids), reward(ids))
    (tmp_path / "rm" / "head.safetensors").unlink()
    with pytest.raises(LmforgeError, match=r"no head\.safetensors"):
        load_head_model(tmp_path / "rm")
    (tmp_path / "rm" / "head.json").unlink()
    with pytest.raises(LmforgeError, match=r"no head\.json"):
        load_head_model(tmp_path / "rm")


def test_adapted_backbone_must_be_merged_before_saving(tmp_path):
    from lmforge.train.lora import LoraConfig, apply_lora, merge_lora

    head = SequenceClassifier(backbone("tiny-llama"), n_labels=2)
    apply_lora(head, LoraConfig(rank=2, train_modules=["score"]))
    assert head.score.weight.requires_grad and not head.backbone.embed.weight.requires_grad
    with pytest.raises(LmforgeError, match="merge_lora"):
        save_head_model(head, tmp_path / "h")
    save_head_model(merge_lora(head), tmp_path / "h")
    assert isinstance(load_head_model(tmp_path / "h"), SequenceClassifier)
