"""generation_config.json: every eos id stops generation, and the file's sampling settings are the defaults."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

import lmforge
from lmforge.errors import LmforgeError
from lmforge.generate.sampling import SamplingParams
from lmforge.tokenizer import GenerationDefaults

transformers = pytest.importorskip("transformers")
from hf_tiny import VOCAB, hf_model, save  # noqa: E402

PROMPT = [5, 17, 42, 8, 60]
UNUSED = VOCAB - 1  # a token id the tiny model's greedy continuation of PROMPT never produces (checked)


def write_generation_config(folder: Path, **values) -> Path:
    (folder / "generation_config.json").write_text(json.dumps(values), encoding="utf-8")
    return folder


@pytest.fixture(scope="module")
def tiny_llama() -> torch.nn.Module:
    return hf_model("llama")


@pytest.fixture
def llama_dir(tiny_llama: torch.nn.Module, tmp_path: Path) -> Path:
    """A tiny random Llama saved by transformers (config.json, model.safetensors, generation_config.json)."""
    return save(tiny_llama, tmp_path / "llama")


def greedy_tokens(folder: Path, n: int = 12) -> tuple[list[int], str | None]:
    """The tokens lmforge generates for PROMPT with the folder's defaults, and why it stopped."""
    lm = lmforge.load(folder)
    tokens = list(lm.tokens(lm.request(PROMPT, n, lm.sampling())))
    return [t.token for t in tokens], tokens[-1].finish_reason


# ----- reading the file -----------------------------------------------------------------------


@pytest.mark.parametrize(("value", "expected"), [(7, (7,)), ([7, 9, 11], (7, 9, 11)), (None, ())])
def test_eos_token_id_is_an_id_or_a_list(tmp_path: Path, value, expected: tuple[int, ...]) -> None:
    write_generation_config(tmp_path, eos_token_id=value)
    assert GenerationDefaults.from_dir(tmp_path).eos_ids == expected


def test_config_json_eos_ids_when_there_is_no_generation_config(tmp_path: Path) -> None:
    """transformers builds the generation config from config.json then; so does lmforge, for the stop ids."""
    (tmp_path / "config.json").write_text(json.dumps({"eos_token_id": [1, 2]}), encoding="utf-8")
    assert GenerationDefaults.from_dir(tmp_path).eos_ids == (1, 2)
    write_generation_config(tmp_path, eos_token_id=3)
    assert GenerationDefaults.from_dir(tmp_path).eos_ids == (3,)
    assert GenerationDefaults.from_dir(tmp_path / "missing") == GenerationDefaults()


def test_sampling_defaults(tmp_path: Path) -> None:
    settings = {"temperature": 0.6, "top_k": 20, "top_p": 0.9, "min_p": 0.05, "repetition_penalty": 1.05}
    write_generation_config(tmp_path, do_sample=True, **settings)
    assert GenerationDefaults.from_dir(tmp_path).sampling == settings
    write_generation_config(tmp_path, do_sample=False, **settings)  # greedy: only the penalty still applies
    assert GenerationDefaults.from_dir(tmp_path).sampling == {"temperature": 0.0, "repetition_penalty": 1.05}
    write_generation_config(tmp_path, eos_token_id=2)
    assert GenerationDefaults.from_dir(tmp_path).sampling == {}


def test_unstated_settings_keep_lmforge_defaults_not_transformers(tmp_path: Path) -> None:
    """Deliberate difference: what the file leaves out keeps lmforge's defaults, as in vLLM.

    transformers decodes greedily when `do_sample` is absent and adds top_k=50 when sampling; lmforge
    samples at temperature 1 with no top-k unless the file (or the caller) says otherwise.
    """
    write_generation_config(tmp_path, eos_token_id=2)
    assert transformers.GenerationConfig.from_pretrained(tmp_path).get_generation_mode() == "greedy_search"
    assert GenerationDefaults.from_dir(tmp_path).sampling == {}
    write_generation_config(tmp_path, do_sample=True, temperature=0.6, top_p=0.9)
    assert "top_k" not in GenerationDefaults.from_dir(tmp_path).sampling


@pytest.mark.parametrize(
    ("values", "match"),
    [
        ({"eos_token_id": "</s>"}, r"eos_token_id in .* should be a token id or a list of ids"),
        ({"eos_token_id": [1, None]}, r"eos_token_id in .* should be a token id or a list of ids"),
        ({"do_sample": "yes"}, r"do_sample in .* should be true or false"),
        ({"top_k": 0.5}, r"top_k in .* should be an integer"),
        ({"temperature": "hot"}, r"temperature in .* should be a number"),
    ],
)
def test_bad_values_are_named(tmp_path: Path, values: dict, match: str) -> None:
    write_generation_config(tmp_path, **values)
    with pytest.raises(LmforgeError, match=match) as info:
        GenerationDefaults.from_dir(tmp_path)
    assert "\n" not in str(info.value) and "fix the file" in str(info.value)


def test_save_round_trip_reads_the_same_in_transformers(tmp_path: Path) -> None:
    values = {"eos_token_id": [7, 9], "do_sample": True, "temperature": 0.7, "top_k": 20}
    defaults = GenerationDefaults.from_dir(write_generation_config(tmp_path, **values))
    saved = tmp_path / "saved"
    saved.mkdir()
    defaults.save(saved)
    assert GenerationDefaults.from_dir(saved) == defaults
    theirs = transformers.GenerationConfig.from_pretrained(saved)
    assert (theirs.eos_token_id, theirs.do_sample, theirs.temperature, theirs.top_k) == (
        [7, 9],
        True,
        0.7,
        20,
    )
    GenerationDefaults().save(tmp_path)  # nothing to say: the folder keeps what it has
    assert json.loads((tmp_path / "generation_config.json").read_text(encoding="utf-8")) == values


# ----- generation through lmforge.load ---------------------------------------------------------


def test_generation_stops_at_any_listed_eos_id(llama_dir: Path) -> None:
    write_generation_config(llama_dir, do_sample=False, eos_token_id=UNUSED)
    free, finish = greedy_tokens(llama_dir)
    assert UNUSED not in free and len(free) == 12 and finish == "length"
    stop_at = next(i for i in range(2, len(free)) if free[i] not in free[:i])  # a first occurrence
    for eos in ([UNUSED, free[stop_at]], [free[stop_at], UNUSED]):
        write_generation_config(llama_dir, do_sample=False, eos_token_id=eos)
        assert greedy_tokens(llama_dir) == (free[: stop_at + 1], "stop")
        # transformers' generate, reading the same generation_config.json, stops at the same token.
        reread = transformers.AutoModelForCausalLM.from_pretrained(llama_dir)
        out = reread.generate(torch.tensor([PROMPT]), max_new_tokens=12, pad_token_id=0)
        assert out[0, len(PROMPT) :].tolist() == free[: stop_at + 1]


def test_lm_sampling_takes_the_folder_defaults(llama_dir: Path, tmp_path: Path) -> None:
    write_generation_config(
        llama_dir, do_sample=True, temperature=0.6, top_k=20, top_p=0.9, eos_token_id=[2, 3]
    )
    lm = lmforge.load(llama_dir)
    assert lm.sampling() == SamplingParams(temperature=0.6, top_k=20, top_p=0.9)
    assert lm.sampling(temperature=0.2, top_k=0) == SamplingParams(temperature=0.2, top_k=0, top_p=0.9)
    assert {2, 3} <= lm.request(PROMPT, 4, lm.sampling()).stop_ids
    lm.save_hf(tmp_path)  # the defaults travel with the model
    assert GenerationDefaults.from_dir(tmp_path) == lm.generation
