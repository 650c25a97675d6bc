"""The lmforge `Tokenizer`: a typed wrapper around a HF `tokenizers.Tokenizer`.

Design choices
- `tokenizer.json` is the single source of truth for text <-> ids (normalizer, pre-tokenizer, model,
  post-processor, decoder), so any HF fast tokenizer works: byte-level BPE (GPT-2, Llama 3, Qwen),
  sentencepiece-style BPE with byte fallback (Llama 2, Mistral), WordPiece (BERT), Unigram (T5).
- Padding and truncation stored in tokenizer.json are switched off on load: lmforge pads and truncates
  explicitly, with masks, and a sentence-embedding checkpoint that pads every text to 128 ids must not
  make `encode` return 119 padding ids (transformers, too, applies them only when asked).
- `tokenizer_config.json` adds what transformers 5 reads from it: which tokens are bos/eos/pad/... (strings,
  or `{"content": ...}` dicts), extra special tokens (`additional_special_tokens`, `extra_special_tokens`,
  model-specific `*_token` keys), `added_tokens_decoder`, the chat template (a string, or the one named
  "default" in a list of named templates), `model_max_length` and `clean_up_tokenization_spaces`.
  `special_tokens_map.json` is read, and wins, only when the config has no `added_tokens_decoder` (as in
  transformers). A sibling `chat_template.jinja` wins over the config's template.
- Tokens named in the config are given to the backend with the calls transformers makes (one `add_tokens`,
  in the same order, with the same flags), so both assign the same ids and split text the same way.
- `encode` adds no special tokens unless asked; when asked, the tokenizer.json post-processor decides which
  ([CLS]/[SEP] for BERT, BOS for Llama, `<|bos|>` for lmforge). Only when tokenizer.json has no post-processor
  do `add_bos_token` / `add_eos_token` build one (`BOS $A EOS`), as transformers 4's Llama tokenizer did.
  Deliberate difference: transformers 5 drops both flags whenever tokenizer.json exists, so for such a folder
  it adds no BOS, although the model was trained with one.
- `decode` applies `clean_up_tokenization_spaces` ("a ." -> "a.", "do n't" -> "don't") when the config asks,
  except for BPE models, where transformers 5 skips it because it would corrupt the text.
- `vocab_size` is the largest id + 1 including added tokens: the rows an embedding table needs.
- `eot_id` is the token that ends a chat turn, where generation stops: the first of `<|im_end|>`
  (lmforge, Qwen), `<|eot_id|>` (Llama 3), `<end_of_turn>` (Gemma), `<|end|>` (Phi 3) that the vocabulary
  has, else the eos token. A model folder's generation_config.json may name more (`GenerationDefaults`).
- `save` writes tokenizer.json and a minimal tokenizer_config.json (class PreTrainedTokenizerFast,
  special tokens, chat template, model_max_length, clean-up of spaces) that transformers loads and
  encodes/decodes identically; each file goes to a temporary name and is renamed into place.
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
from tokenizers import AddedToken, models, processors

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
# The fields of an added token in tokenizer_config.json's dict form.
ADDED_TOKEN_FIELDS = ("content", "single_word", "lstrip", "rstrip", "normalized", "special")
# transformers' clean_up_tokenization: spaces a word-level tokenizer put before punctuation and contractions.
CLEAN_UP_REPLACEMENTS = (
    (" .", "."),
    (" ?", "?"),
    (" !", "!"),
    (" ,", ","),
    (" ' ", "'"),
    (" n't", "n't"),
    (" 'm", "'m"),
    (" 's", "'s"),
    (" 've", "'ve"),
    (" 're", "'re"),
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
        clean_up_tokenization_spaces: bool = False,
    ) -> None:
        """Wrap `backend`; `special_tokens` maps names like "bos_token" to token strings.

        Special tokens missing from the vocabulary are added to `backend` (it is changed in place).
        `clean_up_tokenization_spaces` makes `decode` remove spaces before punctuation (not for BPE models).
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
        self._clean_up_tokenization_spaces = clean_up_tokenization_spaces
        self._cleans_up_spaces = clean_up_tokenization_spaces and not isinstance(backend.model, models.BPE)
        missing = [token for token in self._special_tokens.values() if backend.token_to_id(token) is None]
        if missing:
            backend.add_special_tokens(
                [AddedToken(token, special=True, normalized=False) for token in missing]
            )

    # ----- loading and saving -----------------------------------------------------------------

    @classmethod
    def from_dir(cls, path: str | Path) -> Tokenizer:
        """Load `tokenizer.json` and the optional `tokenizer_config.json` (and special_tokens_map.json)."""
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
        backend.no_padding()
        backend.no_truncation()
        config = _tokenizer_config(folder)
        named = _named_tokens(config)
        special = [*named.values(), *_extra_tokens(config)]
        _add_tokens_like_transformers(backend, _added_tokens_decoder(config), special)
        if backend.post_processor is None:
            backend.post_processor = bos_eos_processor(backend, config, named)
        return cls(
            backend,
            special_tokens={name: named[name].content for name in SPECIAL_TOKEN_NAMES if name in named},
            chat_template=_chat_template_from(folder, config),
            model_max_length=_max_length_from_config(config),
            clean_up_tokenization_spaces=config.get("clean_up_tokenization_spaces") is True,
        )

    def save(self, path: str | Path) -> None:
        """Write tokenizer.json and tokenizer_config.json into a folder (created if needed)."""
        folder = Path(path)
        folder.mkdir(parents=True, exist_ok=True)
        config: dict[str, Any] = {
            "tokenizer_class": "PreTrainedTokenizerFast",
            **self._special_tokens,
            "clean_up_tokenization_spaces": self._clean_up_tokenization_spaces,
        }
        if self._chat_template is not None:
            config["chat_template"] = self._chat_template
        if self.model_max_length is not None:
            config["model_max_length"] = self.model_max_length
        write_atomic(folder / "tokenizer.json", self._backend.to_str())
        write_atomic(
            folder / "tokenizer_config.json", json.dumps(config, indent=2, ensure_ascii=False) + "\n"
        )
        # transformers prefers chat_template.jinja over the config: keep a stale one from shadowing ours.
        jinja_file = folder / "chat_template.jinja"
        if jinja_file.exists():
            if self._chat_template is None:
                jinja_file.unlink()
            else:
                write_atomic(jinja_file, self._chat_template)

    # ----- text <-> ids -----------------------------------------------------------------------

    def encode(self, text: str, add_special_tokens: bool = False) -> list[int]:
        """Token ids of `text`; the post-processor's special tokens only when asked."""
        return self._backend.encode(text, add_special_tokens=add_special_tokens).ids

    def encode_batch(self, texts: Sequence[str], add_special_tokens: bool = False,
                     max_length: int | None = None) -> list[list[int]]:
        """Token ids of several texts, encoded in parallel by the backend. With `max_length`, each text
        is cut from the right so that it fits with its special tokens (transformers' `truncation=True`)."""
        if max_length is None:
            encodings = self._backend.encode_batch(list(texts), add_special_tokens=add_special_tokens)
            return [encoding.ids for encoding in encodings]
        room = max_length - (self._backend.num_special_tokens_to_add(False) if add_special_tokens else 0)
        out = []
        for encoding in self._backend.encode_batch(list(texts), add_special_tokens=False):
            encoding.truncate(max(room, 0))
            out.append(self._backend.post_process(encoding, add_special_tokens=add_special_tokens).ids)
        return out

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = False) -> str:
        """Text of token ids (any sequence of ints: a list, a tensor's tolist(), numpy ints)."""
        text = self._backend.decode([int(i) for i in ids], skip_special_tokens=skip_special_tokens)
        if self._cleans_up_spaces:
            for before, after in CLEAN_UP_REPLACEMENTS:
                text = text.replace(before, after)
        return text

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


def read_json_object(path: Path) -> dict[str, Any]:
    """The JSON object in `path`; LmforgeError naming the file when it is not one."""
    try:
        value = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise LmforgeError(f"{path} is not valid JSON ({err}); re-download or re-save it") from err
    if not isinstance(value, dict):
        raise LmforgeError(
            f"{path} should hold a JSON object, not {type(value).__name__}; re-download or re-save it"
        )
    return value


def _load_backend(path: Path) -> tokenizers.Tokenizer:
    text = path.read_text(encoding="utf-8", errors="replace")
    try:
        return tokenizers.Tokenizer.from_str(text)
    except Exception as err:  # the Rust side raises a bare Exception for any bad file
        read_json_object(path)  # names the JSON syntax error when that is the cause
        raise LmforgeError(
            f"{path} is not a tokenizer the `tokenizers` library can read ({err}); re-download or re-save it"
        ) from err


def _tokenizer_config(folder: Path) -> dict[str, Any]:
    """tokenizer_config.json, with special_tokens_map.json's values over it where transformers reads it.

    transformers 5 reads special_tokens_map.json (a file older saves wrote) only when the config has no
    `added_tokens_decoder`, and then lets its values win.
    """
    config_file = folder / "tokenizer_config.json"
    config = read_json_object(config_file) if config_file.is_file() else {}
    map_file = folder / "special_tokens_map.json"
    if "added_tokens_decoder" not in config and map_file.is_file():
        config = {**config, **read_json_object(map_file)}
    return config


def _added_token(value: str | Mapping[str, Any], name: str, *, special: bool | None = None) -> AddedToken:
    """A token given as a string (special) or in AddedToken dict form; `special` overrides the dict's flag."""
    if isinstance(value, str):
        return AddedToken(value, special=True)
    if not isinstance(value, Mapping) or not isinstance(value.get("content"), str):
        raise LmforgeError(
            f'tokenizer config entry {name} should be a token string or an object with a "content" string, '
            f"not {value!r:.80}; fix tokenizer_config.json (or special_tokens_map.json)"
        )
    fields = {key: value[key] for key in ADDED_TOKEN_FIELDS if key in value}
    if special is not None:
        fields["special"] = special
    return AddedToken(**fields)


def _named_tokens(config: Mapping[str, Any]) -> dict[str, AddedToken]:
    """Named special tokens in transformers' order: the standard names, then model-specific `*_token` keys."""
    named = {}
    for name in SPECIAL_TOKEN_NAMES:
        if config.get(name) is not None:
            named[name] = _added_token(config[name], name, special=True)
    model_specific = {
        key: value
        for key, value in config.items()
        if key.endswith("_token") and key not in SPECIAL_TOKEN_NAMES and isinstance(value, (str, Mapping))
    }
    extra = config.get("extra_special_tokens")
    if isinstance(extra, Mapping):  # transformers 5 reads a dict here as more named tokens
        model_specific.update(extra)
    for name, value in model_specific.items():
        named[name] = _added_token(value, name, special=True)
    return {name: token for name, token in named.items() if token.content}


def _extra_tokens(config: Mapping[str, Any]) -> list[AddedToken]:
    """Unnamed special tokens: `extra_special_tokens` (transformers 5), else `additional_special_tokens`."""
    tokens = config.get("extra_special_tokens") or config.get("additional_special_tokens") or []
    if isinstance(tokens, Mapping):
        return []  # named tokens; see _named_tokens
    if not isinstance(tokens, list):
        raise LmforgeError(
            f"additional_special_tokens should be a list of tokens, not {tokens!r:.80}; "
            "fix tokenizer_config.json"
        )
    return [_added_token(token, "additional_special_tokens") for token in tokens]


def _added_tokens_decoder(config: Mapping[str, Any]) -> list[AddedToken]:
    """The config's `added_tokens_decoder` ({"id": {"content": ...}}), in id order."""
    decoder = config.get("added_tokens_decoder") or {}
    if not isinstance(decoder, Mapping) or not all(
        str(key).isdigit() and isinstance(token, Mapping) for key, token in decoder.items()
    ):
        raise LmforgeError(
            'added_tokens_decoder should map token ids to token objects, like {"0": {"content": "<unk>"}}; '
            "fix tokenizer_config.json or delete the entry (tokenizer.json lists the added tokens too)"
        )
    return [_added_token(decoder[key], f"added_tokens_decoder[{key}]") for key in sorted(decoder, key=int)]


def _add_tokens_like_transformers(
    backend: tokenizers.Tokenizer, decoder_tokens: list[AddedToken], special_tokens: list[AddedToken]
) -> None:
    """Add the config's tokens with the one call transformers 5 makes, so that every id and flag agrees.

    It re-adds every `added_tokens_decoder` entry (its flags win over tokenizer.json's), then each special
    token that is not yet an added token, in order.
    """
    present = {token.content for token in backend.get_added_tokens_decoder().values()}
    present.update(token.content for token in decoder_tokens)
    tokens = list(decoder_tokens)
    for token in special_tokens:
        if token.content not in present:
            tokens.append(token)
            present.add(token.content)
    if tokens:
        backend.add_tokens(tokens)


def bos_eos_processor(
    backend: tokenizers.Tokenizer, config: Mapping[str, Any], named: Mapping[str, AddedToken]
) -> processors.TemplateProcessing | None:
    """`BOS $A EOS` as `add_bos_token` / `add_eos_token` ask, for a tokenizer.json with no post-processor."""
    bos, eos = (
        [named[name].content] if config.get(flag) is True and name in named else []
        for name, flag in (("bos_token", "add_bos_token"), ("eos_token", "add_eos_token"))
    )
    if not bos and not eos:
        return None
    return processors.TemplateProcessing(
        single=[*bos, "$A", *eos],
        pair=[*bos, "$A", *eos, *(f"{token}:1" for token in bos), "$B:1", *(f"{token}:1" for token in eos)],
        special_tokens=[(token, backend.token_to_id(token)) for token in dict.fromkeys([*bos, *eos])],
    )


def _chat_template_from(folder: Path, config: Mapping[str, Any]) -> str | None:
    """chat_template.jinja, else the config's template (a string, or the one named "default" in a list)."""
    jinja_file = folder / "chat_template.jinja"
    if jinja_file.is_file():
        return jinja_file.read_text(encoding="utf-8")
    template = config.get("chat_template")
    if isinstance(template, list):
        if not all(isinstance(item, Mapping) and isinstance(item.get("template"), str) for item in template):
            raise LmforgeError(
                'chat_template as a list should hold {"name": ..., "template": ...} objects; '
                "fix tokenizer_config.json"
            )
        template = {item.get("name"): item["template"] for item in template}.get("default")
    return template if isinstance(template, str) else None


def _max_length_from_config(config: Mapping[str, Any]) -> int | None:
    value = config.get("model_max_length")
    if isinstance(value, (int, float)) and 0 < value < _UNKNOWN_LENGTH:
        return int(value)
    return None


def write_atomic(path: Path, text: str) -> None:
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
