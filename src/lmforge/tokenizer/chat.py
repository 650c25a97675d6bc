"""Chat templates: messages -> text, and the assistant mask for supervised fine-tuning.

Design choices
- Templates render exactly as in `transformers`: a sandboxed, immutable jinja2 environment with
  `trim_blocks` and `lstrip_blocks`, the `loopcontrols` extension, the globals `raise_exception` and
  `strftime_now`, and a `tojson` filter that keeps non-ASCII text and accepts `indent`. The template
  sees `messages`, `add_generation_prompt`, `tools=None`, `documents=None`, every named special token
  the tokenizer has (`bos_token`, `eos_token`, ...), and the caller's extra variables, which win.
  Message keys whose value is None are dropped first, as transformers does.
- The `{% generation %}` tag that some templates use is accepted and renders its body; the assistant
  mask does not depend on it.
- The assistant mask works for any template that renders a conversation prefix as a prefix of the
  whole: the span of assistant turn i is what `messages[:i+1]` adds to `messages[:i]` rendered with
  the generation prompt, i.e. the reply and the end-of-turn text the template puts after it. Trailing
  whitespace after a closing special token (ChatML's newline after `<|im_end|>`) is left out: the model
  stops at the special token and never has to predict it. Character spans become token flags through
  the tokenizer's character offsets: a token is in the mask when it overlaps a span.
- A compiled template is a plain value held by its owner (the `Tokenizer`); there is no global cache.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Collection, Mapping, Sequence
from datetime import datetime
from typing import Any

import jinja2
from jinja2 import nodes
from jinja2.ext import Extension, loopcontrols
from jinja2.sandbox import ImmutableSandboxedEnvironment

from lmforge.errors import LmforgeError

# ChatML with the BOS token once at the start: the default template of lmforge-trained tokenizers.
CHATML_TEMPLATE = (
    "{{- bos_token }}"
    "{%- for message in messages %}"
    "{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}"
    "{{- '<|im_start|>assistant\\n' }}"
    "{%- endif %}"
)

Message = dict[str, Any]
Span = tuple[int, int]


class _GenerationTag(Extension):
    """Accepts `{% generation %}...{% endgeneration %}` and renders the body unchanged."""

    tags = {"generation"}  # noqa: RUF012 (jinja2 declares this as a plain class attribute)

    def parse(self, parser: jinja2.parser.Parser) -> nodes.Node:
        lineno = next(parser.stream).lineno
        body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
        return nodes.CallBlock(self.call_method("_body"), [], [], body).set_lineno(lineno)

    def _body(self, caller: Callable[[], str]) -> str:
        return caller()


def _raise_exception(message: str) -> None:
    raise jinja2.exceptions.TemplateError(message)


def _tojson(
    value: Any,
    ensure_ascii: bool = False,
    indent: int | None = None,
    separators: tuple[str, str] | None = None,
    sort_keys: bool = False,
) -> str:
    # jinja2's own filter escapes HTML characters; templates expect plain json.dumps.
    return json.dumps(
        value, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys
    )


def _strftime_now(format: str) -> str:
    return datetime.now().strftime(format)


def compile_chat_template(source: str) -> jinja2.Template:
    """Compile a chat template in the environment transformers uses."""
    env = ImmutableSandboxedEnvironment(
        trim_blocks=True, lstrip_blocks=True, extensions=[_GenerationTag, loopcontrols]
    )
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = _strftime_now
    try:
        return env.from_string(source)
    except jinja2.TemplateSyntaxError as err:
        raise LmforgeError(
            f"the chat template has a syntax error on line {err.lineno}: {err.message}; fix chat_template "
            "in tokenizer_config.json (or chat_template.jinja)"
        ) from err


def normalize_messages(messages: Sequence[Mapping[str, Any]]) -> list[Message]:
    """Check that every message has a role and content; copy them without None-valued keys."""
    if not messages:
        raise LmforgeError(
            "the conversation has no messages; pass a list like [{'role': 'user', 'content': 'hi'}]"
        )
    normalized = []
    for index, message in enumerate(messages):
        if not isinstance(message, Mapping) or "role" not in message or "content" not in message:
            raise LmforgeError(
                f"message {index} ({message!r:.60}) needs a 'role' and a 'content', "
                "e.g. {'role': 'user', 'content': 'hi'}"
            )
        normalized.append({key: value for key, value in message.items() if value is not None})
    return normalized


def render_chat(
    template: jinja2.Template,
    messages: Sequence[Message],
    *,
    add_generation_prompt: bool,
    variables: Mapping[str, Any],
) -> str:
    """Render already-normalized messages; template errors become LmforgeError."""
    context = {"tools": None, "documents": None, **variables}
    try:
        return template.render(
            messages=list(messages), add_generation_prompt=add_generation_prompt, **context
        )
    except (jinja2.TemplateError, TypeError) as err:
        raise LmforgeError(f"the chat template failed on these messages: {err}") from err


def assistant_spans(
    render: Callable[[list[Message], bool], str],
    messages: list[Message],
    closing_tokens: Collection[str],
) -> tuple[str, list[Span]]:
    """Render the whole conversation and find the character span of each assistant turn.

    `render(messages, add_generation_prompt)` renders a conversation; `closing_tokens` are the
    special-token strings after which trailing whitespace is not part of a turn.
    """
    turns = [i for i, message in enumerate(messages) if message["role"] == "assistant"]
    if not turns:
        raise LmforgeError(
            "the conversation has no assistant message, so there is nothing to train on; "
            "add a {'role': 'assistant', 'content': ...} turn"
        )
    full = render(messages, False)
    spans = []
    for i in turns:
        prompt = render(messages[:i], True)
        upto = render(messages[: i + 1], False)
        if not (upto.startswith(prompt) and full.startswith(upto)):
            raise LmforgeError(
                f"the chat template renders the conversation before assistant turn {i} differently from "
                "the same turns inside the whole conversation, so the assistant mask cannot be derived; "
                "use a template whose output for a prefix of the messages is a prefix of the output"
            )
        spans.append((len(prompt), len(prompt) + _turn_length(upto[len(prompt) :], closing_tokens)))
    return full, spans


def _turn_length(turn: str, closing_tokens: Collection[str]) -> int:
    """Length of an assistant turn without the whitespace that follows its closing special token."""
    stripped = turn.rstrip()
    if any(token and stripped.endswith(token) for token in closing_tokens):
        return len(stripped)
    return len(turn)


def token_mask(offsets: Sequence[tuple[int, int]], spans: Sequence[Span]) -> list[bool]:
    """True for each token whose character range overlaps one of the spans (both in text order)."""
    mask = []
    current = 0  # the first span that does not end before this token starts
    for start, end in offsets:
        while current < len(spans) and start >= spans[current][1]:
            current += 1
        mask.append(current < len(spans) and end > spans[current][0])
    return mask
