"""The tokenizer inside a GGUF file: lmforge `Tokenizer` <-> llama.cpp's `tokenizer.ggml.*` metadata.

llama.cpp reads a byte-level BPE as `tokenizer.ggml.model = "gpt2"`: the token strings by id (in
the byte-to-unicode alphabet, exactly as tokenizer.json stores them), a type per token (normal,
control for special tokens, user-defined for other added tokens, unused for holes), the merges as
"left right" strings, and a pre-tokenizer name that selects its split regex. Two pre-tokenizers
are written: GPT-2's (`ByteLevel` with its own regex, the one lmforge trains) as "gpt-2", and
Llama 3's split regex followed by `ByteLevel` as "llama-bpe". Any other tokenizer (sentencepiece,
WordPiece, another regex) is refused in one line rather than written with a split llama.cpp would
not reproduce.

Special tokens travel as ids (`bos/eos/pad/unk/eot_token_id`), `add_bos_token` / `add_eos_token`
say what the tokenizer's post-processor adds, and the chat template is copied verbatim, so
llama.cpp needs no file beside the GGUF. Reading builds the same `tokenizers` pipeline back.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any

import tokenizers
from gguf import GGUFWriter, TokenType
from tokenizers import AddedToken, decoders, models, pre_tokenizers

from lmforge.errors import LmforgeError
from lmforge.tokenizer import Tokenizer
from lmforge.tokenizer.core import bos_eos_processor

# Llama 3's pre-tokenizer regex (tokenizer.json's Split pattern), llama.cpp's "llama-bpe"
LLAMA3_REGEX = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
SPECIAL_IDS = ("bos", "eos", "pad", "unk")  # tokenizer.ggml.<name>_token_id <-> Tokenizer.<name>_token
KEY = "tokenizer.ggml."


def write_vocab(writer: GGUFWriter, tok: Tokenizer, n_vocab: int) -> None:
    """Add `tok` to `writer`'s metadata, with `n_vocab` tokens (the model's embedding rows)."""
    state = json.loads(tok.backend.to_str())
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre(_pre_tokenizer_name(state))
    tokens, types = _tokens_and_types(tok, n_vocab)
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    writer.add_token_merges([m if isinstance(m, str) else " ".join(m) for m in state["model"].get("merges", [])])
    for name in SPECIAL_IDS:
        token_id = getattr(tok, f"{name}_id", None) if name != "unk" else tok.token_to_id(tok.unk_token or "")
        if token_id is not None:
            writer.add_uint32(f"{KEY}{name}_token_id", token_id)
    if tok.eot_id is not None and tok.eot_id != tok.eos_id:
        writer.add_eot_token_id(tok.eot_id)
    plain, marked = tok.encode("a"), tok.encode("a", add_special_tokens=True)
    writer.add_add_bos_token(len(marked) > len(plain) and marked[0] == tok.bos_id)
    writer.add_add_eos_token(len(marked) > len(plain) and marked[-1] == tok.eos_id)
    if tok.chat_template is not None:
        writer.add_chat_template(tok.chat_template)


def _pre_tokenizer_name(state: Mapping[str, Any]) -> str:
    """llama.cpp's name for this tokenizer's split; a tokenizer it cannot reproduce is refused."""
    model, pre = state.get("model") or {}, state.get("pre_tokenizer") or {}
    if model.get("type") != "BPE" or state.get("normalizer") is not None:
        raise LmforgeError(
            f"GGUF export writes byte-level BPE tokenizers (GPT-2 / Llama 3 style); this one is "
            f"{model.get('type')!r}{' with a normalizer' if state.get('normalizer') else ''}, which llama.cpp would split differently"
        )
    if pre.get("type") == "ByteLevel" and pre.get("use_regex", True) and not pre.get("add_prefix_space"):
        return "gpt-2"
    steps = pre.get("pretokenizers", []) if pre.get("type") == "Sequence" else []
    if (len(steps) == 2 and steps[0].get("type") == "Split" and steps[0].get("pattern", {}).get("Regex") == LLAMA3_REGEX
            and steps[1].get("type") == "ByteLevel" and not steps[1].get("use_regex", True)):
        return "llama-bpe"
    raise LmforgeError(
        "GGUF export writes byte-level BPE tokenizers whose split llama.cpp knows (GPT-2's or Llama 3's); "
        f"this tokenizer's pre-tokenizer is {json.dumps(pre)[:80]}"
    )


def _tokens_and_types(tok: Tokenizer, n_vocab: int) -> tuple[list[str], list[int]]:
    """Token strings and llama.cpp token types by id, holes (and rows past the tokenizer) as unused."""
    if tok.vocab_size > n_vocab:
        raise LmforgeError(f"the tokenizer has {tok.vocab_size} tokens but the model only {n_vocab} embedding rows; "
                           "they do not belong together")
    by_id = {i: t for t, i in tok.backend.get_vocab(with_added_tokens=True).items()}
    added = {i: t.special for i, t in tok.backend.get_added_tokens_decoder().items()}
    tokens = [by_id.get(i, f"[PAD{i}]") for i in range(n_vocab)]
    types = [
        TokenType.UNUSED if i not in by_id
        else TokenType.CONTROL if added.get(i) is True
        else TokenType.USER_DEFINED if i in added
        else TokenType.NORMAL
        for i in range(n_vocab)
    ]
    return tokens, [int(t) for t in types]


# ---------------------------------------------------------------- reading


def read_vocab(fields: Mapping[str, Any], source: str) -> Tokenizer | None:
    """The tokenizer a GGUF file's metadata (`fields`: key -> value) describes, or None when it has none."""
    model = fields.get(f"{KEY}model")
    if model is None:
        return None
    if model != "gpt2":
        raise LmforgeError(f"{source} holds a {model!r} tokenizer; lmforge reads byte-level BPE ('gpt2') tokenizers from GGUF")
    tokens, types = list(fields[f"{KEY}tokens"]), list(fields.get(f"{KEY}token_type") or [])
    merges = [tuple(m.split(" ", 1)) for m in fields.get(f"{KEY}merges") or []]
    backend = tokenizers.Tokenizer(models.BPE({t: i for i, t in enumerate(tokens)}, merges))
    backend.pre_tokenizer = _pre_tokenizer(fields.get(f"{KEY}pre", "gpt-2"), source)
    backend.decoder = decoders.ByteLevel()
    added = [AddedToken(tokens[i], special=kind == TokenType.CONTROL, normalized=False)
             for i, kind in enumerate(types) if kind in (TokenType.CONTROL, TokenType.USER_DEFINED)]
    backend.add_tokens(added)
    special = {f"{name}_token": tokens[fields[f"{KEY}{name}_token_id"]] for name in SPECIAL_IDS
               if fields.get(f"{KEY}{name}_token_id") is not None and fields[f"{KEY}{name}_token_id"] < len(tokens)}
    flags = {f"add_{n}_token": fields.get(f"{KEY}add_{n}_token") is True for n in ("bos", "eos")}
    backend.post_processor = bos_eos_processor(backend, flags, {n: AddedToken(t, special=True) for n, t in special.items()})
    return Tokenizer(backend, special_tokens=special, chat_template=fields.get("tokenizer.chat_template"))


def _pre_tokenizer(name: str, source: str) -> pre_tokenizers.PreTokenizer:
    if name == "gpt-2":
        return pre_tokenizers.ByteLevel(add_prefix_space=False)
    if name == "llama-bpe":
        split = pre_tokenizers.Split(tokenizers.Regex(LLAMA3_REGEX), behavior="isolated")
        return pre_tokenizers.Sequence([split, pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    raise LmforgeError(f"{source} splits text with llama.cpp's {name!r} pre-tokenizer; lmforge reads 'gpt-2' and 'llama-bpe'")
