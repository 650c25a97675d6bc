"""lmforge: one toolkit for the whole life of a transformer language model.

    import lmforge
    lm = lmforge.load("runs/quickstart")
    print(lm.generate("def fib(n):", max_new_tokens=64, temperature=0.8))
"""

from typing import Any

from lmforge.config import ModelConfig, preset
from lmforge.errors import LmforgeError

__version__ = "0.1.0"
__all__ = ["LM", "LmforgeError", "ModelConfig", "load", "preset"]


def __getattr__(name: str) -> Any:
    """`lmforge.LM` and `lmforge.load` import torch on first use, so the command starts without it."""
    if name in ("LM", "load"):
        from lmforge import api

        return getattr(api, name)
    raise AttributeError(f"module 'lmforge' has no attribute {name!r}")
