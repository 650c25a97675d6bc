"""The doctor's picture, doctor.png: the loss, per-layer gradient norms over steps, attention entropy per head.

matplotlib's object API on the Agg canvas (no pyplot, no global backend), written atomically by
`lmforge.figures.save_figure`, as loss.png is.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import TYPE_CHECKING

from lmforge.diagnose.run import RunHistory
from lmforge.figures import new_figure, save_figure

if TYPE_CHECKING:
    from matplotlib.axes import Axes
    from matplotlib.figure import Figure

def _loss_panel(ax: Axes, run: RunHistory) -> None:
    train, evals = run.series("loss"), run.series("eval_loss", "eval")
    ax.plot([s for s, _ in train], [v for _, v in train], "-", label="train")
    if evals:
        ax.plot([s for s, _ in evals], [v for _, v in evals], "o-", label="validation")
    spikes = [(r["step"], r["loss"]) for r in run.train if r.get("loss_spike") and r.get("loss") is not None]
    if spikes:
        ax.plot([s for s, _ in spikes], [v for _, v in spikes], "rx", markersize=10, label="loss spike")
    for step in [r["step"] for r in run.train if r.get("skipped")]:
        ax.axvline(step, color="red", alpha=0.3)
    ax.set(xlabel="step", ylabel="loss (nats per target token)", title="Loss")
    ax.grid(True, alpha=0.3)
    ax.legend()


def _gradient_panel(fig: Figure, ax: Axes, run: RunHistory) -> None:
    records = run.with_key("layer_grad_norm")
    if not records:
        ax.set_axis_off()
        ax.set_title("no per-layer gradient norms recorded")
        return
    layers = list(records[-1]["layer_grad_norm"])
    grid = [[math.log10(v) if v and v > 0 else math.nan for v in (r["layer_grad_norm"].get(name) for name in layers)]
            for r in records]  # (steps, layers)
    image = ax.imshow(list(map(list, zip(*grid, strict=True))), aspect="auto", interpolation="nearest", cmap="viridis",
                      extent=(records[0]["step"], records[-1]["step"], len(layers) - 0.5, -0.5))
    ax.set_yticks(range(len(layers)), layers)
    ax.set(xlabel="step", title="Gradient norm per layer (log10)")
    fig.colorbar(image, ax=ax)


def _entropy_panel(fig: Figure, ax: Axes, run: RunHistory) -> None:
    records = run.with_key("attn_entropy", "eval")
    if not records:
        ax.set_axis_off()
        ax.set_title("attention entropy not recorded (train.watch_attention: true)")
        return
    entropy = records[-1]["attn_entropy"]  # (layers, heads)
    image = ax.imshow(entropy, vmin=0.0, vmax=1.0, cmap="magma", aspect="auto", interpolation="nearest")
    for i, layer in enumerate(entropy):
        for j, h in enumerate(layer):
            ax.text(j, i, f"{h:.2f}", ha="center", va="center", color="white" if h < 0.6 else "black", fontsize=8)
    ax.set_xticks(range(len(entropy[0])))
    ax.set_yticks(range(len(entropy)))
    ax.set(xlabel="head", ylabel="layer", title=f"Attention entropy at step {records[-1]['step']} (0 one token, 1 uniform)")
    fig.colorbar(image, ax=ax)


def plot_doctor(run: RunHistory, path: Path) -> None:
    """doctor.png: the loss with spikes marked, gradient norms per layer over steps, attention entropy per head."""
    fig = new_figure((8, 12))
    axes = fig.subplots(3, 1)
    _loss_panel(axes[0], run)
    _gradient_panel(fig, axes[1], run)
    _entropy_panel(fig, axes[2], run)
    save_figure(fig, path)
