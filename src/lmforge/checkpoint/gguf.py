"""GGUF, the file llama.cpp and Ollama run: export (`save_gguf`) and import (`load_gguf`) of decoders.

Written and read with the `gguf` package that llama.cpp publishes (its writer, reader, key names and
quantizers), so the file is what llama.cpp's own `convert_hf_to_gguf.py` would write.

- Two llama.cpp architectures: "llama" for the rotary + RMSNorm + SwiGLU decoders (LLaMA, Mistral,
  Mixtral's experts stacked per layer, grouped-query heads, linear and llama3 rope scaling) and
  "gpt2" for GPT-2. Anything else (BERT, Gemma's unit-offset norms, Qwen3's q/k norms, ...) is
  refused in one line naming what llama.cpp's graph for these architectures lacks.
- llama.cpp's "llama" graph rotates adjacent pairs of a head (GGML's "normal" rope); lmforge, like
  Hugging Face, rotates the two halves. The q and k rows (and biases) are permuted on export and
  back on import, exactly as `convert_hf_to_gguf.py` does.
- A sliding window is written as `llama.attention.sliding_window` and read back by lmforge;
  llama.cpp's "llama" graph attends to the whole context, so outputs agree within the window.
- The llama3 rope scaling is written as llama.cpp reads it, a `rope_freqs.weight` tensor of
  per-frequency divisors, and also as `lmforge.rope_scaling` so lmforge reads back its parameters.
- `--dtype` f32 / f16 / q8_0 / q4_0 applies to matrices; vectors (norms, biases) and the MoE router
  stay float32, and a matrix whose rows are not a multiple of the 32-value quantization block is
  stored float16 (what llama.cpp's converter does too).
- Import reads f32, f16, q8_0, q4_0 (any type `gguf.quants` dequantizes) into a float32 model,
  with the tokenizer from the metadata (`gguf_vocab.py`). A damaged or truncated file is one line.
- Writes go to a temporary file renamed into place: a failed export leaves nothing behind.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import gguf
import numpy as np
import torch
from gguf import GGMLQuantizationType as Q
from gguf import GGUFReader, GGUFWriter
from torch import Tensor, nn

from lmforge.checkpoint.gguf_vocab import read_vocab, write_vocab
from lmforge.checkpoint.io import atomic_write, load_checked, mismatch, unique_state
from lmforge.checkpoint.rules import Rule, mapping, rules
from lmforge.config import ModelConfig
from lmforge.errors import LmforgeError
from lmforge.models import build_model
from lmforge.models.layers import rope_frequencies
from lmforge.tokenizer import Tokenizer

DTYPES: dict[str, tuple[Q, gguf.LlamaFileType]] = {  # --dtype -> (type of matrices, file type)
    "f32": (Q.F32, gguf.LlamaFileType.ALL_F32),
    "f16": (Q.F16, gguf.LlamaFileType.MOSTLY_F16),
    "q8_0": (Q.Q8_0, gguf.LlamaFileType.MOSTLY_Q8_0),
    "q4_0": (Q.Q4_0, gguf.LlamaFileType.MOSTLY_Q4_0),
}
FLOAT_ONLY = (".ffn_gate_inp.weight",)  # tensors kept float32 whatever the dtype (the MoE router)
LMFORGE_ROPE_KEY = "lmforge.rope_scaling"
ROPE_FREQS = "rope_freqs.weight"

# ---------------------------------------------------------------- tensor names

LLAMA_TENSORS = rules(
    ("embed.weight", "token_embd.weight"),
    ("norm.weight", "output_norm.weight"),
    ("lm_head.weight", "output.weight"),
    ("layers.{i}.attn_norm.weight", "blk.{i}.attn_norm.weight"),
    ("layers.{i}.mlp_norm.weight", "blk.{i}.ffn_norm.weight"),
    *[(f"layers.{{i}}.attn.{p}.{w}", f"blk.{{i}}.attn_{p}.{w}", f"rope_{p}") for p in "qk" for w in ("weight", "bias")],
    *[(f"layers.{{i}}.attn.v.{w}", f"blk.{{i}}.attn_v.{w}") for w in ("weight", "bias")],
    *[(f"layers.{{i}}.attn.o.{w}", f"blk.{{i}}.attn_output.{w}") for w in ("weight", "bias")],
    *[(f"layers.{{i}}.mlp.{p}.{w}", f"blk.{{i}}.ffn_{p}.{w}") for p in ("gate", "up", "down") for w in ("weight", "bias")],
    ("layers.{i}.mlp.router.weight", "blk.{i}.ffn_gate_inp.weight"),
    *[(f"layers.{{i}}.mlp.experts.{{e}}.{p}.weight", f"blk.{{i}}.ffn_{p}_exps.weight", "stack") for p in ("gate", "up", "down")],
)

GPT2_TENSORS = rules(
    ("embed.weight", "token_embd.weight"),
    ("positions.weight", "position_embd.weight"),
    ("lm_head.weight", "output.weight"),
    *[(f"{ours}.{w}", f"{theirs}.{w}") for ours, theirs in (
        ("norm", "output_norm"), ("layers.{i}.attn_norm", "blk.{i}.attn_norm"), ("layers.{i}.attn.o", "blk.{i}.attn_output"),
        ("layers.{i}.mlp_norm", "blk.{i}.ffn_norm"), ("layers.{i}.mlp.up", "blk.{i}.ffn_up"),
        ("layers.{i}.mlp.down", "blk.{i}.ffn_down")) for w in ("weight", "bias")],
    *[(tuple(f"layers.{{i}}.attn.{p}.{w}" for p in "qkv"), f"blk.{{i}}.attn_qkv.{w}", "split") for w in ("weight", "bias")],
)


# ---------------------------------------------------------------- transforms

def _rope_permute(t: Tensor, n_heads: int) -> Tensor:
    """Rows of each head from halves (h0..h_{d/2-1}, h_{d/2}..) to adjacent pairs, as convert_hf_to_gguf.py."""
    return t.reshape(n_heads, 2, t.shape[0] // n_heads // 2, *t.shape[1:]).transpose(1, 2).reshape(t.shape)


def _rope_unpermute(t: Tensor, n_heads: int) -> Tensor:
    return t.reshape(n_heads, t.shape[0] // n_heads // 2, 2, *t.shape[1:]).transpose(1, 2).reshape(t.shape)


# name -> (ours -> theirs, (theirs, number of our tensors) -> ours); the heads come from the config
Transforms = dict[str, tuple[Callable[[list[Tensor]], Tensor], Callable[[Tensor, int], list[Tensor]]]]


def _transforms(c: ModelConfig) -> Transforms:
    return {
        "copy": (lambda ts: ts[0], lambda t, n: [t]),
        "rope_q": (lambda ts: _rope_permute(ts[0], c.n_heads), lambda t, n: [_rope_unpermute(t, c.n_heads)]),
        "rope_k": (lambda ts: _rope_permute(ts[0], c.n_kv_heads), lambda t, n: [_rope_unpermute(t, c.n_kv_heads)]),
        "stack": (torch.stack, lambda t, n: list(t.unbind(0)) if t.shape[0] == n else [t] * n),
        "split": (lambda ts: torch.cat(ts, 0), lambda t, n: list(t.chunk(n, 0)) if t.shape[0] % n == 0 else [t] * n),
    }


def _grouped(model: nn.Module, table: Sequence[Rule]) -> dict[str, tuple[list[str], str]]:
    """GGUF name -> (our names in order, transform); experts of one layer share one GGUF tensor."""
    out: dict[str, tuple[list[str], str]] = {}
    for ours, theirs, transform in mapping(model, table, "GGUF", ""):
        out.setdefault(theirs, ([], transform))[0].extend(ours)
    return out


# ---------------------------------------------------------------- architectures


@dataclass(frozen=True)
class Arch:
    name: str  # general.architecture
    tensors: tuple[Rule, ...]
    lacks: Callable[[ModelConfig], str | None]  # why this architecture cannot hold a model; None when it can
    write_config: Callable[[GGUFWriter, ModelConfig], None]
    read_config: Callable[[Callable[[str], Any], dict[str, tuple[int, ...]]], ModelConfig]


def _llama_lacks(c: ModelConfig) -> str | None:
    parts = {"unit-offset RMSNorm (Gemma)": c.norm != "rmsnorm", "per-head q/k norms (Qwen3)": c.qk_norm,
             f"the {c.mlp} MLP": c.mlp != "swiglu", "scaled embeddings (Gemma)": c.scale_embeddings}
    return next((name for name, present in parts.items() if present), None)


def _gpt2_lacks(c: ModelConfig) -> str | None:
    parts = {"exact GELU (llama.cpp's GPT-2 uses the tanh form)": c.mlp != "gelu_tanh",
             "grouped-query heads": c.n_kv_heads != c.n_heads, "a head_dim other than dim / n_heads": c.head_dim * c.n_heads != c.dim,
             "a sliding window": c.sliding_window is not None,
             "missing biases": not (c.attn_bias and c.qkv_bias and c.mlp_bias and c.norm_bias)}
    return next((name for name, present in parts.items() if present), None)


def _write_shape(w: GGUFWriter, c: ModelConfig) -> None:
    """The keys every architecture has: lengths, block count, heads, vocabulary."""
    w.add_context_length(c.max_seq_len)
    w.add_embedding_length(c.dim)
    w.add_block_count(c.n_layers)
    w.add_feed_forward_length(c.hidden_dim)
    w.add_head_count(c.n_heads)
    w.add_vocab_size(c.vocab_size)


def _write_llama(w: GGUFWriter, c: ModelConfig) -> None:
    _write_shape(w, c)
    w.add_head_count_kv(c.n_kv_heads)
    w.add_key_length(c.head_dim)
    w.add_value_length(c.head_dim)
    w.add_rope_dimension_count(c.head_dim)
    w.add_rope_freq_base(c.rope_theta)
    w.add_layer_norm_rms_eps(c.norm_eps)
    if c.sliding_window is not None:
        w.add_sliding_window(c.sliding_window)
    if c.n_experts:
        w.add_expert_count(c.n_experts)
        w.add_expert_used_count(c.n_experts_per_token)
    if c.rope_scaling is not None and c.rope_scaling["type"] == "linear":
        w.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        w.add_rope_scaling_factor(c.rope_scaling["factor"])
    elif c.rope_scaling is not None:
        w.add_string(LMFORGE_ROPE_KEY, json.dumps(c.rope_scaling))


def _read_llama(key: Callable[[str], Any], shapes: dict[str, tuple[int, ...]]) -> ModelConfig:
    n_heads = key("llama.attention.head_count")
    dim = key("llama.embedding_length")
    scaling = key(LMFORGE_ROPE_KEY, None)
    if key("llama.rope.scaling.type", None) == "linear":
        scaling = json.dumps({"type": "linear", "factor": key("llama.rope.scaling.factor")})
    elif scaling is None and ROPE_FREQS in shapes:
        raise LmforgeError("the file scales rope frequencies by a rope_freqs table lmforge cannot turn back into "
                           "llama3 parameters (it was not written by lmforge)")
    return ModelConfig(
        vocab_size=shapes["token_embd.weight"][0], dim=dim, n_layers=key("llama.block_count"), n_heads=n_heads,
        n_kv_heads=key("llama.attention.head_count_kv", n_heads), head_dim=key("llama.attention.key_length", dim // n_heads),
        hidden_dim=key("llama.feed_forward_length"), norm_eps=key("llama.attention.layer_norm_rms_epsilon"),
        rope_theta=key("llama.rope.freq_base", 10000.0), rope_scaling=None if scaling is None else json.loads(scaling),
        max_seq_len=key("llama.context_length"), sliding_window=key("llama.attention.sliding_window", None),
        attn_bias="blk.0.attn_output.bias" in shapes, qkv_bias="blk.0.attn_q.bias" in shapes,
        mlp_bias="blk.0.ffn_up.bias" in shapes, tie_embeddings="output.weight" not in shapes,
        n_experts=key("llama.expert_count", 0), n_experts_per_token=key("llama.expert_used_count", 2),
    )


def _write_gpt2(w: GGUFWriter, c: ModelConfig) -> None:
    _write_shape(w, c)
    w.add_layer_norm_eps(c.norm_eps)


def _read_gpt2(key: Callable[[str], Any], shapes: dict[str, tuple[int, ...]]) -> ModelConfig:
    return ModelConfig(
        vocab_size=shapes["token_embd.weight"][0], dim=key("gpt2.embedding_length"), n_layers=key("gpt2.block_count"),
        n_heads=key("gpt2.attention.head_count"), hidden_dim=key("gpt2.feed_forward_length"), mlp="gelu_tanh",
        norm="layernorm", norm_bias=True, norm_eps=key("gpt2.attention.layer_norm_epsilon"), positions="learned",
        max_seq_len=key("gpt2.context_length"), attn_bias=True, mlp_bias=True,
        tie_embeddings="output.weight" not in shapes,
    )


ARCHES = {
    "llama": Arch("llama", LLAMA_TENSORS, _llama_lacks, _write_llama, _read_llama),
    "gpt2": Arch("gpt2", GPT2_TENSORS, _gpt2_lacks, _write_gpt2, _read_gpt2),
}


def arch_for(config: ModelConfig) -> Arch:
    """The llama.cpp architecture that runs this model, or one line saying why none does."""
    if config.kind != "decoder":
        raise LmforgeError("GGUF export is for decoders (GPT-2, LLaMA, Mistral, Mixtral); this is an encoder "
                           "(BERT-style), which llama.cpp does not generate with")
    arch = ARCHES["gpt2" if config.positions == "learned" else "llama"]
    if config.positions not in ("learned", "rotary") or (config.positions == "learned") != (config.norm == "layernorm"):
        lacks = f"{config.positions} positions with {config.norm}"
    else:
        lacks = arch.lacks(config)
    if lacks:
        raise LmforgeError(f"GGUF export cannot write this model: llama.cpp's {arch.name!r} architecture has no {lacks}; "
                           "export a GPT-2, LLaMA, Mistral or Mixtral-shaped model, or save it with lm.save_hf")
    return arch


# ---------------------------------------------------------------- export


def save_gguf(model: nn.Module, tokenizer: Tokenizer | None, path: str | Path, dtype: str = "f32") -> None:
    """Write `model` (and `tokenizer`, embedded) as one GGUF file llama.cpp runs; `dtype` as in `DTYPES`."""
    if dtype not in DTYPES:
        raise LmforgeError(f"GGUF dtype {dtype!r} is not one of {', '.join(DTYPES)}")
    config: ModelConfig = model.config
    arch = arch_for(config)
    tensors = gguf_tensors(model, arch)

    def write(tmp: str) -> None:
        writer = GGUFWriter(tmp, arch.name)
        writer.add_name(Path(path).stem)
        writer.add_file_type(DTYPES[dtype][1])
        writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
        arch.write_config(writer, config)
        if tokenizer is not None:
            write_vocab(writer, tokenizer, config.vocab_size)
        for name, array in tensors.items():
            data, qtype = encode_tensor(name, array, dtype)
            writer.add_tensor(name, data, raw_dtype=qtype)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()

    atomic_write(path, write)


def gguf_tensors(model: nn.Module, arch: Arch) -> dict[str, np.ndarray]:
    """The model's weights under GGUF names, as float32 arrays in llama.cpp's layout."""
    ours = unique_state(model)
    forward = _transforms(model.config)
    out = {theirs: forward[t][0]([ours[n] for n in names]) for theirs, (names, t) in _grouped(model, arch.tensors).items()}
    if model.config.rope_scaling is not None and model.config.rope_scaling["type"] == "llama3":
        base = rope_frequencies(replace(model.config, rope_scaling=None))
        out[ROPE_FREQS] = base / rope_frequencies(model.config)  # llama.cpp divides each frequency by these
    return {name: t.detach().float().cpu().contiguous().numpy() for name, t in out.items()}


def encode_tensor(name: str, array: np.ndarray, dtype: str) -> tuple[np.ndarray, Q]:
    """The stored bytes of one tensor and their GGML type (see the module docstring for which stay float)."""
    qtype = DTYPES[dtype][0]
    if array.ndim < 2 or name.endswith(FLOAT_ONLY) or name == ROPE_FREQS:
        qtype = Q.F32
    elif qtype not in (Q.F32, Q.F16) and array.shape[-1] % gguf.GGML_QUANT_SIZES[qtype][0]:
        qtype = Q.F16
    return gguf.quants.quantize(array, qtype), qtype


# ---------------------------------------------------------------- import


def is_gguf_file(path: str | Path) -> bool:
    """A file whose first four bytes are GGUF's magic (or, when unreadable, a name ending in .gguf)."""
    path = Path(path)
    if not path.is_file():
        return False
    with open(path, "rb") as f:
        return f.read(4) == b"GGUF" or path.suffix == ".gguf"


def load_gguf(path: str | Path) -> tuple[nn.Module, Tokenizer | None, str | None]:
    """The float32 model and the tokenizer of a GGUF file (written by lmforge or llama.cpp's converter),
    and the file's quantization ("q8_0", "q4_0", ...; None for float32 / float16 files)."""
    path = Path(path)
    reader = _read(path)
    fields = {name: field.contents() for name, field in reader.fields.items()}
    arch_name = fields.get("general.architecture")
    if arch_name not in ARCHES:
        raise LmforgeError(f"{path} holds a {arch_name!r} model; lmforge reads GGUF files of {', '.join(ARCHES)}")
    arch = ARCHES[arch_name]
    stored = {t.name: t for t in reader.tensors}
    shapes = {name: tuple(int(n) for n in reversed(t.shape.tolist())) for name, t in stored.items()}
    config = _config(arch, fields, shapes, path)
    model = build_model(config)
    load_checked(unique_state(model), _our_tensors(model, arch, stored, shapes, path), path,
                 hint="was the file written for another model?")
    return model, read_vocab(fields, str(path)), quantization_of(fields.get("general.file_type"))


def quantization_of(file_type: int | None) -> str | None:
    """`general.file_type` as a label: None for float files, else llama.cpp's name ("q8_0", "q4_k_m", ...)."""
    if file_type is None or file_type in (gguf.LlamaFileType.ALL_F32, gguf.LlamaFileType.MOSTLY_F16,
                                          gguf.LlamaFileType.MOSTLY_BF16):
        return None
    try:
        return gguf.LlamaFileType(file_type).name.removeprefix("MOSTLY_").lower()
    except ValueError:
        return f"file type {file_type}"


def _read(path: Path) -> GGUFReader:
    try:
        reader = GGUFReader(path)
        short = [t.name for t in reader.tensors if t.data.nbytes != t.n_bytes]
    except (ValueError, IndexError, KeyError, OSError, OverflowError, UnicodeDecodeError, TypeError) as e:
        raise LmforgeError(f"{path} is not a readable GGUF file ({str(e).splitlines()[0] if str(e) else type(e).__name__}); "
                           "it may be truncated or damaged: export or copy it again") from None
    if short:
        raise LmforgeError(f"{path} is truncated (tensor {short[0]} is cut short); export or copy it again")
    return reader


def _config(arch: Arch, fields: dict[str, Any], shapes: dict[str, tuple[int, ...]], path: Path) -> ModelConfig:
    missing = object()

    def key(name: str, default: Any = missing) -> Any:
        if name not in fields and default is missing:
            raise LmforgeError(f"{path} lacks the metadata key {name!r} that a {arch.name} model needs")
        return fields.get(name, default)

    if "token_embd.weight" not in shapes:
        raise LmforgeError(f"{path} has no token_embd.weight tensor; is it a complete model?")
    config = arch.read_config(key, shapes)
    ids = {f"{n}_id": fields.get(f"tokenizer.ggml.{n}_token_id") for n in ("bos", "eos", "pad")}
    return replace(config, **ids)


def _our_tensors(model: nn.Module, arch: Arch, stored: dict[str, Any], shapes: dict[str, tuple[int, ...]],
                 path: Path) -> dict[str, Tensor]:
    """GGUF tensors dequantized to float32 under our names; unknown and missing ones named in one line."""
    backward = _transforms(model.config)
    grouped = _grouped(model, arch.tensors)
    error = mismatch(path, missing=[n for n in grouped if n not in stored],
                     unexpected=[n for n in stored if n not in grouped and n != ROPE_FREQS], misshaped=[],
                     hint="was the file written for another model?")
    if error is not None:
        raise error
    state: dict[str, Tensor] = {}
    for theirs, (names, transform) in grouped.items():
        t = stored[theirs]
        array = gguf.quants.dequantize(np.asarray(t.data), t.tensor_type).reshape(shapes[theirs])
        state.update(zip(names, backward[transform][1](torch.from_numpy(array.astype(np.float32)), len(names))))
    return state


__all__ = ["DTYPES", "arch_for", "is_gguf_file", "load_gguf", "save_gguf"]
