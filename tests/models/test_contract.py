"""One contract over every preset: shapes, batching, cached decoding, save/load round trip."""

from __future__ import annotations

import pytest
import torch
from torch.testing import assert_close

from lmforge.checkpoint import load_model, save_native
from lmforge.config import PRESETS, preset
from lmforge.models import KVCache, build_model

TINY = [name for name in PRESETS if name.startswith("tiny-")]
DECODERS = [name for name in TINY if PRESETS[name].get("kind", "decoder") == "decoder"]


def tiny(name: str):
    torch.manual_seed(0)
    return build_model(preset(name)).eval()


@pytest.mark.parametrize("name", TINY)
def test_shapes_and_batch_independence(name):
    model = tiny(name)
    ids = torch.randint(0, 256, (3, 20))
    with torch.no_grad():
        out = model(ids)
        alone = model(ids[1:2])
    assert out.shape == (3, 20, 256)
    assert_close(out[1:2], alone, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("name", DECODERS)
def test_causality(name):
    model = tiny(name)
    ids = torch.randint(0, 256, (1, 20))
    changed = ids.clone()
    changed[0, 15:] = (changed[0, 15:] + 1) % 256
    with torch.no_grad():
        assert_close(model(ids)[:, :15], model(changed)[:, :15])


@pytest.mark.parametrize("name", DECODERS)
@pytest.mark.parametrize("prefill", [1, 7, 30])  # 30 > tiny-mistral's window of 16: the rolling cache wraps
def test_cached_decoding_equals_full_forward(name, prefill):
    model = tiny(name)
    T = 40
    ids = torch.randint(0, 256, (2, T))
    with torch.no_grad():
        full = model(ids)
        cache = KVCache(model.config, n_slots=2)
        pos = torch.arange(T).expand(2, T)
        steps = [model(ids[:, :prefill], positions=pos[:, :prefill], cache=cache.view())]
        for t in range(prefill, T):
            steps.append(model(ids[:, t : t + 1], positions=pos[:, t : t + 1], cache=cache.view()))
    assert_close(torch.cat(steps, dim=1), full, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("name", DECODERS)
def test_cached_ragged_slots(name):
    """Slots of different lengths decode together and match each sequence alone."""
    model = tiny(name)
    a, b = torch.randint(0, 256, (1, 25)), torch.randint(0, 256, (1, 9))
    with torch.no_grad():
        cache = KVCache(model.config, n_slots=2)
        model(a[:, :-1], positions=torch.arange(24)[None], cache=cache.view(0, 1))
        model(b[:, :-1], positions=torch.arange(8)[None], cache=cache.view(1, 2))
        step = model(torch.cat([a[:, -1:], b[:, -1:]]), positions=torch.tensor([[24], [8]]), cache=cache.view())
        assert_close(step[0, -1], model(a)[0, -1], atol=1e-4, rtol=1e-4)
        assert_close(step[1, -1], model(b)[0, -1], atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("name", TINY)
def test_save_load_round_trip(tmp_path, name):
    model = tiny(name)
    save_native(model, tmp_path / "ckpt")
    loaded, config = load_model(tmp_path / "ckpt")
    assert config == model.config
    ids = torch.randint(0, 256, (2, 10))
    with torch.no_grad():
        assert torch.equal(loaded.eval()(ids), model(ids))
    if config.tie_embeddings and config.kind == "decoder":
        assert loaded.lm_head.weight is loaded.embed.weight


def test_moe_aux_loss_is_recorded():
    model = tiny("tiny-mixtral").train()
    model(torch.randint(0, 256, (2, 16)))
    aux = [m.aux_loss for m in model.modules() if hasattr(m, "aux_loss")]
    assert len(aux) == 2 and all(a.item() >= 1.0 - 1e-4 for a in aux)  # balanced routing gives exactly 1


def n_params(name: str) -> int:
    """Parameters of a preset, counted on the meta device (no memory), tied embeddings once."""
    with torch.device("meta"):
        return sum(p.numel() for p in build_model(preset(name)).parameters())


def test_real_preset_sizes():
    assert n_params("gpt2") == 124_439_808
    assert 1.23e9 < n_params("llama-3.2-1b") < 1.24e9
    assert 46.6e9 < n_params("mixtral-8x7b") < 46.8e9


@pytest.mark.parametrize("name", ["tiny-gpt2", "tiny-bert"])
def test_dropout_modules_exist_only_with_dropout(name):
    """Without dropout a model calls no dropout module (a small model's step would pay a dozen calls)."""
    def droppers(dropout: float) -> int:
        model = build_model(preset(name, dropout=dropout))
        return sum(isinstance(m, torch.nn.Dropout) for m in model.modules())

    assert droppers(0.0) == 0
    assert droppers(0.1) >= 2 * preset(name).n_layers
