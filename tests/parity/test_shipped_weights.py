"""Checkpoints as they ship: bfloat16 / float16 weights, shards, output layers tied or not, unknown families.

Each case is checked against what `transformers` makes of the same folder.
"""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file, save_file
from torch.testing import assert_close

import lmforge
from hf_tiny import hf_model
from lmforge.checkpoint import load_model, stored_dtype
from lmforge.errors import LmforgeError

transformers = pytest.importorskip("transformers")

IDS = torch.randint(0, 96, (2, 12), generator=torch.Generator().manual_seed(1))
# what one bfloat16 / float16 rounding step allows (torch.testing's own defaults, with room for a few steps)
HALF_TOLERANCE = {"atol": 1e-2, "rtol": 1.6e-2}


def auto_class(family: str):
    return transformers.AutoModelForMaskedLM if family.startswith("bert") else transformers.AutoModelForCausalLM


def hf_logits(path, family: str = "llama", **kwargs):
    model = auto_class(family).from_pretrained(path, **kwargs).eval()
    with torch.no_grad():
        return model(input_ids=IDS).logits


def our_logits(path, **kwargs):
    with torch.no_grad():
        return lmforge.load(path, **kwargs).model(IDS)


def edit_config(path, **changes):
    config = json.loads((path / "config.json").read_text())
    (path / "config.json").write_text(json.dumps({**config, **changes}))


# ---------------------------------------------------------------- dtypes and shards


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_weights_load_as_float32_by_default(make_hf, tmp_path, dtype):
    model, _ = make_hf("llama")
    model.to(dtype).save_pretrained(tmp_path / "half")
    lm = lmforge.load(tmp_path / "half")
    assert {p.dtype for p in lm.model.parameters()} == {torch.float32}
    assert_close(our_logits(tmp_path / "half"), hf_logits(tmp_path / "half", dtype=torch.float32), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_auto_keeps_the_stored_dtype(make_hf, tmp_path, family):
    model, _ = make_hf(family)
    path = tmp_path / "bf16"
    model.to(torch.bfloat16).save_pretrained(path)
    assert stored_dtype(path) == torch.bfloat16
    lm = lmforge.load(path, dtype="auto")
    assert {p.dtype for p in lm.model.parameters()} == {torch.bfloat16}
    assert all(b.dtype == torch.float32 for b in lm.model.buffers() if b.is_floating_point())  # rotary frequencies
    with torch.no_grad():
        got = lm.model(IDS)
    assert got.dtype == torch.bfloat16
    assert_close(got.float(), hf_logits(path, family, dtype="auto").float(), **HALF_TOLERANCE)


def test_explicit_dtype_by_object_or_name(make_hf):
    _, path = make_hf("llama")
    assert stored_dtype(path) == torch.float32
    assert lmforge.load(path, dtype=torch.bfloat16).model.embed.weight.dtype == torch.bfloat16
    assert lmforge.load(path, dtype="float16").model.embed.weight.dtype == torch.float16
    with pytest.raises(LmforgeError, match="'int8' is not a floating-point dtype"):
        lmforge.load(path, dtype="int8")


def test_stored_dtype_without_a_config_entry_comes_from_the_weights(make_hf, tmp_path):
    model, _ = make_hf("gpt2")
    path = tmp_path / "fp16"
    model.to(torch.float16).save_pretrained(path)
    config = json.loads((path / "config.json").read_text())
    config.pop("dtype", None)
    config.pop("torch_dtype", None)
    (path / "config.json").write_text(json.dumps(config))
    assert stored_dtype(path) == torch.float16


def test_sharded_bfloat16_checkpoint(make_hf, tmp_path):
    model, _ = make_hf("llama")
    path = tmp_path / "sharded"
    model.to(torch.bfloat16).save_pretrained(path, max_shard_size="20KB")
    assert len(list(path.glob("model-*.safetensors"))) > 1 and not (path / "model.safetensors").exists()
    assert_close(our_logits(path), hf_logits(path, dtype=torch.float32), atol=1e-5, rtol=1e-5)
    assert_close(our_logits(path, dtype="auto").float(), hf_logits(path, dtype="auto").float(), **HALF_TOLERANCE)


def test_shard_missing_from_the_folder_is_one_line(make_hf, tmp_path):
    model, _ = make_hf("llama")
    path = tmp_path / "sharded"
    model.save_pretrained(path, max_shard_size="20KB")
    sorted(path.glob("model-*.safetensors"))[-1].unlink()
    with pytest.raises(LmforgeError, match="lists shards that are not in") as e:
        load_model(path)
    assert "\n" not in str(e.value)


# ---------------------------------------------------------------- tied or untied output layers


@pytest.mark.parametrize("family", ["gpt2", "llama", "bert-mlm"])
def test_stored_output_layer_that_differs_wins_over_a_tied_config(make_hf, family):
    """transformers keeps both matrices (and warns) when a 'tied' checkpoint stores two different ones."""
    _, path = make_hf(family, tie_word_embeddings=False)
    edit_config(path, tie_word_embeddings=True)
    model = load_model(path)[0]
    assert not model.config.tie_embeddings
    assert_close(our_logits(path), hf_logits(path, family), atol=1e-5, rtol=1e-5)


def test_stored_output_layer_equal_to_the_embeddings_stays_tied(make_hf):
    _, path = make_hf("llama", tie_word_embeddings=True)
    tensors = load_file(path / "model.safetensors")
    tensors["lm_head.weight"] = tensors["model.embed_tokens.weight"].clone()  # as pickle-era exports store it
    save_file(tensors, path / "model.safetensors", metadata={"format": "pt"})
    ours = load_model(path)[0]
    assert ours.lm_head.weight is ours.embed.weight
    assert_close(our_logits(path), hf_logits(path), atol=1e-5, rtol=1e-5)


def test_tied_checkpoint_storing_only_the_output_layer(make_hf):
    """transformers ties the other way round when only lm_head.weight is stored."""
    _, path = make_hf("llama", tie_word_embeddings=True)
    tensors = load_file(path / "model.safetensors")
    tensors["lm_head.weight"] = tensors.pop("model.embed_tokens.weight")
    save_file(tensors, path / "model.safetensors", metadata={"format": "pt"})
    assert_close(our_logits(path), hf_logits(path), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_untied_config_without_an_output_layer_is_refused(make_hf, family):
    """transformers would start lm_head from random values; lmforge names the missing tensor and the fix."""
    _, path = make_hf(family, tie_word_embeddings=True)
    edit_config(path, tie_word_embeddings=False)
    _, info = auto_class(family).from_pretrained(path, output_loading_info=True)
    assert "lm_head.weight" in info["missing_keys"]
    with pytest.raises(LmforgeError, match=r"tie_word_embeddings=false, but the weights have no lm_head\.weight") as e:
        load_model(path)
    assert "\n" not in str(e.value)


def test_base_model_without_output_layer_gives_its_hidden_states(tmp_path):
    """LlamaModel (e.g. a decoder embedding model) stores no lm_head; lmforge reuses the embeddings as one."""
    causal = hf_model("llama", tie_word_embeddings=False)
    base = transformers.LlamaModel(causal.config).eval()
    base.load_state_dict(causal.model.state_dict())
    base.save_pretrained(tmp_path / "base")
    ours = load_model(tmp_path / "base")[0].eval()
    assert ours.lm_head.weight is ours.embed.weight
    with torch.no_grad():
        assert_close(ours.hidden_states(IDS)[-1], base(input_ids=IDS).last_hidden_state, atol=1e-5, rtol=1e-5)


# ---------------------------------------------------------------- unknown families


def test_unsupported_architecture_names_the_supported_ones(make_hf):
    _, path = make_hf("llama")
    edit_config(path, architectures=["LlamaForSequenceClassification"])
    with pytest.raises(LmforgeError, match="lmforge loads LlamaForCausalLM, LlamaModel for llama") as e:
        load_model(path)
    assert "\n" not in str(e.value)
