"""Tiny local lm-eval tasks (one per output type) and a tiny random HF LLaMA, shared by the harness tests.

Everything is written into a temporary folder by the test: data as JSON lines, CSV and plain text,
task files in lm-eval's YAML (an `include`, a `description`, few-shot from the evaluated split and
from another one, a regex filter), and a model folder both lm-eval's `hf` backend and lmforge open.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

REVIEWS = [("a great movie", 1), ("a terrible film", 0), ("the quick fox is good", 1), ("a lazy bad dog", 0),
           ("great and good", 1), ("bad, bad, bad", 0), ("the brown fox", 1), ("naive and terrible", 0)]
SUMS = [(2, 3), (1, 1), (4, 5), (3, 3), (2, 2), (6, 1)]
TEXT = ["The quick brown fox jumps over the lazy dog. " * 6, "def add(a, b):\n    return a + b", "Héllo wörld, naïve café!"]

TASK_FILES = {
    "mc.yaml": """
task: tiny_mc
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}/reviews.jsonl
output_type: multiple_choice
test_split: test
fewshot_split: test
num_fewshot: 3
description: "Sentiment of short reviews.\\n\\n"
doc_to_text: "Review: {{{{sentence}}}}\\nSentiment:"
doc_to_target: label
doc_to_choice: ["negative", "positive"]
metric_list:
  - metric: acc
  - metric: acc_norm
""",
    "mc_csv.yaml": """
include: mc.yaml
task: tiny_mc_csv
dataset_path: csv
dataset_kwargs:
  delimiter: ";"
  data_files:
    train: {data}/reviews.csv
    test: {data}/reviews.csv
fewshot_split: train
num_fewshot: 2
description: ""
doc_to_choice: "{{{{['bad', 'good']}}}}"
""",
    "ll.yaml": """
task: tiny_ll
dataset_path: json
dataset_kwargs:
  data_files: {data}/sums.jsonl
output_type: loglikelihood
test_split: train
doc_to_text: "Q: What is {{{{a}}}} plus {{{{b}}}}?\\nA:"
doc_to_target: " {{{{a + b}}}}"
""",
    "roll.yaml": """
task: tiny_roll
dataset_path: text
dataset_kwargs:
  data_files:
    test: {data}/text.txt
output_type: loglikelihood_rolling
test_split: test
doc_to_text: ""
doc_to_target: text
""",
    "gen.yaml": """
task: tiny_gen
dataset_path: json
dataset_kwargs:
  data_files:
    train: {data}/sums.jsonl
output_type: generate_until
test_split: train
fewshot_split: train
num_fewshot: 2
doc_to_text: "Q: What is {{{{a}}}} plus {{{{b}}}}?\\nA:"
doc_to_target: "#### {{{{a + b}}}}"
generation_kwargs:
  until: ["\\n\\n", "Q:"]
  max_gen_toks: 8
filter_list:
  - name: strict
    filter:
      - function: regex
        regex_pattern: "(\\\\d+)"
        group_select: -1
      - function: take_first
  - name: none
    filter:
      - function: take_first
metric_list:
  - metric: exact_match
    ignore_case: true
    regexes_to_ignore: ["#", " "]
""",
    "group.yaml": """
group: tiny_group
task:
  - tiny_mc
  - tiny_ll
""",
}
TASKS = ["tiny_mc", "tiny_mc_csv", "tiny_ll", "tiny_roll", "tiny_gen"]


def write_tasks(folder: Path) -> Path:
    """The data and the task files under `folder`; returns the task folder."""
    data = folder / "data"
    data.mkdir(parents=True)
    (data / "reviews.jsonl").write_text("".join(json.dumps({"sentence": s, "label": y}) + "\n" for s, y in REVIEWS))
    (data / "reviews.csv").write_text("sentence;label\n" + "".join(f"{s};{y}\n" for s, y in REVIEWS[::-1]))
    (data / "sums.jsonl").write_text("".join(json.dumps({"a": a, "b": b}) + "\n" for a, b in SUMS))
    (data / "text.txt").write_text("\n".join(TEXT) + "\n")
    tasks = folder / "tasks"
    tasks.mkdir()
    for name, text in TASK_FILES.items():
        (tasks / name).write_text(text.format(data=data))
    return tasks


def write_model(folder: Path, tokenizer) -> Path:
    """A tiny random HF LLaMA (context 64) with `tokenizer`, saved as a Hugging Face folder."""
    import transformers

    cfg = transformers.LlamaConfig(vocab_size=tokenizer.vocab_size, hidden_size=32, intermediate_size=48,
                                   num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                   max_position_embeddings=64, bos_token_id=tokenizer.bos_id,
                                   eos_token_id=tokenizer.eos_id)
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(cfg).eval()
    with torch.no_grad():  # larger than the default init, so log-likelihoods and greedy tokens differ per input
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.3)
    model.save_pretrained(folder)
    tokenizer.save(folder)
    return folder
