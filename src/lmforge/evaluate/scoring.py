"""A reward model's scores for (prompt, response) texts, encoded exactly as the reward model was trained.

Used by `LM.score`, by GRPO when a reward model joins the reward functions, and by anything
else that ranks responses.
"""

from __future__ import annotations

from collections.abc import Sequence

from torch import nn

from lmforge.data.preference import Prompt, encode_reply, fit_lengths, pack_rows
from lmforge.errors import LmforgeError
from lmforge.evaluate.logprobs import eval_mode
from lmforge.models.heads import RewardModel
from lmforge.tokenizer import Tokenizer


def score_texts(model: nn.Module, tokenizer: Tokenizer, prompts: Sequence[Prompt], responses: Sequence[str],
                batch_size: int = 16) -> list[float]:
    """A reward model's score for each (prompt, response)."""
    if not isinstance(model, RewardModel):
        raise LmforgeError("this model has no reward head; scoring needs a folder written by `lmforge reward`")
    device, max_len = next(model.parameters()).device, model.config.max_seq_len
    encoded = [encode_reply(tokenizer, p, r) for p, r in zip(prompts, responses)]
    rows = [fit_lengths(prompt, [reply], max_len) for prompt, reply in encoded]  # (prompt, [reply], cut)
    scores: list[float] = []
    with eval_mode(model):
        for first in range(0, len(rows), batch_size):
            chunk = rows[first : first + batch_size]
            batch = pack_rows([p for p, _, _ in chunk], [r[0] for _, r, _ in chunk], tokenizer.padding_id)
            scores += model(batch["input_ids"].to(device), attention_mask=batch["attention_mask"].to(device)).float().tolist()
    return scores


__all__ = ["score_texts"]
