"""Logits of lmforge equal `transformers` on the same weights, for every family."""

from __future__ import annotations

import pytest
import torch
from torch.testing import assert_close

from lmforge.checkpoint import load_model, save_hf
from lmforge.checkpoint.io import read_json, read_tensors

transformers = pytest.importorskip("transformers")

IDS = torch.randint(0, 96, (2, 12), generator=torch.Generator().manual_seed(1))


def hf_logits(model, ids, mask=None):
    with torch.no_grad():
        return model(input_ids=ids, attention_mask=mask).logits


def ours(path, ids, mask=None):
    model, _ = load_model(path)
    with torch.no_grad():
        return model.eval()(ids, attention_mask=mask)


@pytest.mark.parametrize(
    ("family", "overrides"),
    [
        ("gpt2", {}),
        ("gpt2", {"tie_word_embeddings": False}),
        ("llama", {"num_key_value_heads": 4}),  # plain multi-head
        ("llama", {"num_key_value_heads": 2}),  # 2 query heads per kv head
        ("llama", {"num_key_value_heads": 1}),  # multi-query
        ("llama", {"tie_word_embeddings": True, "attention_bias": True, "mlp_bias": True}),
        ("llama", {"rope_parameters": {"rope_type": "llama3", "rope_theta": 5e5, "factor": 8.0, "low_freq_factor": 1.0,
                                       "high_freq_factor": 4.0, "original_max_position_embeddings": 8}}),
        ("llama", {"rope_parameters": {"rope_type": "linear", "rope_theta": 1e4, "factor": 2.0}}),
        ("mistral", {"sliding_window": 5}),  # window shorter than the sequence
        ("mixtral", {}),  # top-2 of 4 experts
        ("qwen2", {}),  # biases on q/k/v, none on o
        ("qwen2", {"tie_word_embeddings": True, "use_sliding_window": True, "sliding_window": 5, "max_window_layers": 0}),
        ("qwen3", {}),  # per-head q/k norms; head_dim 16 != 32 / 4
        ("qwen3", {"attention_bias": True, "num_key_value_heads": 1}),
        ("gemma", {}),  # GeGLU, 1 + w norms, embeddings scaled by sqrt(dim), tied head, multi-query
        ("gemma", {"num_key_value_heads": 4, "tie_word_embeddings": False}),
        ("phi3", {}),  # fused qkv (q 32 rows, k and v 16 each) and gate_up
        ("phi3", {"sliding_window": 5}),
    ],
)
def test_decoder_logits_match(make_hf, family, overrides):
    model, path = make_hf(family, **overrides)
    assert_close(ours(path, IDS), hf_logits(model, IDS), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("family", ["gpt2", "llama", "mistral", "mixtral", "qwen2", "qwen3", "gemma", "phi3"])
def test_decoder_padding_mask(make_hf, family):
    model, path = make_hf(family)
    mask = torch.ones_like(IDS)
    mask[0, :4] = 0  # left padding in row 0
    mask[1, -3:] = 0  # right padding in row 1
    got, want = ours(path, IDS, mask), hf_logits(model, IDS, mask)
    valid = mask.bool()
    assert_close(got[valid], want[valid], atol=1e-5, rtol=1e-5)
    assert torch.isfinite(got).all()


def test_bert_mlm_logits_match(make_hf):
    model, path = make_hf("bert-mlm")
    mask = torch.ones_like(IDS)
    mask[1, -5:] = 0
    assert_close(ours(path, IDS), hf_logits(model, IDS), atol=1e-5, rtol=1e-5)
    got, want = ours(path, IDS, mask), hf_logits(model, IDS, mask)
    assert_close(got[mask.bool()], want[mask.bool()], atol=1e-5, rtol=1e-5)


def test_bert_encoder_hidden_states_and_pooler(make_hf):
    model, path = make_hf("bert")
    mask = torch.ones_like(IDS)
    mask[0, -4:] = 0
    types = torch.zeros_like(IDS)
    types[:, 6:] = 1
    with torch.no_grad():
        want = model(input_ids=IDS, attention_mask=mask, token_type_ids=types)
        ours_model, config = load_model(path)
        assert not config.mlm_head and config.pooler
        h = ours_model.eval()(IDS, attention_mask=mask, token_type_ids=types)
        pooled = ours_model.pool(h)
    assert_close(h[mask.bool()], want.last_hidden_state[mask.bool()], atol=1e-5, rtol=1e-5)
    assert_close(pooled, want.pooler_output, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("family", ["gpt2", "llama", "gemma"])  # gemma: the scaled embeddings
def test_hidden_states_match(make_hf, family):
    model, path = make_hf(family)
    with torch.no_grad():
        want = model(input_ids=IDS, output_hidden_states=True).hidden_states
        got = load_model(path)[0].eval().hidden_states(IDS)
    assert len(got) == len(want)
    for g, w in zip(got, want):
        assert_close(g, w, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("family", ["gpt2", "llama", "mistral", "mixtral", "bert-mlm", "bert", "qwen2", "qwen3", "gemma", "phi3"])
def test_save_hf_reloads_in_transformers(make_hf, tmp_path, family):
    model, path = make_hf(family)
    ours_model, _ = load_model(path)
    out = tmp_path / "exported"
    save_hf(ours_model, out)
    # the same family, and every tensor bit for bit (Phi-3's projections fused again, Gemma's offsets kept)
    assert read_json(out / "config.json")["model_type"] == model.config.model_type
    original = read_tensors(path / "model.safetensors")
    assert all(torch.equal(t, original[name]) for name, t in read_tensors(out / "model.safetensors").items())
    auto = transformers.AutoModelForMaskedLM if family == "bert-mlm" else (
        transformers.AutoModel if family == "bert" else transformers.AutoModelForCausalLM)
    reloaded = auto.from_pretrained(out).eval()
    with torch.no_grad():
        if family == "bert":
            assert_close(reloaded(input_ids=IDS).last_hidden_state, model(input_ids=IDS).last_hidden_state, atol=1e-5, rtol=1e-5)
        else:
            assert_close(hf_logits(reloaded, IDS), hf_logits(model, IDS), atol=1e-5, rtol=1e-5)


def test_sharded_checkpoint_loads(make_hf, tmp_path):
    model, _ = make_hf("llama")
    sharded = tmp_path / "sharded"
    model.save_pretrained(sharded, max_shard_size="20KB")
    assert (sharded / "model.safetensors.index.json").is_file()
    assert len(list(sharded.glob("model-*.safetensors"))) > 1
    assert_close(ours(sharded, IDS), hf_logits(model, IDS), atol=1e-5, rtol=1e-5)
