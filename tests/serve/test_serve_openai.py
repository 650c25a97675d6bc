"""The server through the official `openai` client: every endpoint's happy path and exact numbers."""

from __future__ import annotations

import httpx
import numpy as np
import pytest
import torch
from _serve_servers import Server

from lmforge.api import LM

HELLO = [{"role": "user", "content": "Hello, how are you?"}]


def test_models_list(main_server: Server) -> None:
    models = main_server.client().models.list().data
    assert [m.id for m in models] == ["tiny"]
    assert models[0].object == "model"


def test_chat_completion(main_server: Server) -> None:
    reply = main_server.client().chat.completions.create(model="tiny", messages=HELLO, max_tokens=12, temperature=0)
    choice = reply.choices[0]
    assert reply.object == "chat.completion" and choice.message.role == "assistant"
    assert choice.finish_reason in ("stop", "length")
    assert reply.usage.completion_tokens <= 12
    assert reply.usage.total_tokens == reply.usage.prompt_tokens + reply.usage.completion_tokens


def test_streamed_chat_joins_to_the_same_text(main_server: Server) -> None:
    client = main_server.client()
    whole = client.chat.completions.create(model="tiny", messages=HELLO, max_tokens=40, temperature=0)
    chunks = list(client.chat.completions.create(model="tiny", messages=HELLO, max_tokens=40, temperature=0,
                                                 stream=True))
    assert chunks[0].choices[0].delta.role == "assistant"
    assert chunks[-1].choices[0].finish_reason == whole.choices[0].finish_reason
    assert all(c.choices[0].finish_reason is None for c in chunks[:-1])
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == whole.choices[0].message.content


def test_include_usage_counts_exactly(main_server: Server, local_lm: LM) -> None:
    chunks = list(main_server.client().chat.completions.create(
        model="tiny", messages=HELLO, max_tokens=20, temperature=0, stream=True, logprobs=True,
        stream_options={"include_usage": True}))
    usage = chunks[-1].usage
    assert chunks[-1].choices == [] and usage is not None
    assert all(c.usage is None for c in chunks[:-1])
    generated = sum(len(c.choices[0].logprobs.content) for c in chunks[:-1] if c.choices[0].logprobs)
    assert usage.completion_tokens == generated
    assert usage.prompt_tokens == len(local_lm.tokenizer.apply_chat_template(HELLO, add_generation_prompt=True))
    assert usage.total_tokens == usage.prompt_tokens + usage.completion_tokens


def test_echo_logprobs_equal_token_logprobs(main_server: Server, local_lm: LM) -> None:
    prompt = "The quick brown fox jumps over the lazy dog."
    ids = local_lm.tokenizer.encode(prompt, add_special_tokens=True)
    reply = main_server.client().completions.create(model="tiny", prompt=prompt, max_tokens=0, echo=True, logprobs=1)
    choice = reply.choices[0]
    assert choice.text == prompt and choice.finish_reason == "length"
    assert reply.usage.prompt_tokens == len(ids) and reply.usage.completion_tokens == 0
    lp = choice.logprobs
    assert lp.token_logprobs[0] is None and lp.top_logprobs[0] is None
    assert len(lp.tokens) == len(ids) == len(lp.text_offset)
    torch.testing.assert_close(torch.tensor(lp.token_logprobs[1:]), torch.tensor(local_lm.token_logprobs(ids)),
                               atol=1e-4, rtol=0)
    assert lp.tokens[0] == "<|bos|>" and lp.text_offset[:2] == [0, 0]  # a special token adds no text
    for token, offset in zip(lp.tokens[1:], lp.text_offset[1:]):
        assert prompt[offset:offset + len(token)] == token


def test_lm_eval_style_token_prompts(main_server: Server, local_lm: LM) -> None:
    """`lm-eval --model local-completions`: a batch of token-id prompts, echo, logprobs=1, max_tokens=1."""
    batch = [local_lm.tokenizer.encode(t, add_special_tokens=True) for t in ("Hello world", "A language model")]
    reply = main_server.client().completions.create(model="tiny", prompt=batch, max_tokens=1, echo=True, logprobs=1,
                                                    temperature=0)
    assert len(reply.choices) == 2
    for ids, choice in zip(batch, reply.choices):
        lp = choice.logprobs
        assert len(lp.token_logprobs) == len(ids) + 1
        torch.testing.assert_close(torch.tensor(lp.token_logprobs[1:len(ids)]),
                                   torch.tensor(local_lm.token_logprobs(ids)), atol=1e-4, rtol=0)
        for chosen, top in zip(lp.token_logprobs[1:], lp.top_logprobs[1:]):
            assert chosen in top.values() and max(top.values()) >= chosen
    assert reply.usage.prompt_tokens == sum(len(ids) for ids in batch)


def test_completion_logprobs_and_text_offsets(main_server: Server) -> None:
    reply = main_server.client().completions.create(model="tiny", prompt="Hello", max_tokens=8, logprobs=2,
                                                    temperature=0)
    lp = reply.choices[0].logprobs
    assert len(lp.tokens) == reply.usage.completion_tokens == len(lp.token_logprobs) == len(lp.text_offset)
    assert lp.text_offset == [sum(len(t) for t in lp.tokens[:i]) for i in range(len(lp.tokens))]
    for token, chosen, top in zip(lp.tokens, lp.token_logprobs, lp.top_logprobs):
        assert token in top and max(top.values()) >= chosen
        assert 1 <= len(top) <= 3  # the 2 most likely and the chosen one, merged where their text is alike


def test_n_choices(main_server: Server) -> None:
    reply = main_server.client().chat.completions.create(model="tiny", messages=HELLO, max_tokens=10, n=2,
                                                         temperature=1.0, seed=3)
    assert [c.index for c in reply.choices] == [0, 1]
    assert reply.choices[0].message.content != reply.choices[1].message.content
    streamed = list(main_server.client().chat.completions.create(
        model="tiny", messages=HELLO, max_tokens=10, n=2, temperature=1.0, seed=3, stream=True))
    for choice in reply.choices:
        pieces = [c.choices[0].delta.content or "" for c in streamed if c.choices[0].index == choice.index]
        assert "".join(pieces) == choice.message.content


def test_seed_reproducibility(main_server: Server) -> None:
    client = main_server.client()

    def sample(seed: int) -> str:
        return client.completions.create(model="tiny", prompt="Hello", max_tokens=24, temperature=1.0,
                                         seed=seed).choices[0].text

    assert sample(1234) == sample(1234)
    assert sample(1234) != sample(4321)


def test_stop_strings(main_server: Server) -> None:
    client = main_server.client()
    full = client.completions.create(model="tiny", prompt="Hello", max_tokens=40, temperature=0).choices[0].text
    stop = next(full[i:i + 2] for i in range(3, len(full) - 2) if full[i:i + 2].isprintable())
    for stops in (stop, [stop, "never-there"]):
        reply = client.completions.create(model="tiny", prompt="Hello", max_tokens=40, temperature=0, stop=stops)
        assert reply.choices[0].text == full[:full.find(stop)]
        assert reply.choices[0].finish_reason == "stop"
        chunks = list(client.completions.create(model="tiny", prompt="Hello", max_tokens=40, temperature=0,
                                                stop=stops, stream=True))
        assert "".join(c.choices[0].text for c in chunks) == full[:full.find(stop)]
        assert chunks[-1].choices[0].finish_reason == "stop"


def test_embeddings_from_the_decoder(main_server: Server, local_lm: LM) -> None:
    client = main_server.client()
    texts = ["Hello world", "A language model"]
    as_floats = client.embeddings.create(model="tiny", input=texts, encoding_format="float")
    as_base64 = client.embeddings.create(model="tiny", input=texts)  # the client asks for base64
    expected = local_lm.embed(texts).numpy()
    for reply in (as_floats, as_base64):
        got = np.array([d.embedding for d in reply.data])
        np.testing.assert_allclose(got, expected, atol=1e-5)
    assert as_floats.usage.prompt_tokens == sum(len(local_lm.tokenizer.encode(t, add_special_tokens=True))
                                                for t in texts)


def test_embeddings_from_an_encoder(bert_server: Server) -> None:
    reply = bert_server.client().embeddings.create(model="tiny-bert", input="Hello world", encoding_format="float")
    vector = np.array(reply.data[0].embedding)
    assert vector.shape == (64,) and abs(np.linalg.norm(vector) - 1) < 1e-5
    refused = httpx.post(bert_server.url + "/v1/completions", json={"prompt": "Hello"}, timeout=10)
    assert refused.status_code == 400 and "encoder" in refused.json()["error"]["message"]


def test_tokenize_detokenize(main_server: Server, local_lm: LM) -> None:
    post = lambda path, body: httpx.post(main_server.url + path, json=body, headers=main_server.headers, timeout=10)  # noqa: E731
    tokens = post("/tokenize", {"prompt": "Hello world"}).json()
    assert tokens["tokens"] == local_lm.tokenizer.encode("Hello world", add_special_tokens=True)
    assert tokens["count"] == len(tokens["tokens"]) and tokens["max_model_len"] == 1024
    chat = post("/tokenize", {"messages": HELLO}).json()
    assert chat["tokens"] == local_lm.tokenizer.apply_chat_template(HELLO, add_generation_prompt=True)
    assert post("/detokenize", {"tokens": tokens["tokens"][1:]}).json() == {"prompt": "Hello world"}


@pytest.mark.parametrize("path", ["/", "/health"])
def test_open_routes_need_no_key(main_server: Server, path: str) -> None:
    assert httpx.get(main_server.url + path, timeout=10).status_code == 200
