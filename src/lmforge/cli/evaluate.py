"""`lmforge eval`: lm-evaluation-harness task files on any model lmforge loads.

Parses, loads the model (`lmforge.load`: run folders, Hugging Face folders, quantized folders, LoRA
adapters), runs each task through the harness (`evaluate/harness.py`) with a progress bar in
requests per second, prints lm-eval's results table and writes the JSON and the charts. Library
modules are imported inside the command, so `lmforge --help` starts without loading torch.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

Setup = Callable[[argparse.ArgumentParser], None]
REPO_TASKS = Path(__file__).resolve().parents[3] / "tasks"  # the shipped task files, in a source checkout


def shot_counts(text: str | None) -> list[int | None]:
    """`--num-fewshot`: None (each task's own), one count, or a comma list for a sweep."""
    from lmforge.errors import LmforgeError

    if text is None:
        return [None]
    try:
        counts = [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise LmforgeError(f"--num-fewshot {text!r}: give a number or a comma list such as 0,1,5") from None
    if not counts or min(counts) < 0:
        raise LmforgeError(f"--num-fewshot {text!r}: counts must be 0 or more")
    return list(dict.fromkeys(counts))


def include_paths(given: list[str]) -> list[Path]:
    """The shipped tasks/, ./tasks, then the --include-path folders (later ones win on a name)."""
    from lmforge.errors import LmforgeError

    paths = [p for p in (REPO_TASKS, Path("tasks")) if p.is_dir()]
    for folder in given:
        if not Path(folder).is_dir():
            raise LmforgeError(f"--include-path {folder} is not a folder of task YAML files")
        paths.append(Path(folder))
    return list(dict.fromkeys(p.resolve() for p in paths))


def _progress_bars(bars: list[Any]) -> Callable[[str, int], Callable[[int], None]]:
    """A factory of tqdm bars on stderr (requests per second), one per task; `bars` keeps them to close."""
    from tqdm.auto import tqdm

    def make(task: str, total: int) -> Callable[[int], None]:
        bar = tqdm(total=total, desc=task, unit="req", file=sys.stderr, dynamic_ncols=True, leave=False)
        bars.append(bar)
        return bar.update

    return make


def cmd_eval(args: argparse.Namespace) -> None:
    import lmforge
    from lmforge.evaluate.harness import evaluate_task, find_tasks
    from lmforge.evaluate.report import plot_bars, plot_shots, results_table, write_results
    from lmforge.evaluate.scorer import Scorer

    sweep = shot_counts(args.num_fewshot)
    tasks = find_tasks([t for t in args.tasks.split(",") if t], include_paths(args.include_path))
    lm = lmforge.load(args.model, device=args.device)
    if lm.tokenizer is None:
        from lmforge.errors import LmforgeError

        raise LmforgeError(f"{args.model} has no tokenizer.json; evaluation turns text into tokens and needs one")
    scorer = Scorer(lm.model, lm.tokenizer, batch_size=args.batch_size, make_request=lm.request)
    bars: list[Any] = []
    runs: dict[int, list[Any]] = {}
    for k in sweep:
        results = []
        for spec, group in tasks:
            result = evaluate_task(scorer, spec, num_fewshot=k, seed=args.seed, limit=args.limit,
                                   bootstrap_iters=args.bootstrap_iters, log_samples=args.log_samples,
                                   progress=_progress_bars(bars))
            result.group = group
            results.append(result)
            for bar in bars:
                bar.close()
            bars.clear()
        runs[-1 if k is None else k] = results
        print(results_table(results) + "\n")
    everything = [r for results in runs.values() for r in results]
    config = {"model": str(args.model), "num_fewshot": args.num_fewshot, "batch_size": args.batch_size,
              "limit": args.limit, "fewshot_seed": args.seed, "bootstrap_iters": args.bootstrap_iters}
    stem = Path(args.output) if args.output else Path("eval_results.json")
    if args.output:
        write_results(stem, everything, config)
        print(f"wrote {stem}")
    chart = stem.with_suffix(".png")
    plot_bars(chart, everything, f"{Path(args.model).name}")
    print(f"wrote {chart}")
    if len(sweep) > 1:
        curve = stem.with_name(stem.stem + "_shots.png")
        plot_shots(curve, runs, f"{Path(args.model).name}: zero- and few-shot")
        print(f"wrote {curve}")


def setup_eval(p: argparse.ArgumentParser) -> None:
    p.add_argument("model", help="run folder, Hugging Face folder, quantized folder or LoRA adapter folder")
    p.add_argument("--tasks", required=True, help="comma list of task or group names, or task YAML paths")
    p.add_argument("--include-path", action="append", default=[], metavar="DIR",
                   help="a folder of lm-eval task YAML files (repeatable; tasks/ is always searched)")
    p.add_argument("--limit", type=int, default=None, metavar="N", help="evaluate the first N documents of each task")
    p.add_argument("--num-fewshot", default=None, metavar="K",
                   help="few-shot examples (default: each task's own); a comma list such as 0,1,5 sweeps and "
                        "plots the metric against the count")
    p.add_argument("--batch-size", type=int, default=16, help="requests per forward pass (generation: sequences "
                                                              "decoded together)")
    p.add_argument("--seed", type=int, default=1234, help="few-shot sampling seed (lm-eval's default 1234)")
    p.add_argument("--bootstrap-iters", type=int, default=100000,
                   help="bootstrap resamples for the standard error of perplexity and corpus metrics "
                        "(lm-eval's default; 0 = none)")
    p.add_argument("--output", default=None, metavar="PATH",
                   help="write the results JSON here (the bar chart goes beside it as PATH.png)")
    p.add_argument("--log-samples", action="store_true", help="put every document, prompt and answer in the JSON")
    p.add_argument("--device", default="cpu", help="cpu, cuda, cuda:1, mps")
    p.set_defaults(func=cmd_eval)


VERBS: dict[str, tuple[str, Setup]] = {  # verb -> (one-line help, adds its arguments)
    "eval": ("evaluate a model on lm-eval task files (zero-/few-shot, perplexity, generation)", setup_eval),
}
