"""What a model folder says besides tokenizer.json, read as transformers 5 reads it (and where not, why).

Padding and truncation baked into tokenizer.json, tokenizer_config.json's flags and token lists,
special_tokens_map.json, and clean-up of spaces in decode.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import tokenizers
from tokenizer_parity import assert_same_encoding, copy_folder, hf_pair, hf_tokenizer

from lmforge.errors import LmforgeError
from lmforge.tokenizer import Tokenizer

SENTENCE = "The cat sits on the mat."
LONG = "the quick brown fox jumps over the lazy dog . " * 40  # about 400 tokens


# ----- padding and truncation stored in tokenizer.json ----------------------------------------


def test_fixed_padding_and_truncation_do_not_leak_into_encode(padded_dir: Path, tmp_path: Path) -> None:
    """A sentence-embedding tokenizer.json pads to 128 and cuts at 128; encode does neither (nor transformers)."""
    raw = tokenizers.Tokenizer.from_file(str(padded_dir / "tokenizer.json"))
    assert len(raw.encode(SENTENCE).ids) == len(raw.encode(LONG).ids) == 128  # what the file asks for
    ours, theirs = hf_pair(padded_dir)
    ids = ours.encode(SENTENCE, add_special_tokens=True)
    assert len(ids) < 20 and ours.pad_id not in ids
    assert len(ours.encode(LONG)) > 128
    assert ours.encode_batch([SENTENCE, LONG]) == [ours.encode(SENTENCE), ours.encode(LONG)]
    assert_same_encoding(ours, theirs, [SENTENCE, LONG])
    ours.save(tmp_path)  # the saved tokenizer.json no longer pads or cuts
    saved = json.loads((tmp_path / "tokenizer.json").read_text(encoding="utf-8"))
    assert saved["padding"] is None and saved["truncation"] is None
    assert_same_encoding(*hf_pair(tmp_path), [SENTENCE, LONG])


def test_encode_batch_max_length_cuts_like_transformers_truncation(padded_dir: Path) -> None:
    """Cut from the right so that text and special tokens fit, [SEP] kept (what sentence-transformers does)."""
    ours, theirs = hf_pair(padded_dir)
    for length in (5, 40):
        want = theirs([SENTENCE, LONG], truncation=True, max_length=length)["input_ids"]
        assert ours.encode_batch([SENTENCE, LONG], add_special_tokens=True, max_length=length) == want
        assert ours.encode_batch([LONG], max_length=length) == [ours.encode(LONG)[:length]]


# ----- add_bos_token / add_eos_token ----------------------------------------------------------


def test_bos_eos_flags_defer_to_the_post_processor(sentencepiece_dir: Path, tmp_path: Path) -> None:
    """With a post-processor in tokenizer.json, it alone decides, in lmforge as in transformers 5."""
    config = json.loads((sentencepiece_dir / "tokenizer_config.json").read_text(encoding="utf-8"))
    folder = copy_folder(
        sentencepiece_dir, tmp_path, {**config, "add_bos_token": False, "add_eos_token": True}
    )
    ours, theirs = hf_pair(folder)
    assert (
        ours.encode("hi", add_special_tokens=True) == theirs.encode("hi") == [ours.bos_id, *ours.encode("hi")]
    )


@pytest.mark.parametrize(("add_eos_token", "ends"), [(False, ["<s>"]), (True, ["<s>", "</s>"])])
def test_bos_eos_flags_build_a_missing_post_processor(
    sentencepiece_dir: Path, tmp_path: Path, add_eos_token: bool, ends: list[str]
) -> None:
    """Deliberate difference: a LLaMA-style tokenizer.json without a post-processor gets its BOS from the flags.

    transformers 4's Llama tokenizer did the same; transformers 5 drops `add_bos_token` / `add_eos_token`
    whenever a tokenizer.json exists, so it encodes such a folder without the BOS the model was trained with.
    Once lmforge saves the folder, the post-processor is in tokenizer.json and transformers agrees again.
    """
    config = json.loads((sentencepiece_dir / "tokenizer_config.json").read_text(encoding="utf-8"))
    config["add_eos_token"] = add_eos_token
    folder = copy_folder(sentencepiece_dir, tmp_path / "original", config, post_processor=None)
    ours, theirs = hf_pair(folder)
    plain = ours.encode("hi there")
    with_specials = ours.encode("hi there", add_special_tokens=True)
    assert with_specials == [ours.bos_id, *plain, *([ours.eos_id] if add_eos_token else [])]
    assert [ours.id_to_token(i) for i in with_specials if i not in plain] == ends
    assert theirs.encode("hi there") == plain  # transformers 5: no BOS
    ours.save(tmp_path / "saved")
    assert hf_tokenizer(tmp_path / "saved").encode("hi there") == with_specials


# ----- special and added tokens ---------------------------------------------------------------


def test_special_tokens_map_wins_without_added_tokens_decoder(trained_dir: Path, tmp_path: Path) -> None:
    config = {"tokenizer_class": "PreTrainedTokenizerFast", "bos_token": "<|bos|>", "eos_token": "<|eos|>"}
    special_map = {"eos_token": {"content": "<|im_end|>"}, "additional_special_tokens": ["<|tool|>"]}
    folder = copy_folder(trained_dir, tmp_path / "map", config)
    (folder / "special_tokens_map.json").write_text(json.dumps(special_map), encoding="utf-8")
    ours, theirs = hf_pair(folder)
    assert ours.eos_token == theirs.eos_token == "<|im_end|>" and ours.bos_token == "<|bos|>"
    assert ours.token_to_id("<|tool|>") == theirs.convert_tokens_to_ids("<|tool|>") == ours.vocab_size - 1
    assert_same_encoding(ours, theirs, ["call <|tool|> now<|im_end|>"])
    # A config with added_tokens_decoder (what transformers 4.x saved) makes transformers ignore the map.
    config["added_tokens_decoder"] = {}
    (folder / "tokenizer_config.json").write_text(json.dumps(config), encoding="utf-8")
    ours, theirs = hf_pair(folder)
    assert ours.eos_token == theirs.eos_token == "<|eos|>" and ours.token_to_id("<|tool|>") is None


def test_config_tokens_get_the_ids_transformers_gives(trained_dir: Path, tmp_path: Path) -> None:
    """added_tokens_decoder entries, extra special tokens and model-specific `*_token` keys, in its order."""
    plain_token = {"content": "<|new|>", "special": False, "normalized": False, "lstrip": False, "rstrip": False,
                   "single_word": False, "__type": "AddedToken"}  # fmt: skip
    config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "eos_token": "<|eos|>",
        "image_token": "<image>",
        "additional_special_tokens": ["<|tool|>", "<|im_end|>"],
        "added_tokens_decoder": {"999": plain_token},
    }
    folder = copy_folder(trained_dir, tmp_path, config)
    ours, theirs = hf_pair(folder)
    for token in ("<|new|>", "<image>", "<|tool|>", "<|im_end|>"):
        assert ours.token_to_id(token) == theirs.convert_tokens_to_ids(token), token
    assert ours.decode(ours.encode("a<|new|>b<image>"), skip_special_tokens=True) == "a<|new|>b"
    assert_same_encoding(ours, theirs, ["x<|new|>y <image> <|tool|>z<|im_end|>"])


def test_special_token_dict_without_type_is_read(trained_dir: Path, tmp_path: Path) -> None:
    """Deliberate difference: `{"content": ...}` without `"__type": "AddedToken"` is read; transformers 5 raises."""
    config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "eos_token": {"content": "<|eos|>", "special": True},
    }
    folder = copy_folder(trained_dir, tmp_path, config)
    assert Tokenizer.from_dir(folder).eos_token == "<|eos|>"
    with pytest.raises(TypeError, match="eos_token has to be either str or AddedToken"):
        hf_tokenizer(folder)


def test_class_default_special_tokens_are_not_assumed(gpt2_dir: Path, tmp_path: Path) -> None:
    """Deliberate difference: special tokens come from the files, never from transformers' per-class defaults.

    A GPT-2 folder whose config names none (openai-community/gpt2's holds only model_max_length) has
    eos `<|endoftext|>` in transformers because GPT2Tokenizer defaults to it; lmforge has no eos token and
    stops generation at the model's eos_token_id from config.json / generation_config.json instead.
    Ids are the same either way.
    """
    folder = copy_folder(gpt2_dir, tmp_path, {"model_max_length": 1024, "tokenizer_class": "GPT2Tokenizer"})
    ours, theirs = hf_pair(folder)
    assert theirs.eos_token == "<|endoftext|>" and ours.eos_token is None
    assert_same_encoding(ours, theirs, [SENTENCE, "a<|endoftext|>b"])


def test_model_max_length(llama3_dir: Path, tmp_path: Path) -> None:
    config = json.loads((llama3_dir / "tokenizer_config.json").read_text(encoding="utf-8"))
    assert (
        Tokenizer.from_dir(llama3_dir).model_max_length == hf_tokenizer(llama3_dir).model_max_length == 131072
    )
    folder = copy_folder(llama3_dir, tmp_path, {**config, "model_max_length": int(1e30)})  # "unknown"
    assert Tokenizer.from_dir(folder).model_max_length is None


# ----- clean-up of spaces in decode -----------------------------------------------------------


def test_clean_up_tokenization_spaces(t5_dir: Path, tmp_path: Path) -> None:
    """The flag removes spaces before punctuation after the decoder (a WordPiece decoder already does)."""
    config = json.loads((t5_dir / "tokenizer_config.json").read_text(encoding="utf-8"))
    folder = copy_folder(t5_dir, tmp_path / "original", {**config, "clean_up_tokenization_spaces": True})
    ours, theirs = hf_pair(folder)
    ids = ours.encode("The fox runs . The dog sleeps , the fox ?")
    assert ours.backend.decode(ids) == "The fox runs . The dog sleeps , the fox ?"
    assert ours.decode(ids) == theirs.decode(ids) == "The fox runs. The dog sleeps, the fox?"
    ours.save(tmp_path / "saved")  # the flag is kept, so transformers reads the saved folder the same way
    assert hf_tokenizer(tmp_path / "saved").decode(ids) == Tokenizer.from_dir(tmp_path / "saved").decode(ids)


def test_clean_up_tokenization_spaces_is_skipped_for_bpe(gpt2_dir: Path, tmp_path: Path) -> None:
    """transformers 5 ignores the flag for BPE models, where it would delete real spaces; so does lmforge."""
    config = json.loads((gpt2_dir / "tokenizer_config.json").read_text(encoding="utf-8"))
    folder = copy_folder(gpt2_dir, tmp_path, {**config, "clean_up_tokenization_spaces": True})
    ours, theirs = hf_pair(folder)
    ids = ours.encode("a . b , c 's")
    assert ours.decode(ids) == theirs.decode(ids) == "a . b , c 's"


# ----- bad files ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("config", "match"),
    [
        (
            {"eos_token": 2},
            r"entry eos_token should be a token string or an object with a \"content\" string",
        ),
        ({"added_tokens_decoder": {"x": {"content": "a"}}}, r"added_tokens_decoder should map token ids"),
        ({"added_tokens_decoder": {"7": "a"}}, r"added_tokens_decoder should map token ids to token objects"),
        (
            {"added_tokens_decoder": {"7": {"id": 7}}},
            r"entry added_tokens_decoder\[7\] should be a token string",
        ),
        ({"additional_special_tokens": "<a>"}, r"additional_special_tokens should be a list of tokens"),
        ({"chat_template": [{"name": "default"}]}, r'chat_template as a list should hold \{"name"'),
    ],
)
def test_bad_config_entries_are_named(trained_dir: Path, tmp_path: Path, config: dict, match: str) -> None:
    folder = copy_folder(trained_dir, tmp_path, config)
    with pytest.raises(LmforgeError, match=match) as info:
        Tokenizer.from_dir(folder)
    assert "\n" not in str(info.value) and "fix tokenizer_config.json" in str(info.value)
