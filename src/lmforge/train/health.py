"""Training health the loop records: per-layer gradient norms, update/weight ratios, expert load, attention entropy.

`lmforge doctor RUN` reads what this module writes into metrics.jsonl and turns it into findings.

Design choices:
- Parameters are grouped by layer from their names: `embeddings` (token, position and type
  tables and their norm), `block.<i>` (everything under `layers.<i>.`), and `head` (the final
  norm, the output projection, pooler and task heads). Anything else joins `head`.
- Measuring happens only on the steps that write a metrics line (`log_every`), so its cost is
  divided by `log_every`. On such a step the weights are copied before the optimizer step and
  one fused `torch._foreach_norm` each over the gradients, the weights and the weight changes
  gives every tensor's norm; a scatter-add sums them into layers. `benchmarks/health_overhead.py`
  measures the cost against a step without it.
- Gradients are measured after clipping (the optimizer still holds them) and scaled back by the
  step's clip factor, so the figures are the pre-clip per-layer norms whose total the loop logs
  as `grad_norm`.
- Under FSDP2 the parameters and gradients are DTensor shards: the norms are taken of each
  rank's local shard and the per-layer sums of squares added over ranks (one all-reduce).
- Attention entropy (with `train.watch_attention`) is taken on a fixed probe: the first row of
  the first evaluation batch, so every evaluation looks at the same text.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.distributed.tensor import DTensor

from lmforge.errors import LmforgeError
from lmforge.models.layers import MoE
from lmforge.models.probe import attention_entropy

EMBEDDING_NAMES = ("embed", "positions", "type_embed", "embed_norm", "embed_scale")
PROBE_TOKENS = 128  # the attention probe's length at most


def layer_of(name: str) -> str:
    """The health group of a parameter name: `embeddings`, `block.<i>` or `head`."""
    block = re.search(r"(?:^|\.)layers\.(\d+)\.", name)
    if block:
        return f"block.{block.group(1)}"
    return "embeddings" if any(part in EMBEDDING_NAMES for part in name.split(".")) else "head"


def _local(t: Tensor) -> Tensor:
    """This rank's shard of a DTensor (a view), or `t` itself."""
    return t.to_local() if isinstance(t, DTensor) else t


def _group_order(name: str) -> tuple[int, int]:
    if name == "embeddings":
        return (0, 0)
    if name.startswith("block."):
        return (1, int(name.split(".")[1]))
    return (2, 0)


class HealthRecorder:
    """Measures the layers of `model` whose parameters are in `params` (the optimizer's)."""

    def __init__(self, model: nn.Module, params: Sequence[nn.Parameter]) -> None:
        names = {id(p): name for name, p in model.named_parameters(remove_duplicate=False)}
        labels = [layer_of(names.get(id(p), "")) for p in params]
        self.groups = sorted(set(labels), key=_group_order)
        index = {g: i for i, g in enumerate(self.groups)}
        self.params = list(params)
        self.sharded = any(isinstance(p, DTensor) for p in self.params)  # FSDP2: norms of local shards
        self.group_of = torch.tensor([index[label] for label in labels])  # (n_params,)
        self.moe = [m for m in model.modules() if isinstance(m, MoE)]
        self.probe: Tensor | None = None

    def snapshot(self) -> list[Tensor]:
        """A copy of the weights, taken just before the optimizer step being measured."""
        return torch._foreach_mul([_local(p.detach()) for p in self.params], 1.0)

    def _per_layer(self, *norms: Sequence[Tensor]) -> Tensor:
        """Lists of per-tensor norms -> per-layer norms (len(norms), n_groups), in float64 on the norms'
        device (no host read). All lists in one reduction: a logging step of a small model is
        otherwise a few dozen tiny ops per list (`benchmarks/shakespeare.py`)."""
        squares = torch.stack([torch.stack(list(n)) for n in norms]).double() ** 2  # (lists, n_params); stack promotes mixed dtypes, exactly
        group_of = self.group_of.to(squares.device)
        sums = squares.new_zeros(len(norms), len(self.groups)).index_add_(1, group_of, squares)
        if self.sharded:
            dist.all_reduce(sums, op=dist.ReduceOp.SUM)
        return sums.sqrt()

    def measure(self, before: list[Tensor], grad_norm: float, grad_clip: float) -> dict[str, Any]:
        """Per-layer gradient norms (pre-clip) and update/weight ratios of the step just applied.

        `before` is `snapshot()` from before the step (overwritten here); `grad_norm` is the
        step's pre-clip total, `grad_clip` the clipping threshold (0 = none).
        """
        with_grad = [(i, _local(p.grad)) for i, p in enumerate(self.params) if p.grad is not None]
        grads = [torch.zeros((), device=self.params[0].device)] * len(self.params)
        for i, norm in zip([i for i, _ in with_grad], torch._foreach_norm([g for _, g in with_grad]), strict=True):
            grads[i] = norm
        clipped = grad_clip > 0 and grad_norm > grad_clip
        unclip = (grad_norm + 1e-6) / grad_clip if clipped else 1.0
        weights = [_local(p.detach()) for p in self.params]
        torch._foreach_sub_(before, weights)  # before - after: the update, negated
        grad_layers, update_layers, weight_layers = self._per_layer(grads, torch._foreach_norm(before),
                                                                    torch._foreach_norm(weights))
        grad_values, ratio_values = torch.stack((grad_layers * unclip, update_layers / weight_layers.clamp_min(1e-12))).tolist()  # one host read
        return {"clipped": clipped,
                "layer_grad_norm": dict(zip(self.groups, grad_values, strict=True)),
                "layer_update_ratio": dict(zip(self.groups, ratio_values, strict=True)),
                **self.expert_load()}

    def expert_load(self) -> dict[str, Any]:
        """Tokens routed to each expert of each MoE layer in the last forward; empty without experts."""
        if not self.moe:
            return {}
        return {"expert_tokens": [m.expert_tokens.tolist() for m in self.moe]}

    def attention_entropy(self, model: nn.Module, make_batches: Callable[[], Iterable[dict[str, Tensor]]]) -> list[list[float]]:
        """Normalised attention entropy per layer and head on the probe (0 collapsed, 1 uniform)."""
        if self.probe is None:
            batch = next(iter(make_batches()), None)
            if batch is None or "input_ids" not in batch:
                raise LmforgeError("train.watch_attention needs evaluation batches with input_ids; "
                                   "give the run evaluation data or set train.watch_attention false")
            self.probe = batch["input_ids"][:1, :PROBE_TOKENS]  # (1, T)
        device = next(model.parameters()).device
        entropy = attention_entropy(model, self.probe.to(device))
        return [[h if math.isfinite(h) else 0.0 for h in layer] for layer in entropy]
