"""A quantized folder serves like a float one (`lmforge serve runs/x-int4`), and `/v1/models` says
which quantization its weights have."""

from __future__ import annotations

import time
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

import lmforge
from lmforge.quantize import quantize_model
from lmforge.serve.app import create_app
from lmforge.serve.state import Settings


@pytest.mark.parametrize("bits", [4, None])
def test_quantized_folder_serves_and_says_its_quantization(qlora_base_dir: Path, tmp_path: Path, bits: int | None) -> None:
    folder = qlora_base_dir
    if bits is not None:
        lm = lmforge.load(qlora_base_dir)
        quantize_model(lm.model, bits, 32)
        lm.save(folder := tmp_path / f"int{bits}")
    want = lmforge.load(folder).generate("Hello", max_new_tokens=5, temperature=0)
    with TestClient(create_app(lambda: lmforge.load(folder), Settings(model_name="m", n_slots=2))) as client:
        deadline = time.monotonic() + 60
        while client.get("/health").status_code != 200 and time.monotonic() < deadline:
            time.sleep(0.05)
        card = client.get("/v1/models").json()["data"][0]
        reply = client.post("/v1/completions", json={"prompt": "Hello", "max_tokens": 5, "temperature": 0})
    assert card["id"] == "m" and card["quantization"] == (None if bits is None else f"int{bits}")
    assert reply.status_code == 200 and reply.json()["choices"][0]["text"] == want
