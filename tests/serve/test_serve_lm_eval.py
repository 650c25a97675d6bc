"""lm-eval's `local-completions` model against `lmforge serve` gives what lm-eval's `hf` backend gives.

Both backends of lm-evaluation-harness run the same task files on the same tiny Hugging Face folder:
`hf` in this process with transformers, `local-completions` over HTTP against a real `lmforge serve`
(token-id prompts in batches, `echo`, `logprobs=1`, `max_tokens=1`). Every document's
log-likelihoods must agree to 1e-4 and so must the metrics, for a multiple-choice task, a
loglikelihood task and a rolling-loglikelihood task. `add_bos_token=True` makes local-completions
tokenize as the hf backend does with a tokenizer that adds BOS. Without a tokenizer folder,
local-completions finds the server's /tokenizer_info and tokenizes through /tokenize (no BOS:
the hf backend with add_bos_token=False).
"""

from __future__ import annotations

import json
from pathlib import Path

import lm_eval
import pytest
import torch
from _serve_servers import _launch, _wait_ready

from lmforge.api import LM
from lmforge.config import preset
from lmforge.models import build_model

DOCS = [
    {"question": "The quick brown fox", "answer": "jumps over the lazy dog.", "choices": ["dog", "fox", "cat"],
     "label": 0, "text": "The quick brown fox jumps over the lazy dog."},
    {"question": "def add(a, b):", "answer": "return a + b", "choices": [" return a + b", " pass"], "label": 1,
     "text": "def add(a, b):\n    return a + b\n"},
    {"question": "Héllo wörld,", "answer": "naïve café!", "choices": ["café", "naïve", "wörld", "!"], "label": 2,
     "text": "Héllo wörld, naïve café! 你好，世界。"},
    {"question": "你好，", "answer": "世界。", "choices": ["世界", "fox"], "label": 0, "text": "The lazy dog."},
]
TASKS = {
    "lmf_mc": {"output_type": "multiple_choice", "doc_to_text": "Q: {{question}}\nA:", "doc_to_target": "label",
               "doc_to_choice": "{{choices}}", "metric_list": [{"metric": "acc"}, {"metric": "acc_norm"}]},
    "lmf_ll": {"output_type": "loglikelihood", "doc_to_text": "{{question}}", "doc_to_target": " {{answer}}",
               "metric_list": [{"metric": "perplexity"}, {"metric": "acc"}]},
    "lmf_rolling": {"output_type": "loglikelihood_rolling", "doc_to_text": "", "doc_to_target": "{{text}}",
                    "metric_list": [{"metric": "word_perplexity"}, {"metric": "byte_perplexity"},
                                    {"metric": "bits_per_byte"}]},
}
CONTEXT = 128  # the model's context; local-completions is told it as max_length


@pytest.fixture(scope="module")
def task_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("tasks")
    data = folder / "docs.jsonl"
    data.write_text("".join(json.dumps(d, ensure_ascii=False) + "\n" for d in DOCS), encoding="utf-8")
    for name, fields in TASKS.items():
        files = {"data_files": {"test": str(data)}, "cache_dir": str(folder / "datasets")}  # not ~/.cache
        task = {"task": name, "dataset_path": "json", "dataset_kwargs": files,
                "test_split": "test", **fields}
        (folder / f"{name}.yaml").write_text(json.dumps(task), encoding="utf-8")  # JSON is YAML
    return folder


@pytest.fixture(scope="module")
def hf_folder(tmp_path_factory: pytest.TempPathFactory, tiny_tokenizer) -> Path:
    torch.manual_seed(0)
    config = preset("tiny-llama", vocab_size=tiny_tokenizer.vocab_size, eos_id=tiny_tokenizer.eos_id,
                    max_seq_len=CONTEXT)
    folder = tmp_path_factory.mktemp("lm-eval") / "tiny-hf"
    LM(build_model(config), tiny_tokenizer).save_hf(folder)
    return folder


@pytest.fixture(scope="module")
def server_url(hf_folder: Path):
    log = hf_folder.parent / "serve.log"
    process = _launch(hf_folder, ["--model-name", "tiny-hf"], log)
    try:
        yield _wait_ready(process, log, None).url
    finally:
        process.terminate()
        process.wait(timeout=15)


def evaluate(model: str, model_args: str, task_dir: Path, tasks: list[str]) -> dict:
    from lm_eval.tasks import TaskManager

    manager = TaskManager(include_path=str(task_dir), include_defaults=False)
    return lm_eval.simple_evaluate(model=model, model_args=model_args, tasks=tasks, task_manager=manager,
                                   batch_size=4, device="cpu", log_samples=True)


def loglikelihoods(samples: list[dict]) -> dict[int, list[float]]:
    """doc_id -> the document's log-likelihoods, one per request (choice, continuation or document)."""
    return {s["doc_id"]: [float(r[0][0]) if isinstance(r[0], (list, tuple)) else float(r[0]) for r in s["resps"]]
            for s in samples}


def assert_same(hf: dict, api: dict, tasks: list[str]) -> None:
    """Per-document log-likelihoods to 1e-4, and the metrics."""
    for task in tasks:
        expected, served = loglikelihoods(hf["samples"][task]), loglikelihoods(api["samples"][task])
        assert sorted(served) == sorted(expected) == list(range(len(DOCS)))
        for doc_id, values in expected.items():
            assert served[doc_id] == pytest.approx(values, abs=1e-4), (task, doc_id)
        assert all(v < 0 for values in expected.values() for v in values)  # real log-likelihoods, not placeholders
        metrics = {k: v for k, v in hf["results"][task].items() if isinstance(v, float)}
        assert metrics and {k: api["results"][task][k] for k in metrics} == pytest.approx(metrics, rel=1e-4), task


def test_local_completions_equals_hf_backend(hf_folder: Path, server_url: str, task_dir: Path, one_thread) -> None:
    hf = evaluate("hf", f"pretrained={hf_folder},dtype=float32", task_dir, list(TASKS))
    api = evaluate("local-completions", f"model=tiny-hf,base_url={server_url}/v1/completions,"
                   f"tokenizer_backend=huggingface,tokenizer={hf_folder},max_length={CONTEXT},add_bos_token=True",
                   task_dir, list(TASKS))
    assert_same(hf, api, list(TASKS))


def test_remote_tokenizer_needs_no_tokenizer_folder(hf_folder: Path, server_url: str, task_dir: Path,
                                                    one_thread) -> None:
    tasks = ["lmf_mc"]
    hf = evaluate("hf", f"pretrained={hf_folder},dtype=float32,add_bos_token=False", task_dir, tasks)
    api = evaluate("local-completions", f"model=tiny-hf,base_url={server_url}/v1/completions,max_length={CONTEXT}",
                   task_dir, tasks)
    assert_same(hf, api, tasks)
