"""GGUF export and import without llama.cpp: round trips, the rope layout, quantized tensors, bad input.

(tests/checkpoint/test_gguf_llama_cpp.py runs the exported files in llama.cpp itself.)
"""

from __future__ import annotations

import math

import pytest
import torch

from _helpers import run_cli
from lmforge.api import LM, load
from lmforge.checkpoint.gguf import DTYPES, _rope_permute, arch_for, gguf_tensors
from lmforge.config import preset
from lmforge.errors import LmforgeError
from lmforge.models import build_model

CHAT = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Héllo, wörld?"},
        {"role": "assistant", "content": "def add(a, b): return a + b"}]
TEXTS = ["The quick brown fox.", "naïve café 你好", "def add(a, b):\n    return a + b\n", " <|im_end|> spaced  out "]


@pytest.fixture(autouse=True)
def _single_thread(one_thread):
    """Tiny models run fastest on one thread, and far faster when other processes share the cores."""


def tiny_lm(tokenizer, preset_name: str, **overrides) -> LM:
    torch.manual_seed(0)
    config = preset(preset_name, vocab_size=tokenizer.vocab_size, bos_id=tokenizer.bos_id, eos_id=tokenizer.eos_id,
                    **overrides)
    return LM(build_model(config).eval(), tokenizer)


def logits(lm: LM, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return lm.model.eval()(ids)


@pytest.mark.parametrize("preset_name, overrides", [
    ("tiny-llama", {}),  # grouped-query heads (4 query, 2 key/value)
    ("tiny-mistral", {}),  # sliding window
    ("tiny-mixtral", {}),  # experts stacked per layer
    ("tiny-qwen2", {}),  # q/k/v biases (permuted like their rows), tied output layer
    ("tiny-llama", {"rope_scaling": {"type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                                     "original_max_seq_len": 32}}),
    ("tiny-llama", {"rope_scaling": {"type": "linear", "factor": 2.0}, "head_dim": 32}),
    ("tiny-gpt2", {}),
])
def test_round_trip_gives_identical_float32_logits_and_tokenizer(tmp_path, tiny_tokenizer, preset_name, overrides):
    lm = tiny_lm(tiny_tokenizer, preset_name, **overrides)
    path = tmp_path / "model.gguf"
    lm.save_gguf(path, dtype="f32")
    back = load(path)
    ids = torch.randint(0, lm.config.vocab_size, (2, 40))
    assert torch.equal(logits(back, ids), logits(lm, ids))
    for field in ("dim", "n_layers", "n_heads", "n_kv_heads", "head_dim", "hidden_dim", "sliding_window", "n_experts",
                  "rope_scaling", "tie_embeddings", "qkv_bias", "bos_id", "eos_id", "max_seq_len", "positions"):
        assert getattr(back.config, field) == getattr(lm.config, field), field
    for text in TEXTS:
        assert back.tokenizer.encode(text, add_special_tokens=True) == lm.tokenizer.encode(text, add_special_tokens=True)
    assert back.tokenizer.apply_chat_template(CHAT, add_generation_prompt=True) == \
        lm.tokenizer.apply_chat_template(CHAT, add_generation_prompt=True)
    assert back.tokenizer.decode(lm.tokenizer.encode(TEXTS[1])) == TEXTS[1]


def _rotate_adjacent_pairs(x: torch.Tensor, inv_freq: torch.Tensor, position: int) -> torch.Tensor:
    """llama.cpp's "normal" rope, written independently: pair (2j, 2j+1) turned by position * inv_freq[j]."""
    pairs = x.unflatten(-1, (-1, 2))  # (..., head_dim / 2, 2)
    cos, sin = torch.cos(position * inv_freq), torch.sin(position * inv_freq)
    turned = torch.stack((pairs[..., 0] * cos - pairs[..., 1] * sin, pairs[..., 0] * sin + pairs[..., 1] * cos), -1)
    return turned.flatten(-2)


def test_exported_q_and_k_rows_rotate_as_llama_cpp_expects(tiny_tokenizer):
    """lmforge rotates the halves of a head; the exported rows, rotated by adjacent pairs as llama.cpp does,
    must give the same rotated queries/keys (in the exported order) as lmforge's rotation."""
    lm = tiny_lm(tiny_tokenizer, "tiny-llama")
    c, attn = lm.config, lm.model.layers[0].attn
    exported = gguf_tensors(lm.model, arch_for(c))
    x, position = torch.randn(c.dim), 7
    rope = lm.model.positions.angles(torch.tensor([[position]]))
    for ours, theirs, heads in ((attn.q.weight, "blk.0.attn_q.weight", c.n_heads), (attn.k.weight, "blk.0.attn_k.weight", c.n_kv_heads)):
        ours_rotated = lm.model.layers[0].attn.rotate(*(2 * [(ours @ x).view(1, heads, 1, c.head_dim)]), rope)[0]
        theirs_rotated = _rotate_adjacent_pairs((torch.from_numpy(exported[theirs]) @ x).view(heads, c.head_dim),
                                                lm.model.positions.inv_freq, position)
        assert (theirs_rotated.flatten() - _rope_permute(ours_rotated.flatten(), heads)).abs().max() < 1e-5


def test_f16_export_rounds_matrices_only(tmp_path, tiny_tokenizer):
    lm = tiny_lm(tiny_tokenizer, "tiny-llama")
    lm.save_gguf(tmp_path / "model.gguf", dtype="f16")
    back = load(tmp_path / "model.gguf")
    with torch.no_grad():
        for p in lm.model.parameters():
            if p.ndim == 2:
                p.copy_(p.half().float())
    ids = torch.randint(0, lm.config.vocab_size, (1, 32))
    assert torch.equal(logits(back, ids), logits(lm, ids))


@pytest.mark.parametrize("dtype, bound", [("q8_0", 0.04), ("q4_0", 0.6)])
def test_quantized_exports_load_close_and_smaller(tmp_path, tiny_tokenizer, dtype, bound):
    """Blocks of 32 values with one scale each. On this random model the logits' RMS error, relative to
    their RMS, measured 1.6-1.9% (q8_0) and 27-30% (q4_0) over three seeds; the bounds are twice that."""
    lm = tiny_lm(tiny_tokenizer, "tiny-llama", hidden_dim=192, init_std=0.1)  # 192: rows quantize in whole blocks
    lm.save_gguf(tmp_path / "f32.gguf", dtype="f32")
    lm.save_gguf(tmp_path / "q.gguf", dtype=dtype)
    ids = torch.randint(0, lm.config.vocab_size, (1, 32))
    reference, got = logits(lm, ids), logits(load(tmp_path / "q.gguf"), ids)
    error = (got - reference).pow(2).mean().sqrt() / reference.pow(2).mean().sqrt()
    assert 0 < error < bound, error
    ratio = (tmp_path / "q.gguf").stat().st_size / (tmp_path / "f32.gguf").stat().st_size
    assert ratio < {"q8_0": 0.35, "q4_0": 0.25}[dtype]


# ---------------------------------------------------------------- bad input


def _leftovers(folder):
    return sorted(p.name for p in folder.iterdir())


@pytest.mark.parametrize("preset_name, message", [
    ("tiny-bert", "encoder"),
    ("tiny-gemma", "unit-offset RMSNorm"),
    ("tiny-qwen3", "q/k norms"),
])
def test_unsupported_models_are_one_line_errors_and_write_nothing(tmp_path, tiny_tokenizer, preset_name, message):
    lm = tiny_lm(tiny_tokenizer, preset_name)
    with pytest.raises(LmforgeError, match=message) as e:
        lm.save_gguf(tmp_path / "model.gguf")
    assert "\n" not in str(e.value)
    assert _leftovers(tmp_path) == []


def test_unknown_dtype_and_quantized_model_are_refused(tmp_path, tiny_tokenizer):
    from lmforge.quantize import quantize_model

    lm = tiny_lm(tiny_tokenizer, "tiny-llama")
    with pytest.raises(LmforgeError, match="q4_0"):
        lm.save_gguf(tmp_path / "model.gguf", dtype="int4")
    quantize_model(lm.model, bits=8)
    with pytest.raises(LmforgeError, match="float model it was quantized from"):
        lm.save_gguf(tmp_path / "model.gguf")
    assert _leftovers(tmp_path) == []


def test_a_failed_write_leaves_no_file(tmp_path, tiny_tokenizer, monkeypatch):
    import lmforge.checkpoint.gguf as module

    lm = tiny_lm(tiny_tokenizer, "tiny-llama")

    def boom(name, array, dtype):
        raise OSError("disk full")

    monkeypatch.setattr(module, "encode_tensor", boom)
    with pytest.raises(OSError):
        lm.save_gguf(tmp_path / "model.gguf")
    assert _leftovers(tmp_path) == []


@pytest.fixture(scope="module")
def exported(tmp_path_factory, tiny_tokenizer):
    path = tmp_path_factory.mktemp("gguf") / "model.gguf"
    tiny_lm(tiny_tokenizer, "tiny-llama").save_gguf(path)
    return path


@pytest.mark.parametrize("damage", ["truncated_data", "truncated_header", "garbage", "not_gguf"])
def test_damaged_files_are_one_line_errors(tmp_path, exported, damage):
    data = exported.read_bytes()
    broken = {
        "truncated_data": data[: len(data) - 1000],
        "truncated_header": data[:300],
        "garbage": data[:4] + bytes(range(256)) * 8,
        "not_gguf": b"PK\x03\x04 a zip file, not a model" * 10,
    }[damage]
    path = tmp_path / "broken.gguf"
    path.write_bytes(broken)
    with pytest.raises(LmforgeError) as e:
        load(path)
    assert "\n" not in str(e.value) and "broken.gguf" in str(e.value)


def test_cli_dtypes_match_the_library():
    from lmforge.cli.export import GGUF_DTYPES

    assert set(GGUF_DTYPES) == set(DTYPES)


def test_export_verb_writes_a_file_lmforge_loads_and_refuses_bert(tmp_path, tiny_tokenizer):
    folder = tmp_path / "tiny"
    tiny_lm(tiny_tokenizer, "tiny-llama", hidden_dim=192).save(folder)
    out = tmp_path / "tiny.gguf"
    done = run_cli("export", folder, "--format", "gguf", "--out", out, "--dtype", "q8_0")
    assert done.returncode == 0, done.stderr
    assert out.is_file() and "llama-cli -m" in done.stdout
    back, original = load(out), load(folder)
    ids = torch.randint(0, original.config.vocab_size, (1, 16))
    assert math.isclose(logits(back, ids).std().item(), logits(original, ids).std().item(), rel_tol=0.05)
    bert = tmp_path / "bert"
    tiny_lm(tiny_tokenizer, "tiny-bert").save(bert)
    failed = run_cli("export", bert, "--out", tmp_path / "bert.gguf")
    assert failed.returncode == 2 and failed.stderr.startswith("lmforge: error: GGUF export is for decoders")
    assert len(failed.stderr.strip().splitlines()) == 1 and not (tmp_path / "bert.gguf").exists()
