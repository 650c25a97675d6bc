"""Serving a GGUF export: the same routes as a float folder, and /v1/models names the file's quantization."""

from __future__ import annotations

import torch
from fastapi.testclient import TestClient

import lmforge
from lmforge.serve.app import create_app
from lmforge.serve.state import Settings


def test_a_gguf_export_serves_and_its_model_card_names_the_quantization(tmp_path, tiny_lm_dir, one_thread):
    folder = tiny_lm_dir
    lmforge.load(folder).save_gguf(tmp_path / "tiny.gguf", dtype="q8_0")
    lm = lmforge.load(tmp_path / "tiny.gguf")
    messages = [{"role": "user", "content": "Héllo?"}]
    expected = lm.chat(messages, max_new_tokens=8, temperature=0.0)
    with TestClient(create_app(lm, Settings(model_name="tiny.gguf", n_slots=1))) as client:
        card = client.get("/v1/models").json()["data"][0]
        assert (card["id"], card["quantization"]) == ("tiny.gguf", "q8_0")
        reply = client.post("/v1/chat/completions", json={"messages": messages, "max_tokens": 8, "temperature": 0})
        assert reply.status_code == 200 and reply.json()["choices"][0]["message"]["content"] == expected
    with TestClient(create_app(lmforge.load(folder), Settings(model_name="tiny", n_slots=1))) as client:
        assert client.get("/v1/models").json()["data"][0]["quantization"] is None
    assert torch.equal(lm.model.embed.weight, lmforge.load(tmp_path / "tiny.gguf").model.embed.weight)
