"""`lmforge support --config support.yaml`: the support assistant in the terminal (or over stdin).

Each line typed is a user turn; the reply is printed with its numbered sources, or the handover
notice when the policy hands the conversation to a person. `/reset` starts over, `/quit` ends.
`--json` prints each turn as one JSON line (the `support` field the server sends, plus the text).
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable

Setup = Callable[[argparse.ArgumentParser], None]


def cmd_support(args: argparse.Namespace) -> None:
    from lmforge.support import open_assistant, read_support_config

    assistant = open_assistant(read_support_config(args.config))
    messages: list[dict[str, str]] = []
    interactive = sys.stdin.isatty()
    while True:
        if interactive:
            print("you> ", end="", flush=True)
        line = sys.stdin.readline()
        if not line or line.strip() == "/quit":
            return
        text = line.strip()
        if text == "/reset" or not text:
            messages = [] if text else messages
            continue
        messages.append({"role": "user", "content": text})
        reply = assistant.reply(messages)
        messages.append({"role": "assistant", "content": reply.text})
        if args.json:
            print(json.dumps({"text": reply.text, **reply.extra()}, ensure_ascii=False), flush=True)
            continue
        print(f"assistant> {reply.text}")
        for s in reply.sources:
            print(f"  [{s.n}]{'*' if s.n in reply.cited else ' '} {s.doc_id} ({s.url})")
        if reply.escalation is not None:
            print(f"  -> handed to a person: {reply.escalation.reason} ({reply.escalation.detail}); "
                  f"handover #{reply.handover_id}")
        sys.stdout.flush()


def setup_support(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", required=True, help="support.yaml: index, chat model, classifier, escalation rules")
    p.add_argument("--json", action="store_true", help="one JSON line per turn: text, sources, escalation")
    p.set_defaults(func=cmd_support)


VERBS: dict[str, tuple[str, Setup]] = {
    "support": ("support assistant: answers from an index with citations, or hands over to a person", setup_support),
}
