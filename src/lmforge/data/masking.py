"""BERT's masked-language-model corruption of a batch of token ids.

Design choices:
- The recipe of Devlin et al. (2019), as in HF's `DataCollatorForLanguageModeling`: each eligible
  position is selected with probability `mlm_probability`; a selected position becomes `mask_id`
  with probability 0.8, a random token with probability 0.1, and stays unchanged otherwise. Labels
  hold the original id at selected positions and -100 (ignored by cross-entropy) elsewhere.
- Eligible means not in `special_ids`: pass the pad id among them so padding is never selected.
- Random replacements are drawn uniformly from the ids that are neither special nor `mask_id`
  (HF draws from the whole vocabulary, which can put [CLS] or [PAD] mid-sentence).
- A pure function: the caller's tensor is not modified, and all randomness comes from
  `generator` (on the ids' device), so a seeded generator reproduces the same masks.
"""

from __future__ import annotations

from collections.abc import Collection

import torch

from lmforge.errors import LmforgeError

IGNORE_INDEX = -100  # the label cross-entropy skips
MASK_SHARE, RANDOM_SHARE = 0.8, 0.1  # of the selected positions; the remaining 0.1 stay unchanged


def mask_tokens(
    input_ids: torch.Tensor,
    *,
    mask_id: int,
    vocab_size: int,
    special_ids: Collection[int],
    mlm_probability: float = 0.15,
    generator: torch.Generator,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Return (corrupted input_ids, labels), both shaped like `input_ids` (LongTensor)."""
    excluded = sorted({*special_ids, mask_id})
    _check_arguments(excluded, vocab_size, mlm_probability)
    device = input_ids.device
    excluded_ids = torch.tensor(excluded, dtype=input_ids.dtype, device=device)

    draw = torch.rand(input_ids.shape, generator=generator, device=device)
    selected = (draw < mlm_probability) & ~torch.isin(input_ids, excluded_ids)
    labels = torch.where(selected, input_ids, IGNORE_INDEX)

    action = torch.rand(input_ids.shape, generator=generator, device=device)
    to_mask = selected & (action < MASK_SHARE)
    to_random = selected & (action >= MASK_SHARE) & (action < MASK_SHARE + RANDOM_SHARE)
    corrupted = torch.where(to_mask, mask_id, input_ids)
    corrupted = torch.where(
        to_random, _random_regular_ids(excluded_ids, vocab_size, input_ids, generator), corrupted
    )
    return corrupted, labels


def _random_regular_ids(
    excluded_ids: torch.Tensor, vocab_size: int, like: torch.Tensor, generator: torch.Generator
) -> torch.Tensor:
    """Uniform draws, shaped like `like`, from the ids in [0, vocab_size) not in `excluded_ids`."""
    regular = torch.ones(vocab_size, dtype=torch.bool, device=like.device)
    regular[excluded_ids] = False
    regular_ids = regular.nonzero().squeeze(1)  # (n_regular,)
    index = torch.randint(len(regular_ids), like.shape, generator=generator, device=like.device)
    return regular_ids[index].to(like.dtype)


def _check_arguments(excluded: list[int], vocab_size: int, mlm_probability: float) -> None:
    if not 0.0 <= mlm_probability <= 1.0:
        raise LmforgeError(f"mlm_probability must be in [0, 1], got {mlm_probability}; BERT uses 0.15")
    if excluded[0] < 0 or excluded[-1] >= vocab_size:
        raise LmforgeError(f"special and mask ids {excluded} must lie in [0, vocab_size={vocab_size})")
    if len(excluded) >= vocab_size:
        raise LmforgeError(
            f"every id of the vocabulary (size {vocab_size}) is special; nothing can be masked"
        )
