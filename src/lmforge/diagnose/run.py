"""A training run as the doctor reads it: the records of metrics.jsonl and the run's train config.

The loop writes one `train` record every `log_every` steps (with the health record of
`train/health.py`) and one `eval` record per evaluation. Reading is tolerant of what a killed run
leaves (a torn last line), and strict about what makes a diagnosis impossible, which it says in
one line.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from lmforge.errors import LmforgeError

METRICS = "metrics.jsonl"
TRAIN_STATE = "train_state.json"

Points = list[tuple[int, float]]  # (step, value)


@dataclass
class RunHistory:
    """What a run recorded: train and eval records in step order, and its train config (if saved)."""

    folder: Path
    train: list[dict[str, Any]]
    evals: list[dict[str, Any]]
    config: dict[str, Any] = field(default_factory=dict)  # train_state.json's "config" (TrainConfig fields)

    def series(self, key: str, kind: str = "train") -> Points:
        """(step, value) of every record of `kind` with a finite number under `key`."""
        records = self.train if kind == "train" else self.evals
        return [(r["step"], float(r[key])) for r in records if _finite(r.get(key))]

    def with_key(self, key: str, kind: str = "train") -> list[dict[str, Any]]:
        """The records of `kind` that hold `key`."""
        return [r for r in (self.train if kind == "train" else self.evals) if r.get(key) is not None]


def _finite(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def is_run_folder(folder: Path) -> bool:
    """True when `folder` looks like a training run (metrics or periodic checkpoints); a checkpoint
    folder of its own (model files and a train state) is a model folder."""
    return (folder / METRICS).is_file() or (folder / "checkpoints").is_dir()


def _records(path: Path) -> list[dict[str, Any]]:
    records = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            record = json.loads(line)
        except ValueError:
            continue  # a torn line from a killed run
        if isinstance(record, dict) and "step" in record:
            records.append(record)
    return records


def _train_config(folder: Path) -> dict[str, Any]:
    """The TrainConfig fields of the run's newest train state, or {} when none was saved."""
    candidates = [folder / TRAIN_STATE, *sorted((folder / "checkpoints").glob(f"*/{TRAIN_STATE}"), reverse=True)]
    for path in candidates:
        if path.is_file():
            try:
                return dict(json.loads(path.read_text(encoding="utf-8")).get("config") or {})
            except (ValueError, AttributeError):
                continue
    return {}


def read_run(folder: str | Path) -> RunHistory:
    """The history of the run in `folder`; LmforgeError (one line) when there is nothing to diagnose."""
    folder = Path(folder)
    if not folder.is_dir():
        raise LmforgeError(f"run folder {folder} does not exist; pass the out_dir of a training run")
    path = folder / METRICS
    if not path.is_file():
        raise LmforgeError(f"{folder} has no {METRICS}; training writes it every train.log_every steps, "
                           "so this run stopped before its first logged step (or is not a run folder)")
    records = _records(path)
    train = [r for r in records if r.get("kind") == "train"]
    if not train:
        raise LmforgeError(f"{path} holds no training steps; let the run reach train.log_every steps first")
    return RunHistory(folder, train, [r for r in records if r.get("kind") == "eval"], _train_config(folder))
