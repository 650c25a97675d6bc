"""Tiny random Hugging Face models, one per family, and a WordPiece tokenizer (shared by the parity, engine and
classification tests)."""

from __future__ import annotations

import pytest
import torch
from tokenizers import Tokenizer as Backend
from tokenizers import models, pre_tokenizers, processors

from lmforge.tokenizer import Tokenizer

transformers = pytest.importorskip("transformers")

VOCAB = 96


def _decoder_common(**kw):
    return dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                num_attention_heads=4, max_position_embeddings=64, **kw)


DECODERS = {  # family -> (config class, model class, settings beyond _decoder_common)
    "llama": (transformers.LlamaConfig, transformers.LlamaForCausalLM, {"num_key_value_heads": 2}),
    "mistral": (transformers.MistralConfig, transformers.MistralForCausalLM, {"num_key_value_heads": 2, "sliding_window": 5}),
    "mixtral": (transformers.MixtralConfig, transformers.MixtralForCausalLM,
                {"num_key_value_heads": 2, "num_local_experts": 4, "num_experts_per_tok": 2}),
    "qwen2": (transformers.Qwen2Config, transformers.Qwen2ForCausalLM, {"num_key_value_heads": 2}),
    # head_dim 16 != hidden_size / heads (8), as in the released Qwen3 and Gemma models
    "qwen3": (transformers.Qwen3Config, transformers.Qwen3ForCausalLM, {"num_key_value_heads": 2, "head_dim": 16}),
    "gemma": (transformers.GemmaConfig, transformers.GemmaForCausalLM, {"num_key_value_heads": 1, "head_dim": 16}),
    # Phi-3's default pad and eos ids (32000) lie outside the tiny vocabulary
    "phi3": (transformers.Phi3Config, transformers.Phi3ForCausalLM,
             {"num_key_value_heads": 2, "pad_token_id": 0, "eos_token_id": 0}),
}


def hf_model(family: str, **overrides):
    """(model, config) for a tiny random HF model of `family`."""
    t = transformers
    if family == "gpt2":
        cfg = t.GPT2Config(vocab_size=VOCAB, n_embd=32, n_layer=2, n_head=4, n_positions=64,
                           resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, bos_token_id=0, eos_token_id=0, **overrides)
        cls = t.GPT2LMHeadModel
    elif family in DECODERS:
        config_cls, cls, settings = DECODERS[family]
        cfg = config_cls(**_decoder_common(**{**settings, **overrides}))
    elif family in ("bert", "bert-mlm"):
        cfg = t.BertConfig(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                           intermediate_size=48, max_position_embeddings=64, hidden_dropout_prob=0.0,
                           attention_probs_dropout_prob=0.0, **overrides)
        cls = t.BertForMaskedLM if family == "bert-mlm" else t.BertModel
    else:
        raise ValueError(family)
    torch.manual_seed(0)
    model = cls(cfg).eval()
    with torch.no_grad():  # HF inits some norms/biases to constants; randomise so the test sees every tensor
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.02)
    return model


def save(model, path):
    model.save_pretrained(path)
    return path


def save_wordpiece(folder, words: list[str]) -> Tokenizer:
    """A BERT-style WordPiece tokenizer over `words` ([CLS] text [SEP]), saved into `folder`."""
    specials = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    vocab = {w: i for i, w in enumerate(specials + words)}
    backend = Backend(models.WordPiece(vocab, unk_token="[UNK]"))
    backend.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    backend.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", special_tokens=[("[CLS]", 2), ("[SEP]", 3)])
    names = dict(zip(["pad_token", "unk_token", "cls_token", "sep_token", "mask_token"], specials))
    tokenizer = Tokenizer(backend, special_tokens=names)
    tokenizer.save(folder)
    return tokenizer
