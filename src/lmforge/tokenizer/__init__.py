"""Tokenizers: train a byte-level BPE, load HF tokenizer folders, chat templates, streaming detokenization."""

from lmforge.tokenizer.bpe import train_tokenizer
from lmforge.tokenizer.chat import CHATML_TEMPLATE
from lmforge.tokenizer.core import Tokenizer
from lmforge.tokenizer.detok import IncrementalDetokenizer
from lmforge.tokenizer.generation_config import GenerationDefaults

__all__ = ["CHATML_TEMPLATE", "GenerationDefaults", "IncrementalDetokenizer", "Tokenizer", "train_tokenizer"]
