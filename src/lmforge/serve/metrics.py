"""Server metrics in the Prometheus text exposition format, written by hand (no dependency).

Design choices:
- Three instrument kinds, each a few lines: `Counter` (optionally labelled), `Gauge` (read from
  a callback at scrape time, so it can never drift from the scheduler's real state) and
  `Histogram` (cumulative buckets, `_sum`, `_count`).
- Instruments are updated from two threads (the scheduler thread counts tokens, the event loop
  records latencies), so each holds a lock around its numbers.
- `ServerMetrics` names the server's instruments in one place; `render()` writes them all.
- Token counters count the tokens the model processed: a request with `n=2` prefills its
  prompt twice and adds it twice to `lmforge_prompt_tokens_total` (its `usage` counts it once).
"""

from __future__ import annotations

import math
import threading
from collections.abc import Callable, Sequence

# Latency buckets in seconds: fine below 100 ms, where inter-token latencies live.
LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0,
                   10.0, 20.0, 40.0, 80.0)


def _number(value: float) -> str:
    if math.isinf(value):
        return "+Inf" if value > 0 else "-Inf"
    return repr(float(value)) if not float(value).is_integer() else str(int(value))


def _labels(pairs: Sequence[tuple[str, str]]) -> str:
    if not pairs:
        return ""
    escaped = (v.replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"') for _, v in pairs)
    return "{" + ",".join(f'{k}="{v}"' for (k, _), v in zip(pairs, escaped)) + "}"


class Counter:
    """A monotonically increasing number, one per label set."""

    def __init__(self, name: str, help_text: str) -> None:
        self.name, self.help = name, help_text
        self._values: dict[tuple[tuple[str, str], ...], float] = {}
        self._lock = threading.Lock()

    def inc(self, amount: float = 1.0, **labels: str) -> None:
        key = tuple(sorted(labels.items()))
        with self._lock:
            self._values[key] = self._values.get(key, 0.0) + amount

    def value(self, **labels: str) -> float:
        with self._lock:
            return self._values.get(tuple(sorted(labels.items())), 0.0)

    def render(self) -> list[str]:
        with self._lock:
            values = dict(self._values) or {(): 0.0}
        lines = [f"# HELP {self.name} {self.help}", f"# TYPE {self.name} counter"]
        return lines + [f"{self.name}{_labels(key)} {_number(v)}" for key, v in sorted(values.items())]


class Gauge:
    """A number read from `read()` when the metrics are scraped."""

    def __init__(self, name: str, help_text: str, read: Callable[[], float]) -> None:
        self.name, self.help, self.read = name, help_text, read

    def render(self) -> list[str]:
        return [f"# HELP {self.name} {self.help}", f"# TYPE {self.name} gauge", f"{self.name} {_number(self.read())}"]


class Histogram:
    """Observations counted into cumulative `le` buckets, with their sum and count."""

    def __init__(self, name: str, help_text: str, buckets: Sequence[float] = LATENCY_BUCKETS) -> None:
        self.name, self.help = name, help_text
        self.bounds = [*sorted(buckets), math.inf]
        self._counts = [0] * len(self.bounds)
        self._sum = 0.0
        self._lock = threading.Lock()

    def observe(self, value: float) -> None:
        with self._lock:
            self._sum += value
            for i, bound in enumerate(self.bounds):
                if value <= bound:
                    self._counts[i] += 1
                    break

    @property
    def count(self) -> int:
        with self._lock:
            return sum(self._counts)

    def render(self) -> list[str]:
        with self._lock:
            counts, total = list(self._counts), self._sum
        lines = [f"# HELP {self.name} {self.help}", f"# TYPE {self.name} histogram"]
        cumulative = 0
        for bound, n in zip(self.bounds, counts):
            cumulative += n
            lines.append(f'{self.name}_bucket{{le="{_number(bound)}"}} {cumulative}')
        return [*lines, f"{self.name}_sum {_number(total)}", f"{self.name}_count {cumulative}"]


class ServerMetrics:
    """Every instrument the server exports; the gauges read the scheduler through callbacks."""

    def __init__(self, running: Callable[[], float] = lambda: 0, waiting: Callable[[], float] = lambda: 0,
                 slots: Callable[[], float] = lambda: 0) -> None:
        self.running = Gauge("lmforge_requests_running", "Sequences decoding in an engine slot.", running)
        self.waiting = Gauge("lmforge_requests_waiting", "Sequences queued for a free slot.", waiting)
        self.slots = Gauge("lmforge_slots", "Engine slots (sequences decoded together).", slots)
        self.prompt_tokens = Counter("lmforge_prompt_tokens_total", "Prompt tokens prefilled.")
        self.generation_tokens = Counter("lmforge_generation_tokens_total", "Tokens generated.")
        self.finished = Counter("lmforge_sequences_finished_total",
                                "Sequences that left the engine, by reason (stop, length, cancelled, error).")
        self.rejected = Counter("lmforge_requests_rejected_total", "Requests answered 429 because the queue was full.")
        self.ttft = Histogram("lmforge_time_to_first_token_seconds", "Submission to the first generated token.")
        self.itl = Histogram("lmforge_inter_token_latency_seconds", "Time between consecutive tokens of a sequence.")
        self.e2e = Histogram("lmforge_e2e_request_latency_seconds", "Arrival of a generation request to its last byte.")

    def watch(self, running: Callable[[], float], waiting: Callable[[], float], slots: Callable[[], float]) -> None:
        """Point the gauges at the scheduler once it exists (the model loads after the server starts)."""
        self.running.read, self.waiting.read, self.slots.read = running, waiting, slots

    def render(self) -> str:
        instruments = (self.running, self.waiting, self.slots, self.prompt_tokens, self.generation_tokens,
                       self.finished, self.rejected, self.ttft, self.itl, self.e2e)
        return "\n".join(line for item in instruments for line in item.render()) + "\n"
