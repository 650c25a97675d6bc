"""Weight-name rules and transforms: the small language the Hugging Face family tables are written in.

A rule is `(our names, their name, transform)`. `{i}` stands for a layer, `{e}` for an expert;
a name starting with `^` is outside the family's key prefix (e.g. `lm_head.weight`). A transform is
a named pair (load, save): `copy`, `transpose` (GPT-2's Conv1D stores weights as in x out), and
`split` / `split_t` for fused projections, cut into pieces the sizes of our tensors (so grouped-query
attention's smaller k/v need no extra data) and concatenated again on save. The tables themselves,
and every family name, live in `checkpoint/hf.py`.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from lmforge.checkpoint.io import unique_state
from lmforge.errors import LmforgeError

# load: (their tensor, first-dim sizes of our tensors) -> our tensors; save: our tensors -> theirs
Transform = tuple[Callable[[Tensor, tuple[int, ...]], tuple[Tensor, ...]], Callable[[tuple[Tensor, ...]], Tensor]]


def _split(t: Tensor, sizes: tuple[int, ...]) -> tuple[Tensor, ...]:
    """Rows cut into pieces of `sizes`; a tensor with another row count is passed on whole, so the
    shape check names it instead of failing inside torch."""
    return t.split(sizes, dim=0) if t.shape[0] == sum(sizes) else (t,) * len(sizes)


TRANSFORMS: dict[str, Transform] = {
    "copy": (lambda t, sizes: (t,), lambda ts: ts[0]),
    "transpose": (lambda t, sizes: (t.t(),), lambda ts: ts[0].t()),
    "split": (_split, lambda ts: torch.cat(ts, dim=0)),
    "split_t": (lambda t, sizes: _split(t.t(), sizes), lambda ts: torch.cat(ts, dim=0).t()),
}


@dataclass(frozen=True)
class Rule:
    ours: tuple[str, ...]  # lmforge names, e.g. ("layers.{i}.attn.q.weight",)
    theirs: str  # Hugging Face name relative to the family prefix ("^" = absolute)
    transform: str = "copy"


def rules(*rows: tuple) -> tuple[Rule, ...]:
    """Rules from rows `(ours, theirs[, transform])`, where `ours` is one name or a tuple of names."""
    return tuple(Rule((r[0],) if isinstance(r[0], str) else r[0], *r[1:]) for r in rows)


def _pattern(template: str) -> re.Pattern[str]:
    escaped = re.escape(template).replace(r"\{i\}", r"(?P<i>\d+)").replace(r"\{e\}", r"(?P<e>\d+)")
    return re.compile(f"^{escaped}$")


def hf_name(template: str, groups: dict[str, str], prefix: str) -> str:
    name = template.format(**groups)
    return name[1:] if name.startswith("^") else prefix + name


def mapping(model: nn.Module, table: Sequence[Rule], fmt: str, prefix: str) -> list[tuple[tuple[str, ...], str, str]]:
    """(our names, their name, transform) for every unique tensor of `model` under the rules `table` of format `fmt`."""
    ours = unique_state(model)
    out, covered = [], set()
    for rule in table:
        first = _pattern(rule.ours[0])
        for name in ours:
            m = first.match(name)
            if m is None:
                continue
            group = tuple(t.format(**m.groupdict()) for t in rule.ours)
            out.append((group, hf_name(rule.theirs, m.groupdict(), prefix), rule.transform))
            covered.update(group)
    uncovered = sorted(set(ours) - covered)
    if uncovered:
        raise LmforgeError(f"the {fmt} format has no place for {uncovered[:5]}; save in lmforge format")
    return out


__all__ = ["TRANSFORMS", "Rule", "Transform", "hf_name", "mapping", "rules"]
