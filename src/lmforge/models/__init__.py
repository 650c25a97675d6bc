"""Model architectures built from one set of blocks (see layers.py)."""

from torch import nn

from lmforge.config import ModelConfig
from lmforge.models.bert import Bert
from lmforge.models.gpt import GPT
from lmforge.models.kv_cache import KVCache


def build_model(config: ModelConfig) -> nn.Module:
    """The decoder (GPT) or the encoder (Bert) that `config.kind` names, randomly initialised."""
    return GPT(config) if config.kind == "decoder" else Bert(config)


__all__ = ["GPT", "Bert", "KVCache", "build_model"]
