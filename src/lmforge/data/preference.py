"""Preference pairs and prompts for alignment: JSONL rows -> token ids -> batches.

A pair is a prompt with two replies, the `chosen` one preferred to the `rejected` one. Rows
come in three forms:

- `{"prompt": str, "chosen": str, "rejected": str}`: plain text;
- `{"prompt": [messages], "chosen": str | [messages], "rejected": str | [messages]}`: a chat,
  where a message-list reply contributes its last assistant message;
- `{"chosen": ..., "rejected": ...}` without a prompt: two whole dialogues, either transcripts
  in the `\\n\\nHuman: ... \\n\\nAssistant: ...` form (Anthropic HH-RLHF) or message lists,
  split at their last assistant turn into the shared prompt and the two replies.

Design choices:
- Rows that cannot teach a preference are counted and skipped, never fatal: identical replies,
  dialogues with no assistant turn, and dialogue pairs whose text before the last assistant turn
  differs (a handful of real HH-RLHF rows). `PreferenceStats.summary()` reports the counts.
  A malformed row (missing field, wrong type) raises `LmforgeError` naming file and line; a
  file with no pair left raises one too.
- A text prompt is encoded with the tokenizer's special tokens (lmforge: `<|bos|>`) and its reply
  as the reply's text plus EOS; a chat prompt and its reply are encoded together by the chat
  template, the reply being the last span of `encode_chat`'s assistant mask (content plus the
  end-of-turn token). Either way a reply ends with the token where generation stops
  (`stop_token`), which is also the last token a reward model reads.
- Too long for `seq_len`: the oldest prompt tokens go first (the prompt keeps at least half the
  window), then the replies' ends. Truncated pairs are counted.
- Batches (`pack_rows`): rows are prompt + reply, right-padded to (B, T), with `attention_mask`
  and `labels` that hold the next token on reply positions and IGNORE_INDEX elsewhere, so a
  sequence log-probability sums over reply tokens only. A pair batch stacks the B chosen rows
  above the B rejected ones (2B rows); GRPO rollouts use the same layout.
- Splits, shuffled order and resumable batches are `data/rows.py`'s (`RowLoader` with
  `pair_batch` as its collate function), shared with every other kind of row.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from lmforge.data.jsonl import iter_jsonl_rows
from lmforge.data.masking import IGNORE_INDEX
from lmforge.data.rows import SplitConfig
from lmforge.errors import LmforgeError

log = logging.getLogger(__name__)

Message = dict[str, Any]
Prompt = str | list[Message]  # plain text, or the chat messages before the reply
DIALOGUE_ASSISTANT = "\n\nAssistant:"  # where a reply starts in the HH-RLHF transcript form
SKIP_REASONS = {  # PreferenceStats field -> how the report names it
    "identical": "identical replies",
    "no_assistant": "no assistant turn",
    "different_prompts": "different prompts",
}


# ---------------------------------------------------------------- config


@dataclass
class PreferenceDataConfig(SplitConfig):
    """Where alignment rows come from; the `data:` section of reward, dpo and grpo recipes.

    `train` and `eval` are JSONL files of preference pairs (reward, dpo) or of
    `{"prompt": ...}` rows (grpo); `seq_len` caps prompt + reply of a pair.
    """

    def validate(self) -> None:
        """Raise LmforgeError (one line) for the first value out of range."""
        self.require_train("a JSONL file of preference pairs or prompts")
        super().validate()


# ---------------------------------------------------------------- rows


@dataclass(frozen=True)
class PreferencePair:
    """A prompt and two replies to it, `chosen` preferred to `rejected`."""

    prompt: Prompt
    chosen: str
    rejected: str


@dataclass
class PreferenceStats:
    """What reading (and encoding) a preference file kept and skipped."""

    path: str
    rows: int = 0  # non-blank lines read
    kept: int = 0  # pairs kept
    identical: int = 0  # skipped: chosen and rejected replies are the same text
    no_assistant: int = 0  # skipped: a dialogue without an assistant turn after a prompt
    different_prompts: int = 0  # skipped: dialogues that differ before their last assistant turn
    truncated: int = 0  # kept but cut to seq_len (set by `encode_pairs`)

    def summary(self) -> str:
        """One line, e.g. `prefs.jsonl: 100 rows, 97 pairs kept; skipped 2 identical replies, 1 ...`."""
        skipped = [f"{getattr(self, name)} {label}" for name, label in SKIP_REASONS.items() if getattr(self, name)]
        text = f"{self.path}: {self.rows} rows, {self.kept} pairs kept"
        if skipped:
            text += "; skipped " + ", ".join(skipped)
        if self.truncated:
            text += f"; {self.truncated} truncated to fit"
        return text


def _check_messages(value: Any, where: str, name: str) -> list[Message]:
    if not isinstance(value, list) or not all(isinstance(m, Mapping) and "role" in m and "content" in m for m in value):
        raise LmforgeError(f"{where}: '{name}' must be a string or a list of {{role, content}} messages")
    return [dict(m) for m in value]


def check_prompt(value: Any, where: str) -> Prompt:
    """A prompt as given (text or non-empty message list), or LmforgeError naming `where`."""
    if isinstance(value, str):
        return value
    messages = _check_messages(value, where, "prompt")
    if not messages:
        raise LmforgeError(f"{where}: 'prompt' is an empty message list")
    return messages


def _last_assistant(messages: list[Message]) -> int | None:
    return next((i for i in range(len(messages) - 1, -1, -1) if messages[i]["role"] == "assistant"), None)


def _split_dialogue(value: Any, where: str, name: str) -> tuple[Prompt, str] | None:
    """(prompt, reply) at the last assistant turn of a transcript or message list; None without one."""
    if isinstance(value, str):
        cut = value.rfind(DIALOGUE_ASSISTANT)
        if cut < 0:
            return None
        cut += len(DIALOGUE_ASSISTANT)
        return value[:cut], value[cut:]
    messages = _check_messages(value, where, name)
    last = _last_assistant(messages)
    if not last:  # None, or 0: an assistant turn with no prompt before it
        return None
    return messages[:last], str(messages[last]["content"])


def _reply(value: Any, where: str, name: str) -> str | None:
    """A reply given as text, or the last assistant message of a list (None when it has none)."""
    if isinstance(value, str):
        return value
    messages = _check_messages(value, where, name)
    last = _last_assistant(messages)
    return None if last is None else str(messages[last]["content"])


def pair_from_row(row: Mapping[str, Any], where: str) -> PreferencePair | str:
    """The pair a row holds, or the `PreferenceStats` field that counts why it is skipped."""
    if "chosen" not in row or "rejected" not in row:
        raise LmforgeError(
            f"{where} has no 'chosen' and 'rejected' fields; expected {{prompt, chosen, rejected}} "
            "or {chosen, rejected} dialogues"
        )
    if row.get("prompt") is None:
        chosen = _split_dialogue(row["chosen"], where, "chosen")
        rejected = _split_dialogue(row["rejected"], where, "rejected")
        if chosen is None or rejected is None:
            return "no_assistant"
        if chosen[0] != rejected[0]:
            return "different_prompts"
        prompt, replies = chosen[0], (chosen[1], rejected[1])
    else:
        prompt = check_prompt(row["prompt"], where)
        replies = (_reply(row["chosen"], where, "chosen"), _reply(row["rejected"], where, "rejected"))
        if None in replies:
            return "no_assistant"
    if replies[0] == replies[1]:
        return "identical"
    return PreferencePair(prompt, replies[0], replies[1])


def read_preference_pairs(path: str | Path) -> tuple[list[PreferencePair], PreferenceStats]:
    """Every usable pair of a JSONL file, with the counts of what was skipped."""
    stats = PreferenceStats(str(path))
    pairs = []
    for row in iter_jsonl_rows(path):
        stats.rows += 1
        pair = pair_from_row(row.data, f"{path} line {row.line_number}")
        if isinstance(pair, str):
            setattr(stats, pair, getattr(stats, pair) + 1)
        else:
            pairs.append(pair)
    stats.kept = len(pairs)
    if not stats.rows:
        raise LmforgeError(f'{path} holds no preference pairs; expected JSONL rows like {{"prompt": ..., "chosen": ..., "rejected": ...}}')
    if not pairs:
        raise LmforgeError(f"no usable preference pair in {stats.summary()}")
    return pairs, stats


@dataclass(frozen=True)
class PromptRow:
    """A prompt for on-policy training (GRPO), with the row's other fields for reward functions."""

    prompt: Prompt
    fields: dict[str, Any] = field(default_factory=dict)  # every other key of the row (e.g. a reference answer)
    where: str = ""  # "file line N", for error messages


def read_prompt_rows(path: str | Path) -> list[PromptRow]:
    """The `{"prompt": ..., ...}` rows of a JSONL file."""
    rows = []
    for row in iter_jsonl_rows(path):
        where = f"{path} line {row.line_number}"
        if "prompt" not in row.data:
            raise LmforgeError(f'{where} has no "prompt" field; expected rows like {{"prompt": "2+3=", "answer": "5"}}')
        fields = {k: v for k, v in row.data.items() if k != "prompt"}
        rows.append(PromptRow(check_prompt(row.data["prompt"], where), fields, where))
    if not rows:
        raise LmforgeError(f'{path} holds no prompts; expected JSONL rows like {{"prompt": "2+3="}}')
    return rows


# ---------------------------------------------------------------- tokens


def stop_token(tokenizer: Any, prompt: Prompt) -> int | None:
    """The token that ends a reply: end-of-turn after a chat prompt, EOS after text."""
    return tokenizer.eos_id if isinstance(prompt, str) else tokenizer.eot_id


def encode_prompt(tokenizer: Any, prompt: Prompt) -> list[int]:
    """Ids a reply is generated after: text with special tokens, or the chat with the generation prompt."""
    if isinstance(prompt, str):
        return tokenizer.encode(prompt, add_special_tokens=True)
    return tokenizer.apply_chat_template(prompt, add_generation_prompt=True)


def encode_reply(tokenizer: Any, prompt: Prompt, reply: str) -> tuple[list[int], list[int]]:
    """(prompt ids, reply ids); the reply ends with its stop token (see the module docstring)."""
    if isinstance(prompt, str):
        end = stop_token(tokenizer, prompt)
        return encode_prompt(tokenizer, prompt), tokenizer.encode(reply) + ([] if end is None else [end])
    ids, mask = tokenizer.encode_chat([*prompt, {"role": "assistant", "content": reply}])
    if not any(mask):
        raise LmforgeError("the chat template marks no assistant tokens; it cannot encode a reply")
    end = len(mask) - mask[::-1].index(True)
    start = end
    while start > 0 and mask[start - 1]:
        start -= 1
    return ids[:start], ids[start:end]


def fit_lengths(prompt: list[int], replies: Sequence[list[int]], seq_len: int) -> tuple[list[int], list[list[int]], bool]:
    """Prompt and replies cut so prompt + each reply fits `seq_len`; True when anything was cut."""
    longest = max(len(r) for r in replies)
    if len(prompt) + longest <= seq_len:
        return prompt, list(replies), False
    keep = max(seq_len - longest, min(len(prompt), seq_len // 2), 1)
    prompt = prompt[-keep:]
    return prompt, [r[: seq_len - len(prompt)] for r in replies], True


@dataclass(frozen=True)
class EncodedPair:
    """Token ids of a pair: the prompt and the two replies (and, for DPO, the reference log-probs of both)."""

    prompt: list[int]
    chosen: list[int]
    rejected: list[int]
    ref_logps: tuple[float, float] | None = None  # log p_ref(chosen | prompt), log p_ref(rejected | prompt)


def encode_pairs(tokenizer: Any, pairs: Sequence[PreferencePair], seq_len: int,
                 stats: PreferenceStats | None = None) -> list[EncodedPair]:
    """Token ids of every pair, cut to `seq_len`; truncations are counted in `stats`."""
    out = []
    for pair in pairs:
        prompt, chosen = encode_reply(tokenizer, pair.prompt, pair.chosen)
        _, rejected = encode_reply(tokenizer, pair.prompt, pair.rejected)
        prompt, (chosen, rejected), cut = fit_lengths(prompt, [chosen, rejected], seq_len)
        if cut and stats is not None:
            stats.truncated += 1
        out.append(EncodedPair(prompt, chosen, rejected))
    return out


# ---------------------------------------------------------------- batches


def pack_rows(prompts: Sequence[list[int]], replies: Sequence[list[int]], pad_id: int) -> dict[str, Tensor]:
    """Rows prompt + reply, right-padded: input_ids, attention_mask, labels (next token on replies), all (B, T)."""
    rows = [p + r for p, r in zip(prompts, replies)]
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)  # (B, T)
    mask = torch.zeros((len(rows), width), dtype=torch.long)  # (B, T)
    labels = torch.full((len(rows), width), IGNORE_INDEX, dtype=torch.long)  # (B, T)
    for i, (row, prompt) in enumerate(zip(rows, prompts)):
        ids[i, : len(row)] = torch.tensor(row)
        mask[i, : len(row)] = 1
        first = max(len(prompt), 1)  # the first predicted token; an empty prompt cannot predict its reply's first
        labels[i, first - 1 : len(row) - 1] = ids[i, first : len(row)]
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def pair_batch(pairs: Sequence[EncodedPair], pad_id: int) -> dict[str, Tensor]:
    """The B chosen rows above the B rejected rows (2B, T); precomputed reference log-probs become `ref_logps` (2B,)."""
    batch = pack_rows([p.prompt for p in pairs] * 2, [p.chosen for p in pairs] + [p.rejected for p in pairs], pad_id)
    if all(p.ref_logps is not None for p in pairs):
        ref = torch.tensor([p.ref_logps for p in pairs], dtype=torch.float32)  # (B, 2)
        batch["ref_logps"] = torch.cat([ref[:, 0], ref[:, 1]])  # (2B,)
    return batch
