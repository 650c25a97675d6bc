"""Fixtures for the parity tests: tiny random Hugging Face models saved to a temp folder."""

from __future__ import annotations

import pytest

from hf_tiny import hf_model, save


@pytest.fixture
def make_hf(tmp_path):
    def make(family: str, name: str = "hf", **overrides):
        model = hf_model(family, **overrides)
        return model, save(model, tmp_path / name)

    return make
