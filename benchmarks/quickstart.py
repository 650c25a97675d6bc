"""`lmforge quickstart` end to end: how long the main job takes, and what it reaches.

The same function the command runs (tokenizer, shards, pretraining, samples) on the standard
library's source, in a temporary folder. Its wall time is what a new user waits on a machine
like this one; its validation bits per byte say whether the small model learned anything in
that time (the validation split is the last 5% of the corpus, never trained on).

    python benchmarks/quickstart.py            # last line: val_bpb=X wall_s=T
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

from lmforge.quickstart import quickstart


def last_eval_bpb(metrics: Path) -> float:
    """Bits per byte of the last evaluation logged in a run's metrics.jsonl (nan if none was)."""
    values = [record["eval_bpb"] for record in map(json.loads, metrics.read_text().splitlines()) if "eval_bpb" in record]
    return values[-1] if values else float("nan")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=None, help="pretraining steps (default: quickstart's own)")
    args = parser.parse_args()
    start = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="quickstart-") as tmp:
        out = quickstart(out_dir=Path(tmp) / "run", steps=args.steps)
        bpb = last_eval_bpb(out / "metrics.jsonl")
    print(f"val_bpb={bpb:.3f} wall_s={time.monotonic() - start:.0f}")


if __name__ == "__main__":
    main()
