"""Hugging Face <-> lmforge: per-family weight-name tables and small named transforms.

The only place in lmforge that knows family names and Hugging Face parameter names.

- The family comes from `config.json`'s `model_type`, never from the folder name.
- Each family is data: a config translation (two small functions), a key prefix used by
  task-head checkpoints (`model.`, `transformer.`, `bert.`), and rules
  `(our names, their name, transform)`. `{i}` stands for a layer, `{e}` for an expert; a
  name starting with `^` is outside the prefix (e.g. `lm_head.weight`).
- Rules and transforms are `checkpoint/rules.py`'s small vocabulary: `copy`, `transpose` (GPT-2's
  Conv1D), `split` / `split_t` for fused projections (GPT-2's q/k/v, Phi-3's q/k/v and gate/up).
- A loaded model remembers its family (`config.extra["hf_model_type"]`); `save_hf` writes that
  family again when it can hold the model (a Phi-3 keeps its fused projections), else the first
  family in `SAVED_AS` that can.
- Loading names every missing, unexpected and mis-shaped tensor; tensors that are buffers in
  some checkpoints (`attn.bias`, `rotary_emb.inv_freq`, `position_ids`) are ignored.
- The output layer is tied to the embeddings as transformers 5 ties it when loading, which is not
  always what `tie_word_embeddings` says (`_tie_as_stored`). Weights load into a float32 model;
  `lmforge.load(dtype=...)` casts afterwards.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from lmforge.checkpoint.io import (
    load_checked,
    mismatch,
    read_json,
    read_tensors,
    tensor_names,
    unique_state,
    weight_files,
    write_json,
    write_tensors,
)
from lmforge.checkpoint.rules import TRANSFORMS, Rule, hf_name, mapping, rules
from lmforge.config import ModelConfig
from lmforge.errors import LmforgeError
from lmforge.models import build_model

# ---------------------------------------------------------------- per-family tables

GPT2_RULES = rules(
    ("embed.weight", "wte.weight"),
    ("positions.weight", "wpe.weight"),
    ("layers.{i}.attn_norm.weight", "h.{i}.ln_1.weight"),
    ("layers.{i}.attn_norm.bias", "h.{i}.ln_1.bias"),
    (("layers.{i}.attn.q.weight", "layers.{i}.attn.k.weight", "layers.{i}.attn.v.weight"), "h.{i}.attn.c_attn.weight", "split_t"),
    (("layers.{i}.attn.q.bias", "layers.{i}.attn.k.bias", "layers.{i}.attn.v.bias"), "h.{i}.attn.c_attn.bias", "split"),
    ("layers.{i}.attn.o.weight", "h.{i}.attn.c_proj.weight", "transpose"),
    ("layers.{i}.attn.o.bias", "h.{i}.attn.c_proj.bias"),
    ("layers.{i}.mlp_norm.weight", "h.{i}.ln_2.weight"),
    ("layers.{i}.mlp_norm.bias", "h.{i}.ln_2.bias"),
    ("layers.{i}.mlp.up.weight", "h.{i}.mlp.c_fc.weight", "transpose"),
    ("layers.{i}.mlp.up.bias", "h.{i}.mlp.c_fc.bias"),
    ("layers.{i}.mlp.down.weight", "h.{i}.mlp.c_proj.weight", "transpose"),
    ("layers.{i}.mlp.down.bias", "h.{i}.mlp.c_proj.bias"),
    ("norm.weight", "ln_f.weight"),
    ("norm.bias", "ln_f.bias"),
    ("lm_head.weight", "^lm_head.weight"),
)

_ROTARY_COMMON = rules(  # every LLaMA-style family: embeddings, norms, output head
    ("embed.weight", "embed_tokens.weight"),
    ("layers.{i}.attn_norm.weight", "layers.{i}.input_layernorm.weight"),
    ("layers.{i}.mlp_norm.weight", "layers.{i}.post_attention_layernorm.weight"),
    ("norm.weight", "norm.weight"),
    ("lm_head.weight", "^lm_head.weight"),
)

LLAMA_RULES = (  # also Qwen2 (q/k/v biases) and Gemma (the same names)
    *_ROTARY_COMMON,
    *rules(
        *[(f"layers.{{i}}.attn.{p}.{w}", f"layers.{{i}}.self_attn.{p}_proj.{w}") for p in "qkvo" for w in ("weight", "bias")],
        *[(f"layers.{{i}}.mlp.{p}.{w}", f"layers.{{i}}.mlp.{p}_proj.{w}") for p in ("gate", "up", "down") for w in ("weight", "bias")],
    ),
)

QWEN3_RULES = (
    *LLAMA_RULES,
    *rules(
        ("layers.{i}.attn.q_norm.weight", "layers.{i}.self_attn.q_norm.weight"),
        ("layers.{i}.attn.k_norm.weight", "layers.{i}.self_attn.k_norm.weight"),
    ),
)

PHI3_RULES = (  # fused projections, cut at our q/k/v and gate/up sizes
    *_ROTARY_COMMON,
    *rules(
        (("layers.{i}.attn.q.weight", "layers.{i}.attn.k.weight", "layers.{i}.attn.v.weight"), "layers.{i}.self_attn.qkv_proj.weight", "split"),
        ("layers.{i}.attn.o.weight", "layers.{i}.self_attn.o_proj.weight"),
        (("layers.{i}.mlp.gate.weight", "layers.{i}.mlp.up.weight"), "layers.{i}.mlp.gate_up_proj.weight", "split"),
        ("layers.{i}.mlp.down.weight", "layers.{i}.mlp.down_proj.weight"),
    ),
)

MIXTRAL_RULES = (
    *LLAMA_RULES,
    *rules(
        ("layers.{i}.mlp.router.weight", "layers.{i}.block_sparse_moe.gate.weight"),
        ("layers.{i}.mlp.experts.{e}.gate.weight", "layers.{i}.block_sparse_moe.experts.{e}.w1.weight"),
        ("layers.{i}.mlp.experts.{e}.down.weight", "layers.{i}.block_sparse_moe.experts.{e}.w2.weight"),
        ("layers.{i}.mlp.experts.{e}.up.weight", "layers.{i}.block_sparse_moe.experts.{e}.w3.weight"),
    ),
)

_BERT_LAYER = "encoder.layer.{i}."
BERT_RULES = rules(
    ("embed.weight", "embeddings.word_embeddings.weight"),
    ("positions.weight", "embeddings.position_embeddings.weight"),
    ("type_embed.weight", "embeddings.token_type_embeddings.weight"),
    ("embed_norm.weight", "embeddings.LayerNorm.weight"),
    ("embed_norm.bias", "embeddings.LayerNorm.bias"),
    *[
        (f"layers.{{i}}.{ours}.{w}", f"{_BERT_LAYER}{theirs}.{w}")
        for ours, theirs in [
            ("attn.q", "attention.self.query"),
            ("attn.k", "attention.self.key"),
            ("attn.v", "attention.self.value"),
            ("attn.o", "attention.output.dense"),
            ("attn_norm", "attention.output.LayerNorm"),
            ("mlp.up", "intermediate.dense"),
            ("mlp.down", "output.dense"),
            ("mlp_norm", "output.LayerNorm"),
        ]
        for w in ("weight", "bias")
    ],
    ("pooler.weight", "pooler.dense.weight"),
    ("pooler.bias", "pooler.dense.bias"),
    ("head.dense.weight", "^cls.predictions.transform.dense.weight"),
    ("head.dense.bias", "^cls.predictions.transform.dense.bias"),
    ("head.norm.weight", "^cls.predictions.transform.LayerNorm.weight"),
    ("head.norm.bias", "^cls.predictions.transform.LayerNorm.bias"),
    ("head.lm_head.weight", "^cls.predictions.decoder.weight"),
    ("head.lm_head.bias", "^cls.predictions.bias"),
)

# Our names of the two matrices `tie_word_embeddings` shares (the output projection of an LM or MLM head).
EMBEDDING, OUTPUTS = "embed.weight", ("lm_head.weight", "head.lm_head.weight")
# (name the rules read, name transformers computes with): when a checkpoint stores both, the second is
# read. BERT's forward adds `cls.predictions.decoder.bias`, tied to `cls.predictions.bias` only when equal.
COMPUTED_COPIES = (("cls.predictions.bias", "cls.predictions.decoder.bias"),)

IGNORED = (
    r".*\.attn\.(masked_)?bias$",  # GPT-2's causal-mask buffers in old checkpoints
    r".*rotary_emb\.inv_freq$",
    r".*position_ids$",
    r"^cls\.seq_relationship\..*",  # BERT's next-sentence head, not used
)


# ---------------------------------------------------------------- config translation


def _rope_from_hf(hf: dict[str, Any]) -> dict[str, Any]:
    """rope_theta / rope_scaling from either transformers v4 (`rope_theta`, `rope_scaling`) or v5 (`rope_parameters`)."""
    params = dict(hf.get("rope_parameters") or {})
    legacy = dict(hf.get("rope_scaling") or {})
    theta = params.get("rope_theta", hf.get("rope_theta", 10000.0))
    s = params if params.get("rope_type", "default") != "default" else legacy
    kind = s.get("rope_type", s.get("type", "default"))
    if kind in (None, "default"):
        return {"rope_theta": theta, "rope_scaling": None}
    if kind == "linear":
        return {"rope_theta": theta, "rope_scaling": {"type": "linear", "factor": s["factor"]}}
    if kind == "llama3":
        scaling = {
            "type": "llama3",
            "factor": s["factor"],
            "low_freq_factor": s["low_freq_factor"],
            "high_freq_factor": s["high_freq_factor"],
            "original_max_seq_len": s["original_max_position_embeddings"],
        }
        return {"rope_theta": theta, "rope_scaling": scaling}
    raise LmforgeError(f"rope scaling type {kind!r} is not supported; supported: default, linear, llama3")


def _rope_to_hf(c: ModelConfig) -> dict[str, Any]:
    s = c.rope_scaling
    if s is None:
        params: dict[str, Any] = {"rope_type": "default"}
    elif s["type"] == "linear":
        params = {"rope_type": "linear", "factor": s["factor"]}
    else:
        params = {
            "rope_type": "llama3",
            "factor": s["factor"],
            "low_freq_factor": s["low_freq_factor"],
            "high_freq_factor": s["high_freq_factor"],
            "original_max_position_embeddings": s["original_max_seq_len"],
        }
    legacy = None if s is None else dict(params, type=params["rope_type"])
    return {"rope_theta": c.rope_theta, "rope_scaling": legacy, "rope_parameters": {**params, "rope_theta": c.rope_theta}}


def _first(x: Any) -> Any:
    return x[0] if isinstance(x, list) and x else x


def _special_ids(hf: dict[str, Any]) -> dict[str, Any]:
    return {"bos_id": _first(hf.get("bos_token_id")), "eos_id": _first(hf.get("eos_token_id")), "pad_id": _first(hf.get("pad_token_id"))}


def _require(hf: dict[str, Any], key: str, allowed: tuple, default: Any = None) -> Any:
    value = hf.get(key, default)
    if value not in allowed:
        raise LmforgeError(f"config.json has {key}={value!r}, which lmforge does not support (supported: {allowed})")
    return value


def gpt2_config(hf: dict[str, Any], architecture: str) -> ModelConfig:
    act = _require(hf, "activation_function", ("gelu_new", "gelu", "gelu_pytorch_tanh"), "gelu_new")
    _require(hf, "scale_attn_by_inverse_layer_idx", (False, None), False)
    _require(hf, "reorder_and_upcast_attn", (False, None), False)
    return ModelConfig(
        vocab_size=hf["vocab_size"], dim=hf["n_embd"], n_layers=hf["n_layer"], n_heads=hf["n_head"],
        hidden_dim=hf.get("n_inner") or 4 * hf["n_embd"], mlp="gelu" if act == "gelu" else "gelu_tanh",
        norm="layernorm", norm_bias=True, norm_eps=hf.get("layer_norm_epsilon", 1e-5), positions="learned",
        max_seq_len=hf.get("n_positions", 1024), attn_bias=True, mlp_bias=True,
        tie_embeddings=hf.get("tie_word_embeddings", True), **_special_ids(hf),
    )


def gpt2_to_hf(c: ModelConfig) -> dict[str, Any]:
    return {
        "vocab_size": c.vocab_size, "n_embd": c.dim, "n_layer": c.n_layers, "n_head": c.n_heads, "n_inner": c.hidden_dim,
        "activation_function": "gelu" if c.mlp == "gelu" else "gelu_new", "layer_norm_epsilon": c.norm_eps,
        "n_positions": c.max_seq_len, "n_ctx": c.max_seq_len, "tie_word_embeddings": c.tie_embeddings,
        "resid_pdrop": 0.0, "embd_pdrop": 0.0, "attn_pdrop": 0.0,
    }


def _rotary_config(hf: dict[str, Any], **fields: Any) -> ModelConfig:
    """A RoPE + RMSNorm + SwiGLU decoder from the keys every LLaMA-style config.json shares;
    `fields` add a family's own parts or replace a default (transformers' defaults differ per family)."""
    n_heads = hf["num_attention_heads"]
    shared = dict(
        vocab_size=hf["vocab_size"], dim=hf["hidden_size"], n_layers=hf["num_hidden_layers"], n_heads=n_heads,
        n_kv_heads=hf.get("num_key_value_heads") or n_heads, head_dim=hf.get("head_dim") or hf["hidden_size"] // n_heads,
        hidden_dim=hf["intermediate_size"], mlp="swiglu", norm="rmsnorm", norm_eps=hf.get("rms_norm_eps", 1e-6),
        positions="rotary", **_rope_from_hf(hf), max_seq_len=hf.get("max_position_embeddings", 2048),
        tie_embeddings=hf.get("tie_word_embeddings", False), **_special_ids(hf),
    )
    return ModelConfig(**{**shared, **fields})


def _rotary_to_hf(c: ModelConfig) -> dict[str, Any]:
    return {
        "vocab_size": c.vocab_size, "hidden_size": c.dim, "num_hidden_layers": c.n_layers,
        "num_attention_heads": c.n_heads, "num_key_value_heads": c.n_kv_heads, "head_dim": c.head_dim,
        "intermediate_size": c.hidden_dim, "hidden_act": "silu", "rms_norm_eps": c.norm_eps,
        "max_position_embeddings": c.max_seq_len, "tie_word_embeddings": c.tie_embeddings, **_rope_to_hf(c),
    }


def llama_config(hf: dict[str, Any], architecture: str) -> ModelConfig:
    _require(hf, "hidden_act", ("silu",), "silu")
    return _rotary_config(
        hf, sliding_window=hf.get("sliding_window") if hf.get("use_sliding_window", True) else None,
        attn_bias=hf.get("attention_bias", False), mlp_bias=hf.get("mlp_bias", False),
        n_experts=hf.get("num_local_experts", 0), n_experts_per_token=hf.get("num_experts_per_tok", 2),
        router_aux_loss_coef=hf.get("router_aux_loss_coef", 0.01),
    )


def llama_to_hf(c: ModelConfig) -> dict[str, Any]:
    out = {**_rotary_to_hf(c), "attention_bias": c.attn_bias, "mlp_bias": c.mlp_bias, "sliding_window": c.sliding_window}
    if c.n_experts:
        out.update(num_local_experts=c.n_experts, num_experts_per_tok=c.n_experts_per_token, router_aux_loss_coef=c.router_aux_loss_coef)
    return out


def _qwen_window(hf: dict[str, Any]) -> int | None:
    """Qwen's window applies only with `use_sliding_window`, and only to the layers `layer_types`
    marks (by default those from `max_window_layers` on); lmforge slides on every layer or none."""
    window = hf.get("sliding_window") if hf.get("use_sliding_window", False) else None
    n = hf["num_hidden_layers"]
    default = ["sliding_attention" if i >= hf.get("max_window_layers", 28) else "full_attention" for i in range(n)]
    sliding = [t == "sliding_attention" and window is not None for t in hf.get("layer_types") or default]
    if len(set(sliding)) > 1:
        raise LmforgeError(
            f"config.json slides a window over {sum(sliding)} of {n} layers and attends fully on the rest; "
            "lmforge applies one window to every layer or to none"
        )
    return window if all(sliding) else None


def _qwen_window_to_hf(c: ModelConfig) -> dict[str, Any]:
    kind = "full_attention" if c.sliding_window is None else "sliding_attention"
    return {"use_sliding_window": c.sliding_window is not None, "sliding_window": c.sliding_window,
            "max_window_layers": 0, "layer_types": [kind] * c.n_layers}


def qwen2_config(hf: dict[str, Any], architecture: str) -> ModelConfig:
    _require(hf, "hidden_act", ("silu",), "silu")
    return _rotary_config(hf, qkv_bias=True, attn_bias=False, sliding_window=_qwen_window(hf))


def qwen2_to_hf(c: ModelConfig) -> dict[str, Any]:
    return {**_rotary_to_hf(c), **_qwen_window_to_hf(c)}


def qwen3_config(hf: dict[str, Any], architecture: str) -> ModelConfig:
    _require(hf, "hidden_act", ("silu",), "silu")
    return _rotary_config(hf, head_dim=hf.get("head_dim", 128), qk_norm=True, attn_bias=hf.get("attention_bias", False),
                          sliding_window=_qwen_window(hf))


def qwen3_to_hf(c: ModelConfig) -> dict[str, Any]:
    return {**_rotary_to_hf(c), "attention_bias": c.attn_bias, **_qwen_window_to_hf(c)}


def gemma_config(hf: dict[str, Any], architecture: str) -> ModelConfig:
    # transformers reads the legacy hidden_act "gelu" of the released checkpoints as the tanh form
    _require(hf, "hidden_act", ("gelu", "gelu_pytorch_tanh"), "gelu_pytorch_tanh")
    _require(hf, "hidden_activation", (None, "gelu_pytorch_tanh"))
    _require(hf, "use_bidirectional_attention", (None, False))
    return _rotary_config(
        hf, head_dim=hf.get("head_dim", 256), mlp="geglu_tanh", norm="rmsnorm_unit_offset", scale_embeddings=True,
        attn_bias=hf.get("attention_bias", False), tie_embeddings=hf.get("tie_word_embeddings", True),
    )


def gemma_to_hf(c: ModelConfig) -> dict[str, Any]:
    tanh = "gelu_pytorch_tanh"
    return {**_rotary_to_hf(c), "hidden_act": tanh, "hidden_activation": tanh, "attention_bias": c.attn_bias}


def phi3_config(hf: dict[str, Any], architecture: str) -> ModelConfig:
    _require(hf, "hidden_act", ("silu",), "silu")
    partial = (hf.get("rope_parameters") or {}).get("partial_rotary_factor", hf.get("partial_rotary_factor", 1.0))
    if partial != 1.0:
        raise LmforgeError(f"config.json rotates {partial} of each head (partial_rotary_factor); lmforge rotates whole heads")
    return _rotary_config(hf, norm_eps=hf.get("rms_norm_eps", 1e-5), sliding_window=hf.get("sliding_window"))


def phi3_to_hf(c: ModelConfig) -> dict[str, Any]:
    return {**_rotary_to_hf(c), "sliding_window": c.sliding_window, "original_max_position_embeddings": c.max_seq_len,
            "resid_pdrop": 0.0, "embd_pdrop": 0.0, "attention_dropout": 0.0}


def bert_config(hf: dict[str, Any], architecture: str) -> ModelConfig:
    act = _require(hf, "hidden_act", ("gelu", "gelu_new"), "gelu")
    _require(hf, "position_embedding_type", ("absolute",), "absolute")
    return ModelConfig(
        kind="encoder", vocab_size=hf["vocab_size"], dim=hf["hidden_size"], n_layers=hf["num_hidden_layers"],
        n_heads=hf["num_attention_heads"], hidden_dim=hf["intermediate_size"], mlp="gelu" if act == "gelu" else "gelu_tanh",
        norm="layernorm", norm_bias=True, norm_eps=hf.get("layer_norm_eps", 1e-12), positions="learned",
        max_seq_len=hf.get("max_position_embeddings", 512), attn_bias=True, mlp_bias=True,
        type_vocab_size=hf.get("type_vocab_size", 2), tie_embeddings=hf.get("tie_word_embeddings", True),
        mlm_head=architecture in ("BertForMaskedLM", "BertForPreTraining"),
        pooler=architecture in ("BertModel", "BertForPreTraining", "BertForSequenceClassification"),
        **_special_ids(hf),
    )


def bert_to_hf(c: ModelConfig) -> dict[str, Any]:
    return {
        "vocab_size": c.vocab_size, "hidden_size": c.dim, "num_hidden_layers": c.n_layers,
        "num_attention_heads": c.n_heads, "intermediate_size": c.hidden_dim,
        "hidden_act": "gelu" if c.mlp == "gelu" else "gelu_new", "layer_norm_eps": c.norm_eps,
        "max_position_embeddings": c.max_seq_len, "type_vocab_size": c.type_vocab_size,
        "tie_word_embeddings": c.tie_embeddings, "position_embedding_type": "absolute",
        "hidden_dropout_prob": 0.0, "attention_probs_dropout_prob": 0.0,
    }


@dataclass(frozen=True)
class Family:
    model_type: str
    prefix: str  # where task-head checkpoints keep the base model
    rules: tuple[Rule, ...]
    config_from_hf: Callable[[dict[str, Any], str], ModelConfig]
    config_to_hf: Callable[[ModelConfig], dict[str, Any]]
    architectures: tuple[str, ...]  # the first is written on save; the rest load too


SOURCE_FAMILY = "hf_model_type"  # key of `ModelConfig.extra` naming the family a model was loaded from
FAMILIES: dict[str, Family] = {
    "gpt2": Family("gpt2", "transformer.", GPT2_RULES, gpt2_config, gpt2_to_hf, ("GPT2LMHeadModel", "GPT2Model")),
    "llama": Family("llama", "model.", LLAMA_RULES, llama_config, llama_to_hf, ("LlamaForCausalLM", "LlamaModel")),
    "mistral": Family("mistral", "model.", LLAMA_RULES, llama_config, llama_to_hf, ("MistralForCausalLM", "MistralModel")),
    "mixtral": Family("mixtral", "model.", MIXTRAL_RULES, llama_config, llama_to_hf, ("MixtralForCausalLM", "MixtralModel")),
    "bert": Family(
        "bert", "bert.", BERT_RULES, bert_config, bert_to_hf,
        ("BertForMaskedLM", "BertModel", "BertForPreTraining", "BertForSequenceClassification"),
    ),
    "qwen2": Family("qwen2", "model.", LLAMA_RULES, qwen2_config, qwen2_to_hf, ("Qwen2ForCausalLM", "Qwen2Model")),
    "qwen3": Family("qwen3", "model.", QWEN3_RULES, qwen3_config, qwen3_to_hf, ("Qwen3ForCausalLM", "Qwen3Model")),
    "gemma": Family("gemma", "model.", LLAMA_RULES, gemma_config, gemma_to_hf, ("GemmaForCausalLM", "GemmaModel")),
    "phi3": Family("phi3", "model.", PHI3_RULES, phi3_config, phi3_to_hf, ("Phi3ForCausalLM", "Phi3Model")),
}


def family_of(hf_config: dict[str, Any], source: str | Path) -> Family:
    model_type = hf_config.get("model_type")
    if model_type not in FAMILIES:
        raise LmforgeError(
            f"{source} has model_type {model_type!r}, which lmforge cannot load; supported model types: {', '.join(FAMILIES)}"
        )
    return FAMILIES[model_type]


def config_from_hf(hf_config: dict[str, Any], source: str | Path = "config.json") -> ModelConfig:
    """Translate a Hugging Face `config.json` dict into a `ModelConfig`."""
    family = family_of(hf_config, source)
    architecture = _first(hf_config.get("architectures")) or family.architectures[0]
    if architecture not in family.architectures:
        raise LmforgeError(
            f"{source} is a {architecture}; lmforge loads {', '.join(family.architectures)} for {family.model_type}"
        )
    try:
        config = family.config_from_hf(hf_config, architecture)
    except KeyError as e:
        raise LmforgeError(f"{source} lacks the key {e.args[0]!r} that a {family.model_type} config needs") from None
    config.extra[SOURCE_FAMILY] = family.model_type
    return config


def _rotary(c: ModelConfig, norm: str = "rmsnorm", mlp: str = "swiglu", qk_norm: bool = False, scaled: bool = False) -> bool:
    """A dense rotary decoder with exactly these components."""
    return (c.kind, c.positions, c.n_experts, c.norm, c.mlp, c.qk_norm, c.scale_embeddings) == (
        "decoder", "rotary", 0, norm, mlp, qk_norm, scaled)


SAVED_AS: tuple[tuple[str, Callable[[ModelConfig], bool]], ...] = (  # family, can it hold the model; first match wins
    ("bert", lambda c: c.kind == "encoder"),
    ("mixtral", lambda c: c.n_experts > 0),
    ("gpt2", lambda c: c.positions == "learned" and c.norm == "layernorm"),
    ("qwen2", lambda c: _rotary(c) and c.qkv_bias and not (c.attn_bias or c.mlp_bias)),
    ("qwen3", lambda c: _rotary(c, qk_norm=True) and c.qkv_bias == c.attn_bias and not c.mlp_bias),
    ("gemma", lambda c: _rotary(c, "rmsnorm_unit_offset", "geglu_tanh", scaled=True) and c.qkv_bias == c.attn_bias
     and not c.mlp_bias and c.sliding_window is None),
    ("phi3", lambda c: _rotary(c) and not (c.qkv_bias or c.attn_bias or c.mlp_bias) and c.rope_scaling is None
     and c.extra.get(SOURCE_FAMILY) == "phi3"),  # LLaMA's shape: only for a model read from Phi-3
    ("mistral", lambda c: _rotary(c) and c.qkv_bias == c.attn_bias and c.sliding_window is not None),
    ("llama", lambda c: _rotary(c) and c.qkv_bias == c.attn_bias and c.sliding_window is None),
)


def family_for(config: ModelConfig) -> Family:
    """The Hugging Face family that can hold a model of this shape: the one it was loaded from, if
    that one can, else the first of `SAVED_AS` that can (for models trained in lmforge)."""
    holds = dict(SAVED_AS)
    source = config.extra.get(SOURCE_FAMILY)
    if source in holds and holds[source](config):
        return FAMILIES[source]
    for name, can_hold in SAVED_AS:
        if can_hold(config):
            return FAMILIES[name]
    raise LmforgeError(
        f"no Hugging Face family matches this model (positions={config.positions}, norm={config.norm}, mlp={config.mlp}); "
        "save it in lmforge format instead"
    )


# ---------------------------------------------------------------- load / save


def load_hf_weights(folder: Path) -> dict[str, Tensor]:
    tensors: dict[str, Tensor] = {}
    for path in weight_files(folder):
        tensors.update(read_tensors(path))
    for read, computed in COMPUTED_COPIES:
        if computed in tensors:
            tensors[read] = tensors.pop(computed)
    return tensors


def load_hf(folder: str | Path) -> tuple[nn.Module, ModelConfig]:
    """Build the model a Hugging Face folder describes and fill it with its weights (in float32: the
    model is built in float32 and bfloat16 / float16 tensors are widened as they are copied in)."""
    folder = Path(folder)
    hf_config = read_json(folder / "config.json")
    config = config_from_hf(hf_config, folder / "config.json")
    family = FAMILIES[hf_config["model_type"]]
    tensors = load_hf_weights(folder)
    prefix = family.prefix if any(k.startswith(family.prefix) for k in tensors) else ""
    headless = _first(hf_config.get("architectures")) not in (None, family.architectures[0])
    config = _tie_as_stored(config, family, prefix, tensors, folder, headless)
    model = build_model(config)
    load_checked(unique_state(model), _convert_to_ours(model, family, prefix, tensors, folder), folder)
    return model, config


def _tied_names(family: Family, prefix: str) -> tuple[str | None, str | None]:
    """The Hugging Face names of the input embeddings and the output projection in this family."""
    def theirs(ours: tuple[str, ...]) -> str | None:
        return next((hf_name(r.theirs, {}, prefix) for r in family.rules if r.ours[0] in ours), None)

    return theirs((EMBEDDING,)), theirs(OUTPUTS)


def _tie_as_stored(config: ModelConfig, family: Family, prefix: str, tensors: dict[str, Tensor],
                   source: Path, headless: bool) -> ModelConfig:
    """Tie the output projection to the embeddings as transformers 5 does when it loads the folder.

    It follows config.json's `tie_word_embeddings`, except that a tied checkpoint that stores both
    matrices with different values is loaded untied (transformers warns and keeps both), and one
    that stores only the output matrix lends it to the embeddings (`tensors` is changed in place).
    An untied config without an output matrix is refused (transformers would fill it at random),
    unless the architecture is a base model without one (`headless`: LlamaModel, GPT2Model): lmforge's
    decoder always has an output layer, so it reuses the embeddings (hidden states are exact).
    """
    embed, output = _tied_names(family, prefix)
    has_embed, has_output = embed in tensors, output in tensors
    if config.tie_embeddings and has_embed and has_output and not torch.equal(tensors[embed], tensors[output]):
        return replace(config, tie_embeddings=False)
    if config.tie_embeddings and has_output and not has_embed:
        tensors[embed] = tensors.pop(output)
    has_head = config.kind == "decoder" or config.mlm_head
    if not config.tie_embeddings and has_head and has_embed and not has_output:
        if headless:
            return replace(config, tie_embeddings=True)
        raise LmforgeError(
            f"{source}/config.json says tie_word_embeddings=false, but the weights have no {output} "
            "(transformers would start it from random values); if the model reuses its input embeddings "
            "as the output layer, set tie_word_embeddings to true in config.json"
        )
    return config


def _convert_to_ours(model: nn.Module, family: Family, prefix: str, tensors: dict[str, Tensor], source: Path) -> dict[str, Tensor]:
    expected = unique_state(model)
    state: dict[str, Tensor] = {}
    missing, misshaped, used = [], [], set()
    for ours, theirs, transform in mapping(model, family.rules, family.model_type, prefix):
        if theirs not in tensors:
            missing.append(theirs)
            continue
        used.add(theirs)
        sizes = tuple(expected[n].shape[0] for n in ours)
        for name, t in zip(ours, TRANSFORMS[transform][0](tensors[theirs], sizes)):
            if t.shape != expected[name].shape:
                misshaped.append(f"{theirs} {tuple(tensors[theirs].shape)}")
            state[name] = t
    tied_output = _tied_names(family, prefix)[1] if model.config.tie_embeddings else None
    ignorable = [re.compile(p) for p in IGNORED]
    unexpected = sorted(k for k in tensors if k not in used and k != tied_output and not any(p.match(k) for p in ignorable))
    error = mismatch(source, missing, unexpected, misshaped, "is the checkpoint complete and unmodified?")
    if error is not None:
        raise error
    return state


def hf_state(model: nn.Module, family: Family, prefix: str) -> dict[str, Tensor]:
    """The model's weights under Hugging Face names."""
    ours = unique_state(model)
    return {theirs: TRANSFORMS[t][1](tuple(ours[n] for n in names))
            for names, theirs, t in mapping(model, family.rules, family.model_type, prefix)}


def save_hf(model: nn.Module, folder: str | Path) -> None:
    """Write config.json + model.safetensors that `transformers.AutoModel*.from_pretrained` loads."""
    folder = Path(folder)
    config: ModelConfig = model.config
    family = family_for(config)
    architecture = family.architectures[0] if config.kind == "decoder" or config.mlm_head else "BertModel"
    prefix = "" if architecture == "BertModel" else family.prefix
    tensors = {k: v.float() if v.dtype == torch.float32 else v for k, v in hf_state(model, family, prefix).items()}
    folder.mkdir(parents=True, exist_ok=True)
    write_tensors(folder / "model.safetensors", tensors, metadata={"format": "pt"})
    hf_config = {
        "model_type": family.model_type, "architectures": [architecture], **family.config_to_hf(config),
        "bos_token_id": config.bos_id, "eos_token_id": config.eos_id, "pad_token_id": config.pad_id,
        "dtype": str(next(model.parameters()).dtype).removeprefix("torch."),
    }
    write_json(folder / "config.json", hf_config)


def is_hf_folder(folder: Path) -> bool:
    cfg = folder / "config.json"
    return cfg.is_file() and "model_type" in read_json(cfg)


__all__ = ["FAMILIES", "config_from_hf", "is_hf_folder", "load_hf", "save_hf", "tensor_names"]
