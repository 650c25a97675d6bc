"""What the server holds: the operator's `Settings`, the `Loaded` model with its scheduler, and the
`ServerState` every route reads from `request.app.state`.

Design choices:
- **Its own module, at the bottom.** Request checks (`errors.py`), generation (`streaming.py`)
  and rendering (`renderers.py`) all read the caps and the loaded model; kept in `app.py` they
  would make every one of those modules import the app that imports them.
- `Settings` is frozen and checked when built, so a bad cap fails when the server starts, not
  on the first request that meets it.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from fastapi import Request

from lmforge.api import LM
from lmforge.errors import LmforgeError
from lmforge.serve.metrics import ServerMetrics
from lmforge.serve.protocol import now
from lmforge.serve.scheduler import Scheduler


@dataclass(frozen=True)
class Settings:
    """What the operator decides: the served name, the key, and every cap on a request."""

    model_name: str = "lmforge"
    api_key: str | None = None  # None: no authentication
    n_slots: int = 16  # sequences decoded together
    max_queue: int = 64  # sequences waiting for a slot before 429
    max_tokens: int = 2048  # cap on max_tokens per request
    max_n: int = 8  # cap on n
    max_body_bytes: int = 1 << 20
    max_stop: int = 4  # stop strings per request (OpenAI's limit)
    max_stop_chars: int = 256  # characters per stop string
    max_embedding_inputs: int = 2048  # texts per embeddings request (OpenAI's limit)
    embedding_batch: int = 32  # texts embedded per forward pass
    stats_every: float = 10.0  # seconds between stats log lines while busy

    def __post_init__(self) -> None:
        for name in ("n_slots", "max_tokens", "max_n", "max_body_bytes", "max_stop_chars", "embedding_batch"):
            if getattr(self, name) < 1:
                raise LmforgeError(f"{name} must be at least 1, got {getattr(self, name)}")
        if self.max_queue < 0:
            raise LmforgeError(f"max_queue must be >= 0, got {self.max_queue}")


@dataclass
class Loaded:
    """The model once it is ready, with the scheduler that owns it."""

    lm: LM
    scheduler: Scheduler
    max_len: int  # longest sequence (prompt + generated) a slot holds
    created: int = field(default_factory=now)


@dataclass
class ServerState:
    settings: Settings
    metrics: ServerMetrics
    page: bytes
    loaded: Loaded | None = None
    load_error: str | None = None
    closing: bool = False


def server_state(request: Request) -> ServerState:
    return request.app.state.lmforge
