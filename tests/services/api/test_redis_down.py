"""With Redis unreachable the api answers fast 503s with a reason, never 500s or hangs."""

from __future__ import annotations

import time

import httpx

from conspo.redis_conn import free_port


def test_redis_unreachable_gives_503_with_a_reason(start_api, error_of):
    closed = free_port()  # nothing listens there
    server = start_api(redis_url=f"redis://127.0.0.1:{closed}/0", redis_timeout_s=1.0)
    started = time.monotonic()
    with httpx.Client(base_url=server.url, timeout=30) as anonymous:
        assert anonymous.get("/healthz").status_code == 200
        error = error_of(anonymous.get("/readyz"), 503, "redis_unavailable")
        assert "Redis" in error["message"]
        metrics = anonymous.get("/metrics")
        assert metrics.status_code == 200 and "conspo_api_redis_up 0.0" in metrics.text
    for method, path, kwargs in (
        ("GET", "/v1/status", {}),
        ("GET", "/v1/runs/current", {}),
        ("GET", "/v1/dead", {}),
        ("GET", "/v1/rollouts/g-1-0", {}),
        ("GET", "/v1/datasets/x", {}),
        ("POST", "/v1/prompts", {"json": {"text": "1+1", "answer": "2"}}),
        (
            "POST",
            "/v1/prompts",
            {"json": {"text": "1+1", "answer": "2"}, "headers": {"Idempotency-Key": "k"}},
        ),
        (
            "POST",
            "/v1/datasets",
            {"json": {"rows": [{"q": "a", "a": "b"}], "prompt_field": "q", "answer_field": "a"}},
        ),
    ):
        response = server.http.request(method, path, **kwargs)
        error_of(response, 503, "redis_unavailable")
        assert response.headers["retry-after"]
    assert time.monotonic() - started < 30
