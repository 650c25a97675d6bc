"""Tokenizers: train a byte-level BPE, load any HF tokenizer folder, chat templates, streaming detokenization."""

from lmforge.tokenizer.bpe import train_tokenizer
from lmforge.tokenizer.chat import CHATML_TEMPLATE
from lmforge.tokenizer.core import Tokenizer
from lmforge.tokenizer.detok import IncrementalDetokenizer

__all__ = ["CHATML_TEMPLATE", "IncrementalDetokenizer", "Tokenizer", "train_tokenizer"]
