"""Fixtures shared by the whole suite: one real Redis per session, one key namespace per test."""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis

from conspo.keys import Keys
from conspo.redis_conn import reachable_or_local
from conspo.testing import delete_run

SHARED_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "math"


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    try:
        import torch

        has_cuda = torch.cuda.is_available()
    except ImportError:
        has_cuda = False
    if has_cuda:
        return
    skip_gpu = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip_gpu)


@pytest.fixture(scope="session")
def redis_url() -> Iterator[str]:
    """$CONSPO_REDIS_URL if it answers, else a private redis-server for the session."""
    with reachable_or_local(os.environ.get("CONSPO_REDIS_URL")) as url:
        os.environ["CONSPO_REDIS_URL"] = url
        yield url


@pytest.fixture
def redis_client(redis_url: str) -> Iterator[redis.Redis]:
    client = redis.Redis.from_url(redis_url)
    yield client
    client.close()


@pytest.fixture
def run_name(redis_client: redis.Redis) -> Iterator[str]:
    """A fresh run namespace per test, deleted afterwards."""
    name = f"t-{uuid.uuid4().hex[:12]}"
    yield name
    delete_run(redis_client, name)


@pytest.fixture
def keys(run_name: str) -> Keys:
    return Keys(run=run_name)


@pytest.fixture
def shared_data() -> Path:
    if not SHARED_DATA.is_dir():
        pytest.skip(f"benchmark data not found at {SHARED_DATA}")
    return SHARED_DATA


# A model folder as a new user makes one: the recipe of docs/byo-model.md, run as written there
# (a byte-level BPE trained locally with `tokenizers`, a Qwen2-style chat template, a tiny random
# Qwen2, save_pretrained), so the page and the tests cannot drift apart.
BYO_PAGE = Path(__file__).resolve().parents[1] / "docs" / "byo-model.md"
RECIPE_MARK = "<!-- make_tiny_model.py: tests/conftest.py runs this block -->"


def byo_recipe() -> str:
    text = BYO_PAGE.read_text()
    after = text[text.index(RECIPE_MARK) + len(RECIPE_MARK) :]
    return after.split("```python\n", 1)[1].split("\n```", 1)[0] + "\n"


@pytest.fixture(scope="session")
def user_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny user-made model folder (byte-level BPE + chat template + random Qwen2)."""
    import subprocess
    import sys

    work = tmp_path_factory.mktemp("user-model")
    script = work / "make_tiny_model.py"
    script.write_text(byo_recipe())
    out = work / "model"
    subprocess.run([sys.executable, str(script), str(out)], check=True, timeout=300)
    return out
