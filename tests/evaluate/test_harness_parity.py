"""`lmforge eval` against lm-evaluation-harness itself: the same tiny HF model and the same task files,
run once through `lm_eval.simple_evaluate` (model `hf`) and once through `lmforge eval`, must give the
same few-shot contexts (string for string), per-document log-likelihoods (1e-4), generations, and metrics
with their standard errors, for every output type.
"""

from __future__ import annotations

import json
import math

import pytest

from eval_tasks import TASKS, write_model, write_tasks

lm_eval = pytest.importorskip("lm_eval")
pytest.importorskip("accelerate")  # lm-eval's hf backend imports it

BOOTSTRAP = 200  # bootstrap resamples on both sides (perplexity's standard error), fewer than the default for speed


@pytest.fixture(scope="module")
def runs(tmp_path_factory, tiny_tokenizer):
    """(lm-eval's results, lmforge's results JSON, the task folder): one run of each over every task."""
    root = tmp_path_factory.mktemp("harness")
    mp = pytest.MonkeyPatch()
    mp.setenv("HF_DATASETS_CACHE", str(root / "hf_cache"))  # lm-eval's datasets cache stays in the test folder
    mp.setenv("DISABLE_MULTIPROC", "1")  # lm-eval's bootstrap in-process
    tasks = write_tasks(root)
    model = write_model(root / "model", tiny_tokenizer)
    from lm_eval.tasks import TaskManager

    theirs = lm_eval.simple_evaluate(model="hf", model_args=f"pretrained={model},dtype=float32", tasks=TASKS,
                                     task_manager=TaskManager(include_path=str(tasks), include_defaults=False),
                                     batch_size=4, device="cpu", bootstrap_iters=BOOTSTRAP, log_samples=True)
    from lmforge.cli.main import main

    out = root / "lmforge.json"
    assert main(["eval", str(model), "--tasks", ",".join(TASKS), "--include-path", str(tasks), "--batch-size", "4",
                 "--bootstrap-iters", str(BOOTSTRAP), "--output", str(out), "--log-samples"]) == 0
    mp.undo()
    return theirs, json.loads(out.read_text()), root


def _their_samples(theirs, task: str, filter_name: str = "none") -> list[dict]:
    samples = [s for s in theirs["samples"][task] if s.get("filter", "none") == filter_name]
    return sorted(samples, key=lambda s: s["doc_id"])


@pytest.mark.parametrize("task", ["tiny_mc", "tiny_mc_csv", "tiny_ll", "tiny_gen"])
def test_contexts_are_identical(runs, task):
    theirs, mine, _ = runs
    filt = "strict" if task == "tiny_gen" else "none"
    expected = [s["arguments"][0][0] for s in _their_samples(theirs, task, filt)]
    got = [s["context"] for s in mine["samples"][task]]
    assert got == expected
    if task != "tiny_ll":  # few-shot examples really are in the context
        assert all(c.count("Review:" if "mc" in task else "Q:") > 1 for c in got)


@pytest.mark.parametrize("task", ["tiny_mc", "tiny_mc_csv", "tiny_ll"])
def test_loglikelihoods_match(runs, task):
    theirs, mine, _ = runs
    for t, m in zip(_their_samples(theirs, task), mine["samples"][task], strict=True):
        their_scores = [(float(r[0][0]), str(r[0][1]) == "True") for r in t["resps"]]
        assert len(m["resps"]) == len(their_scores)
        for (logp, greedy), (their_logp, their_greedy) in zip(m["resps"], their_scores):
            assert logp == pytest.approx(their_logp, abs=1e-4)
            assert greedy == their_greedy


def test_rolling_loglikelihoods_match(runs):
    theirs, mine, _ = runs
    their = [float(s["resps"][0][0]) for s in _their_samples(theirs, "tiny_roll")]
    got = [s["resps"][0] for s in mine["samples"]["tiny_roll"]]
    assert got == pytest.approx(their, abs=1e-4)
    assert len(mine["samples"]["tiny_roll"][0]["doc"]["text"]) > 200  # the first document spans several windows


def test_generations_match(runs):
    theirs, mine, _ = runs
    for filt in ("strict", "none"):
        their = [(s["resps"][0][0], s["filtered_resps"][0]) for s in _their_samples(theirs, "tiny_gen", filt)]
        got = [(s["resps"][0], s["filtered_resps"][filt]) for s in mine["samples"]["tiny_gen"]]
        assert got == their
    assert any(s["resps"][0] for s in mine["samples"]["tiny_gen"])  # something was generated


@pytest.mark.parametrize("task", TASKS)
def test_metrics_and_stderrs_match(runs, task):
    theirs, mine, _ = runs
    expected = {k: v for k, v in theirs["results"][task].items() if "," in k}
    got = {k: v for k, v in mine["results"][task].items() if "," in k}
    assert set(got) == set(expected)
    for key, value in expected.items():
        if value == "N/A" or got[key] == "N/A":
            assert got[key] == value, key
        else:
            assert math.isclose(got[key], float(value), rel_tol=1e-4, abs_tol=1e-9), (key, got[key], value)
    assert mine["n-shot"][task] == theirs["n-shot"][task]


def test_the_chart_is_written(runs):
    _, _, root = runs
    assert (root / "lmforge.png").stat().st_size > 1000
