"""Training health checks: loss-spike detection and the non-finite guard.

Design choices:
- Everything here is a pure function or a small object with `state_dict` / `load_state_dict`,
  so the loop can save it in the train state and a resumed run behaves exactly like an
  uninterrupted one.
- A non-finite step is skipped, not fatal: a single overflow is survivable, a run of them
  means the learning rate or the data is wrong, so `NonFiniteGuard` stops after
  `max_bad_steps` consecutive ones with a message saying what to change.
- A loss spike is only reported (the loop logs a warning and marks the step); what to do
  about it is the user's decision.
"""

from __future__ import annotations

import math
from collections import deque
from typing import Any

from lmforge.errors import LmforgeError


class LossSpikeDetector:
    """Flags a loss far above the recent ones.

    A loss is a spike when it exceeds the mean of the last `window` losses by more than
    `threshold` standard deviations (and the history holds at least `min_history` losses).
    Spikes are not added to the history, so one spike does not hide the next.
    """

    def __init__(self, window: int = 100, threshold: float = 6.0, min_history: int = 20) -> None:
        self.window = window
        self.threshold = threshold
        self.min_history = min_history
        self.history: deque[float] = deque(maxlen=window)

    def update(self, loss: float) -> bool:
        """Record `loss`; True when it is a spike."""
        if not math.isfinite(loss):
            return False
        if len(self.history) >= self.min_history:
            mean = sum(self.history) / len(self.history)
            std = math.sqrt(sum((x - mean) ** 2 for x in self.history) / len(self.history))
            if loss > mean + self.threshold * max(std, 1e-8):
                return True
        self.history.append(loss)
        return False

    def state_dict(self) -> dict[str, Any]:
        """JSON-serialisable state."""
        return {"history": list(self.history)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore the state saved by `state_dict`."""
        self.history = deque(state["history"], maxlen=self.window)


class NonFiniteGuard:
    """Counts consecutive non-finite steps and stops the run after `max_bad_steps` of them."""

    def __init__(self, max_bad_steps: int) -> None:
        self.max_bad_steps = max_bad_steps
        self.consecutive = 0  # non-finite steps in a row, up to now
        self.total = 0  # non-finite steps in the whole run

    def check(self, loss: float, grad_norm: float, step: int, last_checkpoint: str | None) -> bool:
        """True when the step can be applied; counts it otherwise.

        Raises LmforgeError once `max_bad_steps` non-finite steps have happened in a row.
        """
        if math.isfinite(loss) and math.isfinite(grad_norm):
            self.consecutive = 0
            return True
        self.consecutive += 1
        self.total += 1
        if self.consecutive >= self.max_bad_steps:
            kept = last_checkpoint or "none was written yet"
            raise LmforgeError(
                f"loss was not finite for {self.consecutive} consecutive steps at step {step}; "
                f"lower the learning rate, set grad_clip, or check the data (last good checkpoint: {kept})"
            )
        return False

    def state_dict(self) -> dict[str, Any]:
        """JSON-serialisable state."""
        return {"consecutive": self.consecutive, "total": self.total}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore the state saved by `state_dict`."""
        self.consecutive = int(state["consecutive"])
        self.total = int(state["total"])
