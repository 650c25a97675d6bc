"""`lmforge chat`: an interactive session that streams replies.

Commands: `/reset` forgets the conversation, `/system TEXT` sets the system prompt,
`/quit` (or end of input) leaves. Ctrl-C while a reply streams stops that reply and keeps
the session. History is trimmed from the oldest turns so the rendered conversation plus
the reply fits the context window.
"""

from __future__ import annotations

import sys
from typing import TextIO

import lmforge
from lmforge.api import LM, Message
from lmforge.errors import LmforgeError


def fit_history(lm: LM, messages: list[Message], reply_tokens: int) -> list[Message]:
    """Drop the oldest non-system turns until the prompt leaves room for `reply_tokens`."""
    budget = lm.config.max_seq_len - min(reply_tokens, lm.config.max_seq_len // 2)
    system = [m for m in messages if m["role"] == "system"]
    turns = [m for m in messages if m["role"] != "system"]
    while turns:
        candidate = system + turns
        if len(lm.tokenizer.apply_chat_template(candidate, add_generation_prompt=True)) <= budget:
            return candidate
        turns = turns[2:] if len(turns) > 1 else []
    raise LmforgeError(f"the message is longer than the context window ({lm.config.max_seq_len} tokens); shorten it")


def run_chat(
    model: str,
    *,
    system: str | None = None,
    max_new_tokens: int = 256,
    temperature: float = 0.7,
    top_p: float = 0.95,
    seed: int | None = None,
    stdin: TextIO | None = None,
    stdout: TextIO | None = None,
) -> None:
    """Read user lines, stream replies, until /quit or end of input."""
    stdin, stdout = stdin or sys.stdin, stdout or sys.stdout
    lm = lmforge.load(model)
    if lm.tokenizer is None or lm.tokenizer.chat_template is None:
        raise LmforgeError(f"{model} has no chat template; chat needs a tokenizer_config.json with one")
    history: list[Message] = []
    interactive = stdin.isatty()
    stdout.write(f"chatting with {model} — /reset, /system TEXT, /quit\n")
    while True:
        if interactive:
            stdout.write("you> ")
            stdout.flush()
        line = stdin.readline()
        if not line or line.strip() == "/quit":
            return
        line = line.rstrip("\n")
        if line.strip() == "/reset":
            history = []
            stdout.write("(conversation reset)\n")
            continue
        if line.startswith("/system"):
            system = line[len("/system") :].strip() or None
            stdout.write(f"(system prompt {'set' if system else 'cleared'})\n")
            continue
        if not line.strip():
            continue
        head = [{"role": "system", "content": system}] if system else []
        messages = fit_history(lm, head + history + [{"role": "user", "content": line}], max_new_tokens)
        stdout.write("assistant> ")
        reply = []
        try:
            for piece in lm.stream_chat(messages, max_new_tokens=max_new_tokens, temperature=temperature,
                                        top_p=top_p, seed=seed):
                reply.append(piece)
                stdout.write(piece)
                stdout.flush()
        except KeyboardInterrupt:
            stdout.write(" [stopped]")
        stdout.write("\n")
        history = [m for m in messages if m["role"] != "system"] + [{"role": "assistant", "content": "".join(reply)}]
