"""ModelConfig: the single source of truth for an architecture.

Every supported family (GPT-2, BERT, LLaMA, Mistral, Mixtral, Qwen2, Qwen3, Gemma, Phi-3) is one
`ModelConfig`; the families differ by data, not code. Defaults describe a tiny LLaMA-style
decoder so a bare `ModelConfig()` builds in milliseconds. Presets give named shapes: tiny
ones for tests and the real ones (`gpt2`, `llama-3.2-1b`, `mixtral-8x7b`, ...) for sizing and
for building an architecture before loading its weights.

Names follow one convention everywhere in lmforge (`dim`, `n_layers`, `n_heads`,
`n_kv_heads`, `head_dim`, `hidden_dim`); Hugging Face names are translated only in
`checkpoint/hf.py`.

`build` turns one section of a recipe (a YAML mapping) into its dataclass; every config
dataclass in lmforge (model, data, train, lora, ...) is built through it, so an unknown key
fails the same way everywhere.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from lmforge.errors import LmforgeError

MLP_KINDS = ("gelu", "gelu_tanh", "swiglu", "geglu_tanh")
NORM_KINDS = ("layernorm", "rmsnorm", "rmsnorm_unit_offset")
POSITION_KINDS = ("learned", "rotary", "sinusoidal", "none")
MODEL_KINDS = ("decoder", "encoder")
ROPE_SCALING_TYPES = ("linear", "llama3")


@dataclass
class ModelConfig:
    """The shape and components of a transformer. Every field is plain data (JSON/YAML-able)."""

    kind: str = "decoder"  # "decoder": causal, pre-norm (GPT-2/LLaMA/Mistral/Mixtral); "encoder": bidirectional, post-norm (BERT)
    vocab_size: int = 256  # number of token ids, special tokens included
    dim: int = 64  # width of the residual stream
    n_layers: int = 2  # number of transformer blocks
    n_heads: int = 4  # query heads
    n_kv_heads: int | None = None  # key/value heads (grouped-query attention); None = n_heads
    head_dim: int | None = None  # width of one head; None = dim // n_heads
    hidden_dim: int = 172  # MLP inner width (per expert for mixture-of-experts)
    mlp: str = "swiglu"  # "gelu" (exact, BERT), "gelu_tanh" (GPT-2's gelu_new), "swiglu" (LLaMA) or "geglu_tanh" (Gemma: SwiGLU's gate with tanh-GELU)
    norm: str = "rmsnorm"  # "layernorm", "rmsnorm" or "rmsnorm_unit_offset" (Gemma: scale = 1 + weight, so weights are stored as offsets)
    norm_eps: float = 1e-5  # epsilon inside every norm
    positions: str = "rotary"  # "learned" (GPT-2, BERT), "rotary" (LLaMA), "sinusoidal" or "none"
    rope_theta: float = 10000.0  # rotary base frequency
    rope_scaling: dict[str, Any] | None = None  # {"type": "linear", "factor": f} or {"type": "llama3", "factor", "low_freq_factor", "high_freq_factor", "original_max_seq_len"}
    max_seq_len: int = 256  # context window in tokens
    sliding_window: int | None = None  # each query sees only this many most recent keys (Mistral); None = full
    attn_bias: bool = False  # biases on the q/k/v/o projections (q/k/v: unless qkv_bias says otherwise)
    qkv_bias: bool | None = None  # biases on the q/k/v projections alone (Qwen2: q/k/v yes, o no); None = attn_bias
    qk_norm: bool = False  # a norm over each head's queries and keys before rotation (Qwen3)
    mlp_bias: bool = False  # biases on the MLP projections
    norm_bias: bool = False  # LayerNorm has a bias (GPT-2, BERT); RMSNorm never does
    tie_embeddings: bool = True  # output projection shares the input embedding matrix
    scale_embeddings: bool = False  # token embeddings multiplied by sqrt(dim), in their own dtype (Gemma)
    n_experts: int = 0  # mixture-of-experts experts per layer; 0 = dense MLP
    n_experts_per_token: int = 2  # experts each token is routed to (top-k)
    router_aux_loss_coef: float = 0.01  # weight of the load-balancing loss in training objectives
    type_vocab_size: int = 0  # token-type (segment) embeddings, BERT only; 0 = none
    mlm_head: bool = True  # encoders: build the masked-LM head (else forward returns hidden states)
    pooler: bool = False  # encoders: build BERT's [CLS] pooler (dense + tanh)
    dropout: float = 0.0  # dropout on embeddings, attention probabilities and residual branches
    init_std: float = 0.02  # standard deviation of the initial weights
    bos_id: int | None = None  # beginning-of-sequence token id, when the tokenizer has one
    eos_id: int | None = None  # end-of-sequence token id
    pad_id: int | None = None  # padding token id
    extra: dict[str, Any] = field(default_factory=dict)  # free-form metadata (e.g. label names); never read by the model

    def __post_init__(self) -> None:
        if self.n_kv_heads is None:
            self.n_kv_heads = self.n_heads
        if self.head_dim is None:
            self.head_dim = self.dim // self.n_heads
        if self.qkv_bias is None:
            self.qkv_bias = self.attn_bias
        self.validate()

    def validate(self) -> None:
        """Raise `LmforgeError` naming the first field that cannot describe a working model."""
        choices = {"kind": MODEL_KINDS, "mlp": MLP_KINDS, "norm": NORM_KINDS, "positions": POSITION_KINDS}
        for name, allowed in choices.items():
            if getattr(self, name) not in allowed:
                raise LmforgeError(f"model.{name} must be one of {', '.join(allowed)}; got {getattr(self, name)!r}")
        for name in ("vocab_size", "dim", "n_layers", "n_heads", "hidden_dim", "max_seq_len"):
            if getattr(self, name) <= 0:
                raise LmforgeError(f"model.{name} must be positive; got {getattr(self, name)}")
        if self.n_heads % self.n_kv_heads != 0:
            raise LmforgeError(
                f"model.n_heads ({self.n_heads}) must be a multiple of model.n_kv_heads ({self.n_kv_heads})"
            )
        if self.positions == "rotary" and self.head_dim % 2:
            raise LmforgeError(f"rotary positions need an even head_dim; got {self.head_dim}")
        if self.sliding_window is not None and self.sliding_window <= 0:
            raise LmforgeError(f"model.sliding_window must be positive or null; got {self.sliding_window}")
        if self.n_experts and not 0 < self.n_experts_per_token <= self.n_experts:
            raise LmforgeError(
                f"model.n_experts_per_token must be in 1..{self.n_experts}; got {self.n_experts_per_token}"
            )
        if self.rope_scaling is not None and self.rope_scaling.get("type") not in ROPE_SCALING_TYPES:
            raise LmforgeError(
                f"model.rope_scaling.type must be one of {', '.join(ROPE_SCALING_TYPES)}; got {self.rope_scaling}"
            )
        if not 0.0 <= self.dropout < 1.0:
            raise LmforgeError(f"model.dropout must be in [0, 1); got {self.dropout}")

    @property
    def causal(self) -> bool:
        """Decoders attend only to earlier positions; encoders see the whole sequence."""
        return self.kind == "decoder"

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ModelConfig:
        """Build from a dict, rejecting unknown keys with the list of valid ones."""
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise LmforgeError(f"unknown model config keys {unknown}; valid keys are {sorted(known)}")
        return cls(**data)

    def save(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps({"format": "lmforge", **self.to_dict()}, indent=2) + "\n")


_GPT2 = dict(
    mlp="gelu_tanh", norm="layernorm", norm_bias=True, positions="learned", attn_bias=True, mlp_bias=True,
    vocab_size=50257, max_seq_len=1024, bos_id=50256, eos_id=50256,
)
_LLAMA = dict(mlp="swiglu", norm="rmsnorm", positions="rotary", tie_embeddings=False)
_TINY_ROTARY = dict(_LLAMA, vocab_size=256, dim=64, n_layers=2, n_heads=4, n_kv_heads=2, hidden_dim=172, max_seq_len=128)
_BERT = dict(
    kind="encoder", mlp="gelu", norm="layernorm", norm_bias=True, norm_eps=1e-12, positions="learned",
    attn_bias=True, mlp_bias=True, type_vocab_size=2, vocab_size=30522, max_seq_len=512, pad_id=0,
)

PRESETS: dict[str, dict[str, Any]] = {
    # tiny shapes for tests and quick experiments (CPU, seconds)
    "tiny-gpt2": dict(_GPT2, vocab_size=256, dim=64, n_layers=2, n_heads=4, hidden_dim=256, max_seq_len=128, bos_id=None, eos_id=None),
    "tiny-bert": dict(_BERT, vocab_size=256, dim=64, n_layers=2, n_heads=4, hidden_dim=256, max_seq_len=128, pooler=True),
    "tiny-llama": dict(_TINY_ROTARY),
    "tiny-mistral": dict(_TINY_ROTARY, sliding_window=16),
    "tiny-mixtral": dict(_TINY_ROTARY, hidden_dim=96, n_experts=4, n_experts_per_token=2),
    "tiny-qwen2": dict(_TINY_ROTARY, qkv_bias=True, tie_embeddings=True),
    "tiny-qwen3": dict(_TINY_ROTARY, head_dim=32, qk_norm=True),  # head_dim != dim // n_heads, as in Qwen3
    "tiny-gemma": dict(_TINY_ROTARY, n_kv_heads=1, head_dim=32, mlp="geglu_tanh", norm="rmsnorm_unit_offset",
                       scale_embeddings=True, tie_embeddings=True),
    "tiny-phi3": dict(_TINY_ROTARY, sliding_window=24),  # LLaMA's shape; checkpoints differ only in fused projections
    # real shapes, for sizing and for building before loading weights
    "gpt2": dict(_GPT2, dim=768, n_layers=12, n_heads=12, hidden_dim=3072),
    "gpt2-medium": dict(_GPT2, dim=1024, n_layers=24, n_heads=16, hidden_dim=4096),
    "bert-base": dict(_BERT, dim=768, n_layers=12, n_heads=12, hidden_dim=3072, pooler=True),
    "smollm-135m": dict(_LLAMA, vocab_size=49152, dim=576, n_layers=30, n_heads=9, n_kv_heads=3, hidden_dim=1536, max_seq_len=2048, tie_embeddings=True, rope_theta=10000.0),
    "llama-3.2-1b": dict(
        _LLAMA, vocab_size=128256, dim=2048, n_layers=16, n_heads=32, n_kv_heads=8, hidden_dim=8192, max_seq_len=131072,
        rope_theta=500000.0, tie_embeddings=True, bos_id=128000, eos_id=128001,
        rope_scaling={"type": "llama3", "factor": 32.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0, "original_max_seq_len": 8192},
    ),
    "mistral-7b": dict(_LLAMA, vocab_size=32000, dim=4096, n_layers=32, n_heads=32, n_kv_heads=8, hidden_dim=14336, max_seq_len=32768, sliding_window=4096, bos_id=1, eos_id=2),
    "mixtral-8x7b": dict(_LLAMA, vocab_size=32000, dim=4096, n_layers=32, n_heads=32, n_kv_heads=8, hidden_dim=14336, max_seq_len=32768, rope_theta=1e6, n_experts=8, n_experts_per_token=2, bos_id=1, eos_id=2),
}


def preset(name: str, **overrides: Any) -> ModelConfig:
    """A named architecture, optionally with some fields changed."""
    if name not in PRESETS:
        raise LmforgeError(f"unknown preset {name!r}; choose one of {', '.join(PRESETS)}")
    return ModelConfig(**{**PRESETS[name], **overrides})


# ---------------------------------------------------------------- recipe sections


def build(cls: type, values: dict[str, Any] | None, section: str) -> Any:
    """The dataclass `cls` from a recipe section's values, naming unknown keys and bad values in one line."""
    values = dict(values or {})
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - known)
    if unknown:
        raise LmforgeError(f"unknown keys in section '{section}': {unknown}; valid: {sorted(known)}")
    try:
        return cls(**values)
    except TypeError as e:
        raise LmforgeError(f"section '{section}': {e}") from None


def model_config(values: dict[str, Any] | None, **defaults: Any) -> ModelConfig:
    """A recipe's `model:` section: an optional `preset` to start from, then `defaults`, then the given keys."""
    values = dict(values or {})
    name = values.pop("preset", None)
    if name is not None and name not in PRESETS:
        raise LmforgeError(f"unknown preset {name!r}; choose one of {', '.join(PRESETS)}")
    base = dict(PRESETS[name]) if name is not None else {}
    return build(ModelConfig, {**base, **defaults, **values}, "model")
