"""Bad input to `lmforge sft`, `classify` and `lora merge`: one line on stderr, exit status 2, no traceback."""

from __future__ import annotations

from pathlib import Path

import pytest

from lmforge.cli import main

CONFIGS = Path(__file__).parents[2] / "configs"


def one_line_error(out) -> str:
    assert out.returncode == 2, out.stderr
    assert out.stderr.startswith("lmforge: error: ") and out.stderr.count("\n") == 1, out.stderr
    return out.stderr


def test_bad_json_line_names_file_and_line(cli, tiny_lm_dir, capitals_jsonl, tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text(capitals_jsonl.read_text().splitlines()[0] + '\n{"messages": [oops]}\n')
    err = one_line_error(cli("sft", "--finetune.base", tiny_lm_dir, "--data.train", bad, "--out-dir", tmp_path / "r"))
    assert f"{bad} line 2 is not valid JSON" in err


def test_missing_label_column(cli, tiny_lm_dir, tmp_path):
    data = tmp_path / "d.tsv"
    data.write_text("label\tsentence\n1\tgood\n0\tbad\n")
    err = one_line_error(cli("classify", "--finetune.base", tiny_lm_dir, "--data.train", data, "--data.text_column",
                             "sentence", "--data.label_column", "stars", "--out-dir", tmp_path / "r"))
    assert "has no column 'stars'; its columns are ['label', 'sentence']" in err


@pytest.mark.parametrize(
    ("argv", "needle"),
    [
        (["sft", "--data.train", "{rows}"], "finetune.base is not set"),
        (["sft", "--finetune.base", "{base}", "--data.train", "{no_assistant}"],
         "no_assistant.jsonl line 1: the conversation has no assistant message"),
        (["sft", "--config", "{lora_recipe}", "--finetune.base", "{base}", "--data.train", "{rows}", "--lora.rank", "4"],
         "['*.attention.query'] match no linear layer; available layers include ['layers.0.attn.q'"),
        (["sft", "--finetune.base", "{base}", "--data.train", "{rows}", "--data.too_long", "cut"], "data.too_long"),
        (["sft", "--finetune.base", "{base}", "--data.train", "{rows}", "--data.seq_len", "1000"], "exceeds"),
        (["sft", "--finetune.base", "{base}", "--data.train", "{rows}", "--data.seq_len", "8"], "no row that fits"),
        (["classify", "--finetune.base", "{base}", "some text"], "texts to label need --predict"),
        (["classify", "--predict", "{base}"], "--predict MODEL needs texts"),
        (["classify", "--predict", "{base}", "hello"], "holds no task head"),
        (["lora", "merge", "{base}", "{base}", "--out", "{out}"], "has no adapter_config.json"),
    ],
)
def test_one_line_errors_in_process(argv, needle, tiny_lm_dir, capitals_jsonl, jsonl, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)  # nothing may land in the repository if a case got as far as training
    no_assistant = jsonl("no_assistant.jsonl", [{"messages": [{"role": "user", "content": "hi"}]}])
    lora_recipe = tmp_path / "lora.yaml"
    lora_recipe.write_text("lora:\n  targets: ['*.attention.query']\n")
    values = {"base": tiny_lm_dir, "rows": capitals_jsonl, "no_assistant": no_assistant, "out": tmp_path / "o",
              "lora_recipe": lora_recipe}
    assert main([a.format(**values) for a in argv]) == 2
    err = capsys.readouterr().err
    assert err.startswith("lmforge: error: ") and err.count("\n") == 1 and needle in err, err


def test_configs_parse(capsys):
    for name in ("sft-chat.yaml", "sft-translation.yaml", "classify-sst2.yaml"):
        assert (CONFIGS / name).is_file(), name
    assert main(["sft", "--config", str(CONFIGS / "sft-chat.yaml"), "--finetune.base", "/nonexistent"]) == 2
    assert "/nonexistent does not exist" in capsys.readouterr().err
