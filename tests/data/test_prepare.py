"""prepare: exact token streams, input kinds, dtype, validation split, atomicity and errors."""

from __future__ import annotations

import json

import numpy as np
import pytest
from tokenizers import Tokenizer, models, pre_tokenizers, trainers

from lmforge.data import TokenShards, list_input_files, prepare
from lmforge.errors import LmforgeError

LINES = "".join(f"line {i}: the quick brown fox\n" for i in range(200))


def tokens_of(out_dir, split="train") -> list[int]:
    shards = TokenShards.open(out_dir, split)
    return shards.read(0, shards.n_tokens).tolist()


def test_text_files_become_the_expected_token_stream(tmp_path, write, tokenizer):
    a, b = write("a.txt", "hello world\n"), write("b.md", "# Title\nsecond doc é\n")
    stats = prepare([a, b], tokenizer, tmp_path / "out", val_fraction=0)
    assert tokens_of(tmp_path / "out") == tokenizer.expected("hello world\n", "# Title\nsecond doc é\n")
    assert stats.train.documents == 2 and stats.val.tokens == 0
    assert stats.train.bytes == len(b"hello world\n") + len("# Title\nsecond doc é\n".encode())


def test_jsonl_rows_are_documents(tmp_path, write, tokenizer):
    path = write("d.jsonl", '{"body": "first"}\n\n{"body": "second", "x": 1}\n')
    prepare([path], tokenizer, tmp_path / "out", text_field="body", val_fraction=0)
    assert tokens_of(tmp_path / "out") == tokenizer.expected("first", "second")


def test_nested_folder_is_read_recursively_in_sorted_order(tmp_path, write, tokenizer):
    write("corpus/b/z.txt", "z")
    write("corpus/a.py", "print(1)\n")
    write("corpus/b/c/d.jsonl", '{"text": "row"}\n')
    write("corpus/.git/HEAD.txt", "hidden")
    write("corpus/image.png", "not text")
    assert [p.name for p in list_input_files([tmp_path / "corpus"])] == ["a.py", "d.jsonl", "z.txt"]
    prepare([tmp_path / "corpus"], tokenizer, tmp_path / "out", val_fraction=0)
    assert tokens_of(tmp_path / "out") == tokenizer.expected("print(1)\n", "row", "z")


def test_bos_is_prepended_when_the_tokenizer_has_one(tmp_path, write, make_tokenizer):
    tokenizer = make_tokenizer(bos=True)
    prepare([write("a.txt", "ab"), write("b.txt", "c")], tokenizer, tmp_path / "out", val_fraction=0)
    assert tokens_of(tmp_path / "out") == [257, 97, 98, 256, 257, 99, 256]


def test_chunked_encoding_and_small_shards_keep_the_stream(tmp_path, write, tokenizer):
    text = "".join(f"para {i}\n  indented\n\n" for i in range(300))
    stats = prepare(
        [write("a.txt", text)], tokenizer, tmp_path / "out", val_fraction=0, chunk_bytes=64, shard_tokens=1000
    )
    assert tokens_of(tmp_path / "out") == tokenizer.expected(text)
    assert stats.train.shards == -(-stats.train.tokens // 1000)
    assert stats.train.documents == 1


def test_chunks_end_between_a_visible_character_and_a_line_break(tmp_path, write):
    class Recorder:
        vocab_size, eos_id, bos_id = 256, None, None

        def __init__(self) -> None:
            self.pieces: list[str] = []

        def encode(self, text: str) -> list[int]:
            self.pieces.append(text)
            return list(text.encode())

    recorder = Recorder()
    text = "".join(f"x{i} \n  y\r\n\n" for i in range(50))
    prepare([write("a.txt", text)], recorder, tmp_path / "out", val_fraction=0, chunk_bytes=16)
    pieces = [p for p in recorder.pieces if "quick brown fox" not in p]  # not the fingerprint probe
    assert len(pieces) > 5 and "".join(pieces) == text
    assert all(p.endswith("y") for p in pieces[:-1]) and all(p.startswith("\r\n") for p in pieces[1:])


class HFByteLevel:
    """A byte-level BPE from `tokenizers`, trained on `text`, behind the prepare protocol."""

    def __init__(self, text: str) -> None:
        self.inner = Tokenizer(models.BPE())
        self.inner.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        trainer = trainers.BpeTrainer(
            vocab_size=400,
            special_tokens=["<|eos|>"],
            show_progress=False,
            initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        )
        self.inner.train_from_iterator([text], trainer)
        self.vocab_size, self.eos_id, self.bos_id = (
            self.inner.get_vocab_size(),
            self.inner.token_to_id("<|eos|>"),
            None,
        )

    def encode(self, text: str) -> list[int]:
        return self.inner.encode(text).ids


def test_chunked_encoding_matches_whole_file_encoding_with_byte_level_bpe(tmp_path, write):
    text = "".join(f"Line {i}:  trailing  \n\n\tindented {i * 37}\r\nend.\n  \n" for i in range(150))
    tokenizer = HFByteLevel(text)
    prepare([write("a.txt", text)], tokenizer, tmp_path / "out", val_fraction=0, chunk_bytes=100)
    assert tokens_of(tmp_path / "out") == [*tokenizer.encode(text), tokenizer.eos_id]


@pytest.mark.parametrize(
    ("offset", "dtype"),
    [(0, np.uint16), (2**16 - 258, np.uint16), (2**16 - 257, np.uint32), (70_000, np.uint32)],
)
def test_dtype_follows_vocab_size(tmp_path, write, make_tokenizer, offset, dtype):
    tokenizer = make_tokenizer(offset=offset)
    stats = prepare([write("a.txt", "abc")], tokenizer, tmp_path / "out", val_fraction=0)
    shards = TokenShards.open(tmp_path / "out")
    assert stats.dtype == np.dtype(dtype).name and shards.arrays[0].dtype == dtype
    assert tokens_of(tmp_path / "out") == tokenizer.expected("abc")
    assert shards.max_token_id == offset + 256


def test_meta_json_records_counts_and_tokenizer(tmp_path, write, tokenizer):
    path = write("a.txt", LINES)
    stats = prepare([path], tokenizer, tmp_path / "out", val_fraction=0.1)
    meta = json.loads((tmp_path / "out" / "meta.json").read_text())
    assert meta["format"] == "lmforge-token-shards" and meta["dtype"] == "uint16"
    assert meta["vocab_size"] == 258 and meta["max_token_id"] == 256
    assert meta["tokenizer"]["eos_id"] == 256 and len(meta["tokenizer"]["fingerprint"]) == 16
    for split in ("train", "val"):
        assert meta["splits"][split]["tokens"] == getattr(stats, split).tokens
    assert meta["splits"]["train"]["bytes"] + meta["splits"]["val"]["bytes"] == len(LINES)
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == [
        "meta.json",
        "train_000.bin",
        "val_000.bin",
    ]


def test_tail_split_takes_the_end_of_a_single_file_at_a_line_boundary(tmp_path, write, tokenizer):
    stats = prepare([write("shakespeare.txt", LINES)], tokenizer, tmp_path / "out", val_fraction=0.1)
    mark = int(len(LINES) * 0.9)
    cut = LINES.index("\n", mark - 1) + 1  # first line start at or after the mark
    assert tokens_of(tmp_path / "out", "train") == tokenizer.expected(LINES[:cut])
    assert tokens_of(tmp_path / "out", "val") == tokenizer.expected(LINES[cut:])
    assert stats.val.bytes == len(LINES) - cut and stats.val.documents == 1


def test_document_split_is_deterministic_and_disjoint(tmp_path, write, tokenizer):
    docs = [f"document number {i}" for i in range(200)]
    path = write("d.jsonl", "".join(json.dumps({"text": d}) + "\n" for d in docs))
    splits = []
    for run, seed in enumerate([0, 0, 1]):
        stats = prepare(
            [path], tokenizer, tmp_path / f"out{run}", val_fraction=0.2, val_split="documents", seed=seed
        )
        train, val = tokens_of(tmp_path / f"out{run}"), tokens_of(tmp_path / f"out{run}", "val")
        splits.append((train, val))
        assert stats.train.documents + stats.val.documents == 200
        assert 20 <= stats.val.documents <= 60
        decoded = [bytes(t for t in doc).decode() for doc in _split_docs(train) + _split_docs(val)]
        assert sorted(decoded) == sorted(docs)  # every document in exactly one split
    assert splits[0] == splits[1] and splits[0] != splits[2]


def _split_docs(stream: list[int]) -> list[list[int]]:
    docs, current = [], []
    for token in stream:
        if token == 256:
            docs.append(current)
            current = []
        else:
            current.append(token)
    return docs


def test_progress_reports_every_input_byte(tmp_path, write, tokenizer):
    files = [write("a.txt", LINES), write("b.jsonl", '{"text": "x"}\n\n{"text": "y"}\n')]
    seen: list[int] = []
    prepare(files, tokenizer, tmp_path / "out", val_fraction=0.1, chunk_bytes=256, progress=seen.append)
    assert len(seen) > 3 and sum(seen) == sum(p.stat().st_size for p in files)


def test_interrupted_prepare_leaves_no_output(tmp_path, write, make_tokenizer):
    files = [write(f"in/{i}.txt", f"doc {i}\n") for i in range(10)]
    with pytest.raises(RuntimeError, match="crashed"):
        prepare(files, make_tokenizer(fail_after=5), tmp_path / "out", val_fraction=0)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in"]


def test_interrupted_prepare_keeps_the_previous_output(tmp_path, write, tokenizer, make_tokenizer):
    path = write("a.txt", "first version\n")
    prepare([path], tokenizer, tmp_path / "out", val_fraction=0)
    with pytest.raises(RuntimeError):
        prepare([path], make_tokenizer(fail_after=1), tmp_path / "out", val_fraction=0)
    assert tokens_of(tmp_path / "out") == tokenizer.expected("first version\n")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.txt", "out"]


def test_a_previous_output_is_replaced(tmp_path, write, tokenizer):
    prepare([write("a.txt", "old " * 100)], tokenizer, tmp_path / "out", val_fraction=0, shard_tokens=50)
    prepare([write("b.txt", "new")], tokenizer, tmp_path / "out", val_fraction=0)
    assert tokens_of(tmp_path / "out") == tokenizer.expected("new")
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["meta.json", "train_000.bin"]


def test_missing_input(tmp_path, tokenizer):
    with pytest.raises(LmforgeError, match=r"input .*missing\.txt does not exist"):
        prepare([tmp_path / "missing.txt"], tokenizer, tmp_path / "out")


def test_folder_without_text_files(tmp_path, write, tokenizer):
    write("pics/a.png", "x")
    with pytest.raises(LmforgeError, match=r"folder .*pics has no text files"):
        prepare([tmp_path / "pics"], tokenizer, tmp_path / "out")


def test_empty_corpus(tmp_path, write, tokenizer):
    path = write("empty.txt", "")
    with pytest.raises(LmforgeError, match=r"corpus is empty: .*empty\.txt"):
        prepare([path], tokenizer, tmp_path / "out", val_fraction=0)
    assert not (tmp_path / "out").exists()


def test_empty_validation_split(tmp_path, write, tokenizer):
    path = write("one_line.txt", "a single line without a break")
    with pytest.raises(LmforgeError, match=r"validation split of .*one_line\.txt is empty"):
        prepare([path], tokenizer, tmp_path / "out", val_fraction=0.1)


def test_missing_jsonl_field_names_file_and_line(tmp_path, write, tokenizer):
    path = write("d.jsonl", '{"text": "a"}\n{"content": "b"}\n')
    with pytest.raises(LmforgeError, match=r"d\.jsonl line 2 has no 'text' field \(keys: content\)"):
        prepare([path], tokenizer, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_token_id_too_large_for_uint16(tmp_path, write, make_tokenizer):
    liar = make_tokenizer(offset=65_400)
    liar.vocab_size = 1000  # claims a small vocabulary, produces ids >= 2**16
    with pytest.raises(LmforgeError, match=r"token id \d+ while encoding .*a\.txt.*uint16"):
        prepare([write("a.txt", "abc")], liar, tmp_path / "out", val_fraction=0)


def test_out_dir_that_is_not_a_prepare_output(tmp_path, write, tokenizer):
    write("precious/notes.txt", "keep me")
    with pytest.raises(
        LmforgeError, match=r"output folder .*precious exists and is not a previous prepare output"
    ):
        prepare([write("a.txt", "abc")], tokenizer, tmp_path / "precious")
    assert (tmp_path / "precious" / "notes.txt").read_text() == "keep me"


def test_bad_options(tmp_path, write, tokenizer):
    path = write("a.txt", "abc\n")
    with pytest.raises(LmforgeError, match="val_fraction"):
        prepare([path], tokenizer, tmp_path / "out", val_fraction=1.0)
    with pytest.raises(LmforgeError, match="val_split"):
        prepare([path], tokenizer, tmp_path / "out", val_split="random")
    with pytest.raises(LmforgeError, match="no input"):
        prepare([], tokenizer, tmp_path / "out")
