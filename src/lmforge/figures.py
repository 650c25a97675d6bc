"""Pictures every layer draws (loss.png, doctor.png, drift.png, the eval charts): one way to make and write them.

matplotlib's object API on the Agg canvas — no pyplot, no global backend, no display — imported only
when a picture is drawn, so importing lmforge never loads matplotlib.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any


def new_figure(size: tuple[float, float]) -> Any:
    """An empty matplotlib Figure of `size` (width, height) inches, drawn off-screen."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=size, dpi=100)
    FigureCanvasAgg(fig)
    return fig


def save_figure(fig: Any, path: Path) -> None:
    """Lay out `fig` and write it to the PNG `path` atomically (a reader never sees half a picture)."""
    fig.tight_layout()
    path = Path(path)
    tmp = path.with_name(path.stem + ".tmp.png")
    fig.savefig(tmp, format="png")
    os.replace(tmp, path)
