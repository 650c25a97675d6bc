"""Hugging Face families as data: config translation, refused variants, fused tensors, the family a save picks.

The parity with transformers itself lives in tests/parity/; these need no transformers.
"""

from __future__ import annotations

import pytest
import torch

from lmforge.checkpoint import load_model, save_hf
from lmforge.checkpoint.hf import config_from_hf
from lmforge.checkpoint.io import read_json, read_tensors, write_tensors
from lmforge.config import preset
from lmforge.errors import LmforgeError
from lmforge.models import build_model

SHAPE = {"vocab_size": 96, "hidden_size": 32, "intermediate_size": 48, "num_hidden_layers": 2, "num_attention_heads": 4}


def hf_config(model_type: str, **keys) -> dict:
    return {"model_type": model_type, **SHAPE, **keys}


@pytest.mark.parametrize(
    ("config", "message"),
    [
        (hf_config("phi3", rope_scaling={"type": "longrope", "short_factor": [1.0] * 4, "long_factor": [2.0] * 4}), "longrope"),
        (hf_config("phi3", rope_scaling={"type": "su", "short_factor": [1.0] * 4, "long_factor": [2.0] * 4}), "'su'"),
        (hf_config("phi3", partial_rotary_factor=0.75), "partial_rotary_factor"),
        (hf_config("qwen2", use_sliding_window=True, sliding_window=8, max_window_layers=1), "1 of 2 layers"),
        (hf_config("qwen3", use_sliding_window=True, sliding_window=8,
                   layer_types=["full_attention", "sliding_attention"]), "1 of 2 layers"),
        (hf_config("gemma", use_bidirectional_attention=True), "use_bidirectional_attention"),
        (hf_config("gemma", hidden_act="relu"), "hidden_act"),
    ],
)
def test_unsupported_variants_are_refused(config, message):
    with pytest.raises(LmforgeError, match=message):
        config_from_hf(config)


def test_defaults_follow_transformers():
    assert config_from_hf(hf_config("qwen3")).head_dim == 128  # Qwen3Config's default, not hidden / heads
    gemma = config_from_hf(hf_config("gemma", hidden_act="gelu"))  # the released checkpoints' legacy value
    assert (gemma.head_dim, gemma.mlp, gemma.tie_embeddings) == (256, "geglu_tanh", True)
    assert config_from_hf(hf_config("phi3")).norm_eps == 1e-5
    qwen2 = config_from_hf(hf_config("qwen2", use_sliding_window=False, sliding_window=8))
    assert (qwen2.qkv_bias, qwen2.attn_bias, qwen2.sliding_window) == (True, False, None)


@pytest.mark.parametrize(
    ("name", "source", "family"),
    [
        ("tiny-qwen2", None, "qwen2"),
        ("tiny-qwen3", None, "qwen3"),
        ("tiny-gemma", None, "gemma"),
        ("tiny-phi3", None, "mistral"),  # LLaMA's shape with a window: Phi-3 only for a model read from Phi-3
        ("tiny-phi3", "phi3", "phi3"),
        ("tiny-llama", "phi3", "phi3"),
        ("tiny-qwen2", "phi3", "qwen2"),  # Phi-3 has no place for q/k/v biases
    ],
)
def test_save_hf_picks_a_family_that_holds_the_model(tmp_path, name, source, family):
    torch.manual_seed(0)
    model = build_model(preset(name, extra={"hf_model_type": source} if source else {})).eval()
    save_hf(model, tmp_path)
    assert read_json(tmp_path / "config.json")["model_type"] == family
    loaded, config = load_model(tmp_path)
    assert config.extra == {"hf_model_type": family}
    ids = torch.randint(0, 256, (2, 10))
    with torch.no_grad():
        assert torch.equal(loaded.eval()(ids), model(ids))


def test_misshaped_fused_tensor_is_named(tmp_path):
    model = build_model(preset("tiny-phi3", extra={"hf_model_type": "phi3"}))
    save_hf(model, tmp_path)
    tensors = read_tensors(tmp_path / "model.safetensors")
    name = "model.layers.1.self_attn.qkv_proj.weight"
    tensors[name] = tensors[name][:-4]  # rows missing
    write_tensors(tmp_path / "model.safetensors", tensors)
    with pytest.raises(LmforgeError, match=r"qkv_proj\.weight \(124, 64\)"):
        load_model(tmp_path)
