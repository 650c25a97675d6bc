"""`lm.embed(texts)` equals `SentenceTransformer(folder).encode(texts)` on folders sentence-transformers saved."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
import torch.nn.functional as F
from torch.testing import assert_close

import lmforge
from hf_tiny import hf_model, save_wordpiece
from lmforge.errors import LmforgeError

st = pytest.importorskip("sentence_transformers")
from sentence_transformers.base.modules import Normalize, Transformer  # noqa: E402
from sentence_transformers.sentence_transformer.modules import Pooling  # noqa: E402

WORDS = ["the", "a", "cat", "dog", "sat", "on", "mat", "ran", "fast", "slow", "big", "small", "red", "blue"]
TEXTS = [
    "the cat sat on the mat",
    "a dog",
    "The BIG red dog ran fast",  # capitals: lowercased only when the folder says do_lower_case
    "blue",
    " ".join(WORDS * 6),  # longer than the model's 64 positions: cut, keeping [SEP]
]


def sentence_folder(tmp_path, family: str = "bert", pooling: str = "mean", normalize: bool = True):
    """A tiny random model + WordPiece tokenizer wrapped and saved by sentence-transformers."""
    base = tmp_path / "base"
    hf_model(family).save_pretrained(base)
    save_wordpiece(base, WORDS)
    transformer = Transformer(str(base))
    modules = [transformer, Pooling(transformer.get_embedding_dimension(), pooling_mode=pooling)]
    folder = tmp_path / "sentence"
    st.SentenceTransformer(modules=[*modules, Normalize()] if normalize else modules, device="cpu").save(str(folder))
    return folder


def encode(folder, texts=TEXTS):
    return st.SentenceTransformer(str(folder), device="cpu").encode(texts, convert_to_tensor=True)


@pytest.mark.parametrize(
    ("family", "pooling", "normalize"),
    [
        ("bert", "mean", True),
        ("bert", "mean", False),
        ("bert", "cls", True),
        ("bert", "cls", False),
        ("bert", "lasttoken", True),
        ("bert", "lasttoken", False),
        ("llama", "lasttoken", True),  # decoder embedders (e5-mistral, Qwen3-Embedding) read the last token
    ],
)
def test_embed_equals_sentence_transformers(tmp_path, family, pooling, normalize):
    folder = sentence_folder(tmp_path, family, pooling, normalize)
    got = lmforge.load(folder).embed(TEXTS)
    assert_close(got, encode(folder), atol=1e-5, rtol=1e-5)
    assert torch.allclose(got.norm(dim=-1), torch.ones(len(TEXTS))) == normalize


def test_folders_in_the_older_format(tmp_path):
    """sentence-transformers 2-5 names, pooling booleans, max_seq_length and do_lower_case."""
    folder = sentence_folder(tmp_path, pooling="cls")
    shutil.rmtree(folder / "2_Normalize")
    (folder / "modules.json").write_text(json.dumps([
        {"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"},
        {"idx": 1, "name": "1", "path": "1_Pooling", "type": "sentence_transformers.models.Pooling"},
    ]))
    (folder / "1_Pooling" / "config.json").write_text(json.dumps({
        "word_embedding_dimension": 32, "pooling_mode_cls_token": False, "pooling_mode_mean_tokens": True,
        "pooling_mode_max_tokens": False, "pooling_mode_mean_sqrt_len_tokens": False,
    }))
    (folder / "sentence_bert_config.json").write_text(json.dumps({"max_seq_length": 6, "do_lower_case": True}))
    lm = lmforge.load(folder)
    assert (lm.sentence.pooling, lm.sentence.normalize, lm.sentence.max_length) == ("mean", False, 6)
    assert_close(lm.embed(TEXTS), encode(folder), atol=1e-5, rtol=1e-5)


def test_default_prompt_is_put_before_every_text(tmp_path):
    folder = sentence_folder(tmp_path)
    config = json.loads((folder / "config_sentence_transformers.json").read_text())
    config.update(prompts={"query": "the dog ", "document": ""}, default_prompt_name="query")
    (folder / "config_sentence_transformers.json").write_text(json.dumps(config))
    assert_close(lmforge.load(folder).embed(TEXTS), encode(folder), atol=1e-5, rtol=1e-5)


def test_without_sentence_transformers_files_embed_is_mean_pooled_and_normalised(make_hf, tmp_path):
    model, path = make_hf("bert")
    save_wordpiece(path, WORDS)
    lm = lmforge.load(path)
    ids = [lm.tokenizer.encode(t, add_special_tokens=True) for t in TEXTS[:3]]
    width = max(map(len, ids))
    mask = torch.tensor([[1] * len(i) + [0] * (width - len(i)) for i in ids])
    padded = torch.tensor([i + [0] * (width - len(i)) for i in ids])
    with torch.no_grad():
        hidden = model(input_ids=padded, attention_mask=mask).last_hidden_state
    mean = (hidden * mask[..., None]).sum(1) / mask.sum(1, keepdim=True)
    assert_close(lm.embed(TEXTS[:3]), F.normalize(mean, dim=-1), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize(
    ("edit", "needle"),
    [
        (lambda f: (f / "1_Pooling" / "config.json").write_text(json.dumps({"pooling_mode": "max"})),
         "pools with max; lmforge pools with one of cls, mean, lasttoken"),
        (lambda f: (f / "1_Pooling" / "config.json").write_text(
            json.dumps({"pooling_mode_cls_token": True, "pooling_mode_mean_tokens": True})),
         "pools with cls + mean"),
        (lambda f: (f / "modules.json").write_text(json.dumps([
            {"idx": 0, "path": "", "type": "sentence_transformers.models.Transformer"},
            {"idx": 1, "path": "1_Pooling", "type": "sentence_transformers.models.Pooling"},
            {"idx": 2, "path": "2_Dense", "type": "sentence_transformers.models.Dense"}])),
         "lists a Dense module"),
    ],
)
def test_pipelines_lmforge_cannot_run_are_refused_in_one_line(tmp_path, edit, needle):
    folder = sentence_folder(tmp_path)
    edit(folder)
    with pytest.raises(LmforgeError) as e:
        lmforge.load(folder)
    assert needle in str(e.value) and "\n" not in str(e.value)
