"""Chat templates render exactly like transformers; encode_chat masks exactly the assistant replies."""

from __future__ import annotations

from pathlib import Path

import pytest
from tokenizer_parity import assert_same_chat, hf_pair

from lmforge.errors import LmforgeError
from lmforge.tokenizer import Tokenizer

SYSTEM = {"role": "system", "content": "You are terse. Réponds en français si besoin."}
CONVERSATION = [
    SYSTEM,
    {"role": "user", "content": "What is 2+2?"},
    {"role": "assistant", "content": "4, évidemment 😀"},
    {"role": "user", "content": "And 日本 in one word?"},
    {"role": "assistant", "content": "Japan."},
]
TOOLS = [
    {
        "type": "function",
        "function": {
            "name": "get_weather",
            "description": "Météo d'une ville",
            "parameters": {
                "type": "object",
                "properties": {"city": {"type": "string"}},
                "required": ["city"],
            },
        },
    }
]
TOOL_CALL_TURNS = [
    {"role": "user", "content": "Weather in Zürich?"},
    {
        "role": "assistant",
        "content": None,
        "tool_calls": [
            {"type": "function", "function": {"name": "get_weather", "arguments": {"city": "Zürich"}}}
        ],
    },
    {"role": "tool", "content": '{"temp": 21}'},
]


@pytest.mark.parametrize(
    "messages",
    [CONVERSATION, CONVERSATION[1:], CONVERSATION[:2], [{"role": "user", "content": "  padded  "}]],
)
def test_llama3_template_matches_transformers(llama3_dir: Path, messages: list[dict]) -> None:
    ours, theirs = hf_pair(llama3_dir)
    assert_same_chat(ours, theirs, messages)
    assert_same_chat(ours, theirs, messages, date_string="1 Jan 2025")


def test_llama3_template_with_tools_matches_transformers(llama3_dir: Path) -> None:
    ours, theirs = hf_pair(llama3_dir)
    assert_same_chat(ours, theirs, [SYSTEM, *TOOL_CALL_TURNS], tools=TOOLS)
    text = ours.apply_chat_template([SYSTEM, *TOOL_CALL_TURNS], tools=TOOLS, tokenize=False)
    assert '"description": "Météo d\'une ville"' in text  # tojson keeps non-ASCII, indent=4 works
    assert '\n    "type": "function"' in text


def test_llama3_bos_appears_once(llama3_dir: Path) -> None:
    ours = Tokenizer.from_dir(llama3_dir)
    ids = ours.apply_chat_template(CONVERSATION)
    assert ids[0] == ours.bos_id and ids.count(ours.bos_id) == 1


@pytest.mark.parametrize("messages", [CONVERSATION, CONVERSATION[1:], TOOL_CALL_TURNS])
def test_qwen_template_matches_transformers(qwen_dir: Path, messages: list[dict]) -> None:
    ours, theirs = hf_pair(qwen_dir)
    assert_same_chat(ours, theirs, messages)
    assert_same_chat(ours, theirs, messages, tools=TOOLS)


def test_lmforge_template_matches_transformers(trained_dir: Path) -> None:
    ours, theirs = hf_pair(trained_dir)
    assert_same_chat(ours, theirs, CONVERSATION)


def test_template_globals_and_filters_match_transformers(trained_dir: Path) -> None:
    template = (
        "{% for m in messages %}{% if loop.index > 2 %}{% break %}{% endif %}{{ m | tojson(indent=2) }}{% endfor %}"
        "{{ strftime_now('%Y') }}|{{ bos_token }}|{{ eos_token }}|{{ pad_token }}|{{ unk_token is defined }}"
        "|{{ tools is none }}|{{ documents is none }}|{{ custom }}\n  {% if true %}\n    lstrip{% endif %}"
    )
    ours, theirs = hf_pair(trained_dir)
    ours = Tokenizer(ours.backend, special_tokens=ours.special_tokens, chat_template=template)
    messages = [*CONVERSATION, {"role": "user", "content": "<script>&</script>", "name": None}]
    expected = theirs.apply_chat_template(messages, chat_template=template, tokenize=False, custom="x")
    assert ours.apply_chat_template(messages, tokenize=False, custom="x") == expected


def masked_pieces(tokenizer: Tokenizer, ids: list[int], mask: list[bool]) -> list[str]:
    """Decode each run of masked tokens."""
    pieces, run = [], []
    for token, keep in zip(ids, mask):
        if keep:
            run.append(token)
        elif run:
            pieces.append(tokenizer.decode(run))
            run = []
    return [*pieces, tokenizer.decode(run)] if run else pieces


def test_encode_chat_masks_exactly_the_assistant_replies(trained: Tokenizer) -> None:
    ids, mask = trained.encode_chat(CONVERSATION)
    assert ids == trained.apply_chat_template(CONVERSATION)
    assert len(mask) == len(ids)
    assert masked_pieces(trained, ids, mask) == ["4, évidemment 😀<|im_end|>", "Japan.<|im_end|>"]
    unmasked = trained.decode([token for token, keep in zip(ids, mask) if not keep])
    assert unmasked.count("<|im_start|>assistant\n") == 2 and "Japan" not in unmasked


def test_encode_chat_with_llama3_and_qwen_templates(llama3_dir: Path, qwen_dir: Path) -> None:
    llama3 = Tokenizer.from_dir(llama3_dir)
    ids, mask = llama3.encode_chat(CONVERSATION)
    assert masked_pieces(llama3, ids, mask) == ["4, évidemment 😀<|eot_id|>", "Japan.<|eot_id|>"]
    qwen = Tokenizer.from_dir(qwen_dir)
    ids, mask = qwen.encode_chat(CONVERSATION[1:])
    assert masked_pieces(qwen, ids, mask) == ["4, évidemment 😀<|im_end|>", "Japan.<|im_end|>"]


def test_encode_chat_agrees_with_transformers_generation_mask(trained_dir: Path) -> None:
    """On a template with {% generation %} blocks, transformers' own assistant mask equals ours."""
    template = (
        "{{ bos_token }}{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\n' }}"
        "{% if m['role'] == 'assistant' %}{% generation %}{{ m['content'] + '<|im_end|>' }}{% endgeneration %}"
        "{% else %}{{ m['content'] + '<|im_end|>' }}{% endif %}{{ '\n' }}{% endfor %}"
        "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
    )
    ours, theirs = hf_pair(trained_dir)
    ours = Tokenizer(ours.backend, special_tokens=ours.special_tokens, chat_template=template)
    ids, mask = ours.encode_chat(CONVERSATION)
    out = theirs.apply_chat_template(CONVERSATION, chat_template=template, return_assistant_tokens_mask=True)
    assert ids == out["input_ids"]
    assert [int(keep) for keep in mask] == out["assistant_masks"]


def test_encode_chat_needs_an_assistant_turn(trained: Tokenizer) -> None:
    with pytest.raises(LmforgeError, match="no assistant message"):
        trained.encode_chat(CONVERSATION[:2])


def test_messages_need_role_and_content(trained: Tokenizer) -> None:
    with pytest.raises(LmforgeError, match="needs a 'role' and a 'content'"):
        trained.apply_chat_template([{"role": "user"}])
    with pytest.raises(LmforgeError, match=r"message 1 .* needs a 'role'"):
        trained.encode_chat([{"role": "user", "content": "hi"}, {"content": "yo"}])
    with pytest.raises(LmforgeError, match="no messages"):
        trained.apply_chat_template([])


def test_no_template_is_an_error(bert_dir: Path) -> None:
    with pytest.raises(LmforgeError, match="has no chat template; add chat_template"):
        Tokenizer.from_dir(bert_dir).apply_chat_template([{"role": "user", "content": "hi"}])


def test_template_errors_are_lmforge_errors(trained: Tokenizer) -> None:
    raising = Tokenizer(
        trained.backend,
        chat_template="{{ raise_exception('Conversation roles must alternate user/assistant') }}",
    )
    with pytest.raises(LmforgeError, match="roles must alternate"):
        raising.apply_chat_template([{"role": "user", "content": "hi"}])
    broken = Tokenizer(trained.backend, chat_template="{% for m in messages %}")
    with pytest.raises(LmforgeError, match="syntax error on line 1"):
        broken.apply_chat_template([{"role": "user", "content": "hi"}])


def test_mask_needs_a_prefix_consistent_template(trained: Tokenizer) -> None:
    # Renders only the last message: a prefix of the conversation is not a prefix of its rendering.
    last_only = Tokenizer(trained.backend, chat_template="{{ messages[-1]['content'] }}")
    with pytest.raises(LmforgeError, match="prefix"):
        last_only.encode_chat(CONVERSATION)
