"""Per-document scores, filters, aggregation and standard errors of lm-eval task metrics.

Each output type turns a document's model answers into per-document values (lm-eval's
`process_results`); a metric's aggregation turns the values of all documents into its figure;
its standard error is lm-eval's: the sample standard error of the mean for means, a bootstrap
(lm-eval's seeds and resampling, so the same figure) for perplexity and the corpus metrics, and
none ("N/A") for the weighted perplexities and bits per byte. The corpus metrics (BLEU, chrF,
chrF++, TER) are `corpus_metrics.py`'s.
"""

from __future__ import annotations

import math
import random
import re
import string
from collections.abc import Callable, Sequence
from typing import Any

from lmforge.errors import LmforgeError
from lmforge.evaluate.corpus_metrics import CORPUS_METRICS
from lmforge.evaluate.corpus_metrics import HIGHER_IS_BETTER as CORPUS_HIGHER
from lmforge.evaluate.taskfile import Doc, TaskSpec, doc_to_choice, doc_to_target

DEFAULT_METRICS = {
    "loglikelihood": ["perplexity", "acc"],
    "loglikelihood_rolling": ["word_perplexity", "byte_perplexity", "bits_per_byte"],
    "multiple_choice": ["acc", "acc_norm"],
    "generate_until": ["exact_match"],
}
LOWER_IS_BETTER = {"perplexity", "word_perplexity", "byte_perplexity", "bits_per_byte", "ter"}
BOOTSTRAP_CAP = {"bleu": 100, "chrf": 100, "chrf++": 100, "ter": 100}  # lm-eval's bootstrap iterations for these


def metric_names(spec: TaskSpec) -> list[tuple[str, dict[str, Any]]]:
    """(metric, keyword arguments) the task reports, from metric_list or lm-eval's defaults."""
    if spec.metric_list is None:
        return [(m, {}) for m in DEFAULT_METRICS.get(spec.output_type, [])]
    out = []
    for entry in spec.metric_list:
        if not isinstance(entry, dict) or "metric" not in entry:
            raise LmforgeError(f"{spec.where('metric_list')}: each entry needs `metric: NAME`; got {entry!r}")
        kwargs = {k: v for k, v in entry.items() if k not in ("metric", "aggregation", "higher_is_better",
                                                                 "hf_evaluate")}
        out.append((str(entry["metric"]), kwargs))
    return out


# ---------------------------------------------------------------- filters


def apply_filters(spec: TaskSpec, responses: list[str]) -> dict[str, list[Any]]:
    """filter name -> the filtered answer of each document (lm-eval's default: `none`, take_first)."""
    pipelines = spec.filter_list or [{"name": "none", "filter": [{"function": "take_first"}]}]
    out = {}
    for pipeline in pipelines:
        values: list[Any] = [[r] for r in responses]
        for step in pipeline.get("filter", []):
            values = _filter_step(spec, step, values)
        out[str(pipeline.get("name", "none"))] = [v[0] if isinstance(v, list) else v for v in values]
    return out


def _filter_step(spec: TaskSpec, step: dict[str, Any], values: list[Any]) -> list[Any]:
    name = step.get("function")
    if name == "take_first":
        return [v[0] if isinstance(v, list) else v for v in values]
    if name == "regex":
        pattern = re.compile(step.get("regex_pattern", r"#### (\-?[0-9\.\,]+)"))
        group, fallback = int(step.get("group_select", 0)), step.get("fallback", "[invalid]")
        return [[_regex_pick(pattern, r, group, fallback) for r in (v if isinstance(v, list) else [v])]
                for v in values]
    if name in ("lowercase", "uppercase"):
        return [[getattr(str(r), name[:-4])() for r in (v if isinstance(v, list) else [v])] for v in values]
    raise LmforgeError(f"{spec.where('filter_list')}: filter function {name!r} is not supported "
                       "(regex, take_first, lowercase, uppercase are)")


def _regex_pick(pattern: re.Pattern[str], response: Any, group: int, fallback: str) -> str:
    """lm-eval's RegexFilter: the `group`-th match (its first non-empty group), stripped, else the fallback."""
    matches = pattern.findall(response if isinstance(response, str) else "")
    if not matches:
        return fallback
    match = matches[group]
    if isinstance(match, tuple):
        match = next((m for m in match if m), fallback)
    return match.strip()


# ---------------------------------------------------------------- per-document values


def exact_match(prediction: str, reference: str, regexes_to_ignore: Sequence[str] | None = None,
                ignore_case: bool = False, ignore_punctuation: bool = False, ignore_numbers: bool = False) -> float:
    """1.0 when prediction equals reference after lm-eval's (HF evaluate's) normalisations."""
    for pattern in regexes_to_ignore or ():
        prediction, reference = re.sub(pattern, "", prediction), re.sub(pattern, "", reference)
    if ignore_case:
        prediction, reference = prediction.lower(), reference.lower()
    for chars, wanted in ((string.punctuation, ignore_punctuation), (string.digits, ignore_numbers)):
        if wanted:
            table = str.maketrans("", "", chars)
            prediction, reference = prediction.translate(table), reference.translate(table)
    return float(prediction == reference)


def doc_values(spec: TaskSpec, doc: Doc, answers: list[Any], metrics: list[tuple[str, dict[str, Any]]]) -> dict[str, Any]:
    """One document's value of each metric, from its (filtered) model answers."""
    kind, names = spec.output_type, [m for m, _ in metrics]
    if kind == "loglikelihood":
        logp, greedy = answers[0]
        return {k: v for k, v in (("perplexity", logp), ("acc", int(greedy))) if k in names}
    if kind == "loglikelihood_rolling":
        text = doc_to_target(spec, doc)
        words, n_bytes = len(re.split(r"\s+", text)), len(text.encode("utf-8"))
        counts = {"word_perplexity": words, "byte_perplexity": n_bytes, "bits_per_byte": n_bytes}
        return {k: (answers[0], n) for k, n in counts.items() if k in names}
    if kind == "multiple_choice":
        return _choice_values(spec, doc, answers, names)
    return _generation_values(spec, doc, answers[0], metrics)


def _choice_values(spec: TaskSpec, doc: Doc, answers: list[tuple[float, bool]], names: list[str]) -> dict[str, Any]:
    choices = doc_to_choice(spec, doc)
    logps = [a[0] for a in answers]
    gold = doc_to_target(spec, doc)
    if isinstance(gold, str):
        gold = choices.index(gold) if gold in choices else -100
    golds = [g if g < len(choices) else -100 for g in gold] if isinstance(gold, list) else [gold]
    if not isinstance(gold, list) and not (isinstance(gold, int) and 0 <= gold < len(choices)):
        golds = [-100]

    def best(scores: Sequence[float]) -> int:
        return max(range(len(scores)), key=lambda i: (scores[i], -i))  # numpy argmax: the first of equals

    picks = {"acc": best(logps), "acc_norm": best([lp / len(c) for lp, c in zip(logps, choices)]),
             "acc_bytes": best([lp / len(c.encode("utf-8")) for lp, c in zip(logps, choices)])}
    values: dict[str, Any] = {k: 1.0 if pick in golds else 0.0 for k, pick in picks.items() if k in names}
    if "exact_match" in names:
        values["exact_match"] = int(any(answers[g][1] for g in golds if g != -100))
    return values


def _generation_values(spec: TaskSpec, doc: Doc, answer: str, metrics: list[tuple[str, dict[str, Any]]]) -> dict[str, Any]:
    gold = doc_to_target(spec, doc)
    if spec.doc_to_choice is not None:
        gold = doc_to_choice(spec, doc)[gold]
    values: dict[str, Any] = {}
    for name, kwargs in metrics:
        if name == "exact_match":
            golds = gold if isinstance(gold, list) else [str(gold)]
            values[name] = max(exact_match(answer, str(g), **kwargs) for g in golds)
        elif name in CORPUS_METRICS:
            values[name] = (gold, answer)
        else:
            raise LmforgeError(f"{spec.where('metric_list')}: metric {name!r} is not supported for generate_until "
                               f"(exact_match, {', '.join(CORPUS_METRICS)} are)")
    return values


# ---------------------------------------------------------------- aggregation and standard errors


def _mean(items: Sequence[float]) -> float:
    return sum(items) / len(items)


def _perplexity(items: Sequence[float]) -> float:
    return math.exp(-_mean(items))


def _weighted_perplexity(items: Sequence[tuple[float, int]]) -> float:
    return math.exp(-sum(a for a, _ in items) / sum(b for _, b in items))


def _bits_per_byte(items: Sequence[tuple[float, int]]) -> float:
    return -sum(a for a, _ in items) / sum(b for _, b in items) / math.log(2)


def _corpus(name: str) -> Callable[[Sequence[Any]], float]:
    return lambda items: CORPUS_METRICS[name]([p for _, p in items], [g for g, _ in items])


def aggregation(spec: TaskSpec, metric: str) -> Callable[[Sequence[Any]], float]:
    """The function that turns a metric's per-document values into its figure."""
    named = {"mean": _mean, "perplexity": _perplexity, "weighted_perplexity": _weighted_perplexity,
             "bits_per_byte": _bits_per_byte}
    entry = next((e for e in spec.metric_list or [] if e.get("metric") == metric), {})
    if "aggregation" in entry:
        if entry["aggregation"] not in named:
            raise LmforgeError(f"{spec.where('metric_list')}: aggregation {entry['aggregation']!r} is not one of "
                               f"{', '.join(named)}")
        return named[entry["aggregation"]]
    if metric in CORPUS_METRICS:
        return _corpus(metric)
    return {"perplexity": _perplexity, "word_perplexity": _weighted_perplexity,
            "byte_perplexity": _weighted_perplexity, "bits_per_byte": _bits_per_byte}.get(metric, _mean)


def higher_is_better(metric: str) -> bool:
    return CORPUS_HIGHER.get(metric, metric not in LOWER_IS_BETTER)


def sample_stddev(xs: Sequence[float]) -> float:
    mu = _mean(xs)
    return math.sqrt(sum((x - mu) ** 2 for x in xs) / (len(xs) - 1))


def bootstrap_stderr(f: Callable[[Sequence[Any]], float], xs: Sequence[Any], iters: int) -> float:
    """lm-eval's bootstrap: chunks of up to 1000 resamples, chunk i drawn by random.Random(i)."""
    chunk = min(1000, iters)
    replicates = []
    for i in range(iters // chunk):
        rng = random.Random(i)
        replicates += [f(rng.choices(xs, k=len(xs))) for _ in range(chunk)]
    return sample_stddev(replicates)


def stderr(agg: Callable[[Sequence[Any]], float], metric: str, items: Sequence[Any], bootstrap_iters: int) -> float | str:
    """The standard error lm-eval reports for a metric, or "N/A"."""
    if len(items) < 2 or bootstrap_iters <= 0:
        return "N/A"
    if agg is _mean:
        return sample_stddev(items) / math.sqrt(len(items))
    if agg is _perplexity or metric in CORPUS_METRICS:
        return bootstrap_stderr(agg, items, min(bootstrap_iters, BOOTSTRAP_CAP.get(metric, bootstrap_iters)))
    return "N/A"


__all__ = ["DEFAULT_METRICS", "aggregation", "apply_filters", "bootstrap_stderr", "doc_values", "exact_match",
           "higher_is_better", "metric_names", "stderr"]
