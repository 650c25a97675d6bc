"""Bad checkpoints give one clear line naming the file and the fix."""

from __future__ import annotations

import json

import pytest
import torch

from lmforge.checkpoint import load_model, save_hf, save_native
from lmforge.config import ModelConfig, preset
from lmforge.errors import LmforgeError
from lmforge.models import build_model


@pytest.fixture
def hf_folder(tmp_path):
    model = build_model(preset("tiny-llama"))
    save_hf(model, tmp_path / "hf")
    return tmp_path / "hf"


def one_line(err: pytest.ExceptionInfo) -> str:
    msg = str(err.value)
    assert "\n" not in msg
    return msg


def test_missing_folder(tmp_path):
    with pytest.raises(LmforgeError) as e:
        load_model(tmp_path / "nope")
    assert "does not exist" in one_line(e)


def test_folder_without_weights(hf_folder):
    (hf_folder / "model.safetensors").unlink()
    with pytest.raises(LmforgeError) as e:
        load_model(hf_folder)
    assert "no model.safetensors" in one_line(e)


def test_native_folder_without_weights(tmp_path):
    save_native(build_model(preset("tiny-gpt2")), tmp_path / "run")
    (tmp_path / "run" / "model.safetensors").unlink()
    with pytest.raises(LmforgeError) as e:
        load_model(tmp_path / "run")
    assert "interrupted before the first save" in one_line(e)


def test_unsupported_model_type(hf_folder):
    cfg = json.loads((hf_folder / "config.json").read_text())
    cfg["model_type"] = "t5"
    (hf_folder / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(LmforgeError) as e:
        load_model(hf_folder)
    msg = one_line(e)
    assert "'t5'" in msg and "llama" in msg and "gpt2" in msg and "bert" in msg


def test_truncated_safetensors(hf_folder):
    path = hf_folder / "model.safetensors"
    path.write_bytes(path.read_bytes()[:1000])
    with pytest.raises(LmforgeError) as e:
        load_model(hf_folder)
    msg = one_line(e)
    assert "model.safetensors" in msg and "truncated" in msg


def test_wrong_shape_names_the_tensor(hf_folder):
    cfg = json.loads((hf_folder / "config.json").read_text())
    cfg["intermediate_size"] += 4
    (hf_folder / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(LmforgeError) as e:
        load_model(hf_folder)
    assert "wrong shape" in one_line(e) and "mlp.up_proj.weight" in str(e.value)


def test_unexpected_and_missing_tensors(hf_folder):
    from safetensors.torch import load_file, save_file

    tensors = load_file(hf_folder / "model.safetensors")
    tensors["model.layers.0.extra.weight"] = torch.zeros(2)
    del tensors["model.norm.weight"]
    save_file(tensors, hf_folder / "model.safetensors")
    with pytest.raises(LmforgeError) as e:
        load_model(hf_folder)
    msg = one_line(e)
    assert "missing model.norm.weight" in msg and "unexpected model.layers.0.extra.weight" in msg


def test_corrupt_config_json(hf_folder):
    (hf_folder / "config.json").write_text("{not json")
    with pytest.raises(LmforgeError) as e:
        load_model(hf_folder)
    assert "config.json is not valid JSON" in one_line(e)


def test_pickle_only_folder_is_refused(hf_folder):
    (hf_folder / "model.safetensors").rename(hf_folder / "pytorch_model.bin")
    with pytest.raises(LmforgeError) as e:
        load_model(hf_folder)
    assert "pickle" in one_line(e)


@pytest.mark.parametrize(
    ("field", "value", "needle"),
    [("n_kv_heads", 3, "multiple"), ("mlp", "relu", "model.mlp"), ("sliding_window", 0, "sliding_window")],
)
def test_bad_config_values(field, value, needle):
    with pytest.raises(LmforgeError) as e:
        ModelConfig(**{field: value})
    assert needle in one_line(e)
