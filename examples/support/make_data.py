"""Writes the example's knowledge base (kb/, one Markdown file per article) and its labelled conversations.

    python examples/support/make_data.py      # kb/ and conversations.jsonl next to this file

Deterministic: the same files every run. Conversations come from `knowledge.py`'s hand-written
questions and escalation cases, varied by a few openings and by two-turn forms:
- every question of every article: answered from that article (`doc`), no escalation;
- out-of-scope questions: `low_confidence` (nothing in the knowledge base answers them);
- requests for a person, alone or after an answered question: `human_request`;
- sensitive messages (legal, security, fraud): `topic`;
- two frustrated turns in a row: `negative_sentiment` (needs the sentiment classifier).
Each row: {"id", "turns": [user messages], "doc": the article answering the last turn or null,
"escalate": the reason the last turn must be handed over, or null}.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

from knowledge import ARTICLES, FRUSTRATED, HUMAN_REQUESTS, OUT_OF_SCOPE, SENSITIVE

HERE = Path(__file__).resolve().parent
OPENINGS = ["", "Hi, ", "Hello! ", "Quick question: ", "Hey, "]


def article_markdown(article: dict) -> str:
    parts = [f"# {article['title']}"]
    for heading, text in article["sections"].items():
        parts += [f"## {heading}", text]
    return "\n\n".join(parts) + "\n"


def conversations(rng: random.Random) -> list[dict]:
    rows: list[dict] = []

    def add(turns: list[str], doc: str | None, escalate: str | None) -> None:
        rows.append({"id": f"c{len(rows) + 1:03d}", "turns": turns, "doc": doc, "escalate": escalate})

    for article in ARTICLES:
        for question in article["questions"]:
            add([rng.choice(OPENINGS) + question + "?"], article["id"], None)
    for question in OUT_OF_SCOPE:
        add([rng.choice(OPENINGS) + question + "?"], None, "low_confidence")
    for i, request in enumerate(HUMAN_REQUESTS):
        before = [] if i % 2 else [rng.choice(ARTICLES)["questions"][0] + "?"]
        add([*before, request], None, "human_request")
    for _, message in SENSITIVE:
        add([message], None, "topic")
    for i, first in enumerate(FRUSTRATED):
        add([first, FRUSTRATED[(i + 1) % len(FRUSTRATED)]], None, "negative_sentiment")
    return rows


def main() -> None:
    kb = HERE / "kb"
    for article in ARTICLES:
        path = kb / article["id"]
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(article_markdown(article), encoding="utf-8")
    rows = conversations(random.Random(0))
    (HERE / "conversations.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    print(f"wrote {len(ARTICLES)} articles to {kb} and {len(rows)} conversations")


if __name__ == "__main__":
    main()
