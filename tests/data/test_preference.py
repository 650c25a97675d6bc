"""Preference rows in every form, skips with a report, encoding, batches and the resumable loader."""

from __future__ import annotations

import pytest

from _helpers import write_jsonl
from lmforge.data import IGNORE_INDEX
from lmforge.data.preference import (
    EncodedPair,
    PreferencePair,
    encode_pairs,
    encode_reply,
    fit_lengths,
    pack_rows,
    pair_batch,
    pair_from_row,
    read_preference_pairs,
    read_prompt_rows,
)
from lmforge.errors import LmforgeError

USER = [{"role": "user", "content": "hi"}]


def test_every_row_form():
    text = pair_from_row({"prompt": "Q?", "chosen": " yes.", "rejected": " no."}, "f line 1")
    assert text == PreferencePair("Q?", " yes.", " no.")
    chat = pair_from_row({"prompt": USER, "chosen": [{"role": "assistant", "content": "hello"}], "rejected": "go"}, "f")
    assert chat == PreferencePair(USER, "hello", "go")
    hh = pair_from_row({"chosen": "\n\nHuman: hi\n\nAssistant: a\n\nHuman: more\n\nAssistant: kind",
                        "rejected": "\n\nHuman: hi\n\nAssistant: a\n\nHuman: more\n\nAssistant: rude"}, "f")
    assert hh == PreferencePair("\n\nHuman: hi\n\nAssistant: a\n\nHuman: more\n\nAssistant:", " kind", " rude")
    dialogue = pair_from_row({"chosen": [*USER, {"role": "assistant", "content": "A"}],
                              "rejected": [*USER, {"role": "assistant", "content": "B"}]}, "f")
    assert dialogue == PreferencePair(USER, "A", "B")


def test_skipped_rows_are_counted_and_reported(tmp_path):
    path = write_jsonl(tmp_path / "p.jsonl", [
        {"prompt": "Q", "chosen": "a", "rejected": "b"},
        {"prompt": "Q", "chosen": "same", "rejected": "same"},
        {"chosen": "\n\nHuman: hi", "rejected": "\n\nHuman: hi there"},
        {"chosen": "\n\nHuman: x\n\nAssistant: a", "rejected": "\n\nHuman: y\n\nAssistant: b"},
        {"prompt": USER, "chosen": [{"role": "user", "content": "no reply"}], "rejected": "b"},
        "",
    ])
    pairs, stats = read_preference_pairs(path)
    assert len(pairs) == 1 and (stats.rows, stats.kept, stats.identical, stats.no_assistant, stats.different_prompts) == (5, 1, 1, 2, 1)
    assert stats.summary() == (f"{path}: 5 rows, 1 pairs kept; skipped 1 identical replies, 2 no assistant turn, "
                               "1 different prompts")


@pytest.mark.parametrize(("rows", "needle"), [
    ([], "holds no preference pairs"),
    ([{"prompt": "Q", "chosen": "a", "rejected": "a"}], "no usable preference pair"),
    ([{"prompt": "Q", "chosen": "a"}], "line 1 has no 'chosen' and 'rejected'"),
    ([{"prompt": "Q", "chosen": "a", "rejected": "b"}, {"prompt": 3, "chosen": "a", "rejected": "b"}], "line 2: 'prompt' must be"),
    (["{not json"], "line 1 is not valid JSON"),
])
def test_bad_files_are_one_line_errors(tmp_path, rows, needle):
    with pytest.raises(LmforgeError, match=needle) as info:
        read_preference_pairs(write_jsonl(tmp_path / "p.jsonl", rows))
    assert "\n" not in str(info.value)


def test_prompt_rows(tmp_path):
    rows = read_prompt_rows(write_jsonl(tmp_path / "q.jsonl", [{"prompt": "2+3=", "answer": "5"}, {"prompt": USER}]))
    assert rows[0].prompt == "2+3=" and rows[0].fields == {"answer": "5"} and rows[1].prompt == USER
    assert rows[1].where.endswith("q.jsonl line 2")
    with pytest.raises(LmforgeError, match="no \"prompt\" field"):
        read_prompt_rows(write_jsonl(tmp_path / "bad.jsonl", [{"question": "2+3="}]))
    with pytest.raises(LmforgeError, match="holds no prompts"):
        read_prompt_rows(write_jsonl(tmp_path / "empty.jsonl", []))


def test_replies_end_with_the_stop_token(tiny_tokenizer):
    tok = tiny_tokenizer
    prompt, reply = encode_reply(tok, "The quick", " brown fox")
    assert prompt == tok.encode("The quick", add_special_tokens=True) and prompt[0] == tok.bos_id
    assert reply == [*tok.encode(" brown fox"), tok.eos_id]
    prompt, reply = encode_reply(tok, USER, "café")
    assert prompt == tok.apply_chat_template(USER, add_generation_prompt=True)  # what generation continues
    assert reply[-1] == tok.eot_id and tok.decode(reply[:-1]) == "café"


def test_fit_lengths_cuts_the_prompt_start_first():
    prompt, replies, cut = fit_lengths(list(range(10)), [[100, 101], [200]], 8)
    assert cut and prompt == list(range(4, 10)) and replies == [[100, 101], [200]]
    prompt, replies, cut = fit_lengths(list(range(10)), [list(range(100, 110))], 8)
    assert cut and prompt == list(range(6, 10)) and replies == [[100, 101, 102, 103]]  # the prompt keeps half
    assert fit_lengths([1, 2], [[3]], 8) == ([1, 2], [[3]], False)


def test_encode_pairs_counts_truncation(tiny_tokenizer, tmp_path):
    pairs = [PreferencePair("The quick brown fox " * 10, " jumps", " sleeps"), PreferencePair("Q", " a", " b")]
    _, stats = read_preference_pairs(write_jsonl(tmp_path / "p.jsonl", [{"prompt": "Q", "chosen": "a", "rejected": "b"}]))
    encoded = encode_pairs(tiny_tokenizer, pairs, 16, stats)
    assert stats.truncated == 1 and max(len(e.prompt) + len(e.chosen) for e in encoded) <= 16


def test_pack_rows_labels_only_the_reply():
    batch = pack_rows([[1, 5, 6], [1]], [[7, 8, 2], [9, 2]], pad_id=0)
    assert batch["input_ids"].tolist() == [[1, 5, 6, 7, 8, 2], [1, 9, 2, 0, 0, 0]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1, 1, 1, 1], [1, 1, 1, 0, 0, 0]]
    x = IGNORE_INDEX
    assert batch["labels"].tolist() == [[x, x, 7, 8, 2, x], [9, 2, x, x, x, x]]


def test_pair_batch_stacks_chosen_over_rejected_with_their_reference_logps():
    pairs = [EncodedPair([1, i], [10 + i, 2], [20 + i, 2], ref_logps=(-1.0 * i, -2.0 * i)) for i in range(3)]
    batch = pair_batch(pairs, pad_id=0)
    assert batch["input_ids"][:, 2].tolist() == [10, 11, 12, 20, 21, 22]  # B chosen rows, then B rejected
    assert batch["ref_logps"].tolist() == [0.0, -1.0, -2.0, 0.0, -2.0, -4.0]
    assert "ref_logps" not in pair_batch([EncodedPair([1], [2], [3])], pad_id=0)  # none precomputed
