"""mask_tokens: BERT's 15% selection and 80/10/10 replacement, specials untouched."""

from __future__ import annotations

import pytest
import torch

from lmforge.data import IGNORE_INDEX, mask_tokens
from lmforge.errors import LmforgeError

VOCAB, PAD, CLS, SEP, MASK = 1000, 0, 1, 2, 3
SPECIALS = {PAD, CLS, SEP, MASK}


def batch(rows: int = 200, length: int = 500) -> torch.Tensor:
    """Random regular ids framed by [CLS] ... [SEP] and a padded tail."""
    ids = torch.randint(4, VOCAB, (rows, length), generator=torch.Generator().manual_seed(0))
    n_pad = length // 10
    ids[:, 0], ids[:, length - n_pad - 1] = CLS, SEP
    ids[:, length - n_pad :] = PAD
    return ids


def mask(ids: torch.Tensor, seed: int = 0, **kwargs) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    return mask_tokens(
        ids, mask_id=MASK, vocab_size=VOCAB, special_ids=SPECIALS, generator=generator, **kwargs
    )


def test_selection_and_replacement_statistics():
    ids = batch()
    corrupted, labels = mask(ids)
    regular = ~torch.isin(ids, torch.tensor(sorted(SPECIALS)))
    selected = labels != IGNORE_INDEX
    assert abs(selected.sum().item() / regular.sum().item() - 0.15) < 0.005
    n = selected.sum().item()
    as_mask = (corrupted == MASK) & selected
    unchanged = (corrupted == ids) & selected
    random = selected & ~as_mask & ~unchanged
    assert abs(as_mask.sum().item() / n - 0.8) < 0.01
    assert abs(unchanged.sum().item() / n - 0.1) < 0.01  # a random draw equal to the original lands here
    assert abs(random.sum().item() / n - 0.1) < 0.01
    assert not torch.isin(corrupted[random], torch.tensor(sorted(SPECIALS))).any()


def test_labels_hold_originals_at_selected_positions_only():
    ids = batch(20, 100)
    corrupted, labels = mask(ids)
    selected = labels != IGNORE_INDEX
    assert torch.equal(labels[selected], ids[selected])
    assert torch.equal(corrupted[~selected], ids[~selected])


def test_specials_and_padding_are_never_selected():
    ids = batch()
    corrupted, labels = mask(ids, mlm_probability=1.0)
    special = torch.isin(ids, torch.tensor(sorted(SPECIALS)))
    assert (labels[special] == IGNORE_INDEX).all() and (labels[~special] != IGNORE_INDEX).all()
    assert torch.equal(corrupted[special], ids[special])


def test_input_untouched_and_seed_reproducible():
    ids = batch(10, 50)
    before = ids.clone()
    first, second = mask(ids, seed=4), mask(ids, seed=4)
    assert torch.equal(ids, before)
    assert torch.equal(first[0], second[0]) and torch.equal(first[1], second[1])
    assert not torch.equal(first[1], mask(ids, seed=5)[1])


def test_bad_arguments():
    with pytest.raises(LmforgeError, match="mlm_probability"):
        mask(batch(2, 10), mlm_probability=1.5)
    with pytest.raises(LmforgeError, match="vocab_size=1000"):
        mask_tokens(
            batch(2, 10), mask_id=VOCAB, vocab_size=VOCAB, special_ids=SPECIALS, generator=torch.Generator()
        )
