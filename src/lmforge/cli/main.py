"""The `lmforge` command: the parser and `main`.

Every verb is a one-line help and a function that adds its arguments (`cli/train.py`,
`cli/infer.py`). Only the verb being run gets its arguments, and verb modules import the library
inside their functions, so `lmforge --help` lists the verbs without loading torch. A
`LmforgeError` is printed as one line (`lmforge: error: ...`) with exit status 2; anything else
is a bug and keeps its traceback.
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence

from lmforge.cli import data_tools, diagnose, embed, evaluate, export, infer, rag, support, train
from lmforge.errors import LmforgeError

VERBS = {**train.VERBS, **embed.VERBS, **infer.VERBS, **evaluate.VERBS, **diagnose.VERBS, **data_tools.VERBS,
         **export.VERBS, **rag.VERBS, **support.VERBS}


def build_parser(argv: Sequence[str] = ()) -> argparse.ArgumentParser:
    """The `lmforge` parser; the verb named in `argv` (if any) gets its full arguments."""
    parser = argparse.ArgumentParser(prog="lmforge", description="Train, fine-tune, align, run and serve transformer language models.")
    parser.add_argument("-v", "--verbose", action="store_true", help="log more detail")
    verbs = parser.add_subparsers(dest="verb", metavar="VERB", required=True)
    chosen = next((a for a in argv if not a.startswith("-")), None)
    for name, (help_text, setup) in VERBS.items():
        p = verbs.add_parser(name, help=help_text, description=help_text)
        if name == chosen:
            setup(p)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        args = build_parser(argv).parse_args(argv)
        logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING,
                            format="%(levelname)s %(name)s: %(message)s")
        code = args.func(args)
        return code if isinstance(code, int) else 0
    except LmforgeError as e:
        print(f"lmforge: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("lmforge: interrupted", file=sys.stderr)
        return 130
