"""lmforge: one toolkit for the whole life of a transformer language model.

    import lmforge
    lm = lmforge.load("runs/quickstart")
    print(lm.generate("def fib(n):", max_new_tokens=64, temperature=0.8))
"""

from lmforge.api import LM, load
from lmforge.config import ModelConfig, preset
from lmforge.errors import LmforgeError

__version__ = "0.1.0"
__all__ = ["LM", "LmforgeError", "ModelConfig", "load", "preset"]
