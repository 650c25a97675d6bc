"""The rows every fine-tuning verb shares: held-out splits and the one resumable shuffled loader."""

from __future__ import annotations

import json

import pytest
import torch

from lmforge.data.rows import RowLoader, ShuffledOrder, SplitConfig, context_length, holdout
from lmforge.errors import LmforgeError


def test_row_loader_is_seeded_epoch_complete_and_resumable():
    items = list(range(10))

    def collate(rows):
        return {"x": torch.tensor(rows)}

    loader = RowLoader(items, collate, batch_size=5, seed=4)
    first_epoch = torch.cat([loader.next_batch()["x"] for _ in range(2)]).tolist()
    assert sorted(first_epoch) == items and first_epoch != items
    state = loader.state_dict()
    upcoming = [loader.next_batch()["x"].tolist() for _ in range(3)]
    resumed = RowLoader(items, collate, batch_size=5, seed=0)
    resumed.load_state_dict(state)
    assert [resumed.next_batch()["x"].tolist() for _ in range(3)] == upcoming

    ranks = [RowLoader(items, collate, batch_size=2, seed=4, rank=r, world_size=2).next_batch()["x"].tolist()
             for r in range(2)]
    assert ranks[0] + ranks[1] == RowLoader(items, collate, batch_size=4, seed=4).next_batch()["x"].tolist()
    with pytest.raises(LmforgeError, match="same data"):
        RowLoader(items[:9], collate, batch_size=5, seed=4).load_state_dict(state)


def test_loader_state_survives_json_and_the_order_is_epochwise_permutations():
    order = ShuffledOrder(7, seed=5)
    assert sorted(order.span(0, 7)) == list(range(7)) and sorted(order.span(7, 7)) == list(range(7))
    assert order.span(0, 7) != order.span(7, 7)  # a new permutation each epoch
    loader = RowLoader(list(range(7)), lambda rows: {"x": torch.tensor(rows)}, batch_size=3, seed=5)
    loader.next_batch()
    resumed = RowLoader(list(range(7)), lambda rows: {"x": torch.tensor(rows)}, batch_size=3, seed=0)
    resumed.load_state_dict(json.loads(json.dumps(loader.state_dict())))
    assert resumed.next_batch()["x"].tolist() == loader.next_batch()["x"].tolist() == order.span(3, 3)
    old = {"seed": 5, "batches_drawn": 2, "n_pairs": 7, "global_batch_size": 3}  # a preference run of release 0.1
    resumed.load_state_dict(old)
    assert resumed.next_batch()["x"].tolist() == order.span(6, 3)


def test_holdout_is_seeded_and_disjoint():
    train, held = holdout(list(range(20)), 0.2, seed=3)
    assert len(held) == 4 and sorted(train + held) == list(range(20))
    assert holdout(list(range(20)), 0.2, seed=3) == (train, held)
    assert holdout(list(range(20)), 0.2, seed=4) != (train, held)
    assert holdout(list(range(20)), 0.0, seed=3) == (list(range(20)), [])
    assert len(holdout(list(range(20)), 0.001, seed=3)[1]) == 1  # at least one row when asked for any
    with pytest.raises(LmforgeError, match="too few to hold out"):
        holdout([1], 0.5, seed=0)
    with pytest.raises(LmforgeError, match=r"data.eval_fraction must be in \[0, 1\)"):
        holdout(list(range(20)), 1.0, seed=0)


def test_split_config_checks_its_keys():
    with pytest.raises(LmforgeError, match=r"data\.seq_len must be >= 0"):
        SplitConfig(train="x", seq_len=-1).validate()
    with pytest.raises(LmforgeError, match=r"data\.train is not set"):
        SplitConfig().require_train("a JSONL file")
    assert context_length(0, 128) == 128 and context_length(64, 128) == 64
    with pytest.raises(LmforgeError, match="exceeds the model's max_seq_len 128"):
        context_length(129, 128)
