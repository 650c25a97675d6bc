"""The doctor: the classic ways a language-model run goes wrong, each named from a run's own records.

Every check reads `RunHistory` (metrics.jsonl) and returns at most one `Finding` with a stable
`code` (scripts and CI act on it), a severity, the evidence in numbers, and what to change. The
thresholds are heuristics, chosen to name each failure the tests provoke (huge learning rate,
vanishing gradients, overfitting, a head forced uniform) and to stay silent on a healthy run:

- exploding_gradients: clipped on at least half of the logged steps (the issue's definition);
  an error when the median norm is 10x the clip threshold.
- vanishing_gradients: the first block's gradient norm below 1/100 of the last block's (median).
- loss_spikes: the loop's rolling z-score flag (`train/monitor.py`).
- non_finite: any step skipped for a NaN/inf loss or gradient.
- overfitting: validation loss 5% above its best while the training loss kept falling.
- undertrained: the last fifth of the run still gave 15% of the whole loss drop.
- lr_too_high: the loss rose 50% above its first logged value, or weights moved >10% per step.
- lr_too_low: weights moved <1e-5 per step and the loss fell by less than 5%.
- collapsed_attention: half the heads or more with entropy <0.05 (each looks at one token; a few
  such heads, e.g. previous-token heads, are healthy), or a head at ~1 (uniform) while most focus.
- dead_experts: an expert that got no token in the last quarter of the logged steps.
- low_diversity: samples with distinct-2 below half the training text's, or 2x its repetition.
"""

from __future__ import annotations

import statistics
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from typing import Any

from lmforge.diagnose.run import RunHistory
from lmforge.evaluate.diversity import diversity_report, reference_pieces

CODES = ("exploding_gradients", "vanishing_gradients", "loss_spikes", "non_finite", "overfitting", "undertrained",
         "lr_too_high", "lr_too_low", "collapsed_attention", "dead_experts", "low_diversity")
SEVERITIES = ("error", "warning", "info")  # most serious first


@dataclass(frozen=True)
class Finding:
    """One diagnosis: a stable code, how serious it is, what shows it, and what to change."""

    code: str  # one of CODES
    severity: str  # one of SEVERITIES
    evidence: str  # the numbers that show it
    advice: str  # what to change

    def as_dict(self) -> dict[str, str]:
        return asdict(self)


def _steps(steps: Sequence[int], at_most: int = 6) -> str:
    shown = ", ".join(str(s) for s in steps[:at_most])
    return shown + (f" and {len(steps) - at_most} more" if len(steps) > at_most else "")


def _chunk_means(values: Sequence[float], parts: int = 5) -> list[float]:
    size = len(values) / parts
    return [statistics.fmean(values[round(i * size): max(round((i + 1) * size), round(i * size) + 1)])
            for i in range(parts)]


# ---------------------------------------------------------------- gradients


def check_exploding(run: RunHistory) -> Finding | None:
    flags = [bool(r["clipped"]) for r in run.with_key("clipped")]
    norms = [v for _, v in run.series("grad_norm")]
    if not flags or sum(flags) < 0.5 * len(flags) or not norms:
        return None
    clip = run.config.get("grad_clip")
    median, peak = statistics.median(norms), max(norms)
    severe = bool(clip) and median > 10 * clip
    return Finding("exploding_gradients", "error" if severe else "warning",
                   f"gradients were clipped on {sum(flags)} of {len(flags)} logged steps (median norm {median:.3g}, "
                   f"peak {peak:.3g}{f', clip threshold {clip:g}' if clip else ''})",
                   "lower train.lr (try 3-10x lower) or lengthen train.warmup_steps; keep train.grad_clip at 1.0")


def _block_norms(record: dict[str, Any]) -> list[float]:
    layers = record["layer_grad_norm"]
    blocks = sorted((k for k in layers if k.startswith("block.")), key=lambda k: int(k.split(".")[1]))
    return [layers[k] for k in blocks if layers[k] is not None]


def check_vanishing(run: RunHistory) -> Finding | None:
    ratios = []
    for record in run.with_key("layer_grad_norm"):
        blocks = _block_norms(record)
        if len(blocks) >= 2 and blocks[-1] > 0:
            ratios.append(blocks[0] / blocks[-1])
    if not ratios or statistics.median(ratios) >= 1e-2:
        return None
    n_blocks = len(_block_norms(run.with_key("layer_grad_norm")[-1]))
    return Finding("vanishing_gradients", "warning",
                   f"the first block's gradient norm is {statistics.median(ratios):.1e} of the last block's "
                   f"(block.0 vs block.{n_blocks - 1}, median over {len(ratios)} logged steps): early layers barely learn",
                   "use pre-norm residual blocks, a larger init (model.init_std) with residual projections "
                   "scaled by 1/sqrt(2 x layers), or fewer layers")


# ---------------------------------------------------------------- the loss


def _flagged(run: RunHistory, flag: Callable[[dict[str, Any]], bool], code: str, severity: str, evidence: str,
             advice: str) -> Finding | None:
    """A finding about the logged steps `flag` marks; `evidence` may use {n} and {steps}."""
    steps = [r["step"] for r in run.train if flag(r)]
    return Finding(code, severity, evidence.format(n=len(steps), steps=_steps(steps)), advice) if steps else None


def check_non_finite(run: RunHistory) -> Finding | None:
    return _flagged(run, lambda r: bool(r.get("skipped")) or r.get("loss") is None, "non_finite", "error",
                    "{n} logged steps had a non-finite loss or gradient norm and were skipped (steps {steps})",
                    "lower train.lr, keep train.grad_clip on, train in float32 instead of bfloat16, "
                    "and check the data at those steps for empty or corrupt rows")


def check_spikes(run: RunHistory) -> Finding | None:
    return _flagged(run, lambda r: bool(r.get("loss_spike")), "loss_spikes", "warning",
                    "{n} loss spikes (over 6 standard deviations above the last 100 steps) at steps {steps}",
                    "lower train.lr or lengthen train.warmup_steps, keep train.grad_clip on, "
                    "and look at the batches of those steps for bad data")


def check_overfitting(run: RunHistory) -> Finding | None:
    evals = run.series("eval_loss", "eval")
    if len(evals) < 3:
        return None
    best_step, best = min(evals, key=lambda p: p[1])
    last_step, last = evals[-1]
    train = run.series("loss")
    near_best = [v for s, v in train if s <= best_step] or [train[0][1]]
    if last_step == best_step or last < best * 1.05 + 0.02 or train[-1][1] >= near_best[-1]:
        return None
    return Finding("overfitting", "warning",
                   f"validation loss rose from {best:.3f} at step {best_step} to {last:.3f} at step {last_step} "
                   f"while training loss fell from {near_best[-1]:.3f} to {train[-1][1]:.3f}",
                   f"keep the model of step {best_step} (checkpoints every train.save_every steps) or stop there; "
                   "add data, dropout (model.dropout) or weight decay (train.weight_decay)")


def check_undertrained(run: RunHistory) -> Finding | None:
    losses = [v for _, v in run.series("loss")]
    if len(losses) < 10:
        return None
    means = _chunk_means(losses)
    total, recent = means[0] - means[-1], means[-2] - means[-1]
    if total <= 0 or recent <= 0.15 * total or recent <= 0.01 * abs(means[0]):
        return None
    return Finding("undertrained", "info",
                   f"training loss still fell {recent:.3f} in the last fifth of the run "
                   f"({recent / total:.0%} of its whole drop of {total:.3f})",
                   "train longer (train.steps): the model has not converged")


def _update_ratio(run: RunHistory) -> float | None:
    medians = [statistics.median(v for v in r["layer_update_ratio"].values() if v is not None)
               for r in run.with_key("layer_update_ratio") if r["layer_update_ratio"]]
    return statistics.median(medians) if medians else None


def check_lr_too_high(run: RunHistory) -> Finding | None:
    losses = run.series("loss")
    ratio = _update_ratio(run)
    if len(losses) >= 2:
        first = losses[0][1]
        peak_step, peak = max(losses[1:], key=lambda p: p[1])
        if peak > 1.5 * first:
            return Finding("lr_too_high", "error",
                           f"the training loss rose from {first:.3f} at step {losses[0][0]} to {peak:.3f} at step {peak_step}",
                           "lower train.lr (try 3-10x lower) and lengthen train.warmup_steps")
    if ratio is not None and ratio > 0.1:
        return Finding("lr_too_high", "warning",
                       f"weights change by {ratio:.1%} of their size per step (median update/weight ratio; ~0.1% is typical)",
                       "lower train.lr (try 3-10x lower)")
    return None


def check_lr_too_low(run: RunHistory) -> Finding | None:
    losses = [v for _, v in run.series("loss")]
    ratio = _update_ratio(run)
    if ratio is None or ratio >= 1e-5 or len(losses) < 2 or losses[0] - losses[-1] >= 0.05 * abs(losses[0]):
        return None
    return Finding("lr_too_low", "warning",
                   f"weights change by {ratio:.1e} of their size per step and the loss moved only "
                   f"from {losses[0]:.3f} to {losses[-1]:.3f}",
                   "raise train.lr (try 10x higher)")


# ---------------------------------------------------------------- attention and experts


def check_attention(run: RunHistory) -> Finding | None:
    records = run.with_key("attn_entropy", "eval")
    if not records:
        return None
    entropy = records[-1]["attn_entropy"]
    heads = [h for layer in entropy for h in layer]
    collapsed = [(i, j, h) for i, layer in enumerate(entropy) for j, h in enumerate(layer) if h < 0.05]
    collapsed = collapsed if len(collapsed) >= len(heads) / 2 else []  # one sharp head (previous token) is healthy
    focused = statistics.median(heads) < 0.9
    uniform = [(i, j, h) for i, layer in enumerate(entropy) for j, h in enumerate(layer) if h > 0.99 and focused]
    if not collapsed and not uniform:
        return None
    parts = [f"{len(collapsed)} of {len(heads)} heads attend to a single token "
             f"({', '.join(f'layer {i} head {j}: {h:.2f}' for i, j, h in collapsed[:4])})"] if collapsed else []
    parts += [f"{len(uniform)} heads attend uniformly while most focus "
              f"({', '.join(f'layer {i} head {j}: {h:.2f}' for i, j, h in uniform[:4])})"] if uniform else []
    return Finding("collapsed_attention", "warning",
                   "; ".join(parts) + f" (normalised entropy at step {records[-1]['step']}; 0 = one token, 1 = uniform)",
                   "collapsed heads follow a too-high learning rate (lower train.lr, or use qk-norm); uniform heads "
                   "carry nothing: check their weights were not zeroed or frozen, or prune them")


def check_experts(run: RunHistory) -> Finding | None:
    records = run.with_key("expert_tokens")
    if not records:
        return None
    recent = records[-max(1, len(records) // 4):]
    dead = [(i, e) for i, layer in enumerate(recent[0]["expert_tokens"]) for e in range(len(layer))
            if all(r["expert_tokens"][i][e] == 0 for r in recent)]
    if not dead:
        return None
    return Finding("dead_experts", "warning",
                   f"{len(dead)} experts got no tokens in the last {len(recent)} logged steps "
                   f"({', '.join(f'layer {i} expert {e}' for i, e in dead[:6])})",
                   "raise model.router_aux_loss_coef (load balancing), lower train.lr, or use fewer experts")


CHECKS: tuple[Callable[[RunHistory], Finding | None], ...] = (
    check_non_finite, check_lr_too_high, check_exploding, check_spikes, check_vanishing, check_overfitting,
    check_undertrained, check_lr_too_low, check_attention, check_experts,
)


def diagnose(run: RunHistory) -> list[Finding]:
    """Every finding of the run's records, most serious first."""
    findings = [f for f in (check(run) for check in CHECKS) if f is not None]
    return sorted(findings, key=lambda f: SEVERITIES.index(f.severity))


# ---------------------------------------------------------------- samples


def check_diversity(samples: Sequence[str], reference: str | Sequence[str]) -> Finding | None:
    """low_diversity when the samples are far less varied than the training text (`diversity_report`)."""
    report = diversity_report(samples, reference=reference)
    low = report["distinct_2"] < 0.5 * report["reference_distinct_2"]
    repetitive = report["repetition_rate"] > max(2 * report["reference_repetition_rate"], 0.1)
    if not (low or repetitive):
        return None
    return Finding("low_diversity", "warning",
                   f"{len(samples)} samples: distinct-2 {report['distinct_2']:.2f} (training text "
                   f"{report['reference_distinct_2']:.2f}), repetition {report['repetition_rate']:.2f} "
                   f"(training text {report['reference_repetition_rate']:.2f})",
                   "sample with a higher temperature or top_p, a repetition penalty; train on more varied data, "
                   "or stop before the model collapses onto its training text")


def check_samples(generate: Callable[[str], str], reference: str, n_samples: int = 8) -> Finding | None:
    """Sample `n_samples` continuations of prompts cut from the training text `reference`; `check_diversity`."""
    prompts = [" ".join(piece.split()[:4]) for piece in reference_pieces(reference, n_samples, 16)]
    if not prompts:
        return None
    return check_diversity([generate(prompt) for prompt in prompts], reference)
