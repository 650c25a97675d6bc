"""Reporting from the training loop: callbacks, metrics.jsonl, loss.png, progress bar, TensorBoard.

Design choices:
- The loop reports only through `Callback` objects and the two files it owns
  (`metrics.jsonl`, `loss.png`); it never prints. A command that wants a progress bar adds
  `ProgressBar`; a notebook can add its own callback.
- Callbacks run on rank 0 only. A callback ends training early by raising `StopTraining`;
  the loop then saves the final checkpoint and returns `stopped_early=True`.
- `metrics.jsonl` holds one JSON object per line, `{"kind": "train"|"eval", "step": ..., ...}`;
  non-finite numbers are written as null so every line is strict JSON. On resume it is cut
  back to the checkpoint's step, so an interrupted-and-resumed run leaves the same file as
  an uninterrupted one (apart from timings).
- The plot uses matplotlib's object API with the Agg canvas: no pyplot, no global backend.
  The loop redraws it at most every 30 s during a run (`LossPlot`) and always at its end.
- TensorBoard is optional and imported lazily; without it the callback logs a warning and
  does nothing.
"""

from __future__ import annotations

import json
import logging
import math
import os
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, TextIO

from lmforge.figures import new_figure, save_figure

if TYPE_CHECKING:
    from lmforge.train.loop import TrainConfig, TrainResult

log = logging.getLogger(__name__)


class StopTraining(Exception):
    """Raised by a callback to end training after the current step (the final checkpoint is saved)."""


class Callback:
    """Hooks the loop calls on rank 0; override the ones you need."""

    def on_train_start(self, start_step: int, cfg: TrainConfig) -> None:
        """Training begins (at `start_step` > 0 when resuming)."""

    def on_step(self, step: int, metrics: dict[str, float]) -> None:
        """Optimizer step `step` (1-based) finished; `metrics` holds loss, lr, grad_norm, ..."""

    def on_eval(self, step: int, metrics: dict[str, float]) -> None:
        """An evaluation at `step` finished; `metrics` holds eval_loss, eval_ppl, ..."""

    def on_save(self, step: int, path: Path) -> None:
        """A complete checkpoint for `step` is now at `path`."""

    def on_train_end(self, result: TrainResult) -> None:
        """Training finished normally."""

    def close(self) -> None:
        """Release resources; called after training, also when it failed."""


def json_safe(value: Any) -> Any:
    """`value` with non-finite floats replaced by None (strict JSON has no NaN)."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_safe(v) for v in value]
    return value


class MetricsWriter:
    """Appends one JSON object per line to `path`."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def write(self, kind: str, step: int, metrics: dict[str, Any]) -> None:
        """Append `{"kind": kind, "step": step, **metrics}`."""
        record = json_safe({"kind": kind, "step": step, **metrics})
        with self.path.open("a") as f:
            f.write(json.dumps(record, allow_nan=False) + "\n")

    def truncate_after(self, step: int) -> None:
        """Drop the records logged after `step` (all of them when step is 0)."""
        if not self.path.is_file():
            return
        kept = [line for line in self.path.read_text().splitlines() if _line_step(line) <= step]
        tmp = self.path.with_name(self.path.name + ".tmp")
        tmp.write_text("".join(line + "\n" for line in kept))
        os.replace(tmp, self.path)


def _line_step(line: str) -> float:
    try:
        return float(json.loads(line)["step"])
    except (ValueError, KeyError, TypeError):
        return math.inf  # a torn last line from a killed run: drop it


def read_metrics(path: Path) -> list[dict[str, Any]]:
    """The records of a metrics.jsonl file."""
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


Curve = tuple[Sequence[Sequence[float]], str, str]  # (step, value) points, matplotlib style, label


def plot_curves(path: Path, curves: Sequence[Curve], *, ylabel: str, title: str) -> None:
    """Draw each curve's values against step into the PNG `path` (written atomically)."""
    fig = new_figure((8, 5))
    ax = fig.add_subplot()
    for points, style, label in curves:
        if points:
            ax.plot([s for s, _ in points], [v for _, v in points], style, label=label)
    ax.set(xlabel="step", ylabel=ylabel, title=title)
    ax.grid(True, alpha=0.3)
    if any(points for points, _, _ in curves):
        ax.legend()
    save_figure(fig, path)


def plot_losses(
    path: Path, train: Sequence[Sequence[float]], evals: Sequence[Sequence[float]], title: str = "Training loss"
) -> None:
    """Draw train and validation loss against step into the PNG `path` (written atomically)."""
    plot_curves(path, [(train, "-", "train"), (evals, "o-", "validation")],
                ylabel="loss (nats per target token)", title=title)


class LossPlot:
    """A run's loss.png, redrawn at most every `interval_s` seconds, and whenever the final picture
    is asked for. A drawing is costly matplotlib work and a small model evaluates every few
    seconds: drawing at every evaluation would add percents to its run (`benchmarks/shakespeare.py`)."""

    def __init__(self, path: Path, interval_s: float = 30.0) -> None:
        self.path, self.interval_s = path, interval_s
        self.drawn_at = time.monotonic()  # the first drawing waits an interval too

    def update(self, train: Sequence[Sequence[float]], evals: Sequence[Sequence[float]], final: bool = False) -> None:
        now = time.monotonic()
        if final or now - self.drawn_at >= self.interval_s:
            plot_losses(self.path, train, evals)
            self.drawn_at = now


class ProgressBar(Callback):
    """A tqdm bar on stderr showing loss, tokens/s, learning rate and ETA."""

    def __init__(self, total_steps: int, file: TextIO | None = None) -> None:
        self.total_steps = total_steps
        self.file = file
        self.bar: Any = None

    def on_train_start(self, start_step: int, cfg: TrainConfig) -> None:
        from tqdm.auto import tqdm

        self.bar = tqdm(total=self.total_steps, initial=start_step, unit="step",
                        dynamic_ncols=True, file=self.file or sys.stderr)

    def on_step(self, step: int, metrics: dict[str, float]) -> None:
        if self.bar is None:
            return
        self.bar.update(step - self.bar.n)
        self.bar.set_postfix(loss=f"{metrics['loss']:.4f}", tok_s=f"{metrics['tokens_per_s']:.0f}",
                             lr=f"{metrics['lr']:.2e}", refresh=False)

    def on_eval(self, step: int, metrics: dict[str, float]) -> None:
        if self.bar is not None:
            self.bar.set_postfix_str(f"eval_loss={metrics['eval_loss']:.4f}")

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None


class TensorBoardCallback(Callback):
    """Writes train and eval scalars for TensorBoard, if the `tensorboard` package is installed."""

    def __init__(self, log_dir: Path) -> None:
        self.log_dir = log_dir
        self.writer: Any = None

    def on_train_start(self, start_step: int, cfg: TrainConfig) -> None:
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError:
            log.warning("tensorboard is not installed (pip install tensorboard); not writing TensorBoard logs")
            return
        self.writer = SummaryWriter(log_dir=str(self.log_dir))

    def _add(self, prefix: str, step: int, metrics: dict[str, float]) -> None:
        if self.writer is None:
            return
        for key, value in metrics.items():
            if isinstance(value, (int, float)) and math.isfinite(value):
                self.writer.add_scalar(f"{prefix}/{key}", value, step)

    def on_step(self, step: int, metrics: dict[str, float]) -> None:
        self._add("train", step, metrics)

    def on_eval(self, step: int, metrics: dict[str, float]) -> None:
        self._add("eval", step, metrics)

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
            self.writer = None
