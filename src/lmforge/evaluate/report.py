"""What an evaluation run shows: lm-eval's results table, its JSON, a bar chart and the shots curve.

The table has lm-eval's columns (Tasks | Version | Filter | n-shot | Metric | | Value | | Stderr,
with ↑/↓ for the better direction); the JSON has lm-eval's layout (`results`, `configs`,
`versions`, `n-shot`, `n-samples`, `higher_is_better`, `samples` when asked for), so tools that
read lm-eval's output read this. Plots use matplotlib's object API on the Agg canvas (no pyplot,
no global backend) and are written atomically.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from lmforge.checkpoint.io import write_json
from lmforge.evaluate.harness import TaskResult
from lmforge.evaluate.task_metrics import higher_is_better
from lmforge.figures import new_figure, save_figure

ARROWS = {True: "↑", False: "↓"}


def _rows(results: Sequence[TaskResult]) -> list[list[str]]:
    rows = []
    for r in results:
        for key in sorted(r.metrics):
            metric, _, filt = key.partition(",")
            if metric.endswith("_stderr"):
                continue
            value = r.metrics[key]
            se = r.metrics.get(f"{metric}_stderr,{filt}")
            shown_se = "" if se is None else ("   N/A" if se == "N/A" else f"{se:.4f}")
            rows.append([r.name, str(r.version if r.version is not None else "Yaml"), filt, str(r.num_fewshot), metric,
                         ARROWS[higher_is_better(metric)], f"{value:.4f}" if isinstance(value, float) else str(value),
                         "±" if se is not None else "", shown_se])
    return rows


def results_table(results: Sequence[TaskResult]) -> str:
    """lm-eval's markdown results table."""
    header = ["Tasks", "Version", "Filter", "n-shot", "Metric", "", "Value", "", "Stderr"]
    rows = _rows(results)
    widths = [max(len(x) for x in col) for col in zip(header, *rows)]
    right = {6, 8}  # numbers align right, as pytablewriter does

    def line(cells: Sequence[str]) -> str:
        return "|" + "|".join(c.rjust(w) if i in right else c.ljust(w) for i, (c, w) in enumerate(zip(cells, widths))) + "|"

    rule = "|" + "|".join("-" * (w - 1) + (":" if i in right else "-") for i, w in enumerate(widths)) + "|"
    return "\n".join([line(header), rule, *(line(r) for r in rows)])


def results_json(results: Sequence[TaskResult], config: dict[str, Any]) -> dict[str, Any]:
    """lm-eval's output layout; in a few-shot sweep a task's key is `name|K-shot`."""
    names = [r.name for r in results]
    keys = [n if names.count(n) == 1 else f"{n}|{r.num_fewshot}-shot" for n, r in zip(names, results)]
    out: dict[str, Any] = {
        "results": {k: {"alias": k, **r.metrics} for k, r in zip(keys, results)},
        "group_subtasks": _groups(results),
        "configs": {k: r.config for k, r in zip(keys, results)},
        "versions": {k: r.version for k, r in zip(keys, results)},
        "n-shot": {k: r.num_fewshot for k, r in zip(keys, results)},
        "higher_is_better": {k: {m.partition(",")[0]: higher_is_better(m.partition(",")[0])
                                 for m in r.metrics if "_stderr," not in m} for k, r in zip(keys, results)},
        "n-samples": {k: {"original": r.n_samples, "effective": r.n_samples} for k, r in zip(keys, results)},
        "config": config,
    }
    if any(r.samples for r in results):
        out["samples"] = {k: r.samples for k, r in zip(keys, results)}
    return out


def _groups(results: Sequence[TaskResult]) -> dict[str, list[str]]:
    groups: dict[str, list[str]] = {}
    for r in results:
        if r.group:
            groups.setdefault(r.group, []).append(r.name)
    return groups


def write_results(path: Path, results: Sequence[TaskResult], config: dict[str, Any]) -> None:
    """The JSON results file, written atomically."""
    write_json(path, results_json(results, config))


def headline(result: TaskResult) -> tuple[str, float] | None:
    """The metric a chart shows for a task: its first metric with a number (acc before the rest)."""
    numbers = {k: v for k, v in result.metrics.items() if "_stderr," not in k and isinstance(v, (int, float))}
    preferred = [k for k in numbers if k.startswith("acc,")] + sorted(numbers)
    return (preferred[0], float(numbers[preferred[0]])) if preferred else None


def plot_bars(path: Path, results: Sequence[TaskResult], title: str) -> None:
    """One bar per task (its headline metric, the metric named under the bar) into the PNG `path`."""
    shown = [(r, h) for r in results if (h := headline(r)) is not None]
    fig = new_figure((max(4.0, 1.4 * len(shown) + 2), 4.5))
    ax = fig.add_subplot()
    labels = [f"{r.name}\n{key.replace(',none', '')} ({r.num_fewshot}-shot)" for r, (key, _) in shown]
    bars = ax.bar(range(len(shown)), [v for _, (_, v) in shown], color="#4C72B0")
    ax.bar_label(bars, fmt="%.3f")
    ax.set_xticks(range(len(shown)), labels, fontsize=8)
    ax.set(title=title, ylabel="value")
    ax.grid(True, axis="y", alpha=0.3)
    save_figure(fig, path)


def plot_shots(path: Path, sweep: dict[int, Sequence[TaskResult]], title: str) -> None:
    """Each task's headline accuracy-like metric (higher is better; perplexities do not depend on the
    shots) against the number of few-shot examples into the PNG `path`."""
    fig = new_figure((7.0, 4.5))
    ax = fig.add_subplot()
    curves: dict[str, list[tuple[int, float]]] = {}
    for k in sorted(sweep):
        for r in sweep[k]:
            if (h := headline(r)) is not None and higher_is_better(h[0].partition(",")[0]):
                curves.setdefault(f"{r.name} ({h[0].replace(',none', '')})", []).append((r.num_fewshot, h[1]))
    for label, points in curves.items():
        ax.plot([k for k, _ in points], [v for _, v in points], "o-", label=label)
    ax.set(title=title, xlabel="few-shot examples", ylabel="value")
    ax.set_xticks(sorted(sweep))
    ax.grid(True, alpha=0.3)
    if curves:
        ax.legend(fontsize=8)
    save_figure(fig, path)


__all__ = ["headline", "plot_bars", "plot_shots", "results_json", "results_table", "write_results"]
