"""`lmforge` verbs for align (filled in by the align work)."""

import argparse


def add_verbs(verbs: argparse._SubParsersAction) -> None:
    """Add this stage's verbs to the `lmforge` parser."""
