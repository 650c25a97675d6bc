"""Memory planner: what a training step (and generation) will hold in memory, before anything is allocated.

`plan_memory(request)` adds up, for a model config, a batch shape and a precision:
- weights (quantized linear layers for a 4- or 8-bit base), gradients and AdamW's two moments of
  the trainable parameters (all of them, or the LoRA adapters only);
- the activations autograd keeps for the backward pass, with and without activation
  checkpointing, and the largest temporary of the backward pass;
- the output projection's buffers (the fused loss keeps a chunk of logits and the gradient of
  the hidden states; `models/cpu_ops.py`);
- the KV cache per token of generation;
and compares the total with the free memory of the machine (CPU RAM, or each GPU), with concrete
suggestions when it does not fit.

Design choices:
- Parameters are counted exactly on a model built on the meta device (no memory).
- Activations are not a hand-written formula that drifts from the code: one block of a tiny
  copy of the model (the same family and components, widths of a few units) runs forward under
  `saved_tensors_hooks`, which see every tensor autograd saves. Saved bytes are linear in the
  widths (dim, hidden_dim, head_dim) and in the batch, and at most quadratic in the sequence
  length (attention masks), so five tiny traces fit the coefficients exactly and the estimate
  for the real shape is read off them. The traced block is the model's own code, so a new
  component is planned correctly without touching this file.
- The peak of a step is at the end of the forward pass (every saved activation, plus a block of
  logits the fused loss computes before copying it into its chunk) or in the backward pass,
  followed block by block: block k's saved activations are freed as its gradients appear, so the
  backward peaks at its start (all activations) or its end (all gradients), plus the temporaries
  of one block's backward (the gradients of its intermediates: about half the activations it
  saved, measured). With checkpointing each block keeps only its input, and one block's
  activations are recomputed at a time.
- Steady state is planned: the optimizer state exists (it is allocated at the first step).
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import json
import os
from collections.abc import Iterator
from dataclasses import dataclass, field

import torch

from lmforge.config import ModelConfig
from lmforge.errors import LmforgeError
from lmforge.models.cpu_ops import logits_transient_columns

PRECISIONS = ("float32", "bfloat16")
ADAM_BYTES = 8  # exp_avg and exp_avg_sq in float32 per trainable parameter
LOSS_CHUNK_ELEMENTS = 2**25  # `cpu_ops.linear_cross_entropy`'s default logits chunk
QUANT_GROUP = 64  # `quantize.linear` int4 group size (a float32 scale and zero per group)
GIB = 2**30


@dataclass
class PlanRequest:
    """What to plan: a model, a micro-batch shape and how it is trained."""

    config: ModelConfig
    batch_size: int
    seq_len: int
    precision: str = "float32"  # "float32" or "bfloat16" autocast (weights stay float32)
    lora_rank: int = 0  # 0 = every weight is trained
    lora_targets: tuple[str, ...] = ("*.attn.q", "*.attn.k", "*.attn.v", "*.attn.o")
    bits: int | None = None  # 4 or 8: a quantized frozen base (needs lora_rank)
    activation_checkpointing: bool = False
    grad_accum: int = 1

    def __post_init__(self) -> None:
        if self.batch_size < 1 or self.seq_len < 1:
            raise LmforgeError(f"batch size and sequence length must be >= 1; got {self.batch_size} and {self.seq_len}")
        if self.precision not in PRECISIONS:
            raise LmforgeError(f"precision must be one of {', '.join(PRECISIONS)}; got {self.precision!r}")
        if self.bits not in (None, 4, 8):
            raise LmforgeError(f"bits must be 4 or 8 (a quantized base); got {self.bits}")
        if self.bits and not self.lora_rank:
            raise LmforgeError("a quantized base (--bits) is frozen; add --lora R to train adapters on it (QLoRA)")


@dataclass
class MemoryPlan:
    """The planned memory of one training step, in bytes, and whether it fits."""

    request: PlanRequest
    n_params: int
    n_trainable: int
    weights: int
    gradients: int
    optimizer: int
    loss_buffers: int  # logits chunk + gradient of the hidden states (+ the token ids)
    activations: int  # saved for backward, with the request's checkpointing setting
    activations_other: int  # ... with the other setting
    backward_peak: int  # the step's own peak: the end of the forward (activations + the loss's logits) or the backward
    backward_peak_other: int
    kv_cache_per_token: int
    device: str = "cpu"
    free: int | None = None  # free memory of the device
    suggestions: list[str] = field(default_factory=list)

    @property
    def total(self) -> int:
        """Peak bytes of a training step: weights + optimizer state + the step's own peak."""
        return self.weights + self.optimizer + self.loss_buffers + self.backward_peak

    @property
    def total_other(self) -> int:
        return self.weights + self.optimizer + self.loss_buffers + self.backward_peak_other

    @property
    def step_peak(self) -> int:
        """What one step adds above the weights and optimizer state (the loss's buffers included)."""
        return self.loss_buffers + self.backward_peak

    @property
    def fits(self) -> bool:
        return self.free is None or self.total <= self.free

    def lines(self) -> list[str]:
        """The plan as a table, then the verdict and the suggestions."""
        r = self.request
        ac = "on" if r.activation_checkpointing else "off"
        base = f"{r.bits}-bit base" if r.bits else "float32 weights"
        training = f"LoRA rank {r.lora_rank}" if r.lora_rank else "full fine-tuning"
        out = [f"{self.n_params / 1e6:,.1f}M parameters ({self.n_trainable / 1e6:,.2f}M trained: {training}); "
               f"micro-batch {r.batch_size} x {r.seq_len} tokens, {r.precision}, {base}",
               _row("weights", self.weights), _row("gradients (held within the peak below)", self.gradients),
               _row("optimizer state (AdamW)", self.optimizer), _row("output layer + loss buffers", self.loss_buffers),
               _row(f"activations (checkpointing {ac})", self.activations),
               _row("backward peak (activations + gradients in flight)", self.backward_peak),
               _row("total at the peak of a step", self.total),
               _row(f"  ... with checkpointing {'off' if r.activation_checkpointing else 'on'}", self.total_other),
               _row("KV cache per token of generation", self.kv_cache_per_token, unit="KiB")]
        if self.free is not None:
            out.append(_row(f"free memory ({self.device})", self.free))
            verdict = "fits" if self.fits else "does NOT fit"
            out.append(f"verdict: {verdict} ({_gib(self.total)} of {_gib(self.free)} free on {self.device})")
        out += [f"suggestion: {s}" for s in self.suggestions]
        return out


def _gib(n: int) -> str:
    return f"{n / GIB:.2f} GiB" if n >= GIB / 10 else f"{n / 2**20:.1f} MiB"


def _row(label: str, n: int, unit: str = "") -> str:
    value = f"{n / 1024:,.1f} KiB" if unit == "KiB" else _gib(n)
    return f"{label:52}{value:>14}"


# ---------------------------------------------------------------- parameters


_INIT_FILLERS = ("normal_", "uniform_", "kaiming_uniform_", "zeros_", "ones_", "constant_", "trunc_normal_")


@contextlib.contextmanager
def _initialisers_skipped() -> Iterator[None]:
    """`torch.nn.init`'s fillers as no-ops while a meta model is built: its values are never read, and
    the first random fill of a meta tensor loads PyTorch's decompositions (seconds, on every training
    verb's start). Restored on exit; only `torch.nn.init` is touched, for the length of one build."""
    saved = {name: getattr(torch.nn.init, name) for name in _INIT_FILLERS}
    try:
        for name in _INIT_FILLERS:
            setattr(torch.nn.init, name, lambda tensor, *args, **kwargs: tensor)
        yield
    finally:
        for name, filler in saved.items():
            setattr(torch.nn.init, name, filler)


def _meta_model(config: ModelConfig) -> torch.nn.Module:
    """The model `config` describes, with shapes and no memory (meta tensors)."""
    from lmforge.models import build_model

    with torch.device("meta"), _initialisers_skipped():
        return build_model(config)


def _linear_sizes(model: torch.nn.Module) -> dict[str, tuple[int, int]]:
    """(in, out) of every linear layer by module name (the output layer is left out if tied)."""
    from lmforge.models.surgery import is_linear, tied_modules

    tied = tied_modules(model)
    return {name: (m.in_features, m.out_features) for name, m in model.named_modules()
            if is_linear(m) and name not in tied}


def _param_counts(request: PlanRequest) -> tuple[int, int, int]:
    """(all parameters, trained parameters, bytes of the weights)."""
    from lmforge.models.surgery import matches

    model = _meta_model(request.config)
    n_params = sum(p.numel() for p in model.parameters())
    linears = _linear_sizes(model)
    if not request.lora_rank:
        return n_params, n_params, 4 * n_params
    targets = [name for name in linears if matches(name, list(request.lora_targets))]
    if not targets:
        raise LmforgeError(f"no linear layer matches the LoRA targets {list(request.lora_targets)}")
    n_lora = sum(request.lora_rank * (i + o) for name, (i, o) in linears.items() if name in targets)
    weights = 4 * (n_params + n_lora)
    if request.bits:
        quantized = sum(i * o for name, (i, o) in linears.items() if name != "lm_head")
        per_weight = request.bits / 8 + (8 / QUANT_GROUP if request.bits == 4 else 0)
        rows = sum(o for name, (_, o) in linears.items() if name != "lm_head")
        weights -= int(4 * quantized - per_weight * quantized) - (4 * rows if request.bits == 8 else 0)
    return n_params, n_lora, weights


# ---------------------------------------------------------------- activations


def _tiny(config: ModelConfig, dim: int, hidden: int, head: int) -> ModelConfig:
    return dataclasses.replace(config, dim=dim, hidden_dim=hidden, head_dim=head, n_layers=1, vocab_size=32,
                               max_seq_len=max(config.max_seq_len, 64), sliding_window=config.sliding_window)


def _traced_bytes(config: ModelConfig, seq_len: int, precision: str) -> int:
    """Bytes the block of a 1-layer `config` model saves for backward on one sequence (its weights, and
    the rotary angles and mask every block shares, left out)."""
    from lmforge.models import build_model
    from lmforge.models.gpt import default_positions
    from lmforge.models.layers import attention_mask
    from lmforge.train.loop import autocast_for

    torch.manual_seed(0)
    model = build_model(config).train()
    block = model.layers[0]
    ids = torch.zeros(1, seq_len, dtype=torch.long)
    positions = default_positions(ids)
    x = torch.randn(1, seq_len, config.dim, requires_grad=True)
    rope = model.positions.angles(positions)
    window = config.sliding_window if config.kind == "decoder" else None
    mask = attention_mask(positions, positions, causal=True, window=window) if window else None  # as the model builds it
    shared = {t.untyped_storage()._cdata for t in [*block.parameters(), *(rope or ()), *([mask] if mask is not None else [])]}
    weight_shapes = {tuple(p.shape) for p in block.parameters() if p.dim() >= 2}
    saved: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        key = t.untyped_storage()._cdata
        if key not in shared and not (t.dtype != torch.float32 and tuple(t.shape) in weight_shapes):
            saved[key] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t), autocast_for(precision, torch.device("cpu")):
        block(x, rope, mask)
    return sum(saved.values())


def block_activation_bytes(config: ModelConfig, batch_size: int, seq_len: int, precision: str) -> int:
    """Bytes one block saves for backward at (batch_size, seq_len), from five traces of tiny blocks."""
    per_token, quad = _activation_coefficients(json.dumps(dataclasses.asdict(config), sort_keys=True), precision)
    return int(batch_size * (per_token * seq_len + quad * seq_len * seq_len))


@functools.lru_cache(maxsize=32)
def _activation_coefficients(config_json: str, precision: str) -> tuple[float, float]:
    """(bytes per token, bytes per squared position) one block saves, for a config given as JSON (hashable)."""
    config = ModelConfig(**json.loads(config_json))
    d0, h0, k0, t0 = 8, 8, 4, 16
    base = _tiny(config, d0, h0, k0)
    s0, s1 = _traced_bytes(base, t0, precision), _traced_bytes(base, 2 * t0, precision)
    quad = (s1 - 2 * s0) / (2 * t0 * t0)  # s(T) = a T + c T^2
    per_token = (s0 - quad * t0 * t0) / t0
    for widths, real, step in (((2 * d0, h0, k0), config.dim, d0), ((d0, 2 * h0, k0), config.hidden_dim, h0),
                               ((d0, h0, 2 * k0), config.head_dim, k0)):
        grown = _traced_bytes(_tiny(config, *widths), t0, precision)
        per_token += (grown - s0) / t0 / step * (real - step)
    return per_token, quad


def _kv_per_token(config: ModelConfig) -> int:
    return 2 * config.n_layers * config.n_kv_heads * config.head_dim * 4  # keys and values, float32


# ---------------------------------------------------------------- the plan


def plan_memory(request: PlanRequest, free: int | None = None, device: str | None = None) -> MemoryPlan:
    """The memory plan of `request`; `free` defaults to this machine's free memory (`free_memory`)."""
    config, batch, seq_len = request.config, request.batch_size, request.seq_len
    if seq_len > config.max_seq_len:
        raise LmforgeError(f"sequence length {seq_len} is longer than the model's max_seq_len {config.max_seq_len}")
    n_params, n_trainable, weights = _param_counts(request)
    act_bytes = 2 if request.precision == "bfloat16" else 4
    n_tokens = batch * seq_len
    per_block = block_activation_bytes(config, batch, seq_len, request.precision)
    block_input = n_tokens * config.dim * act_bytes
    block_grads = 0 if request.lora_rank else 4 * (n_params - config.vocab_size * config.dim * (1 if config.tie_embeddings else 2)) // config.n_layers
    head = 4 * config.vocab_size * config.dim  # the output layer's gradient (the fused loss computes it in the forward)
    chunk = min(n_tokens, max(1, LOSS_CHUNK_ELEMENTS // config.vocab_size))
    loss_transient = 4 * chunk * logits_transient_columns(config.vocab_size)  # logits before they are copied into the chunk
    loss_buffers = 4 * chunk * config.vocab_size + n_tokens * config.dim * (4 + act_bytes) + 8 * n_tokens
    if not request.lora_rank:
        loss_buffers += head + (0 if config.tie_embeddings else head)  # + the embedding's gradient, if its own

    def peak(checkpointed: bool) -> tuple[int, int]:
        """(activations the forward saves, the step's peak above weights, optimizer and loss buffers)."""
        L, kept = config.n_layers, block_input if checkpointed else per_block  # held by each block until its backward
        held = max(L * kept, kept + (L - 1) * block_grads)  # at the first block's backward, or at the last's
        transient = per_block // 4 + block_grads  # one block's backward: gradients of its intermediates and weights
        return L * kept, max(L * kept + loss_transient, held + (per_block if checkpointed else 0) + transient)

    acts_on, peak_on = peak(True)
    acts_off, peak_off = peak(False)
    on = request.activation_checkpointing
    device, free_bytes = (device, free) if device is not None else free_memory()
    plan = MemoryPlan(request, n_params, n_trainable, weights, 4 * n_trainable, ADAM_BYTES * n_trainable, loss_buffers,
                      acts_on if on else acts_off, acts_off if on else acts_on, peak_on if on else peak_off,
                      peak_off if on else peak_on, _kv_per_token(config), device,
                      free if free is not None else free_bytes)
    plan.suggestions = suggestions(plan) if not plan.fits else []
    return plan


def free_memory() -> tuple[str, int | None]:
    """(device name, free bytes): the first CUDA GPU's free memory, else the CPU's available RAM."""
    if torch.cuda.is_available():
        free, _ = torch.cuda.mem_get_info(0)
        return f"cuda:0 ({torch.cuda.get_device_name(0)})", int(free)
    try:
        with open("/proc/meminfo") as handle:
            info = dict(line.split(":", 1) for line in handle)
        return "cpu", int(info["MemAvailable"].split()[0]) * 1024
    except (OSError, KeyError, ValueError):
        pages = os.sysconf("SC_AVPHYS_PAGES") if hasattr(os, "sysconf") else 0
        return "cpu", (pages * os.sysconf("SC_PAGE_SIZE")) or None


def suggestions(plan: MemoryPlan) -> list[str]:
    """Concrete changes that would make the plan fit, each with the total it would reach; when no
    single one is enough, the first combination (in this order) that is."""
    r = plan.request
    tries: list[tuple[str, dict]] = []
    if not r.activation_checkpointing:
        tries.append(("activation checkpointing (train.activation_checkpointing: true)", {"activation_checkpointing": True}))
    if r.batch_size > 1:
        half = r.batch_size // 2
        tries.append((f"half the micro-batch, twice the accumulation (train.batch_size: {half}, "
                      f"train.grad_accum: {2 * r.grad_accum}; the same tokens per step)",
                      {"batch_size": half, "grad_accum": 2 * r.grad_accum}))
    if r.precision == "float32":
        tries.append(("bfloat16 autocast (train.precision: bfloat16)", {"precision": "bfloat16"}))
    if not r.lora_rank:
        tries.append(("LoRA adapters instead of every weight (--lora.rank 8)", {"lora_rank": 8}))
    if not r.bits:
        tries.append(("LoRA on a 4-bit frozen base (QLoRA)", {"bits": 4, "lora_rank": r.lora_rank or 8}))
    out, combined, names = [], r, []
    for text, change in tries:
        single = _replanned(plan, dataclasses.replace(r, **change))
        if single.total < plan.total:  # a change that does not help (e.g. checkpointing when gradients dominate) is left out
            out.append(f"{text}: {_gib(single.total)}{' (fits)' if single.fits else ''}")
        combined, names = dataclasses.replace(combined, **change), [*names, text.split(" (")[0]]
        together = _replanned(plan, combined)
        if len(names) > 1 and together.fits and not any(s.endswith("(fits)") for s in out):
            out.append(f"together, {' + '.join(names)}: {_gib(together.total)} (fits)")
            break
    return out


def _replanned(plan: MemoryPlan, request: PlanRequest) -> MemoryPlan:
    """`request` planned against the same free memory, without suggestions of its own."""
    other = dataclasses.replace(plan_memory(request, free=10**18, device=plan.device), free=plan.free)
    return other


# ---------------------------------------------------------------- recipes, refusal, picture


def request_from_recipe(recipe: dict) -> PlanRequest:
    """The plan of a training recipe: its model (`model:` with the data's tokenizer, or `finetune.base`),
    `train.batch_size`, `data.seq_len`, `train.precision`, `lora.rank` and checkpointing. A DPO recipe
    scores a chosen and a rejected sequence per row, so its batch counts twice."""
    from lmforge.checkpoint import load_model_config
    from lmforge.config import build
    from lmforge.data.rows import context_length
    from lmforge.diagnose.corpus import load_tokenizer
    from lmforge.train.loop import TrainConfig
    from lmforge.train.lora import LoraConfig
    from lmforge.train.pretrain import model_config_for
    from lmforge.train.setup import renamed

    recipe = renamed(recipe)
    data = dict(recipe.get("data") or {})
    if (recipe.get("finetune") or {}).get("base"):
        config = load_model_config(recipe["finetune"]["base"])
    elif "model" in recipe:
        tokenizer = data.get("tokenizer") or (f"{data['shards']}/tokenizer" if data.get("shards") else None)
        if tokenizer is None:
            raise LmforgeError("the recipe's data section names no tokenizer or shards; the plan needs the vocabulary size")
        config = model_config_for(dict(recipe["model"] or {}), load_tokenizer(tokenizer))
    else:
        raise LmforgeError("the recipe has neither a model section nor finetune.base; which model should be planned?")
    train, lora = build(TrainConfig, recipe.get("train"), "train"), build(LoraConfig, recipe.get("lora"), "lora")
    pairs = 2 if "dpo" in recipe else 1
    return PlanRequest(config, train.batch_size * pairs, context_length(int(data.get("seq_len") or 0), config.max_seq_len),
                       train.precision, lora.rank, tuple(lora.targets), None, train.activation_checkpointing,
                       train.grad_accum)


def refuse_if_too_big(recipe: dict) -> MemoryPlan | None:
    """Raise a one-line LmforgeError when the recipe's plan exceeds free memory (unless train.check_memory is false)."""
    if not (recipe.get("train") or {}).get("check_memory", True):
        return None
    try:
        plan = plan_memory(request_from_recipe(recipe))
    except LmforgeError:
        return None  # a recipe that cannot be planned is one the verb refuses itself, in its own words
    if not plan.fits:
        raise LmforgeError(f"this run needs about {_gib(plan.total)} at the peak of a step but {_gib(plan.free)} is free on "
                           f"{plan.device}; " + "; ".join(plan.suggestions)
                           + "; or set train.check_memory: false to start anyway (`lmforge plan --config` shows the plan)")
    return plan


def plot_plan(plan: MemoryPlan, path: str) -> None:
    """plan.png: the parts of the peak, with and without activation checkpointing, against free memory."""
    from pathlib import Path

    from lmforge.figures import new_figure, save_figure

    fig = new_figure((8, 4.5))
    ax = fig.add_subplot()
    on = plan.request.activation_checkpointing
    columns = {f"checkpointing {'on' if on else 'off'}": plan.backward_peak,
               f"checkpointing {'off' if on else 'on'}": plan.backward_peak_other}
    parts = [("weights", plan.weights), ("optimizer state", plan.optimizer), ("loss buffers", plan.loss_buffers)]
    for x, backward in enumerate(columns.values()):
        bottom = 0.0
        for i, (name, size) in enumerate([*parts, ("activations + gradients (backward peak)", backward)]):
            ax.bar(x, size / GIB, bottom=bottom, color=f"C{i}", label=name if x == 0 else None)
            bottom += size / GIB
    if plan.free is not None and plan.free < 3 * max(plan.total, plan.total_other):
        ax.axhline(plan.free / GIB, color="red", linestyle="--", label=f"free on {plan.device}")
    ax.set(xticks=range(len(columns)), ylabel="GiB",
           title=f"peak memory of a training step ({plan.request.batch_size} x {plan.request.seq_len} tokens)")
    ax.set_xticklabels(list(columns))
    ax.legend(fontsize=8)
    save_figure(fig, Path(path))
