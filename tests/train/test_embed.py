"""Embedder fine-tuning: the multiple-negatives ranking loss against its formula, a short run that lowers the
loss and raises recall, LoRA training only adapters, mined hard negatives, and one-line errors on bad pairs."""

from __future__ import annotations

import json
import math

import pytest
import torch
from safetensors.torch import load_file

import lmforge
from lmforge.checkpoint.sentence import read_sentence_config
from lmforge.data.pairs import Pair, read_pairs
from lmforge.errors import LmforgeError
from lmforge.rag import Document, Index, index_documents
from lmforge.rag.mining import hard_negative, index_miner
from lmforge.train import embed
from lmforge.train.distributed import DistInfo
from lmforge.train.embed import RETRIEVAL_REPORT, run_embed
from lmforge.train.objectives import multiple_negatives_ranking_loss
from lmforge.train.report import Callback
from rag_fakes import HashEmbedder

hf_tiny = pytest.importorskip("hf_tiny")

N_TOPICS = 12
QUERY_WORDS = [f"q{i}x" for i in range(N_TOPICS)]
PASSAGE_WORDS = [f"p{i}y" for i in range(N_TOPICS)]
FILLER = ["how", "do", "i", "the", "my", "you", "can", "this", "page", "help"]


def pairs(n: int = N_TOPICS) -> list[dict]:
    """Query i and passage i share no word: only training can tell which passage answers which query."""
    return [{"query": f"how do i {QUERY_WORDS[i]}", "passage": f"this page can help {PASSAGE_WORDS[i]} {PASSAGE_WORDS[i]}"}
            for i in range(n)]


@pytest.fixture(scope="module")
def encoder(tmp_path_factory):
    """A tiny random BertModel folder with a WordPiece tokenizer and sentence-transformers files (CLS pooling)."""
    base = tmp_path_factory.mktemp("encoder")
    hf_tiny.save(hf_tiny.hf_model("bert"), base)
    hf_tiny.save_wordpiece(base, QUERY_WORDS + PASSAGE_WORDS + FILLER)
    (base / "modules.json").write_text(json.dumps([
        {"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"},
        {"idx": 1, "name": "1", "path": "1_Pooling", "type": "sentence_transformers.models.Pooling"}]))
    (base / "1_Pooling").mkdir()
    (base / "1_Pooling" / "config.json").write_text(json.dumps({"word_embedding_dimension": 32,
                                                                 "pooling_mode_cls_token": True}))
    return base


def knowledge_base() -> list[Document]:
    """Each passage as a document `doc<i>`."""
    return [Document(f"doc{i}", row["passage"]) for i, row in enumerate(pairs())]


class Losses(Callback):
    def __init__(self, losses: list[float]) -> None:
        self.losses = losses

    def on_step(self, step: int, metrics: dict[str, float]) -> None:
        self.losses.append(metrics["loss"])


def embed_recipe(base, train_file, out_dir, **sections) -> dict:
    train = {"steps": 40, "batch_size": 12, "lr": 3e-3, "min_lr": 3e-4, "warmup_steps": 2, "eval_every": 0,
             "save_every": 0, "log_every": 1, "resume": "never", **sections.pop("train", {})}
    return {"finetune": {"base": str(base), **sections.pop("finetune", {})},
            "data": {"train": str(train_file), "eval": str(train_file), **sections.pop("data", {})},
            "train": train, "out_dir": str(out_dir), **sections}


def test_loss_equals_the_formula():
    torch.manual_seed(0)
    q, c, s = torch.randn(4, 8), torch.randn(7, 8), 20.0  # 4 queries, their 4 passages and 3 hard negatives
    cos = torch.nn.functional.cosine_similarity(q[:, None], c[None], dim=-1)  # (4, 7)
    direct = [-math.log(math.exp(s * cos[i, i]) / sum(math.exp(s * cos[i, j]) for j in range(7))) for i in range(4)]
    got = multiple_negatives_ranking_loss(q, c, s)
    assert torch.allclose(got, torch.tensor(direct), rtol=1e-4, atol=1e-4)
    assert multiple_negatives_ranking_loss(q, torch.cat([q, c[4:]]), s).mean() < got.mean()  # own query = best passage


def test_loss_matches_sentence_transformers():
    st = pytest.importorskip("sentence_transformers.losses")
    torch.manual_seed(1)
    q, p, n = torch.randn(5, 8), torch.randn(5, 8), torch.randn(5, 8)

    class Fixed(torch.nn.Module):  # hands the loss the given embeddings, one tensor per input column
        def forward(self, features):
            return {"sentence_embedding": features["x"]}

    ref = st.MultipleNegativesRankingLoss(Fixed(), scale=20.0)(
        [{"x": q}, {"x": p}, {"x": n}], labels=None)
    assert torch.allclose(multiple_negatives_ranking_loss(q, torch.cat([p, n]), 20.0).mean(), ref, atol=1e-5)


def test_training_lowers_the_loss_and_raises_recall(encoder, jsonl, tmp_path):
    data = jsonl("pairs.jsonl", pairs())
    losses = []
    result = run_embed(embed_recipe(encoder, data, tmp_path / "run"), callbacks=[Losses(losses)])
    assert sum(losses[-5:]) / 5 < sum(losses[:5]) / 5 * 0.5, losses
    assert result.after["recall@1"] > result.before["recall@1"] + 0.3, (result.before, result.after)
    assert result.after["mrr"] > result.before["mrr"]
    saved = json.loads((tmp_path / "run" / RETRIEVAL_REPORT).read_text())
    assert saved["after"] == result.after and saved["n"] == N_TOPICS
    assert "held-out retrieval: recall@1" in result.summary()

    assert read_sentence_config(tmp_path / "run").pooling == "cls"  # the base's pooling travels with the model
    lm = lmforge.load(tmp_path / "run")
    vectors = lm.embed([pairs()[0]["query"], pairs()[0]["passage"], pairs()[1]["passage"]])  # (3, 32)
    assert vectors[0] @ vectors[1] > vectors[0] @ vectors[2]
    index_documents(tmp_path / "kb.index", knowledge_base(), lm, str(tmp_path / "run"))  # an index takes it
    hits = Index.open(tmp_path / "kb.index", lm).search(pairs()[1]["query"], k=3, mode="dense")
    assert hits[0].doc_id == "doc1", hits


def test_lora_trains_only_the_adapters(encoder, jsonl, tmp_path):
    data = jsonl("pairs.jsonl", pairs())
    run = tmp_path / "run"
    result = run_embed(embed_recipe(encoder, data, run, lora={"rank": 4, "alpha": 8.0}, finetune={"merge": False},
                                    train={"lr": 1e-2, "steps": 30}))
    assert not (run / "model.safetensors").exists()
    names = load_file(run / "adapter.safetensors").keys()
    assert names and all("lora" in name for name in names), sorted(names)[:4]
    assert result.after["mrr"] > result.before["mrr"], (result.before, result.after)


def test_embed_train_refuses_several_processes_in_one_line(encoder, jsonl, tmp_path, monkeypatch):
    two_ranks = DistInfo(rank=0, world_size=2, local_rank=0, device=torch.device("cpu"))  # no process group needed:
    monkeypatch.setattr(embed, "init_distributed", lambda: two_ranks)  # the check comes before any collective
    with pytest.raises(LmforgeError, match=r"^embed-train runs in one process: .* not torchrun$"):
        run_embed(embed_recipe(encoder, jsonl("pairs.jsonl", pairs()), tmp_path / "run"))


def test_hard_negatives_from_the_data_and_mined_from_an_index(encoder, jsonl, tmp_path):
    index_documents(tmp_path / "kb.index", knowledge_base(), HashEmbedder(), "hash")
    index = Index.open(tmp_path / "kb.index")  # lexical search needs no embedder
    passages = [r["passage"] for r in pairs()]
    rows = [Pair(f"help page {PASSAGE_WORDS[i]}", passages[i], doc_id=f"doc{i}") for i in range(N_TOPICS)]
    mined = index_miner(index, mode="lexical")(rows)
    assert all(m in passages and m != r.passage for m, r in zip(mined, rows)), mined  # never the positive
    unnamed = [Pair(r.query, r.passage) for r in rows]  # no doc_id: the positive is told by its text
    assert index_miner(index, mode="lexical")(unnamed) == mined
    assert hard_negative(index.search(rows[0].query, k=1, mode="lexical"), rows[0]) is None

    given = [{**row, "negative": pairs()[(i + 1) % N_TOPICS]["passage"]} for i, row in enumerate(pairs())]
    result = run_embed(embed_recipe(encoder, jsonl("neg.jsonl", given), tmp_path / "run", train={"steps": 3},
                                    data={"mine_index": str(tmp_path / "kb.index")}),
                       miner=lambda todo: [None] * len(todo))
    assert result.train.step == 3


@pytest.mark.parametrize(("row", "message"), [
    ({"query": "a"}, "line 1 has no field 'passage'"),
    ({"query": "a", "passage": "  "}, "line 1 has 'passage' = '  '"),
    ({"passage": "a", "query": "b", "negative": 3}, "line 1 has 'negative' = 3"),
])
def test_bad_pairs_fail_in_one_line(jsonl, row, message):
    with pytest.raises(LmforgeError, match=message) as error:
        read_pairs(jsonl("bad.jsonl", [row]))
    assert "\n" not in str(error.value)


def test_cli_reports_bad_input_in_one_line(encoder, jsonl, tmp_path, cli):
    data = jsonl("bad.jsonl", [{"question": "a", "passage": "b"}])
    out = cli("embed-train", "--finetune.base", encoder, "--data.train", data, "--out-dir", tmp_path / "run")
    assert out.returncode == 2 and out.stderr.startswith("lmforge: error:") and out.stderr.count("\n") == 1, out.stderr
    assert "has no field 'query'" in out.stderr and not (tmp_path / "run").exists()
    with pytest.raises(LmforgeError, match=r"data\.mine_index needs an index miner"):
        run_embed(embed_recipe(encoder, data, tmp_path / "run", data={"mine_index": "kb.index"}))
