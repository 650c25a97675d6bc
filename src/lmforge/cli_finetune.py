"""`lmforge` verbs for finetune (filled in by the finetune work)."""

import argparse


def add_verbs(verbs: argparse._SubParsersAction) -> None:
    """Add this stage's verbs to the `lmforge` parser."""
