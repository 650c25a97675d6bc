"""Incremental detokenization: token ids in one at a time, finished text out.

Design choices
- Decoding one token alone is wrong in two ways: a byte-level token may hold part of a UTF-8
  character, and sentencepiece-style decoders treat the first token of a text specially (they strip
  its leading space). So the detokenizer decodes a short window of recent ids twice, without and with
  the new ones, and emits the difference (the approach of text-generation-inference and vLLM).
- Text is held back while it ends in U+FFFD, the replacement character a decoder produces for an
  unfinished UTF-8 sequence (byte-level BPE or `<0xE2>` byte-fallback tokens); `flush` emits whatever
  is left, so the pieces always join to `decode(all_ids)`.
- Memory stays bounded: ids before the window are dropped.
- Caveat: sentencepiece's byte-fallback decoder turns a whole run of `<0xNN>` tokens into U+FFFD
  characters when the run is not valid UTF-8, so a valid byte token already emitted can later join an
  invalid run. Text that a tokenizer encoded never does this; only ids no encoder produces (e.g. a model
  emitting a stray continuation byte) can then stream differently from `decode(all_ids)`.
- Caveat: `clean_up_tokenization_spaces` (honoured by `decode` for WordPiece and Unigram configs that ask
  for it) rewrites text across token boundaries ("it ' s" -> "it's"), so such a tokenizer can stream
  text that differs from `decode(all_ids)` where a clean-up spans pieces already emitted.
"""

from __future__ import annotations

from lmforge.tokenizer.core import Tokenizer

_REPLACEMENT = "\ufffd"


class IncrementalDetokenizer:
    """Turns a stream of token ids into a stream of text pieces that never split a character."""

    def __init__(self, tokenizer: Tokenizer, *, skip_special_tokens: bool = False) -> None:
        self._tokenizer = tokenizer
        self._skip_special_tokens = skip_special_tokens
        self._ids: list[int] = []  # the window: ids whose text is already emitted, then pending ids
        self._emitted = 0  # how many ids of the window have had their text emitted

    def push(self, token_id: int) -> str:
        """Add one id; return the text it completes (often "", e.g. mid-character)."""
        self._ids.append(int(token_id))
        return self._advance(final=False)

    def flush(self) -> str:
        """Return the text still held back (e.g. an unfinished character at the end of the stream)."""
        return self._advance(final=True)

    def _advance(self, *, final: bool) -> str:
        prefix = self._decode(self._ids[: self._emitted])
        text = self._decode(self._ids)
        if len(text) <= len(prefix) or (text.endswith(_REPLACEMENT) and not final):
            if final:
                self._restart_window()
            return ""
        self._restart_window()
        return text[len(prefix) :]

    def _restart_window(self) -> None:
        """Keep only the ids emitted last as context for the next decode."""
        self._ids = self._ids[self._emitted :]
        self._emitted = len(self._ids)

    def _decode(self, ids: list[int]) -> str:
        return self._tokenizer.decode(ids, skip_special_tokens=self._skip_special_tokens) if ids else ""
