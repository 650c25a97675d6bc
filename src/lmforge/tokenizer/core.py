"""The lmforge `Tokenizer`: a typed wrapper around a HF `tokenizers.Tokenizer`.

Design choices
- `tokenizer.json` is the single source of truth for text <-> ids (normalizer, pre-tokenizer, model,
  post-processor, decoder), so any HF fast tokenizer works: byte-level BPE (GPT-2, Llama 3),
  sentencepiece-style BPE with byte fallback (Llama 2, Mistral), WordPiece (BERT).
  `tokenizer_config.json` only adds names: which tokens are bos/eos/pad/..., the chat template and
  the maximum length. A sibling `chat_template.jinja` wins over the config's template, as in transformers.
- `encode` adds no special tokens unless asked; when asked, the tokenizer.json post-processor decides
  which ([CLS]/[SEP] for BERT, BOS for Llama, `<|bos|>` for lmforge). As in transformers 5,
  `add_bos_token` / `add_eos_token` in the config are ignored because tokenizer.json is present.
- A special token named in the config but missing from the vocabulary is appended as an added token,
  as transformers does, so that both assign the same ids.
- `vocab_size` is the largest id + 1 including added tokens: the rows an embedding table needs.
- `eot_id` is the token that ends a chat turn, where generation stops: the first of `<|im_end|>`
  (lmforge, Qwen), `<|eot_id|>` (Llama 3), `<end_of_turn>` (Gemma), `<|end|>` (Phi 3) that the vocabulary
  has, else the eos token.
- `save` writes tokenizer.json and a minimal tokenizer_config.json (class PreTrainedTokenizerFast,
  special tokens, chat template, model_max_length, no clean-up of spaces) that transformers loads
  and encodes/decodes identically; each file goes to a temporary name and is renamed into place.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping, Sequence
from functools import cached_property
from pathlib import Path
from typing import Any, Literal, overload

import jinja2
import tokenizers
from tokenizers import AddedToken

from lmforge.errors import LmforgeError
from lmforge.tokenizer.chat import (
    assistant_spans,
    compile_chat_template,
    normalize_messages,
    render_chat,
    token_mask,
)

# The named special tokens of transformers, in the order it adds missing ones to the vocabulary.
SPECIAL_TOKEN_NAMES = (
    "bos_token",
    "eos_token",
    "unk_token",
    "sep_token",
    "pad_token",
    "cls_token",
    "mask_token",
)
# Tokens that end a chat turn, most specific first.
END_OF_TURN_TOKENS = ("<|im_end|>", "<|eot_id|>", "<end_of_turn>", "<|end|>")
# transformers writes int(1e30) as model_max_length when the length is unknown.
_UNKNOWN_LENGTH = 10**12


class Tokenizer:
    """Text <-> token ids, special tokens and chat templates for one vocabulary."""

    def __init__(
        self,
        backend: tokenizers.Tokenizer,
        *,
        special_tokens: Mapping[str, str] | None = None,
        chat_template: str | None = None,
        model_max_length: int | None = None,
    ) -> None:
        """Wrap `backend`; `special_tokens` maps names like "bos_token" to token strings.

        Special tokens missing from the vocabulary are added to `backend` (it is changed in place).
        """
        special_tokens = dict(special_tokens or {})
        unknown = sorted(set(special_tokens) - set(SPECIAL_TOKEN_NAMES))
        if unknown:
            raise LmforgeError(
                f"unknown special token names {unknown}; use some of {list(SPECIAL_TOKEN_NAMES)}"
            )
        self._backend = backend
        self._special_tokens = {
            name: special_tokens[name] for name in SPECIAL_TOKEN_NAMES if special_tokens.get(name)
        }
        self._chat_template = chat_template
        self._compiled_template: jinja2.Template | None = None
        self.model_max_length = model_max_length
        missing = [token for token in self._special_tokens.values() if backend.token_to_id(token) is None]
        if missing:
            backend.add_special_tokens(
                [AddedToken(token, special=True, normalized=False) for token in missing]
            )

    # ----- loading and saving -----------------------------------------------------------------

    @classmethod
    def from_dir(cls, path: str | Path) -> Tokenizer:
        """Load `tokenizer.json` and the optional `tokenizer_config.json` from a folder."""
        folder = Path(path)
        if folder.is_file() and folder.name == "tokenizer.json":
            folder = folder.parent
        if not folder.is_dir():
            raise LmforgeError(
                f"tokenizer folder {folder} does not exist; pass the folder that holds tokenizer.json"
            )
        tokenizer_file = folder / "tokenizer.json"
        if not tokenizer_file.is_file():
            raise LmforgeError(
                f"{folder} has no tokenizer.json; lmforge reads HF fast tokenizers (a sentencepiece-only "
                "tokenizer.model can be converted by loading it with transformers and calling save_pretrained)"
            )
        backend = _load_backend(tokenizer_file)
        config_file = folder / "tokenizer_config.json"
        config = _read_json_object(config_file) if config_file.is_file() else {}
        return cls(
            backend,
            special_tokens=_special_tokens_from_config(config),
            chat_template=_chat_template_from(folder, config),
            model_max_length=_max_length_from_config(config),
        )

    def save(self, path: str | Path) -> None:
        """Write tokenizer.json and tokenizer_config.json into a folder (created if needed)."""
        folder = Path(path)
        folder.mkdir(parents=True, exist_ok=True)
        config: dict[str, Any] = {
            "tokenizer_class": "PreTrainedTokenizerFast",
            **self._special_tokens,
            "clean_up_tokenization_spaces": False,
        }
        if self._chat_template is not None:
            config["chat_template"] = self._chat_template
        if self.model_max_length is not None:
            config["model_max_length"] = self.model_max_length
        _write_atomic(folder / "tokenizer.json", self._backend.to_str())
        _write_atomic(
            folder / "tokenizer_config.json", json.dumps(config, indent=2, ensure_ascii=False) + "\n"
        )
        # transformers prefers chat_template.jinja over the config: keep a stale one from shadowing ours.
        jinja_file = folder / "chat_template.jinja"
        if jinja_file.exists():
            if self._chat_template is None:
                jinja_file.unlink()
            else:
                _write_atomic(jinja_file, self._chat_template)

    # ----- text <-> ids -----------------------------------------------------------------------

    def encode(self, text: str, add_special_tokens: bool = False) -> list[int]:
        """Token ids of `text`; the post-processor's special tokens only when asked."""
        return self._backend.encode(text, add_special_tokens=add_special_tokens).ids

    def encode_batch(self, texts: Sequence[str], add_special_tokens: bool = False) -> list[list[int]]:
        """Token ids of several texts, encoded in parallel by the backend."""
        encodings = self._backend.encode_batch(list(texts), add_special_tokens=add_special_tokens)
        return [encoding.ids for encoding in encodings]

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = False) -> str:
        """Text of token ids (any sequence of ints: a list, a tensor's tolist(), numpy ints)."""
        return self._backend.decode([int(i) for i in ids], skip_special_tokens=skip_special_tokens)

    def token_to_id(self, token: str) -> int | None:
        """Id of a token string, or None when it is not in the vocabulary."""
        return self._backend.token_to_id(token)

    def id_to_token(self, token_id: int) -> str | None:
        """Token string of an id, or None when the id is out of range."""
        return self._backend.id_to_token(int(token_id))

    # ----- vocabulary and special tokens ------------------------------------------------------

    @property
    def backend(self) -> tokenizers.Tokenizer:
        """The wrapped `tokenizers.Tokenizer`, for fast paths such as batch encoding with offsets."""
        return self._backend

    @cached_property
    def vocab_size(self) -> int:
        """Largest token id + 1, added tokens included."""
        return max(self._backend.get_vocab(with_added_tokens=True).values(), default=-1) + 1

    @property
    def special_tokens(self) -> dict[str, str]:
        """Named special tokens, e.g. {"bos_token": "<|bos|>", "eos_token": "<|eos|>"}."""
        return dict(self._special_tokens)

    @property
    def bos_token(self) -> str | None:
        return self._special_tokens.get("bos_token")

    @property
    def eos_token(self) -> str | None:
        return self._special_tokens.get("eos_token")

    @property
    def pad_token(self) -> str | None:
        return self._special_tokens.get("pad_token")

    @property
    def unk_token(self) -> str | None:
        return self._special_tokens.get("unk_token")

    @property
    def bos_id(self) -> int | None:
        return self._id_of(self.bos_token)

    @property
    def eos_id(self) -> int | None:
        return self._id_of(self.eos_token)

    @property
    def pad_id(self) -> int | None:
        return self._id_of(self.pad_token)

    @property
    def padding_id(self) -> int:
        """The id batches are padded with: the pad token, else EOS, else 0 (attention masks hide pads either way)."""
        return next((i for i in (self.pad_id, self.eos_id) if i is not None), 0)

    @property
    def eot_id(self) -> int | None:
        """The id that ends a chat turn (generation stops there); see the module docstring."""
        for token in END_OF_TURN_TOKENS:
            token_id = self._backend.token_to_id(token)
            if token_id is not None:
                return token_id
        return self.eos_id

    def _id_of(self, token: str | None) -> int | None:
        return None if token is None else self._backend.token_to_id(token)

    @cached_property
    def _closing_tokens(self) -> frozenset[str]:
        """Contents of the added special tokens (where an assistant turn may end)."""
        added = self._backend.get_added_tokens_decoder().values()
        return frozenset(token.content for token in added if token.special)

    # ----- chat -------------------------------------------------------------------------------

    @property
    def chat_template(self) -> str | None:
        """The Jinja chat template, or None when the tokenizer has none."""
        return self._chat_template

    @overload
    def apply_chat_template(
        self,
        messages: Sequence[Mapping[str, Any]],
        add_generation_prompt: bool = ...,
        tokenize: Literal[True] = ...,
        **extra: Any,
    ) -> list[int]: ...

    @overload
    def apply_chat_template(
        self,
        messages: Sequence[Mapping[str, Any]],
        add_generation_prompt: bool = ...,
        *,
        tokenize: Literal[False],
        **extra: Any,
    ) -> str: ...

    def apply_chat_template(
        self,
        messages: Sequence[Mapping[str, Any]],
        add_generation_prompt: bool = False,
        tokenize: bool = True,
        **extra: Any,
    ) -> list[int] | str:
        """Render messages with the chat template; token ids (no special tokens added again) or text.

        `extra` becomes template variables (e.g. `tools=[...]`, `date_string="1 Jan 2025"`).
        """
        text = self._render(normalize_messages(messages), add_generation_prompt, extra)
        return self.encode(text) if tokenize else text

    def encode_chat(
        self, messages: Sequence[Mapping[str, Any]], **extra: Any
    ) -> tuple[list[int], list[bool]]:
        """Token ids of a conversation and a mask that is True on the assistant replies.

        The mask covers each assistant message's content and the end-of-turn token(s) the template
        emits after it (e.g. `<|im_end|>`), never the system/user turns or the assistant header.
        """
        normalized = normalize_messages(messages)
        text, spans = assistant_spans(
            lambda prefix, generation_prompt: self._render(prefix, generation_prompt, extra),
            normalized,
            self._closing_tokens,
        )
        encoding = self._backend.encode(text, add_special_tokens=False)
        return encoding.ids, token_mask(encoding.offsets, spans)

    def _render(
        self, messages: list[dict[str, Any]], add_generation_prompt: bool, extra: Mapping[str, Any]
    ) -> str:
        if self._chat_template is None:
            raise LmforgeError(
                "this tokenizer has no chat template; add chat_template to tokenizer_config.json "
                "(or a chat_template.jinja file) next to tokenizer.json"
            )
        if self._compiled_template is None:
            self._compiled_template = compile_chat_template(self._chat_template)
        variables = {**self._special_tokens, **extra}
        return render_chat(
            self._compiled_template,
            messages,
            add_generation_prompt=add_generation_prompt,
            variables=variables,
        )

    def __repr__(self) -> str:
        return f"Tokenizer(vocab_size={self.vocab_size}, special_tokens={self._special_tokens})"


# ----- helpers ---------------------------------------------------------------------------------


def _read_json_object(path: Path) -> dict[str, Any]:
    try:
        value = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise LmforgeError(f"{path} is not valid JSON ({err}); re-download or re-save the tokenizer") from err
    if not isinstance(value, dict):
        raise LmforgeError(
            f"{path} should hold a JSON object, not {type(value).__name__}; re-save the tokenizer"
        )
    return value


def _load_backend(path: Path) -> tokenizers.Tokenizer:
    text = path.read_text(encoding="utf-8", errors="replace")
    try:
        return tokenizers.Tokenizer.from_str(text)
    except Exception as err:  # the Rust side raises a bare Exception for any bad file
        _read_json_object(path)  # names the JSON syntax error when that is the cause
        raise LmforgeError(
            f"{path} is not a tokenizer the `tokenizers` library can read ({err}); re-download or re-save it"
        ) from err


def _special_tokens_from_config(config: Mapping[str, Any]) -> dict[str, str]:
    """Special tokens given as strings or as {"content": ...} dicts (AddedToken form)."""
    tokens = {}
    for name in SPECIAL_TOKEN_NAMES:
        value = config.get(name)
        if isinstance(value, Mapping):
            value = value.get("content")
        if isinstance(value, str) and value:
            tokens[name] = value
    return tokens


def _chat_template_from(folder: Path, config: Mapping[str, Any]) -> str | None:
    """chat_template.jinja, else the config's template (a string, or the one named "default" in a list)."""
    jinja_file = folder / "chat_template.jinja"
    if jinja_file.is_file():
        return jinja_file.read_text(encoding="utf-8")
    template = config.get("chat_template")
    if isinstance(template, list):
        named = {item.get("name"): item.get("template") for item in template if isinstance(item, Mapping)}
        template = named.get("default")
    return template if isinstance(template, str) else None


def _max_length_from_config(config: Mapping[str, Any]) -> int | None:
    value = config.get("model_max_length")
    if isinstance(value, (int, float)) and 0 < value < _UNKNOWN_LENGTH:
        return int(value)
    return None


def _write_atomic(path: Path, text: str) -> None:
    """Write to a temporary name in the same folder, then rename over `path`."""
    temporary = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        with open(temporary, "w", encoding="utf-8", newline="") as handle:
            handle.write(text)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(temporary, path)
    finally:
        temporary.unlink(missing_ok=True)
