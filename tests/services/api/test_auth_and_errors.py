"""Auth on every /v1 route, open health endpoints, size limits, one error body everywhere."""

from __future__ import annotations

import json

import httpx
import pytest

from conspo.settings import ApiSettings, SettingsError, load

V1_ROUTES = [
    ("GET", "/v1/status"),
    ("GET", "/v1/runs/current"),
    ("GET", "/v1/accounting"),
    ("GET", "/v1/dead"),
    ("GET", "/v1/datasets"),
    ("GET", "/v1/datasets/some-id"),
    ("GET", "/v1/rollouts/g-1-0"),
    ("POST", "/v1/prompts"),
    ("POST", "/v1/datasets"),
    ("GET", "/v1/no-such-route"),
]


def test_open_endpoints_need_no_token(shared_api):
    with httpx.Client(base_url=shared_api.url) as anonymous:
        assert anonymous.get("/healthz").json() == {"status": "ok"}
        assert anonymous.get("/readyz").json() == {"status": "ready", "redis": "ok"}
        metrics = anonymous.get("/metrics")
        assert metrics.status_code == 200
        assert metrics.headers["content-type"].startswith("text/plain")
        assert 'conspo_queue_length{stream="prompts"}' in metrics.text
        assert "conspo_api_redis_up 1.0" in metrics.text


@pytest.mark.parametrize(("method", "path"), V1_ROUTES)
def test_every_v1_route_needs_the_right_token(shared_api, method, path, error_of, token):
    body = {"text": "1+1", "answer": "2"}
    with httpx.Client(base_url=shared_api.url) as anonymous:
        missing = anonymous.request(method, path, json=body)
        error = error_of(missing, 401, "unauthorized")
        assert missing.headers["www-authenticate"].startswith("Bearer")
        assert "missing" in error["message"]

        for header in (f"Bearer {token}x", f"Bearer {token[:-1]}", f"Basic {token}", "Bearer"):
            wrong = anonymous.request(method, path, json=body, headers={"Authorization": header})
            error_of(wrong, 401, "unauthorized")
            assert 'error="invalid_token"' in wrong.headers["www-authenticate"]

        right = anonymous.request(
            method, path, json=body, headers={"Authorization": f"bearer {token}"}
        )
        assert right.status_code != 401, right.text


def test_auth_can_be_disabled_for_local_use(start_api):
    server = start_api(api_token=None, auth_disabled=True)
    with httpx.Client(base_url=server.url) as anonymous:
        assert anonymous.get("/v1/status").status_code == 200


def test_settings_refuse_to_build_without_a_token(monkeypatch):
    monkeypatch.delenv("CONSPO_API_TOKEN", raising=False)
    monkeypatch.delenv("CONSPO_AUTH_DISABLED", raising=False)
    with pytest.raises(SettingsError, match="CONSPO_API_TOKEN"):
        load(ApiSettings)
    with pytest.raises(SettingsError, match="at least 8"):
        load(ApiSettings, api_token="short")
    assert load(ApiSettings, auth_disabled=True).api_token is None


def test_oversized_body_with_content_length_is_413(start_api, redis_client, keys, error_of):
    server = start_api(max_body_bytes=4096)
    big = {"text": "x" * 5000, "answer": "1"}
    response = server.http.post("/v1/prompts", json=big)
    error = error_of(response, 413, "payload_too_large")
    assert "4096" in error["message"]
    assert redis_client.xlen(keys.prompts) == 0


def test_oversized_streamed_body_is_413(start_api, redis_client, keys, error_of):
    server = start_api(max_body_bytes=4096)
    payload = json.dumps({"text": "y" * 6000, "answer": "1"}).encode()

    def chunks():  # no Content-Length: transfer-encoding chunked
        for i in range(0, len(payload), 1000):
            yield payload[i : i + 1000]

    response = server.http.post(
        "/v1/prompts", content=chunks(), headers={"Content-Type": "application/json"}
    )
    assert "content-length" not in response.request.headers
    error_of(response, 413, "payload_too_large")
    assert redis_client.xlen(keys.prompts) == 0


def test_a_small_streamed_body_still_works(api):
    payload = json.dumps({"text": "1+1", "answer": "2"}).encode()
    response = api.http.post(
        "/v1/prompts",
        content=iter([payload[:5], payload[5:]]),
        headers={"Content-Type": "application/json"},
    )
    assert response.status_code == 202, response.text


@pytest.mark.parametrize(
    "raw", [b"{not json", b'{"text": "a", "answer": ', b"\xff\xfe", b'{"text": "a"} trailing']
)
def test_malformed_json_is_400(shared_api, raw, redis_client, error_of):
    stream = shared_api.settings.keys.prompts
    before = redis_client.xlen(stream)
    response = shared_api.http.post(
        "/v1/prompts", content=raw, headers={"Content-Type": "application/json"}
    )
    error_of(response, 400, "malformed_json")
    assert redis_client.xlen(stream) == before


@pytest.mark.parametrize(
    ("body", "loc"),
    [
        ({"text": "a"}, ["body", "answer"]),
        ({"text": "a", "answer": "1", "verifier": "bad name!"}, ["body", "verifier"]),
        ({"text": "a", "answer": "1", "extra": 1}, ["body", "extra"]),
        ({"prompts": [{"text": "a", "answer": True}]}, ["body", "prompts", "0", "answer"]),
        ({"prompts": []}, ["body", "prompts"]),
        ([1, 2], ["body"]),
    ],
)
def test_validation_errors_name_the_field(shared_api, body, loc, error_of):
    error = error_of(shared_api.http.post("/v1/prompts", json=body), 422, "validation_error")
    locs = [d["loc"] for d in error["details"]]
    assert any(found[: len(loc)] == loc for found in locs), locs


def test_unknown_route_and_wrong_method_use_the_error_body(shared_api, error_of):
    error_of(shared_api.http.get("/v1/nothing-here"), 404, "not_found")
    error_of(shared_api.http.get("/nothing-here"), 404, "not_found")
    response = shared_api.http.delete("/v1/prompts")
    error_of(response, 405, "method_not_allowed")
    assert "POST" in response.headers["allow"]


def test_too_many_prompts_is_422_and_enqueues_nothing(start_api, redis_client, keys, error_of):
    server = start_api(max_prompts_per_request=3)
    prompts = [{"text": f"{i}+1", "answer": str(i + 1)} for i in range(4)]
    error = error_of(
        server.http.post("/v1/prompts", json={"prompts": prompts}), 422, "too_many_prompts"
    )
    assert "3" in error["message"]
    assert redis_client.xlen(keys.prompts) == 0
    assert server.http.post("/v1/prompts", json={"prompts": prompts[:3]}).status_code == 202


def test_metrics_count_requests_by_route_and_status(api):
    api.http.post("/v1/prompts", json={"text": "1+1", "answer": "2"})
    api.http.get("/v1/rollouts/g-1-0")
    httpx.get(f"{api.url}/v1/status")
    text = httpx.get(f"{api.url}/metrics").text
    assert 'conspo_api_requests_total{method="POST",route="/v1/prompts",status="202"} 1.0' in text
    assert (
        'conspo_api_requests_total{method="GET",route="/v1/rollouts/{group_id}",status="404"} 1.0'
        in text
    )
    assert 'route="unmatched",status="401"' in text or 'route="/v1/status",status="401"' in text
    assert 'conspo_api_request_seconds_count{method="POST",route="/v1/prompts"} 1.0' in text
    assert 'conspo_api_prompts_accepted_total{source="request"} 1.0' in text


def test_openapi_schema_declares_bearer_auth_and_error_bodies(shared_api):
    schema = httpx.get(f"{shared_api.url}/openapi.json").json()
    assert schema["components"]["securitySchemes"]["bearerAuth"]["scheme"] == "bearer"
    post = schema["paths"]["/v1/prompts"]["post"]
    assert {"bearerAuth": []} in post["security"]
    for status in ("400", "401", "413", "422", "503"):
        ref = post["responses"][status]["content"]["application/json"]["schema"]["$ref"]
        assert ref.endswith("/ErrorBody")
    assert "202" in post["responses"]
    datasets = schema["paths"]["/v1/datasets"]["post"]["requestBody"]["content"]
    assert {"application/json", "multipart/form-data", "application/x-ndjson"} <= set(datasets)
    for path in ("/v1/status", "/v1/runs/current", "/v1/accounting", "/v1/rollouts/{group_id}",
                 "/v1/dead"):  # fmt: skip
        assert "$ref" in str(schema["paths"][path]["get"]["responses"]["200"])
    assert "security" not in schema["paths"]["/healthz"]["get"]
