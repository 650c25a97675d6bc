"""Chat templates in the three styles models ship render exactly as transformers renders them.

ChatML (Qwen, many fine-tunes), Llama 3's header tokens, and Mistral's `[INST]` blocks, written here in the
style those models' tokenizer_config.json files use; plus a chat_template given as a list of named templates.
"""

from __future__ import annotations

import json
from pathlib import Path

import jinja2
import pytest
from tokenizer_parity import assert_same_chat, copy_folder, hf_pair

from lmforge.errors import LmforgeError

# ChatML with a default system prompt, written with plain blocks: trim_blocks and lstrip_blocks matter.
CHATML = """{% if messages[0]['role'] != 'system' %}
<|im_start|>system
You are a helpful assistant.<|im_end|>
{% endif %}
{% for message in messages %}
<|im_start|>{{ message['role'] }}
{{ message['content'] }}<|im_end|>
{% endfor %}
{% if add_generation_prompt %}
<|im_start|>assistant
{% endif %}"""

# Llama 3 Instruct: BOS once, a header per turn, content trimmed, <|eot_id|> after each turn.
LLAMA3 = (
    "{% set loop_messages = messages %}{% for message in loop_messages %}"
    "{% set content = '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n'"
    " + message['content'] | trim + '<|eot_id|>' %}"
    "{% if loop.index0 == 0 %}{% set content = bos_token + content %}{% endif %}{{ content }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}{% endif %}"
)

# Mistral Instruct: the system prompt joins the last user turn, roles must alternate, no generation prompt.
MISTRAL = """{%- if messages[0]["role"] == "system" %}
    {%- set system_message = messages[0]["content"] %}
    {%- set loop_messages = messages[1:] %}
{%- else %}
    {%- set loop_messages = messages %}
{%- endif %}
{{- bos_token }}
{%- for message in loop_messages %}
    {%- if (message["role"] == "user") != (loop.index0 % 2 == 0) %}
        {{- raise_exception("Conversation roles must alternate user/assistant/user/assistant/...") }}
    {%- endif %}
    {%- if message["role"] == "user" %}
        {%- if loop.last and system_message is defined %}
            {{- "[INST] " + system_message + "\\n\\n" + message["content"] + "[/INST]" }}
        {%- else %}
            {{- "[INST] " + message["content"] + "[/INST]" }}
        {%- endif %}
    {%- elif message["role"] == "assistant" %}
        {{- " " + message["content"] | trim + eos_token }}
    {%- else %}
        {{- raise_exception("Only user and assistant roles are supported, after an optional system message!") }}
    {%- endif %}
{%- endfor %}
"""

TOOL_USE = (
    "{{ bos_token }}{% for tool in tools %}{{ tool | tojson }}{% endfor %}{{ messages[-1]['content'] }}"
)

SYSTEM = {"role": "system", "content": "Be brief. Réponds en français si besoin."}
TURNS = [
    {"role": "user", "content": "  What is 2+2?\n"},
    {"role": "assistant", "content": "4, évidemment 😀 "},
    {"role": "user", "content": "And 日本 in one word?", "name": None},
]
CONVERSATIONS = [[SYSTEM, *TURNS], TURNS, TURNS[:1], [SYSTEM, TURNS[0]]]


def folder_with_template(source: Path, target: Path, template: str | list) -> Path:
    config = json.loads((source / "tokenizer_config.json").read_text(encoding="utf-8"))
    return copy_folder(source, target, {**config, "chat_template": template})


@pytest.mark.parametrize(
    ("source", "template"), [("qwen_dir", CHATML), ("llama3_dir", LLAMA3), ("sentencepiece_dir", MISTRAL)]
)
@pytest.mark.parametrize("messages", CONVERSATIONS)
def test_template_styles_render_like_transformers(
    source: str, template: str, messages: list[dict], request: pytest.FixtureRequest, tmp_path: Path
) -> None:
    ours, theirs = hf_pair(folder_with_template(request.getfixturevalue(source), tmp_path, template))
    assert_same_chat(ours, theirs, messages)


def test_mistral_template_errors_like_transformers(sentencepiece_dir: Path, tmp_path: Path) -> None:
    ours, theirs = hf_pair(folder_with_template(sentencepiece_dir, tmp_path, MISTRAL))
    twice = [TURNS[0], TURNS[0]]
    with pytest.raises(LmforgeError, match="roles must alternate"):
        ours.apply_chat_template(twice, tokenize=False)
    with pytest.raises(jinja2.TemplateError, match="roles must alternate"):
        theirs.apply_chat_template(twice, tokenize=False)


def test_named_templates_use_default(qwen_dir: Path, tmp_path: Path) -> None:
    named = [{"name": "tool_use", "template": TOOL_USE}, {"name": "default", "template": CHATML}]
    ours, theirs = hf_pair(folder_with_template(qwen_dir, tmp_path, named))
    assert ours.chat_template == CHATML
    for messages in CONVERSATIONS:
        assert_same_chat(ours, theirs, messages)


def test_named_templates_without_default(qwen_dir: Path, tmp_path: Path) -> None:
    """Neither library guesses which of several named templates to use."""
    named = [{"name": "tool_use", "template": TOOL_USE}, {"name": "rag", "template": CHATML}]
    ours, theirs = hf_pair(folder_with_template(qwen_dir, tmp_path, named))
    with pytest.raises(LmforgeError, match="has no chat template"):
        ours.apply_chat_template(TURNS, tokenize=False)
    with pytest.raises(ValueError, match="chat template"):
        theirs.apply_chat_template(TURNS, tokenize=False)
