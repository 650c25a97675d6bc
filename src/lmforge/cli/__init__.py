"""The `lmforge` command (`main`); see cli/main.py."""

from lmforge.cli.main import main

__all__ = ["main"]
