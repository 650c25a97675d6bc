"""Task files: groups, includes, data readers, and one-line errors that name the task and the field; the
few-shot sampler, rolling windows, filters and exact match against lm-eval's own functions (no model)."""

from __future__ import annotations

import random

import pytest

from eval_tasks import write_tasks
from lmforge.errors import LmforgeError
from lmforge.evaluate.harness import find_tasks
from lmforge.evaluate.prompts import build_requests, sample_fewshot
from lmforge.evaluate.scorer import rolling_windows
from lmforge.evaluate.task_metrics import apply_filters, exact_match
from lmforge.evaluate.taskfile import TaskSpec, load_splits


@pytest.fixture
def tasks(tmp_path):
    return write_tasks(tmp_path)


def _requests(task_file, num_fewshot=0):
    [(spec, _)] = find_tasks([str(task_file)], [])
    return build_requests(spec, load_splits(spec), num_fewshot)


def test_a_group_names_its_tasks_and_include_merges_the_base(tasks):
    found = find_tasks(["tiny_group", "tiny_mc_csv"], [tasks])
    assert [(s.task, g) for s, g in found] == [("tiny_mc", "tiny_group"), ("tiny_ll", "tiny_group"),
                                              ("tiny_mc_csv", None)]
    csv_task = found[2][0]
    assert csv_task.output_type == "multiple_choice" and csv_task.doc_to_text.startswith("Review:")  # from mc.yaml
    docs = load_splits(csv_task)["train"]
    assert docs[0] == {"sentence": "naive and terrible", "label": 0}  # ';'-separated, label typed as int


def test_contexts_and_choices(tasks):
    first = _requests(tasks / "mc_csv.yaml", num_fewshot=0)[0]
    assert first.context == "Review: naive and terrible\nSentiment:"
    assert first.arguments == [(first.context, " bad"), (first.context, " good")]


@pytest.mark.parametrize("edit, field", [
    (("doc_to_text: \"Review: {{sentence}}", "doc_to_text: \"Review: {{sentence"), "doc_to_text"),
    (("doc_to_text: \"Review: {{sentence}}", "doc_to_text: \"Review: {{sentense}}"), "doc_to_text"),
    (("test_split: test", "test_split: validation"), "test_split"),
    (("doc_to_choice: [\"negative\", \"positive\"]", "doc_to_choice: \"{{sentence}}\""), "doc_to_choice"),
])
def test_bad_mc_task_files_fail_in_one_line(tasks, edit, field):
    path = tasks / "mc.yaml"
    path.write_text(path.read_text().replace(*edit))
    with pytest.raises(LmforgeError) as e:
        _requests(path)
    message = str(e.value)
    assert "task tiny_mc (mc.yaml)" in message and field in message and "\n" not in message


def test_generation_without_stop_or_limit_fails_in_one_line(tasks):
    path = tasks / "gen.yaml"
    path.write_text(path.read_text().replace('until: ["\\n\\n", "Q:"]', "until: []").replace("max_gen_toks: 8", ""))
    with pytest.raises(LmforgeError, match=r"task tiny_gen \(gen.yaml\), generation_kwargs: .*no `until`"):
        find_tasks([str(path)], [])


def test_unknown_task_names_the_known_ones(tasks):
    with pytest.raises(LmforgeError, match=r"no task or group named 'nope'.*tiny_mc"):
        find_tasks(["nope"], [tasks])


def test_fewshot_sampling_is_lm_evals():
    pytest.importorskip("lm_eval")
    from lm_eval.api.samplers import ContextSampler

    pool = [{"i": i} for i in range(9)]
    theirs, mine = ContextSampler(list(pool), rnd=1234), random.Random(1234)
    for doc in pool:  # the same generator across documents, the evaluated one excluded
        assert sample_fewshot(mine, pool, 3, doc) == list(theirs.sample(3, eval_doc=doc))
    assert sample_fewshot(mine, pool, 2, None) == list(theirs.sample(2))


@pytest.mark.parametrize("n_tokens", [1, 5, 8, 9, 17, 40])
def test_rolling_windows_are_lm_evals(n_tokens):
    pytest.importorskip("lm_eval")
    from lm_eval.utils import get_rolling_token_windows, make_disjoint_window

    tokens = list(range(10, 10 + n_tokens))
    expected = [make_disjoint_window(w) for w in get_rolling_token_windows(tokens, 1, 8, 1)]
    assert rolling_windows(tokens, 1, 8) == expected


def test_filters_and_exact_match_are_lm_evals():
    pytest.importorskip("lm_eval")
    from lm_eval.api.metrics import exact_match_hf_evaluate
    from lm_eval.filters.extraction import RegexFilter

    responses = ["#### 12", "the answer is 7 or 8", "none", " (3), (4) "]
    for pattern, group in ((r"#### (\-?[0-9\.\,]+)", 0), (r"(-?[$0-9.,]{2,})|(-?[0-9]+)", -1), (r"\((\d)\)", 1)):
        spec = TaskSpec("t", filter_list=[{"name": "f", "filter": [
            {"function": "regex", "regex_pattern": pattern, "group_select": group}, {"function": "take_first"}]}])
        expected = [r[0] for r in RegexFilter(pattern, group).apply([[r] for r in responses], [])]
        assert apply_filters(spec, responses)["f"] == expected
    cases = [("Hello, World", "hello world"), ("#### 5", "5"), ("42", "42"), ("4 2", "42")]
    for options in ({}, {"ignore_case": True, "ignore_punctuation": True}, {"regexes_to_ignore": ["#", " "]}):
        for pred, ref in cases:
            assert exact_match(pred, ref, **options) == exact_match_hf_evaluate([pred], [ref], **options)["exact_match"]


def test_a_continuation_longer_than_the_context_scores_its_last_tokens():
    import torch

    from lmforge.config import preset
    from lmforge.evaluate.scorer import Scorer
    from lmforge.models import build_model

    torch.manual_seed(0)
    model = build_model(preset("tiny-llama", vocab_size=50, max_seq_len=16)).eval()
    tokenizer = type("Tok", (), {"bos_id": 1, "eos_id": 2})()
    scorer = Scorer(model, tokenizer, batch_size=4)
    cont = list(range(3, 40))
    [(logp, _)] = scorer.loglikelihood_tokens([([1, 5], cont)])
    with torch.no_grad():
        logits = model(torch.tensor([cont[-17:-1]]))[0].log_softmax(-1)  # the last 16 tokens, each from its window
    assert logp == pytest.approx(float(logits.gather(-1, torch.tensor(cont[-16:])[:, None]).sum()), abs=1e-4)
