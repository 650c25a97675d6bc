"""The handover queue: an append-only SQLite table of conversations handed to a person.

A handover is committed (synchronous=FULL, so it is on disk, not in a cache) before `append`
returns, and the assistant acknowledges the handover to the user only after that: a server killed
right after the acknowledgement still has it in the queue when it restarts. Each `append` opens
its own connection, so the server's threads never share one.
"""

from __future__ import annotations

import json
import sqlite3
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from lmforge.errors import LmforgeError

SCHEMA = """CREATE TABLE IF NOT EXISTS handovers (
    id INTEGER PRIMARY KEY AUTOINCREMENT, created REAL NOT NULL, reason TEXT NOT NULL, detail TEXT NOT NULL,
    conversation TEXT NOT NULL, sources TEXT NOT NULL, scores TEXT NOT NULL)"""


@dataclass(frozen=True)
class Handover:
    """One conversation waiting for a person."""

    id: int
    created: float  # unix time
    reason: str  # the escalation rule that fired (policy.REASONS)
    detail: str
    conversation: list[dict[str, Any]]  # the messages so far, the user's last turn included
    sources: list[dict[str, Any]]  # what retrieval found for that turn
    scores: list[dict[str, float]]  # the classifier's scores of each user turn ([] without a classifier)


class HandoverQueue:
    """Append and read handovers in the SQLite file at `path` (created on first use)."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            with self._connect() as con:
                con.execute(SCHEMA)
        except (OSError, sqlite3.Error) as e:
            raise LmforgeError(f"cannot open the handover queue {self.path} ({e}); choose a writable path") from None

    def _connect(self) -> sqlite3.Connection:
        con = sqlite3.connect(self.path, timeout=30)
        con.execute("PRAGMA synchronous = FULL")
        return con

    def append(self, reason: str, detail: str, conversation: Sequence[dict[str, Any]],
               sources: Sequence[dict[str, Any]], scores: Sequence[dict[str, float]]) -> int:
        """Store a handover durably and return its id."""
        con = self._connect()
        try:
            with con:  # commits, or rolls back on error
                cursor = con.execute(
                    "INSERT INTO handovers (created, reason, detail, conversation, sources, scores) "
                    "VALUES (?, ?, ?, ?, ?, ?)",
                    (time.time(), reason, detail, json.dumps(list(conversation), ensure_ascii=False),
                     json.dumps(list(sources), ensure_ascii=False), json.dumps(list(scores))))
            return int(cursor.lastrowid or 0)
        finally:
            con.close()

    def list(self, after: int = 0, limit: int = 100) -> list[Handover]:
        """Handovers with an id above `after`, oldest first, at most `limit`."""
        con = self._connect()
        try:
            rows = con.execute("SELECT * FROM handovers WHERE id > ? ORDER BY id LIMIT ?", (after, limit)).fetchall()
        finally:
            con.close()
        return [Handover(r[0], r[1], r[2], r[3], json.loads(r[4]), json.loads(r[5]), json.loads(r[6])) for r in rows]


def handover_json(handover: Handover) -> dict[str, Any]:
    return asdict(handover)


__all__ = ["Handover", "HandoverQueue", "handover_json"]
