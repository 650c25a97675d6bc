"""`LM.generate` reaches beam search (`num_beams`) and speculative decoding (`draft`)."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch

import lmforge
from lmforge.api import LM
from lmforge.config import preset
from lmforge.errors import LmforgeError
from lmforge.generate.engine import SpeculationStats, beam_search, speculative_stream
from lmforge.models import build_model
from lmforge.tokenizer import GenerationDefaults

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models run fastest on one thread on a shared host


@pytest.fixture(scope="module")
def lm(tiny_lm_dir):
    return lmforge.load(tiny_lm_dir)


def first_layer_draft(lm: LM) -> LM:
    """The target's first layer with its embeddings, final norm and head: it agrees with the target
    sometimes, so both the accepting and the correcting paths run."""
    draft = build_model(replace(lm.config, n_layers=1)).eval()
    draft.load_state_dict(lm.model.state_dict(), strict=False)  # the second layer's tensors are left out
    return LM(draft, lm.tokenizer)


def small_draft(tokenizer, **overrides) -> LM:
    torch.manual_seed(1)
    overrides = {"vocab_size": tokenizer.vocab_size, "eos_id": tokenizer.eos_id, "n_layers": 1, **overrides}
    return LM(build_model(preset("tiny-llama", **overrides)).eval(), tokenizer)


def test_greedy_with_a_draft_is_plain_greedy_token_for_token(lm):
    draft = first_layer_draft(lm)
    ids = lm.tokenizer.encode("The quick")
    request = lambda: lm.request(ids, 40, lm.sampling(temperature=0))  # noqa: E731
    plain = [t.token for t in lm.tokens(request())]
    stats = SpeculationStats()
    assert [t.token for t in speculative_stream(lm.model, draft.model, request(), stats=stats)] == plain
    assert 0 < stats.acceptance_rate < 1
    assert [t.token for t in lm.tokens(request(), draft=draft)] == plain
    assert lm.generate("The quick", max_new_tokens=40, temperature=0, draft=draft) == lm.generate(
        "The quick", max_new_tokens=40, temperature=0)
    pieces = list(lm.stream("你好", max_new_tokens=30, temperature=1.0, seed=3, draft=draft))
    assert "".join(pieces) == lm.generate("你好", max_new_tokens=30, temperature=1.0, seed=3, draft=draft)


def test_num_beams_runs_beam_search(lm):
    ids = lm.tokenizer.encode("The quick", add_special_tokens=True)
    best = beam_search(lm.model, lm.request(ids, 12, lm.sampling(temperature=0)), width=3, length_penalty=0.5)
    want = lm.tokenizer.decode([t.token for t in best], skip_special_tokens=True)
    assert lm.generate("The quick", max_new_tokens=12, num_beams=3, length_penalty=0.5) == want
    given = dict(temperature=0, seed=1)  # settings beam search honours (trivially)
    assert lm.generate("The quick", max_new_tokens=12, num_beams=3, length_penalty=0.5, **given) == want



def test_beam_search_ignores_the_folders_sampling_defaults(lm):
    """generation_config.json's temperature and top_p are for sampling; the user asked for neither."""
    sampler = replace(lm, generation=GenerationDefaults(temperature=0.6, top_p=0.9, repetition_penalty=1.1))
    want = lm.generate("The quick", max_new_tokens=12, num_beams=3)
    assert sampler.generate("The quick", max_new_tokens=12, num_beams=3) == want


@pytest.mark.parametrize(("kwargs", "words"), [
    ({"num_beams": 0}, "num_beams must be >= 1"),
    ({"num_beams": 4, "temperature": 0.8, "top_p": 0.9}, "cannot honour temperature=0.8, top_p=0.9"),
    ({"num_beams": 4, "repetition_penalty": 1.3}, "cannot honour repetition_penalty=1.3"),
    ({"num_beams": 2, "draft": "same"}, "num_beams and draft cannot be combined"),
    ({"draft": "same", "temperature": 0, "frequency_penalty": 0.5}, "cannot apply frequency_penalty=0.5"),
])
def test_settings_the_decoder_cannot_honour_are_one_line_errors(lm, kwargs, words):
    if kwargs.get("draft") == "same":
        kwargs["draft"] = lm
    with pytest.raises(LmforgeError, match=words) as e:
        lm.generate("The", max_new_tokens=4, **kwargs)
    assert "\n" not in str(e.value)


def test_stream_refuses_beams(lm):
    with pytest.raises(LmforgeError, match=r"cannot stream beam search.*lm.generate\(\.\.\., num_beams=3\)"):
        lm.stream("The", num_beams=3)


def test_a_draft_with_another_vocabulary_is_refused(lm, tmp_path):
    from lmforge.tokenizer import train_tokenizer

    with pytest.raises(LmforgeError, match="vocabulary of 300 tokens but the target has"):
        lm.generate("The", max_new_tokens=4, draft=LM(small_draft(lm.tokenizer, vocab_size=300).model, None))
    (tmp_path / "other.txt").write_text("Different words make another vocabulary. " * 200, encoding="utf-8")
    other = train_tokenizer([tmp_path / "other.txt"], vocab_size=lm.tokenizer.vocab_size)
    with pytest.raises(LmforgeError, match="different tokenizer"):
        lm.generate("The", max_new_tokens=4, draft=small_draft(other, vocab_size=lm.config.vocab_size))
