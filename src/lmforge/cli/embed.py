"""Embedder verb: `lmforge embed-train --config RECIPE` (contrastive fine-tuning of an encoder).

The verb reads the recipe like every training verb (`--config` plus `--section.key` flags), opens
the index named by `data.mine_index` (with the embedder it was built with) when hard negatives are
to be mined, runs `train.embed.run_embed` and prints its summary, held-out recall before -> after.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable
from typing import Any

from lmforge.cli.flags import add_config_flags, load_recipe

Setup = Callable[[argparse.ArgumentParser], None]

EMBED_HELP = """Fine-tune an embedder (an encoder, a sentence-transformers folder) on (query, passage) pairs with the
multiple-negatives ranking loss: other passages of the batch are negatives. data.train is JSONL with
{"query": ..., "passage": ...} rows, optionally "negative" (a hard negative) and "doc_id"; with
--data.mine_index INDEX (a `lmforge rag index` folder) rows without a negative get the top hit that is
not their passage. Held-out recall@1/@5 and MRR are printed before and after. Add --lora.rank 8 for LoRA."""


def _miner(recipe: dict[str, Any]) -> Any:
    """The index miner for `data.mine_index`, or None when the recipe mines nothing."""
    data = recipe.get("data") or {}
    if not data.get("mine_index"):
        return None
    import lmforge
    from lmforge.rag import Index
    from lmforge.rag.mining import index_miner

    name = Index.open(data["mine_index"]).record.name
    index = Index.open(data["mine_index"], lmforge.load(name), name)
    return index_miner(index, depth=int(data.get("mine_depth", 10)))


def cmd_embed_train(args: argparse.Namespace) -> None:
    from lmforge.train.embed import EMBED_SECTIONS, run_embed
    from lmforge.train.setup import RENAMED_KEYS

    recipe = load_recipe(args, EMBED_SECTIONS, RENAMED_KEYS)
    print(run_embed(recipe, progress=True, report=print, miner=_miner(recipe)).summary())


def setup_embed_train(p: argparse.ArgumentParser) -> None:
    from lmforge.train.embed import EMBED_SECTIONS
    from lmforge.train.setup import RENAMED_KEYS

    p.description = EMBED_HELP
    add_config_flags(p, EMBED_SECTIONS, RENAMED_KEYS)
    p.set_defaults(func=cmd_embed_train)


VERBS: dict[str, tuple[str, Setup]] = {
    "embed-train": ("fine-tune an embedder on (query, passage) pairs (in-batch and hard negatives)", setup_embed_train),
}
