"""Training verbs (filled in with the training loop)."""

import argparse


def add_verbs(verbs: argparse._SubParsersAction) -> None:
    """Add the training verbs to the `lmforge` parser."""
