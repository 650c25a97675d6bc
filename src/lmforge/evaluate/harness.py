"""The evaluation harness: task names in, per-task metrics (lm-eval's keys and figures) out.

`find_tasks` resolves names against the task files of the include folders (a task's `task:`,
a group's `group:` expanding to its tasks, or a path to a YAML file); `evaluate_task` builds a
task's requests (`prompts.py`), runs them on a `Scorer`, filters the answers and aggregates the
metrics (`task_metrics.py`). Results use lm-eval's layout (`"acc,none"`, `"acc_stderr,none"`),
so a JSON written here reads like lm-eval's.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from lmforge.errors import LmforgeError
from lmforge.evaluate.diversity import diversity_report
from lmforge.evaluate.prompts import FEWSHOT_SEED, DocRequests, build_requests
from lmforge.evaluate.scorer import Progress, Scorer
from lmforge.evaluate.task_metrics import aggregation, apply_filters, doc_values, metric_names, stderr
from lmforge.evaluate.taskfile import TaskSpec, doc_to_target, load_splits, read_yaml, task_spec

BOOTSTRAP_ITERS = 100000  # lm-eval's default


@dataclass
class TaskResult:
    """One task's figures, as lm-eval reports them."""

    name: str
    version: Any
    num_fewshot: int
    metrics: dict[str, float | str]  # "acc,none" -> 0.5, "acc_stderr,none" -> 0.1 or "N/A"
    n_samples: int
    config: dict[str, Any]
    group: str | None = None
    samples: list[dict[str, Any]] = field(default_factory=list)


# ---------------------------------------------------------------- finding tasks


def task_index(include_paths: Iterable[Path]) -> dict[str, tuple[Path, dict[str, Any]]]:
    """name -> (file, merged YAML) of every task and group in the folders (later folders win)."""
    index: dict[str, tuple[Path, dict[str, Any]]] = {}
    for folder in include_paths:
        for path in sorted(Path(folder).rglob("*.yaml")):
            cfg = read_yaml(path)
            for key in ("task", "group"):
                if isinstance(cfg.get(key), str) and (key == "task" or isinstance(cfg.get("task"), list)):
                    index[cfg[key]] = (path, cfg)
    return index


def find_tasks(names: Sequence[str], include_paths: Iterable[Path]) -> list[tuple[TaskSpec, str | None]]:
    """(task, its group or None) for each name: a task, a group of tasks, or a task file's path."""
    index = task_index(include_paths) if any(not n.endswith((".yaml", ".yml")) for n in names) else {}
    out: list[tuple[TaskSpec, str | None]] = []
    for name in names:
        if name.endswith((".yaml", ".yml")):
            path = Path(name)
            out += _expand(path, read_yaml(path), index, None)
        elif name in index:
            out += _expand(*index[name], index, None)
        else:
            known = ", ".join(sorted(index)) or "none"
            raise LmforgeError(f"no task or group named {name!r} (known: {known}); add --include-path DIR with its "
                               "YAML file, or pass the file's path")
    return out


def _expand(path: Path, cfg: dict[str, Any], index: dict[str, tuple[Path, dict[str, Any]]],
            group: str | None) -> list[tuple[TaskSpec, str | None]]:
    members = cfg.get("task")
    if not isinstance(members, list):
        return [(task_spec(cfg, path), group)]
    name = str(cfg.get("group"))
    out: list[tuple[TaskSpec, str | None]] = []
    for member in members:
        if isinstance(member, dict):
            out += _expand(path, member, index, name)
        elif member in index:
            out += _expand(*index[member], index, name)
        else:
            raise LmforgeError(f"group {name} ({path.name}), field task: no task named {member!r}; add its YAML to "
                               "an --include-path folder")
    return out


# ---------------------------------------------------------------- running a task


def shots(spec: TaskSpec, requested: int | None) -> int:
    """The number of few-shot examples: a task file's explicit 0 stays 0 (as lm-eval), else the request,
    else the task file's, else 0."""
    if spec.num_fewshot == 0 or requested is None:
        return spec.num_fewshot or 0
    return requested


def evaluate_task(scorer: Scorer, spec: TaskSpec, *, num_fewshot: int | None = None, seed: int = FEWSHOT_SEED,
                  limit: int | None = None, bootstrap_iters: int = BOOTSTRAP_ITERS, log_samples: bool = False,
                  progress: Callable[[str, int], Progress] | None = None) -> TaskResult:
    """Run one task on the model and aggregate its metrics; `progress(task, n_requests)` gives the
    callback told how many requests each model call finished."""
    k = shots(spec, num_fewshot)
    docs = build_requests(spec, load_splits(spec), k, seed, limit)
    if not docs:
        raise LmforgeError(f"{spec.where('test_split')}: the split has no documents")
    n_requests = sum(len(d.arguments) for d in docs)
    answers = run_requests(scorer, spec, docs, progress(spec.task, n_requests) if progress else None)
    if spec.output_type == "diversity":
        metrics: dict[str, float | str] = {f"{m},none": v for m, v in _diversity(spec, docs, answers).items()}
        filtered: dict[str, list[Any]] = {"none": [a[0] for a in answers]}
    else:
        metrics, filtered = _aggregate(spec, docs, answers, bootstrap_iters)
    samples = [_sample(d, a, {f: v[i] for f, v in filtered.items()}) for i, (d, a) in enumerate(zip(docs, answers))]
    return TaskResult(spec.task, spec.version, k, metrics, len(docs), _config(spec, k), None,
                      samples if log_samples else [])


def run_requests(scorer: Scorer, spec: TaskSpec, docs: list[DocRequests], progress: Progress | None) -> list[list[Any]]:
    """Every document's model answers: (log p, greedy) per pair, log p of a rolled text, or generated text."""
    flat = [(i, arg) for i, d in enumerate(docs) for arg in d.arguments]
    kind = spec.output_type
    if kind in ("multiple_choice", "loglikelihood"):
        results: list[Any] = scorer.loglikelihood([arg for _, arg in flat], progress)
    elif kind == "loglikelihood_rolling":
        results = scorer.loglikelihood_rolling([arg[0] for _, arg in flat], progress)
    else:
        kwargs = spec.generation_kwargs or {}
        results = scorer.generate([arg[0] for _, arg in flat], kwargs["until"], kwargs["max_gen_toks"], progress)
    per_doc: list[list[Any]] = [[] for _ in docs]
    for (i, _), result in zip(flat, results):
        per_doc[i].append(result)
    return per_doc


def _aggregate(spec: TaskSpec, docs: list[DocRequests], answers: list[list[Any]],
               bootstrap_iters: int) -> tuple[dict[str, float | str], dict[str, list[Any]]]:
    metrics = metric_names(spec)
    generated = spec.output_type == "generate_until"
    filtered = apply_filters(spec, [a[0] for a in answers]) if generated else {"none": answers}
    out: dict[str, float | str] = {}
    for filter_name, values in filtered.items():
        per_doc = [doc_values(spec, d.doc, [v] if generated else v, metrics) for d, v in zip(docs, values)]
        for metric, _ in metrics:
            items = [p[metric] for p in per_doc if metric in p]
            if not items:
                continue
            agg = aggregation(spec, metric)
            out[f"{metric},{filter_name}"] = agg(items)
            out[f"{metric}_stderr,{filter_name}"] = stderr(agg, metric, items, bootstrap_iters)
    return out, filtered


def _diversity(spec: TaskSpec, docs: list[DocRequests], answers: list[list[Any]]) -> dict[str, float]:
    """Collapse figures of the generations, and of the documents' targets (the reference text) when the
    task names doc_to_target."""
    reference = [str(doc_to_target(spec, d.doc)) for d in docs] if spec.doc_to_target is not None else None
    return diversity_report([a[0] for a in answers], reference)


def _sample(doc: DocRequests, answers: list[Any], filtered: dict[str, Any]) -> dict[str, Any]:
    return {"doc_id": doc.doc_id, "doc": doc.doc, "context": doc.context,
            "arguments": [[a if isinstance(a, (str, int, float)) else str(a) for a in arg] for arg in doc.arguments],
            "resps": [list(a) if isinstance(a, tuple) else a for a in answers],
            "filtered_resps": {k: list(v) if isinstance(v, tuple) else v for k, v in filtered.items()}}


def _config(spec: TaskSpec, k: int) -> dict[str, Any]:
    keys = ("task", "output_type", "dataset_path", "dataset_kwargs", "test_split", "validation_split",
            "training_split", "fewshot_split", "doc_to_text", "doc_to_target", "doc_to_choice", "description",
            "target_delimiter", "fewshot_delimiter", "generation_kwargs", "filter_list", "metric_list")
    cfg = {key: getattr(spec, key) for key in keys if getattr(spec, key) is not None}
    return {**cfg, "num_fewshot": k, "source": str(spec.source) if spec.source else None}


__all__ = ["BOOTSTRAP_ITERS", "TaskResult", "evaluate_task", "find_tasks", "run_requests", "shots", "task_index"]
