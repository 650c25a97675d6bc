"""SFT data: the assistant-only loss mask, one BOS, end-of-turn tokens, context limits, packing, the loader."""

from __future__ import annotations

import logging

import pytest

from lmforge.data import IGNORE_INDEX
from lmforge.data.sft import (
    SftDataConfig,
    collate_sft,
    encode_conversation,
    encode_sft_file,
    load_sft_data,
    pack,
    row_messages,
    sequences,
    to_example,
)
from lmforge.errors import LmforgeError
from lmforge.tokenizer import Tokenizer
from lmforge.tokenizer.chat import CHATML_TEMPLATE

CONVERSATION = [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "Capital of France?"},
    {"role": "assistant", "content": "Paris."},
    {"role": "user", "content": "And of Germany?"},
    {"role": "assistant", "content": "Berlin, I think."},
]


def with_template(tokenizer: Tokenizer, template: str) -> Tokenizer:
    return Tokenizer(tokenizer.backend, special_tokens=tokenizer.special_tokens, chat_template=template)


def test_loss_mask_covers_exactly_the_assistant_tokens(tiny_tokenizer):
    tok = tiny_tokenizer
    # The conversation written out by hand as ChatML pieces: (text, is it assistant output?)
    pieces = [
        ("<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nCapital of France?<|im_end|>\n"
         "<|im_start|>assistant\n", False),
        ("Paris.<|im_end|>", True),
        ("\n<|im_start|>user\nAnd of Germany?<|im_end|>\n<|im_start|>assistant\n", False),
        ("Berlin, I think.<|im_end|>", True),
        ("\n", False),
    ]
    want_ids, want_mask = [tok.bos_id], [False]
    for text, assistant in pieces:
        ids = tok.encode(text)
        want_ids += ids
        want_mask += [assistant] * len(ids)

    ids, mask = encode_conversation(tok, CONVERSATION)
    assert ids == want_ids and mask == want_mask
    assert ids.count(tok.bos_id) == 1 and ids[0] == tok.bos_id

    example = to_example(ids, mask)
    assert example.input_ids == ids[:-1]
    targets = [(t, label) for t, label in enumerate(example.labels) if label != IGNORE_INDEX]
    assert [label for _, label in targets] == [i for i, m in zip(ids, mask) if m]  # every assistant token, in order
    assert all(ids[t + 1] == label and mask[t + 1] for t, label in targets)
    texts = tok.decode([label for _, label in targets])
    assert texts == "Paris.<|im_end|>Berlin, I think.<|im_end|>"  # each turn ends with the end-of-turn token


def test_instruction_rows_become_one_exchange(tiny_tokenizer):
    row = {"instruction": "Translate to French.", "input": "Hello", "output": "Bonjour"}
    messages = row_messages(row, "x line 1")
    assert messages == [{"role": "user", "content": "Translate to French.\n\nHello"},
                        {"role": "assistant", "content": "Bonjour"}]
    assert row_messages({"instruction": "Say hi.", "output": "hi"}, "x")[0]["content"] == "Say hi."
    ids, mask = encode_conversation(tiny_tokenizer, messages)
    assert tiny_tokenizer.decode([i for i, m in zip(ids, mask) if m]) == "Bonjour<|im_end|>"


def test_bos_is_added_once_when_the_template_has_none(tiny_tokenizer):
    tok = with_template(tiny_tokenizer, CHATML_TEMPLATE.replace("{{- bos_token }}", ""))
    ids, mask = encode_conversation(tok, CONVERSATION)
    assert ids[0] == tok.bos_id and ids.count(tok.bos_id) == 1 and not mask[0]
    assert (ids, mask) == encode_conversation(tiny_tokenizer, CONVERSATION)


def test_template_without_end_of_turn_is_refused(tiny_tokenizer):
    tok = with_template(tiny_tokenizer, "{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}")
    with pytest.raises(LmforgeError, match="never learn to stop"):
        encode_conversation(tok, CONVERSATION)


@pytest.mark.parametrize(
    ("line", "needle"),
    [
        ('{"messages": [{"role": "user", "content": "hi"}', "line 2 is not valid JSON"),
        ('{"messages": [{"role": "user", "content": "hi"}]}', "line 2: the conversation has no assistant message"),
        ('{"prompt": "hi", "completion": "yo"}', "line 2 has neither 'messages' nor 'instruction'"),
        ('{"messages": "hi"}', "line 2: 'messages' must be a list"),
    ],
)
def test_bad_rows_name_file_and_line(tiny_tokenizer, jsonl, capitals_jsonl, line, needle):
    good = capitals_jsonl.read_text().splitlines()[0]
    path = jsonl("bad.jsonl", [good, line])
    with pytest.raises(LmforgeError, match=needle) as err:
        encode_sft_file(path, tiny_tokenizer, 64, "drop")
    assert str(path) in str(err.value) and "\n" not in str(err.value)


def test_too_long_rows_are_dropped_or_truncated_and_counted(tiny_tokenizer, jsonl, caplog):
    short = {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]}
    long = {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "the quick fox " * 20}]}
    long_prompt = {"messages": [{"role": "user", "content": "the lazy dog " * 30}, {"role": "assistant", "content": "ok"}]}
    path = jsonl("rows.jsonl", [short, long, long_prompt, short])
    seq_len = len(to_example(*encode_conversation(tiny_tokenizer, short["messages"]))) + 10

    with caplog.at_level(logging.WARNING):
        kept, stats = encode_sft_file(path, tiny_tokenizer, seq_len, "drop")
    assert (stats.rows, stats.kept, stats.dropped_too_long, stats.truncated) == (4, 2, 2, 0)
    assert "2 dropped as longer than" in caplog.text

    kept, stats = encode_sft_file(path, tiny_tokenizer, seq_len, "truncate")
    assert (stats.kept, stats.truncated, stats.dropped_no_target) == (3, 2, 1)  # the long prompt leaves no target
    assert all(len(e) <= seq_len for e in kept)
    assert stats.targets == sum(sum(label != IGNORE_INDEX for label in e.labels) for e in kept)
    assert "truncated to" in stats.summary(seq_len) and "no assistant token left" in stats.summary(seq_len)


def test_eval_split_is_held_out(tiny_tokenizer, capitals_jsonl):
    data = load_sft_data(SftDataConfig(train=str(capitals_jsonl), eval_fraction=0.25), tiny_tokenizer, 64, seed=3)
    assert (len(data.train), len(data.eval)) == (36, 12)
    again = load_sft_data(SftDataConfig(train=str(capitals_jsonl), eval_fraction=0.25), tiny_tokenizer, 64, seed=3)
    assert [e.input_ids for e in again.eval] == [e.input_ids for e in data.eval]
    with pytest.raises(LmforgeError, match=r"data\.too_long"):
        SftDataConfig(train="x", too_long="cut").validate()


def test_packing_fills_sequences_and_restarts_positions(tiny_tokenizer, capitals_jsonl):
    examples, _ = encode_sft_file(capitals_jsonl, tiny_tokenizer, 128, "drop")
    groups = pack([len(e) for e in examples], 128, seed=0)
    assert sorted(i for g in groups for i in g) == list(range(len(examples)))  # each row exactly once
    assert all(sum(len(examples[i]) for i in g) <= 128 for g in groups) and len(groups) <= len(examples) / 2

    batch = collate_sft(sequences(examples, 128, True, seed=0)[:2], pad_id=tiny_tokenizer.pad_id, packed=True)
    first = sequences(examples, 128, True, seed=0)[0]
    lengths = [len(e) for e in first]
    assert batch["positions"][0, : sum(lengths)].tolist() == [p for n in lengths for p in range(n)]
    assert batch["document_ids"][0, : sum(lengths)].tolist() == [d for d, n in enumerate(lengths) for _ in range(n)]
    assert batch["input_ids"].shape == batch["labels"].shape == batch["attention_mask"].shape
    pads = batch["attention_mask"] == 0
    assert (batch["labels"][pads] == IGNORE_INDEX).all() and (batch["document_ids"][pads] == -1).all()

    plain = collate_sft([[e] for e in examples[:3]], pad_id=0, packed=False)
    assert set(plain) == {"input_ids", "labels", "attention_mask"}
