"""Fixtures for the serve tests; the servers themselves are built in `_serve_servers.py`."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from _serve_servers import Server, ServerPool, build_models

from lmforge.api import LM


@pytest.fixture(scope="session")
def model_paths(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    return build_models(tmp_path_factory.mktemp("serve-models"))


@pytest.fixture(scope="session")
def server_pool(model_paths: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerPool]:
    pool = ServerPool(model_paths, tmp_path_factory.mktemp("serve-logs"))
    yield pool
    pool.close()


@pytest.fixture(scope="session")
def main_server(server_pool: ServerPool) -> Server:
    return server_pool.get("main")


@pytest.fixture(scope="session")
def queue_server(server_pool: ServerPool) -> Server:
    return server_pool.get("queue")


@pytest.fixture(scope="session")
def bert_server(server_pool: ServerPool) -> Server:
    return server_pool.get("bert")


@pytest.fixture(scope="session")
def local_lm(model_paths: dict[str, Path]) -> LM:
    """The decoder the servers serve, loaded in the test process to compare against."""
    import lmforge

    return lmforge.load(model_paths["llama"])
