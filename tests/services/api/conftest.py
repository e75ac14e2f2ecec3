"""A real uvicorn server per test (in a thread, on a free port) in front of the test's run."""

from __future__ import annotations

import threading
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import httpx
import pytest
import redis
import uvicorn
from fastapi import FastAPI

from conspo.redis_conn import free_port
from conspo.settings import ApiSettings, load
from conspo.testing import delete_run, wait_for
from services.api.app import create_app

TOKEN = "test-token-0123456789"
AUTH = {"Authorization": f"Bearer {TOKEN}"}


@dataclass
class ApiServer:
    url: str
    settings: ApiSettings
    app: FastAPI
    server: uvicorn.Server
    thread: threading.Thread
    http: httpx.Client  # authenticated

    def stop(self) -> None:
        self.http.close()
        self.server.should_exit = True
        self.thread.join(30)


def assert_error_body(response: httpx.Response, status: int, code: str | None = None) -> dict:
    """The one error shape: {"error": {"code", "message", "details"}}."""
    assert response.status_code == status, response.text
    assert response.headers["content-type"].startswith("application/json")
    body = response.json()
    assert set(body) == {"error"}
    assert set(body["error"]) == {"code", "message", "details"}
    assert isinstance(body["error"]["message"], str) and body["error"]["message"]
    assert isinstance(body["error"]["details"], list)
    if code is not None:
        assert body["error"]["code"] == code, body
    return body["error"]


def _serve(url: str, run: str, client: redis.Redis | None, **overrides: Any) -> ApiServer:
    values: dict[str, Any] = {
        "redis_url": url,
        "run": run,
        "api_token": TOKEN,
        "feed_interval_s": 0.05,
        **overrides,
    }
    settings = load(ApiSettings, **values)
    app = create_app(settings, client)
    port = free_port()
    config = uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning", lifespan="on")
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, name=f"api-{port}", daemon=True)
    thread.start()
    assert wait_for(lambda: server.started, timeout=30), "uvicorn did not start"
    url = f"http://127.0.0.1:{port}"
    http = httpx.Client(base_url=url, headers=AUTH, timeout=30)
    return ApiServer(url, settings, app, server, thread, http)


@pytest.fixture
def start_api(redis_url: str, run_name: str) -> Iterator[Callable[..., ApiServer]]:
    """``start_api(client=None, **settings)``: a fresh server on the test's run."""
    started: list[ApiServer] = []

    def start(client: redis.Redis | None = None, **overrides: Any) -> ApiServer:
        handle = _serve(redis_url, run_name, client, **overrides)
        started.append(handle)
        return handle

    yield start
    for handle in started:
        handle.stop()


@pytest.fixture(scope="module")
def shared_api(redis_url: str) -> Iterator[ApiServer]:
    """One default server per test module, on its own run namespace, for tests that only look
    at responses (starting a server per test costs more than the tests themselves)."""
    run = f"t-{uuid.uuid4().hex[:12]}"
    handle = _serve(redis_url, run, None)
    yield handle
    handle.stop()
    client = redis.Redis.from_url(redis_url)
    delete_run(client, run)
    client.close()


@pytest.fixture
def api(start_api: Callable[..., ApiServer]) -> ApiServer:
    return start_api()


@pytest.fixture
def token() -> str:
    return TOKEN


@pytest.fixture
def error_of() -> Callable[..., dict]:
    """``error_of(response, status, code)`` checks the one error body and returns its error."""
    return assert_error_body
