"""Data: text -> token shards on disk, resumable loaders over them, and MLM masking."""

from lmforge.data.jsonl import JsonlRow, iter_jsonl_rows, read_jsonl
from lmforge.data.masking import IGNORE_INDEX, mask_tokens
from lmforge.data.prepare import PrepareStats, SplitStats, list_input_files, prepare, token_dtype
from lmforge.data.shards import TokenizerLike, TokenLoader, TokenShards, iter_eval_batches, tokenizer_identity

__all__ = [
    "IGNORE_INDEX",
    "JsonlRow",
    "PrepareStats",
    "SplitStats",
    "TokenLoader",
    "TokenShards",
    "TokenizerLike",
    "iter_eval_batches",
    "iter_jsonl_rows",
    "list_input_files",
    "mask_tokens",
    "prepare",
    "read_jsonl",
    "token_dtype",
    "tokenizer_identity",
]
