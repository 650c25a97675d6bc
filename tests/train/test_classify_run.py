"""Classification end to end: a decoder from an lmforge checkpoint, a BERT from a Hugging Face folder with LoRA,
label names saved with the model, the evaluation report, and `--predict`."""

from __future__ import annotations

import json
import random

import pytest

import lmforge
from lmforge.cli import main
from lmforge.evaluate.classification import predict
from lmforge.train.finetune import run_classify

POSITIVE, NEGATIVE = ["good", "great", "superb", "lovely"], ["bad", "awful", "boring", "ugly"]
FILLER = ["the", "film", "was", "quite", "and", "plot", "acting", "very"]


def reviews(n: int, seed: int = 0) -> list[tuple[str, int]]:
    """(text, 1 if positive else 0): filler words around two words of one sentiment, linearly separable."""
    rng = random.Random(seed)
    out = []
    for i in range(n):
        label = i % 2
        words = rng.sample(FILLER, 4) + rng.sample(POSITIVE if label else NEGATIVE, 2)
        rng.shuffle(words)
        out.append((" ".join(words), label))
    return out


def short(**sections):
    """Sections of a classifier run: 40 steps of 16 texts, a quarter held out."""
    return {"data": {"eval_fraction": 0.25, **sections.pop("data", {})},
            "train": {"steps": 40, "batch_size": 16, "warmup_steps": 4, **sections.pop("train", {})}, **sections}


def test_decoder_classifier_learns_a_separable_task(recipe, tiny_lm_dir, tmp_path):
    path = tmp_path / "reviews.csv"
    path.write_text("text,sentiment\n" + "".join(f"{t},{'pos' if y else 'neg'}\n" for t, y in reviews(160)))
    result = run_classify(recipe(tiny_lm_dir, path, tmp_path / "run", **short(data={"label_column": "sentiment"})))
    report = result.eval_report
    assert report.labels == ["neg", "pos"] and report.n == 40
    assert report.accuracy >= 0.9 and report.macro_f1 >= 0.9, report
    assert sum(map(sum, report.confusion)) == 40
    saved = json.loads((tmp_path / "run" / "eval_report.json").read_text())
    assert saved["accuracy"] == report.accuracy
    assert json.loads((tmp_path / "run" / "head.json").read_text())["labels"] == ["neg", "pos"]

    lm = lmforge.load(tmp_path / "run")
    model, tokenizer = lm.model, lm.tokenizer
    got = predict(model, tokenizer, ["the plot was superb and lovely", "awful and boring acting"])
    assert [p.label for p in got] == ["pos", "neg"]
    assert set(got[0].probabilities) == {"neg", "pos"} and got[0].probability > 0.5


def test_bert_from_a_hugging_face_folder_with_lora_and_predict_cli(recipe, tmp_path, cli):
    hf_tiny = pytest.importorskip("hf_tiny")
    base = tmp_path / "bert"
    hf_tiny.save(hf_tiny.hf_model("bert"), base)  # BertModel: encoder + [CLS] pooler, as downloaded checkpoints are
    hf_tiny.save_wordpiece(base, POSITIVE + NEGATIVE + FILLER)
    data = tmp_path / "sst.tsv"
    data.write_text("label\tsentence\n" + "".join(f"{y}\t{t}\n" for t, y in reviews(160, seed=1)))
    run = tmp_path / "run"
    result = run_classify(recipe(base, data, run, **short(data={"text_column": "1", "label_column": "0"},
                                 lora={"rank": 4, "alpha": 8.0}, finetune={"merge": False}, train={"lr": 1e-2})))
    assert result.eval_report.labels == ["0", "1"] and result.eval_report.accuracy >= 0.9, result.eval_report
    assert not (run / "model.safetensors").exists()  # only the adapter and the head record: merged at load time

    out = cli("classify", "--predict", run, "the acting was superb", "boring and ugly film")
    assert out.returncode == 0, out.stderr
    assert [line.split("\t")[0] for line in out.stdout.splitlines()] == ["1", "0"]

    assert main(["lora", "merge", str(base), str(run), "--out", str(tmp_path / "merged")]) == 0
    lm = lmforge.load(tmp_path / "merged")
    model, tokenizer = lm.model, lm.tokenizer
    assert [p.label for p in predict(model, tokenizer, ["great and lovely plot"])] == ["1"]
