"""Classification rows: CSV, TSV and JSONL; named or indexed columns; string or integer labels; errors."""

from __future__ import annotations

from functools import partial

import pytest

from lmforge.data.classification import (
    ClassifyDataConfig,
    collate_classification,
    label_names,
    load_classification_data,
    read_labelled,
)
from lmforge.errors import LmforgeError


def test_tsv_csv_and_jsonl_read_alike(tmp_path, jsonl):
    (tmp_path / "a.tsv").write_text('label\tsentence\n1\ta "quoted" film ,\n0\tdull\n')
    (tmp_path / "a.csv").write_text('sentence,label\n"a ""quoted"" film ,",1\ndull,0\n')
    rows = {
        "tsv": read_labelled(tmp_path / "a.tsv", "sentence", "label"),
        "csv": read_labelled(tmp_path / "a.csv", "sentence", "label"),
        "jsonl": read_labelled(jsonl("a.jsonl", [{"sentence": 'a "quoted" film ,', "label": 1},
                                                 {"sentence": "dull", "label": 0}]), "sentence", "label"),
        "index": read_labelled(tmp_path / "a.tsv", "1", "0"),  # columns by position
    }
    for got in rows.values():
        assert [(r.text, r.label) for r in got] == [('a "quoted" film ,', "1"), ("dull", "0")]
    assert rows["tsv"][1].where.endswith("a.tsv line 3")


def test_label_names_sorted_numerically_or_given():
    class Row:
        def __init__(self, label):
            self.label = label

    assert label_names([Row("10"), Row("9"), Row("2")]) == ["2", "9", "10"]
    assert label_names([Row("pos"), Row("neg")]) == ["neg", "pos"]
    assert label_names([Row("pos")], ["pos", "neg"]) == ["pos", "neg"]


@pytest.mark.parametrize(
    ("content", "column", "needle"),
    [
        ("label\tsentence\n1\tgood\n", "text", "has no column 'text'; its columns are ['label', 'sentence']"),
        ("label\tsentence\n1\n", "sentence", "line 2 has 1 columns"),
        ("", "sentence", "is empty"),
    ],
)
def test_bad_files_are_one_line(tmp_path, content, column, needle):
    (tmp_path / "d.tsv").write_text(content)
    with pytest.raises(LmforgeError) as err:
        read_labelled(tmp_path / "d.tsv", column, "label")
    assert needle in str(err.value) and "\n" not in str(err.value)


def test_jsonl_errors_name_the_line(jsonl):
    path = jsonl("d.jsonl", [{"text": "ok", "label": 1}, {"text": "no label"}])
    with pytest.raises(LmforgeError, match=r"d\.jsonl line 2 has no field 'label'"):
        read_labelled(path, "text", "label")
    path = jsonl("e.jsonl", [{"text": "ok", "label": 1.5}])
    with pytest.raises(LmforgeError, match="must be a string or an integer"):
        read_labelled(path, "text", "label")
    other = path.with_name("x.parquet")
    other.write_text("x")
    with pytest.raises(LmforgeError, match=r"unknown suffix '\.parquet'"):
        read_labelled(other, "text", "label")


def test_unknown_eval_label_and_single_label_are_refused(tiny_tokenizer, jsonl):
    train = jsonl("t.jsonl", [{"text": "good", "label": "pos"}, {"text": "bad", "label": "neg"}])
    evals = jsonl("e.jsonl", [{"text": "meh", "label": "neutral"}])
    with pytest.raises(LmforgeError, match=r"e\.jsonl line 1: label 'neutral' is not one of \['neg', 'pos'\]"):
        load_classification_data(ClassifyDataConfig(train=str(train), eval=str(evals)), tiny_tokenizer, 32, 0)
    one = jsonl("o.jsonl", [{"text": "good", "label": "pos"}])
    with pytest.raises(LmforgeError, match="at least two"):
        load_classification_data(ClassifyDataConfig(train=str(one)), tiny_tokenizer, 32, 0)


def test_encoding_truncates_and_collates(tiny_tokenizer, jsonl):
    rows = [{"text": "the quick brown fox " * 20, "label": "a"}, {"text": "", "label": "b"}] * 5
    data = load_classification_data(ClassifyDataConfig(train=str(jsonl("t.jsonl", rows)), eval_fraction=0.2),
                                    tiny_tokenizer, 16, 0)
    assert data.labels == ["a", "b"] and data.truncated == 5 and (len(data.train), len(data.eval)) == (8, 2)
    assert max(len(ids) for ids, _ in data.train) == 16
    batch = collate_classification(data.train[:3], pad_id=tiny_tokenizer.pad_id)
    assert batch["input_ids"].shape == batch["attention_mask"].shape and batch["labels"].shape == (3,)


def test_bert_batches_are_as_wide_as_their_longest_text(tmp_path, jsonl):
    """A sentence-embedding tokenizer.json pads every text to 128; a classify batch is padded to its longest row."""
    import tokenizers

    from lmforge.data.rows import RowLoader
    from lmforge.tokenizer import Tokenizer

    hf_tiny = pytest.importorskip("hf_tiny")
    words = ["good", "bad", "film", "plot", "the", "a"]
    hf_tiny.save_wordpiece(tmp_path, words)
    backend = tokenizers.Tokenizer.from_file(str(tmp_path / "tokenizer.json"))
    backend.enable_padding(length=128, pad_id=0, pad_token="[PAD]")
    backend.enable_truncation(max_length=128)
    backend.save(str(tmp_path / "tokenizer.json"))
    tokenizer = Tokenizer.from_dir(tmp_path)
    rows = [{"text": " ".join(words[: 1 + i % 6]), "label": i % 2} for i in range(12)]
    data = load_classification_data(ClassifyDataConfig(train=str(jsonl("t.jsonl", rows)), eval_fraction=0.0),
                                    tokenizer, 64, 0)
    loader = RowLoader(data.train, partial(collate_classification, pad_id=tokenizer.padding_id), 4, seed=0)
    for _ in range(3):
        batch = loader.next_batch()
        lengths = batch["attention_mask"].sum(1)
        assert batch["input_ids"].shape[1] == int(lengths.max()) <= 8  # [CLS] + at most 6 words + [SEP]


def test_a_cut_text_keeps_its_closing_special_token(tmp_path):
    """Truncation drops words, not [SEP]: the ids equal transformers' `truncation=True`."""
    from transformers import PreTrainedTokenizerFast

    from lmforge.data.classification import encode_texts

    hf_tiny = pytest.importorskip("hf_tiny")
    words = ["good", "bad", "film", "plot", "the", "a"]
    tokenizer = hf_tiny.save_wordpiece(tmp_path, words)
    texts = [" ".join(words * 3), "good film"]
    ids, cut = encode_texts(tokenizer, texts, 8)
    reference = PreTrainedTokenizerFast(tokenizer_file=str(tmp_path / "tokenizer.json"))
    assert cut == 1 and ids == reference(texts, truncation=True, max_length=8)["input_ids"]
    assert tokenizer.decode(ids[0][-1:]) == "[SEP]"
