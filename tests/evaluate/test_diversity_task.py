"""The `diversity` output type: greedy generations from each prompt, scored by `diversity_report` beside the
documents' reference text."""

from __future__ import annotations

import json

from eval_tasks import write_model
from lmforge.evaluate.diversity import diversity_report
from lmforge.evaluate.harness import evaluate_task, find_tasks
from lmforge.evaluate.scorer import Scorer

TASK = """task: collapse
output_type: diversity
dataset_path: json
dataset_kwargs: {{data_files: {{test: {data}}}}}
test_split: test
doc_to_text: "{{{{prompt}}}}"
doc_to_target: "{{{{reference}}}}"
generation_kwargs: {{until: ["\\n\\n"], max_gen_toks: 12}}
"""


def test_diversity_task_reports_the_figures_of_its_generations(tmp_path, tiny_tokenizer):
    import lmforge

    rows = [{"prompt": p, "reference": f"the quick brown fox {i} jumps over the lazy dog"}
            for i, p in enumerate(["The quick", "def add(a, b):", "Héllo", "naïve café", "The lazy dog"])]
    data = tmp_path / "prompts.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    (tmp_path / "collapse.yaml").write_text(TASK.format(data=data))
    lm = lmforge.load(write_model(tmp_path / "model", tiny_tokenizer))
    [(spec, _)] = find_tasks([str(tmp_path / "collapse.yaml")], [])
    result = evaluate_task(Scorer(lm.model, lm.tokenizer, batch_size=2, make_request=lm.request), spec,
                           log_samples=True)
    texts = [s["resps"][0] for s in result.samples]
    assert [s["context"] for s in result.samples] == [r["prompt"] for r in rows]
    assert any(texts)
    expected = diversity_report(texts, [r["reference"] for r in rows])
    assert result.metrics == {f"{k},none": v for k, v in expected.items()}
    assert "reference_distinct_2,none" in result.metrics
