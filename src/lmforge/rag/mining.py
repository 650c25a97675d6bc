"""Hard negatives for embedder training, mined from an index: the top hit that is not the positive.

`index_miner(index)` is the `miner` that `train.embed.run_embed` takes (`data.mine_index` in a
recipe; `lmforge embed-train` opens the index). A hit is the positive when it comes from the pair's
`doc_id` (when the row names one) or when its text and the passage contain one another (after
collapsing whitespace), since the index may have chunked the passage differently.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

from lmforge.data.pairs import Pair
from lmforge.rag.index import Hit, Index


def _flat(text: str) -> str:
    return " ".join(text.split()).lower()


def is_positive(hit: Hit, pair: Pair) -> bool:
    """Whether `hit` is (part of) the pair's own passage or document."""
    if pair.doc_id is not None and hit.doc_id == pair.doc_id:
        return True
    text, passage = _flat(hit.text), _flat(pair.passage)
    return text in passage or passage in text


def hard_negative(hits: Sequence[Hit], pair: Pair) -> str | None:
    """The text of the best-ranked hit that is not the positive, or None."""
    return next((hit.text for hit in hits if not is_positive(hit, pair)), None)


def index_miner(index: Index, depth: int = 10, mode: str = "hybrid") -> Callable[[Sequence[Pair]], list[str | None]]:
    """A miner: for each pair, the top of `index.search(query, k=depth, mode=mode)` that is not its positive."""

    def mine(pairs: Sequence[Pair]) -> list[str | None]:
        return [hard_negative(index.search(pair.query, k=depth, mode=mode), pair) for pair in pairs]

    return mine


__all__ = ["hard_negative", "index_miner", "is_positive"]
