"""Checks of a model folder's tokenizer and chat template: what `lmforge doctor MODEL` verifies.

A tokenizer that does not round-trip text, lacks its end-of-sequence token, or has ids beyond the
model's embeddings breaks generation silently; a chat template that fails to render, or whose
assistant mask is empty, makes SFT train on nothing. Each check says what it saw.
"""

from __future__ import annotations

from dataclasses import dataclass

from lmforge.errors import LmforgeError
from lmforge.tokenizer import Tokenizer

ROUND_TRIP_TEXTS = (
    "Hello, world! The quick brown fox.",
    "  two leading spaces,\ttabs and\nnew lines\n\n",
    "naïve café, 你好, emoji 🙂",
    "def f(x):\n    return x ** 2  # code\n",
)
CONVERSATION = [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "What is two plus two?"},
    {"role": "assistant", "content": "Four."},
]


@dataclass(frozen=True)
class Check:
    """One check of a model folder: what was checked, whether it passed, what was seen."""

    name: str
    ok: bool
    detail: str


def _round_trip(tokenizer: Tokenizer) -> Check:
    broken = [text for text in ROUND_TRIP_TEXTS if tokenizer.decode(tokenizer.encode(text)) != text]
    if broken:
        return Check("round trip", False, f"decode(encode(text)) changes {len(broken)} of {len(ROUND_TRIP_TEXTS)} "
                     f"test texts, e.g. {broken[0]!r}; a normalising or lossy tokenizer")
    return Check("round trip", True, f"{len(ROUND_TRIP_TEXTS)} texts (spaces, unicode, code) come back unchanged")


def _special_tokens(tokenizer: Tokenizer, vocab_size: int) -> Check:
    named = {name: getattr(tokenizer, f"{name}_token") for name in ("bos", "eos", "pad", "unk")}
    present = {name: token for name, token in named.items() if token is not None}
    missing = [f"{name} {token!r}" for name, token in present.items() if tokenizer.token_to_id(token) is None]
    if missing:
        return Check("special tokens", False, f"{', '.join(missing)} named in tokenizer_config.json but not in the vocabulary")
    if tokenizer.eos_id is None:
        return Check("special tokens", False, "no end-of-sequence token: generation cannot stop by itself; "
                     "set eos_token in tokenizer_config.json")
    if tokenizer.vocab_size > vocab_size:
        return Check("special tokens", False, f"the tokenizer has {tokenizer.vocab_size} tokens but the model only "
                     f"{vocab_size} embeddings: ids above {vocab_size - 1} would fail")
    return Check("special tokens", True, ", ".join(f"{name} {token!r} = {tokenizer.token_to_id(token)}"
                                                   for name, token in present.items()))


def _chat_template(tokenizer: Tokenizer) -> list[Check]:
    if tokenizer.chat_template is None:
        return [Check("chat template", True, "none (a base model: `chat` and `sft` need one)")]
    try:
        text = tokenizer.apply_chat_template(CONVERSATION, tokenize=False)
        prompt = tokenizer.apply_chat_template(CONVERSATION[:2], add_generation_prompt=True, tokenize=False)
        ids, mask = tokenizer.encode_chat(CONVERSATION)
    except (LmforgeError, ValueError, TypeError, KeyError) as e:
        return [Check("chat template", False, f"does not render a system/user/assistant conversation: {e}")]
    lost = [m["content"] for m in CONVERSATION if m["content"] not in text]
    checks = [Check("chat template", not lost, f"renders {len(ids)} tokens, generation prompt "
                    f"{len(tokenizer.encode(prompt))} tokens" if not lost else f"drops message text {lost}")]
    reply = tokenizer.decode([i for i, m in zip(ids, mask, strict=True) if m])
    ok = sum(mask) > 0 and "Four." in reply
    checks.append(Check("assistant mask", ok, f"{sum(mask)} tokens, {reply!r}" if ok else
                        f"covers {sum(mask)} tokens ({reply!r}), not the assistant's reply: SFT would learn nothing"))
    return checks


def tokenizer_checks(tokenizer: Tokenizer, vocab_size: int) -> list[Check]:
    """Round trip, special tokens against a model of `vocab_size` embeddings, chat template and assistant mask."""
    return [_round_trip(tokenizer), _special_tokens(tokenizer, vocab_size), *_chat_template(tokenizer)]


def check_lines(checks: list[Check]) -> list[str]:
    """One line per check, marked ok or FAIL."""
    return [f"  {'ok  ' if c.ok else 'FAIL'} {c.name}: {c.detail}" for c in checks]

