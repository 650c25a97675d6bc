"""Helpers shared by tests in several folders (a plain module: importing from conftest.py collides across folders)."""

from __future__ import annotations

import json
import os
import platform
import shutil
import subprocess
import sys
from pathlib import Path

import torch

CHOSEN, REJECTED = " the quick brown fox.", " the lazy dog."
BUILDABLE = (platform.machine().lower() in ("x86_64", "amd64") and shutil.which("cc") is not None
             and torch.backends.cpu.get_cpu_capability() in ("AVX2", "AVX512"))  # can the native kernels be built here?


def write_jsonl(path: Path, rows: list) -> Path:
    """One line per row: objects as JSON, strings as they are (for malformed lines)."""
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


def quick_train(steps: int, **overrides) -> dict:
    """A train section for runs of a few steps."""
    return {"steps": steps, "batch_size": 4, "lr": 1e-2, "min_lr": 1e-2, "schedule": "constant", "warmup_steps": 0,
            "eval_every": 0, "save_every": 0, "log_every": 1, "seed": 0, **overrides}


def run_cli(*args: object, cwd: Path | None = None) -> subprocess.CompletedProcess:
    """`lmforge ARGS...` in a fresh process on one thread, as a user runs it."""
    return subprocess.run([sys.executable, "-m", "lmforge.cli", *map(str, args)], capture_output=True, text=True,
                          timeout=300, cwd=cwd, env={**os.environ, "OMP_NUM_THREADS": "1"})
