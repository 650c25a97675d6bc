"""The engine against transformers' generate, and its own invariants."""

from __future__ import annotations

import pytest
import torch

from lmforge.checkpoint import load_model
from lmforge.config import preset
from lmforge.errors import LmforgeError
from lmforge.generate.engine import Engine, Request, SpeculationStats, beam_search, speculative_stream
from lmforge.generate.sampling import SamplingParams
from lmforge.models import build_model

transformers = pytest.importorskip("transformers")
from hf_tiny import hf_model  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models run fastest on one thread on a shared host


def hf_greedy(model, prompt, n):
    out = model.generate(torch.tensor([prompt]), max_new_tokens=n, do_sample=False, min_new_tokens=n,
                         pad_token_id=0, eos_token_id=None)
    return out[0, len(prompt):].tolist()


@pytest.mark.parametrize(("family", "overrides"), [
    ("gpt2", {}), ("llama", {"num_key_value_heads": 2}), ("mistral", {"sliding_window": 6}), ("mixtral", {}),
    ("qwen2", {}), ("qwen3", {}), ("phi3", {}), ("phi3", {"sliding_window": 6}),
    ("gemma", {"tie_word_embeddings": False}),  # tied, a tiny random Gemma repeats its last token: too easy a test
])
def test_greedy_equals_transformers(tmp_path, family, overrides):
    hf = hf_model(family, **overrides)
    hf.save_pretrained(tmp_path / "m")
    model, _ = load_model(tmp_path / "m")
    prompt = [5, 17, 33, 2, 9, 60, 41]
    n = 24  # prompt + output (31) is far beyond a window of 6
    want = hf_greedy(hf, prompt, n)
    got = Engine(model).generate([Request(prompt, max_new_tokens=n)])[0]
    assert got.tokens == want
    assert got.finish_reason == "length"


def tiny(name="tiny-llama", **kw):
    torch.manual_seed(0)
    return build_model(preset(name, **kw)).eval()


@pytest.mark.parametrize("name", ["tiny-llama", "tiny-mistral", "tiny-gpt2"])
def test_batched_ragged_prompts_equal_each_alone(name):
    model = tiny(name)
    prompts = [[1, 2, 3], list(range(10, 40)), [7], list(range(50, 62))]
    alone = [Engine(model, n_slots=1).generate([Request(p, max_new_tokens=12)])[0].tokens for p in prompts]
    batched = Engine(model, n_slots=4).generate([Request(p, max_new_tokens=12) for p in prompts])
    assert [r.tokens for r in batched] == alone
    queued = Engine(model, n_slots=2).generate([Request(p, max_new_tokens=12) for p in prompts])  # more requests than slots
    assert [r.tokens for r in queued] == alone


def test_equal_prompts_are_prefilled_together(monkeypatch):
    model = tiny()
    prompts = [[1, 2, 3], [4, 5, 6], [7, 8, 9], [1, 2], [3, 4, 5]]
    alone = [Engine(model, n_slots=1).generate([Request(p, max_new_tokens=6)])[0].tokens for p in prompts]
    engine = Engine(model, n_slots=4)
    widths = []
    hidden_states = model.hidden_states
    monkeypatch.setattr(model, "hidden_states", lambda ids, **kw: widths.append(ids.shape) or hidden_states(ids, **kw))
    assert [r.tokens for r in engine.generate([Request(p, max_new_tokens=6) for p in prompts])] == alone
    prefills = [shape for shape in widths if shape[1] > 1]
    # three 3-token prompts in one pass; the 2-token one alone; the last waits for a free slot
    assert prefills == [torch.Size([3, 3]), torch.Size([1, 2]), torch.Size([1, 3])]


def test_seeded_sampling_is_reproducible():
    model = tiny()
    req = lambda seed: Request([1, 2, 3], max_new_tokens=16, sampling=SamplingParams(temperature=1.0, top_k=50, seed=seed))  # noqa: E731
    a = Engine(model).generate([req(1)])[0].tokens
    assert a == Engine(model).generate([req(1)])[0].tokens
    assert a != Engine(model).generate([req(2)])[0].tokens
    # a seeded request gives the same tokens whatever runs beside it
    mixed = Engine(model).generate([req(5), req(1), Request([4, 4], max_new_tokens=16)])
    assert mixed[1].tokens == a


def test_stop_ids_and_logprobs():
    model = tiny()
    free = Engine(model).generate([Request([1, 2, 3], max_new_tokens=10, logprobs=2)])[0]
    stop_at = free.tokens[4]
    first = free.tokens.index(stop_at)
    stopped = Engine(model).generate([Request([1, 2, 3], max_new_tokens=10, stop_ids=frozenset({stop_at}))])[0]
    assert stopped.tokens == free.tokens[:first] and stopped.finish_reason == "stop"
    # log-probs equal a full forward pass of the model on prompt + output
    ids = torch.tensor([[1, 2, 3, *free.tokens]])
    with torch.no_grad():
        lp = model(ids).log_softmax(-1)[0, 2:-1]
    want = lp.gather(-1, torch.tensor(free.tokens)[:, None])[:, 0]
    torch.testing.assert_close(torch.tensor(free.logprobs), want, atol=1e-4, rtol=1e-4)


def test_stream_and_cancel_free_the_slot():
    model = tiny()
    engine = Engine(model, n_slots=1)
    tokens = [t.token for t in engine.stream(Request([1, 2], max_new_tokens=5))]
    assert len(tokens) == 5 and not engine.busy
    seq = engine.submit(Request([1, 2], max_new_tokens=50))
    engine.step()
    engine.cancel(seq)
    assert not engine.busy and engine._free == [0]


def test_prompt_longer_than_context():
    model = tiny(max_seq_len=32)
    with pytest.raises(LmforgeError) as e:
        Engine(model).submit(Request(list(range(40)), max_new_tokens=4))
    assert "40 tokens" in str(e.value) and "32" in str(e.value)
    res = Engine(model).generate([Request(list(range(40)), max_new_tokens=4, truncate_left=True)])[0]
    assert len(res.tokens) == 4


def test_generation_stops_at_context_end():
    model = tiny(max_seq_len=16)
    res = Engine(model).generate([Request(list(range(10)), max_new_tokens=100)])[0]
    assert res.finish_reason == "length" and len(res.tokens) == 7  # 10 + 7 = 17 positions: the last token is never fed back


def tokens_and_finish(events):
    events = list(events)
    return [t.token for t in events], events[-1].finish_reason


def plain(model, request):
    return tokens_and_finish(Engine(model, n_slots=1).stream(request))


@pytest.mark.parametrize("name", ["tiny-llama", "tiny-mistral"])
def test_speculative_greedy_equals_plain_greedy(name):
    target = tiny(name)
    torch.manual_seed(1)
    draft = build_model(preset(name, n_layers=1)).eval()
    request = lambda: Request(list(range(3, 20)), max_new_tokens=40)  # noqa: E731
    want = plain(target, request())
    stats = SpeculationStats()
    assert tokens_and_finish(speculative_stream(target, draft, request(), k=4, stats=stats)) == want
    assert stats.proposed > 0 and 0.0 <= stats.acceptance_rate <= 1.0
    self_stats = SpeculationStats()
    assert tokens_and_finish(speculative_stream(target, target, request(), k=4, stats=self_stats)) == want
    assert self_stats.acceptance_rate == 1.0


@pytest.mark.parametrize("k", [1, 3, 5])
def test_speculative_stops_where_plain_decoding_stops(k):
    """At a stop token, at max_new_tokens, and at the end of the context (where the target goes on alone)."""
    target = tiny(max_seq_len=24)
    torch.manual_seed(1)
    draft = build_model(preset("tiny-llama", n_layers=1, max_seq_len=24)).eval()
    free, _ = plain(target, Request([1, 2, 3], max_new_tokens=12))
    stop_at = frozenset({free[5]})
    for request in (lambda: Request([1, 2, 3], max_new_tokens=12, stop_ids=stop_at),
                    lambda: Request([1, 2, 3], max_new_tokens=7),
                    lambda: Request(list(range(10)), max_new_tokens=100)):
        want = plain(target, request())
        assert tokens_and_finish(speculative_stream(target, draft, request(), k=k)) == want


def test_speculative_sampling_keeps_the_target_distribution():
    """With a tiny vocabulary, first-token frequencies under speculation match the target's softmax."""
    torch.manual_seed(0)
    target = build_model(preset("tiny-llama", vocab_size=8)).eval()
    torch.manual_seed(3)
    draft = build_model(preset("tiny-llama", vocab_size=8, n_layers=1)).eval()
    with torch.no_grad():
        p = target(torch.tensor([[1, 2]]))[0, -1].softmax(-1)
    counts = torch.zeros(8)
    for seed in range(600):
        request = Request([1, 2], max_new_tokens=1, sampling=SamplingParams(temperature=1.0, seed=seed))
        counts[next(speculative_stream(target, draft, request, k=2)).token] += 1
    assert (counts / counts.sum() - p).abs().max() < 0.06


@pytest.mark.parametrize(("draft_overrides", "request_overrides", "words"), [
    ({"vocab_size": 100}, {}, "vocabulary of 100"),
    ({}, {"sampling": SamplingParams(repetition_penalty=1.2)}, "repetition_penalty=1.2"),
    ({}, {"logprobs": 0}, "log-probs"),
])
def test_speculative_refuses_what_it_cannot_do_exactly(draft_overrides, request_overrides, words):
    target, draft = tiny(), tiny(n_layers=1, **draft_overrides)
    with pytest.raises(LmforgeError, match=words):
        next(speculative_stream(target, draft, Request([1, 2, 3], **request_overrides)))


def test_beam_search_width_one_is_greedy_and_wider_scores_no_worse():
    model = tiny()
    prompt = [4, 8, 15, 16]
    greedy, _ = plain(model, Request(prompt, max_new_tokens=8))
    assert [t.token for t in beam_search(model, Request(prompt, max_new_tokens=8), width=1)] == greedy

    def score(seq):
        ids = torch.tensor([prompt + seq])
        with torch.no_grad():
            lp = model(ids).log_softmax(-1)[0, len(prompt) - 1 : -1]
        return lp.gather(-1, torch.tensor(seq)[:, None]).sum().item()

    wide = beam_search(model, Request(prompt, max_new_tokens=8), width=4, length_penalty=0.0)
    wide = [t.token for t in wide]
    assert len(wide) == 8 and score(wide) >= score(greedy) - 1e-5


@pytest.mark.parametrize("family", ["gpt2", "llama"])
@pytest.mark.parametrize("length_penalty", [1.0, 0.0, 2.0])
def test_beam_search_equals_transformers(tmp_path, family, length_penalty):
    """transformers' beam search with early_stopping=True, with and without a stop token."""
    hf = hf_model(family)
    hf.save_pretrained(tmp_path / "m")
    model, _ = load_model(tmp_path / "m")
    for prompt in ([5, 17, 33, 2], [60, 41, 9]):
        free = beam_search(model, Request(prompt, max_new_tokens=10), width=3, length_penalty=length_penalty)
        for stop in (None, free[3].token):  # a token the search meets, so that beams finish early
            out = hf.generate(torch.tensor([prompt]), max_new_tokens=10, num_beams=3, do_sample=False,
                              early_stopping=True, length_penalty=length_penalty, eos_token_id=stop,
                              pad_token_id=0)
            want = out[0, len(prompt):].tolist()
            stop_ids = frozenset() if stop is None else frozenset({stop})
            request = Request(prompt, max_new_tokens=10, stop_ids=stop_ids)
            got = beam_search(model, request, width=3, length_penalty=length_penalty)
            assert [t.token for t in got] == want
            assert got[-1].finish_reason == ("stop" if want[-1] == stop else "length")


def test_beam_search_stops_at_the_end_of_the_context():
    model = tiny(max_seq_len=16)
    got = beam_search(model, Request(list(range(10)), max_new_tokens=100), width=3)
    # like the engine: 10 + 7 positions, the last token never fed back
    assert len(got) == 7 and got[-1].finish_reason == "length"


@pytest.mark.parametrize(("width", "sampling", "words"), [
    (0, SamplingParams(temperature=0.0), "num_beams must be >= 1"),
    (4, SamplingParams(temperature=0.8, top_p=0.9), "temperature=0.8, top_p=0.9"),
])
def test_beam_search_refuses_bad_settings(width, sampling, words):
    with pytest.raises(LmforgeError, match=words):
        beam_search(tiny(), Request([1, 2, 3], sampling=sampling), width=width)
