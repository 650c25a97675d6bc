"""TokenShards and the loaders: exact windows, determinism, exact resume, ranks, evaluation."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from lmforge.data import TokenLoader, TokenShards, iter_eval_batches, prepare
from lmforge.data.shards import eval_rows
from lmforge.errors import LmforgeError

DOCS = [f"document {i}: " + "abcdefghij"[: i % 10] * (i % 7 + 1) for i in range(300)]


@pytest.fixture
def out_dir(tmp_path, write, tokenizer):
    """A prepare output with several train shards (of 500 tokens) and a val split."""
    path = write("corpus.jsonl", "".join(json.dumps({"text": d}) + "\n" for d in DOCS))
    prepare([path], tokenizer, tmp_path / "tokens", val_fraction=0.1, shard_tokens=500)
    return tmp_path / "tokens"


def stream(shards: TokenShards) -> np.ndarray:
    return shards.read(0, shards.n_tokens)


def is_window_of(row: list[int], tokens: np.ndarray) -> bool:
    """Whether `row` occurs contiguously in `tokens`."""
    windows = np.lib.stride_tricks.sliding_window_view(tokens, len(row))
    return bool((windows == np.asarray(row)).all(axis=1).any())


def draw(loader: TokenLoader, n: int) -> list[dict[str, torch.Tensor]]:
    return [loader.next_batch() for _ in range(n)]


def same(a: list[dict[str, torch.Tensor]], b: list[dict[str, torch.Tensor]]) -> bool:
    return len(a) == len(b) and all(torch.equal(x[k], y[k]) for x, y in zip(a, b) for k in x)


def test_shards_read_back_the_prepared_stream(out_dir, tokenizer):
    train, val = TokenShards.open(out_dir, "train"), TokenShards.open(out_dir, "val")
    assert len(train.arrays) > 3 and all(len(a) == 500 for a in train.arrays[:-1])
    assert stream(train).tolist() + stream(val).tolist() == tokenizer.expected(*DOCS)
    assert train.n_bytes + val.n_bytes == sum(len(d.encode()) for d in DOCS)


def test_batches_are_windows_of_the_stream_with_shifted_labels(out_dir):
    shards = TokenShards.open(out_dir)
    tokens = stream(shards)
    for batch in draw(TokenLoader(shards, batch_size=4, seq_len=16, seed=0), 5):
        assert batch["input_ids"].shape == batch["labels"].shape == (4, 16)
        assert batch["input_ids"].dtype == batch["labels"].dtype == torch.long
        assert torch.equal(batch["input_ids"][:, 1:], batch["labels"][:, :-1])
        for inputs, labels in zip(batch["input_ids"], batch["labels"]):
            assert is_window_of([*inputs.tolist(), labels[-1].item()], tokens)


def test_windows_never_cross_shards_and_cover_every_shard(out_dir):
    shards = TokenShards.open(out_dir)
    loader = TokenLoader(shards, batch_size=64, seq_len=32, seed=3)
    rows = [torch.cat([b["input_ids"], b["labels"][:, -1:]], 1) for b in draw(loader, 10)]
    hits = set()
    for row in torch.cat(rows).tolist():
        owners = [i for i, array in enumerate(shards.arrays) if is_window_of(row, np.asarray(array))]
        assert owners
        hits.update(owners)
    assert hits == set(range(len(shards.arrays)))


def test_same_seed_same_batches_other_seed_other_batches(out_dir):
    shards = TokenShards.open(out_dir)
    first = draw(TokenLoader(shards, 3, 8, seed=7), 4)
    assert same(first, draw(TokenLoader(shards, 3, 8, seed=7), 4))
    assert not same(first, draw(TokenLoader(shards, 3, 8, seed=8), 4))


def test_resume_mid_stream_through_json(out_dir):
    shards = TokenShards.open(out_dir)
    original = TokenLoader(shards, 4, 16, seed=11)
    draw(original, 5)
    state = json.loads(json.dumps(original.state_dict()))
    expected = draw(original, 6)
    resumed = TokenLoader(shards, 4, 16, seed=0)  # the seed comes from the state
    resumed.load_state_dict(state)
    assert same(draw(resumed, 6), expected)


def test_iteration_matches_next_batch(out_dir):
    shards = TokenShards.open(out_dir)
    iterated = [batch for _, batch in zip(range(3), TokenLoader(shards, 2, 8, seed=1))]
    assert same(iterated, draw(TokenLoader(shards, 2, 8, seed=1), 3))


def test_two_ranks_split_the_one_rank_global_batch(out_dir):
    shards = TokenShards.open(out_dir)
    single = draw(TokenLoader(shards, 4, 16, seed=5), 3)
    ranks = [draw(TokenLoader(shards, 2, 16, seed=5, rank=r, world_size=2), 3) for r in range(2)]
    for step, batch in enumerate(single):
        for key in batch:
            assert torch.equal(torch.cat([ranks[0][step][key], ranks[1][step][key]]), batch[key])


def test_state_from_other_settings_is_refused(out_dir):
    shards = TokenShards.open(out_dir)
    state = TokenLoader(shards, 4, 16, seed=0).state_dict()
    with pytest.raises(LmforgeError, match="resume with the same data"):
        TokenLoader(shards, 4, 32, seed=0).load_state_dict(state)
    TokenLoader(shards, 2, 16, seed=0, rank=1, world_size=2).load_state_dict(state)  # same global batch


def test_eval_batches_are_consecutive_and_deterministic(out_dir):
    val = TokenShards.open(out_dir, "val")
    tokens, seq_len = stream(val), 10
    batches = list(iter_eval_batches(val, batch_size=4, seq_len=seq_len))
    inputs = torch.cat([b["input_ids"] for b in batches])
    n_windows = (len(tokens) - 1) // seq_len
    assert inputs.shape == (n_windows, seq_len)
    assert inputs.flatten().tolist() == tokens[: n_windows * seq_len].tolist()
    assert (
        torch.cat([b["labels"] for b in batches]).flatten().tolist()
        == tokens[1 : n_windows * seq_len + 1].tolist()
    )
    assert same(batches, list(iter_eval_batches(val, 4, seq_len)))
    assert len(list(iter_eval_batches(val, 4, seq_len, max_batches=2))) == 2


def test_eval_windows_do_not_depend_on_rows_per_batch(out_dir):
    """Short windows are evaluated more at a time (`eval_rows`); `max_batches` still counts batches of
    `batch_size`, so the same windows are evaluated."""
    val = TokenShards.open(out_dir, "val")
    def windows(**kwargs):
        return torch.cat([b["input_ids"] for b in iter_eval_batches(val, 3, 4, max_batches=5, **kwargs)])
    grouped = list(iter_eval_batches(val, 3, 4, max_batches=5, rows=7))
    assert [len(b["input_ids"]) for b in grouped] == [7, 7, 1]
    assert torch.equal(windows(rows=7), windows()) and len(windows()) == 15
    assert eval_rows(12, 64) == 32 and eval_rows(8, 1024) == 8  # only short windows are grouped
    with pytest.raises(LmforgeError, match="rows must be positive"):
        iter_eval_batches(val, 3, 4, rows=0)


def test_eval_windows_cross_shard_boundaries(out_dir):
    train = TokenShards.open(out_dir)
    tokens = stream(train)
    batch = next(iter_eval_batches(train, batch_size=100, seq_len=7))
    assert batch["input_ids"].flatten().tolist() == tokens[:700].tolist()


def test_train_and_val_are_disjoint_parts_of_the_stream(out_dir, tokenizer):
    train, val = TokenShards.open(out_dir), TokenShards.open(out_dir, "val")
    full = tokenizer.expected(*DOCS)
    assert stream(train).tolist() == full[: train.n_tokens]
    assert stream(val).tolist() == full[train.n_tokens :]


def test_seq_len_longer_than_every_shard(out_dir):
    with pytest.raises(LmforgeError, match=r"no shard of seq_len \+ 1 = 501 tokens"):
        TokenLoader(TokenShards.open(out_dir), 1, 500, seed=0)
    with pytest.raises(LmforgeError, match="fewer than seq_len"):
        iter_eval_batches(TokenShards.open(out_dir, "val"), 1, 100_000)


def test_check_vocab_and_tokenizer(out_dir, tokenizer, make_tokenizer):
    shards = TokenShards.open(out_dir)
    shards.check_vocab(257)
    shards.check_tokenizer(tokenizer)
    with pytest.raises(LmforgeError, match="holds token id 256 but the vocabulary has only 256"):
        shards.check_vocab(256)
    with pytest.raises(LmforgeError, match="different tokenizer"):
        shards.check_tokenizer(make_tokenizer(offset=1))


def test_open_missing_folder(tmp_path):
    with pytest.raises(LmforgeError, match=r"token folder .*nowhere does not exist"):
        TokenShards.open(tmp_path / "nowhere")


def test_open_folder_without_meta(tmp_path):
    (tmp_path / "x").mkdir()
    with pytest.raises(LmforgeError, match=r"x has no meta\.json"):
        TokenShards.open(tmp_path / "x")


def test_open_corrupt_meta(out_dir):
    (out_dir / "meta.json").write_text("{not json")
    with pytest.raises(LmforgeError, match=r"meta\.json is corrupt"):
        TokenShards.open(out_dir)


def test_open_truncated_shard(out_dir):
    shard = out_dir / "train_001.bin"
    shard.write_bytes(shard.read_bytes()[:-2])
    with pytest.raises(LmforgeError, match=r"train_001\.bin holds 998 bytes but meta\.json says 500"):
        TokenShards.open(out_dir)


def test_open_missing_shard(out_dir):
    (out_dir / "val_000.bin").unlink()
    with pytest.raises(LmforgeError, match=r"val_000\.bin is missing"):
        TokenShards.open(out_dir, "val")


def test_open_split_without_tokens(tmp_path, write, tokenizer):
    prepare([write("a.txt", "abc")], tokenizer, tmp_path / "out", val_fraction=0)
    with pytest.raises(LmforgeError, match=r"val split .* holds no tokens"):
        TokenShards.open(tmp_path / "out", "val")
    with pytest.raises(LmforgeError, match="no 'test' split"):
        TokenShards.open(tmp_path / "out", "test")
