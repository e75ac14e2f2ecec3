"""POST /v1/prompts: what lands in the prompts stream, and Idempotency-Key semantics."""

from __future__ import annotations

import threading

import pytest

from conspo.protocol import Prompt, decode


def stream_prompts(redis_client, keys) -> list[tuple[str, str, Prompt]]:
    return [
        (i.decode(), f[b"k"].decode(), decode(f[b"d"], Prompt))
        for i, f in redis_client.xrange(keys.prompts)
    ]


def test_one_text_prompt_is_published_as_a_protocol_prompt(api, redis_client, keys):
    response = api.http.post(
        "/v1/prompts",
        json={"text": "What is 20 + 7?", "answer": 27.0, "dataset": "amc", "metadata": {"l": 3}},
    )
    assert response.status_code == 202, response.text
    body = response.json()
    assert body["count"] == 1 and body["stream"] == "prompts"
    (entry_id, key, prompt), *rest = stream_prompts(redis_client, keys)
    assert not rest
    assert body["entry_ids"] == [entry_id]
    assert body["prompt_ids"] == [prompt.prompt_id] == [key]
    assert prompt.prompt_id.startswith("p-")
    assert prompt.text == "What is 20 + 7?" and prompt.messages is None
    assert prompt.answer == "27"  # a float gold answer is formatted as the integer it is
    assert prompt.verifier == "math" and prompt.dataset == "amc"
    assert prompt.metadata == {"l": 3}
    assert redis_client.hget(keys.counters, "api.prompts_accepted") == b"1"


def test_a_batch_keeps_client_ids_order_and_chat_messages(api, redis_client, keys):
    batch = {
        "prompts": [
            {"prompt_id": "q-1", "text": "1+1", "answer": "2", "verifier": "arith"},
            {
                "prompt_id": "q-2",
                "messages": [
                    {"role": "system", "content": "Be brief."},
                    {"role": "user", "content": "2+2"},
                ],
                "answer": 4,
            },
            {"text": "0.5 + 0.25", "answer": 0.75},
        ]
    }
    body = api.http.post("/v1/prompts", json=batch).json()
    assert body["count"] == 3
    assert body["prompt_ids"][:2] == ["q-1", "q-2"]
    stored = stream_prompts(redis_client, keys)
    assert [e for e, _, _ in stored] == body["entry_ids"]
    assert [p.prompt_id for _, _, p in stored] == body["prompt_ids"]
    assert stored[0][2].verifier == "arith"
    assert [m.role for m in stored[1][2].messages] == ["system", "user"]
    assert stored[1][2].text is None and stored[1][2].answer == "4"
    assert stored[2][2].answer == "0.75"


@pytest.mark.parametrize(
    ("body", "reason"),
    [
        ({"answer": "1"}, "exactly one of"),
        ({"text": "a", "messages": [{"role": "user", "content": "a"}], "answer": "1"}, "exactly"),
        ({"messages": [{"role": "robot", "content": "a"}], "answer": "1"}, "role"),
        ({"messages": [], "answer": "1"}, "messages"),
        ({"text": "a", "answer": "1", "prompt_id": "has space"}, "prompt_id"),
        ({"text": "a" * 100_001, "answer": "1"}, "text"),
    ],
)
def test_invalid_prompts_are_422_and_not_published(
    shared_api, redis_client, error_of, body, reason
):
    stream = shared_api.settings.keys.prompts
    before = redis_client.xlen(stream)
    error = error_of(shared_api.http.post("/v1/prompts", json=body), 422, "validation_error")
    assert reason in str(error["details"])
    assert redis_client.xlen(stream) == before


def test_duplicate_prompt_ids_in_one_request_are_refused(api, redis_client, keys, error_of):
    batch = {"prompts": [{"prompt_id": "x", "text": "a", "answer": "1"}] * 2}
    error_of(api.http.post("/v1/prompts", json=batch), 422, "duplicate_prompt_id")
    assert redis_client.xlen(keys.prompts) == 0


def test_the_same_idempotency_key_replays_and_enqueues_once(api, redis_client, keys):
    batch = {"prompts": [{"text": "1+1", "answer": "2"}, {"text": "2+2", "answer": "4"}]}
    headers = {"Idempotency-Key": "req-0001"}
    first = api.http.post("/v1/prompts", json=batch, headers=headers)
    second = api.http.post("/v1/prompts", json=batch, headers=headers)
    assert first.status_code == second.status_code == 202
    assert first.json() == second.json()
    assert "idempotent-replayed" not in first.headers
    assert second.headers["idempotent-replayed"] == "true"
    assert redis_client.xlen(keys.prompts) == 2
    assert [e for e, _, _ in stream_prompts(redis_client, keys)] == first.json()["entry_ids"]
    ttl = redis_client.ttl(keys.idempotency("req-0001"))
    assert 0 < ttl <= api.settings.idempotency_ttl_s
    # another key is another request
    third = api.http.post("/v1/prompts", json=batch, headers={"Idempotency-Key": "req-0002"})
    assert third.json()["entry_ids"] != first.json()["entry_ids"]
    assert redis_client.xlen(keys.prompts) == 4
    assert redis_client.hget(keys.counters, "api.prompts_accepted") == b"4"


def test_concurrent_retries_with_one_key_enqueue_once(api, redis_client, keys):
    batch = {"prompts": [{"text": f"{i}*3", "answer": str(3 * i)} for i in range(5)]}
    headers = {"Idempotency-Key": "7f1c2a3e-retry-storm"}
    responses = []
    barrier = threading.Barrier(8)

    def submit() -> None:
        barrier.wait()
        responses.append(api.http.post("/v1/prompts", json=batch, headers=headers))

    threads = [threading.Thread(target=submit) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert len(responses) == 8
    assert {r.status_code for r in responses} == {202}
    bodies = [r.json() for r in responses]
    assert all(b == bodies[0] for b in bodies)
    assert sum(r.headers.get("idempotent-replayed") == "true" for r in responses) == 7
    assert redis_client.xlen(keys.prompts) == 5


def test_the_same_key_with_another_body_is_refused(api, redis_client, keys, error_of):
    headers = {"Idempotency-Key": "k-1"}
    assert (
        api.http.post("/v1/prompts", json={"text": "a", "answer": "1"}, headers=headers)
    ).status_code == 202
    other = api.http.post("/v1/prompts", json={"text": "b", "answer": "1"}, headers=headers)
    error = error_of(other, 422, "idempotency_key_reused")
    assert "different request body" in error["message"]
    assert redis_client.xlen(keys.prompts) == 1


@pytest.mark.parametrize("key", ["", "a" * 256, "with space", "tab\tkey"])
def test_malformed_idempotency_keys_are_422(shared_api, error_of, key):
    response = shared_api.http.post(
        "/v1/prompts", json={"text": "a", "answer": "1"}, headers={"Idempotency-Key": key}
    )
    error_of(response, 422, "validation_error")
