"""Refused at the door: what can only fail later gets a 4xx with its reason, and nothing is
enqueued. Empty prompts and answers, verifiers nobody offers (from the replicas' published names,
or the api's setting before any replica started), prompts longer than the served context (counted
with the generator's tokenizer, or bounded without one), and prompt ids already used in the run
(409, or an idempotent replay of the identical prompt, across requests and api replicas)."""

from __future__ import annotations

import threading
from pathlib import Path

import pytest

from conspo.models import default_checkpoint
from conspo.serving import ServedModel, publish_served_model, publish_verifiers


def _refused(api, error_of, body, code: str, redis_client, keys) -> dict:
    error = error_of(api.http.post("/v1/prompts", json=body), 422, code)
    assert redis_client.xlen(keys.prompts) == 0 and not redis_client.exists(keys.prompt_ids)
    return error


@pytest.mark.parametrize(
    ("body", "code", "field"),
    [
        ({"text": "", "answer": "2"}, "empty_prompt", "text"),
        ({"text": " \n\t", "answer": "2"}, "empty_prompt", "text"),
        ({"messages": [{"role": "user", "content": " "}], "answer": "2"}, "empty_prompt",
         "messages"),
        ({"text": "1+1", "answer": ""}, "empty_answer", "answer"),
        ({"text": "1+1", "answer": "   "}, "empty_answer", "answer"),
    ],
)  # fmt: skip
def test_empty_prompts_and_answers_are_refused(
    api, error_of, redis_client, keys, body, code, field
):
    error = _refused(api, error_of, body, code, redis_client, keys)
    assert error["details"][0]["loc"] == ["body", "prompts", "0", field]
    assert "empty" in error["message"] or "no content" in error["message"]


def test_a_verifier_nobody_offers_is_refused(api, error_of, redis_client, keys):
    # No replica has published yet: the api's setting (the built-ins) decides.
    error = _refused(
        api, error_of, {"text": "1+1", "answer": "2", "verifier": "maht"}, "unknown_verifier",
        redis_client, keys,
    )  # fmt: skip
    assert error["message"] == (
        "no verifier named 'maht': no verifier has started yet; the api's `verifiers` setting "
        "allows arith, exact, math"
    )
    # A replica published its names, a plugin among them: those count now, the setting no more.
    publish_verifiers(redis_client, keys, ["arith", "my_plugin"])
    ok = api.http.post("/v1/prompts", json={"text": "1+1", "answer": "2", "verifier": "my_plugin"})
    assert ok.status_code == 202, ok.text
    batch = {"prompts": [{"text": "1+1", "answer": "2", "verifier": "arith"},
                         {"text": "1+1", "answer": "2", "verifier": "math"}]}  # fmt: skip
    error = error_of(api.http.post("/v1/prompts", json=batch), 422, "unknown_verifier")
    assert error["message"] == (
        "prompt 1: no verifier named 'math': the verifier replicas offer arith, my_plugin"
    )
    assert error["details"][0]["loc"] == ["body", "prompts", "1", "verifier"]
    assert redis_client.xlen(keys.prompts) == 1  # the refused batch left nothing behind


def test_a_prompt_longer_than_the_served_context_is_refused(api, error_of, redis_client, keys):
    long_text = "1+1=2, " * 20  # 140 characters
    assert api.http.post("/v1/prompts", json={"text": long_text, "answer": "2"}).status_code == 202
    # A generator published its model; its tokenizer folder is readable from here.
    model = Path(default_checkpoint())
    publish_served_model(
        redis_client,
        keys,
        ServedModel(max_model_len=64, tokenizer_path=str(model), max_token_chars=1),
    )
    error = error_of(
        api.http.post("/v1/prompts", json={"text": long_text, "answer": "2"}),
        422,
        "prompt_too_long",
    )
    assert error["message"].startswith("the prompt has at least 140 tokens (counted with the")
    assert error["message"].endswith("context is 64 tokens, which leaves no room for a completion")
    assert api.http.post("/v1/prompts", json={"text": "1+1=", "answer": "2"}).status_code == 202
    chat = {"messages": [{"role": "user", "content": long_text}], "answer": "2"}
    error_of(api.http.post("/v1/prompts", json=chat), 422, "prompt_too_long")
    # Without a tokenizer here: the bound by the longest token (4 characters) still refuses.
    publish_served_model(
        redis_client,
        keys,
        ServedModel(max_model_len=32, tokenizer_path="/nowhere/on/this/host", max_token_chars=4),
    )
    error = error_of(
        api.http.post("/v1/prompts", json={"text": long_text, "answer": "2"}),
        422,
        "prompt_too_long",
    )
    assert "at least 35 tokens (140 characters, at most 4 per token" in error["message"]
    assert api.http.post("/v1/prompts", json={"text": "x" * 124, "answer": "2"}).status_code == 202
    assert redis_client.xlen(keys.prompts) == 3


def test_a_prompt_id_names_one_prompt_for_the_whole_run(api, error_of, redis_client, keys):
    first = api.http.post("/v1/prompts", json={"prompt_id": "q-7", "text": "1+1", "answer": "2"})
    assert first.status_code == 202, first.text
    entry = first.json()["entry_ids"]
    # The identical prompt again (another request, no Idempotency-Key): replayed, not enqueued.
    again = api.http.post("/v1/prompts", json={"prompt_id": "q-7", "text": "1+1", "answer": "2"})
    assert again.status_code == 202
    assert (again.json()["entry_ids"], again.json()["replayed"]) == (entry, ["q-7"])
    # Another prompt under that id: 409, and nothing of the request is enqueued.
    batch = {"prompts": [{"prompt_id": "q-8", "text": "2+2", "answer": "4"},
                         {"prompt_id": "q-7", "text": "1+2", "answer": "3"}]}  # fmt: skip
    error = error_of(api.http.post("/v1/prompts", json=batch), 409, "prompt_id_conflict")
    assert error["message"].startswith(f"prompt_id 'q-7' is already used in this run by another "
                                       f"prompt (entry {entry[0]})")  # fmt: skip
    assert error["details"][0]["loc"] == ["body", "prompts", "1", "prompt_id"]
    assert redis_client.xlen(keys.prompts) == 1
    assert redis_client.hget(keys.counters, "api.prompts_accepted") == b"1"
    # Known and new ids together: the known one is replayed, the new one enqueued.
    mixed = {"prompts": [{"prompt_id": "q-7", "text": "1+1", "answer": "2"},
                         {"prompt_id": "q-9", "text": "3+3", "answer": "6"}]}  # fmt: skip
    body = api.http.post("/v1/prompts", json=mixed).json()
    assert body["entry_ids"][0] == entry[0] and body["replayed"] == ["q-7"]
    assert redis_client.xlen(keys.prompts) == 2
    assert redis_client.hget(keys.counters, "api.prompts_accepted") == b"2"


def test_one_prompt_id_raced_from_two_replicas_is_enqueued_once(
    start_api, redis_client, keys, error_of
):
    replicas = [start_api(), start_api()]
    responses = []
    barrier = threading.Barrier(8)

    def submit(i: int) -> None:
        body = {"prompt_id": "race-1", "text": f"{i}+1", "answer": str(i + 1)}
        barrier.wait()
        responses.append(replicas[i % 2].http.post("/v1/prompts", json=body))

    threads = [threading.Thread(target=submit, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert sorted(r.status_code for r in responses) == [202] + [409] * 7
    for r in responses:
        if r.status_code == 409:
            error_of(r, 409, "prompt_id_conflict")
    assert redis_client.xlen(keys.prompts) == 1


def test_datasets_are_refused_for_a_verifier_nobody_offers_and_rows_too_long(
    api, error_of, redis_client, keys
):
    rows = [{"q": "1+1", "a": "2"}, {"q": "x" * 400, "a": "3"}]
    spec = {"rows": rows, "prompt_field": "q", "answer_field": "a"}
    publish_verifiers(redis_client, keys, ["arith"])
    error = error_of(
        api.http.post("/v1/datasets", json={**spec, "verifier": "math"}), 422, "unknown_verifier"
    )
    assert "the verifier replicas offer arith" in error["message"]
    assert not redis_client.exists(keys.datasets)
    publish_served_model(
        redis_client, keys, ServedModel(max_model_len=64, tokenizer_path=None, max_token_chars=4)
    )
    response = api.http.post("/v1/datasets", json={**spec, "verifier": "arith"})
    assert response.status_code == 201, response.text
    info = response.json()
    assert (info["rows"], info["rejected_count"]) == (1, 1)
    assert info["rejected"][0]["line"] == 2
    assert info["rejected"][0]["reason"].startswith("the prompt has at least 100 tokens")


def test_the_kept_admission_is_used_only_while_current(api, error_of, redis_client, keys):
    """One round trip per request (the publish script) while nothing changes; a worker that
    publishes new names is heeded at once, as if every request had read them."""
    ok = {"text": "1+1", "answer": "2", "verifier": "math"}
    assert api.http.post("/v1/prompts", json=ok).status_code == 202  # reads the admission

    def calls(command: str) -> int:
        return int(redis_client.info("commandstats").get(f"cmdstat_{command}", {}).get("calls", 0))

    before = {c: calls(c) for c in ("smembers", "evalsha")}  # the feeder polls with GETs
    for i in range(5):
        body = {**ok, "text": f"{i}+1"}
        assert api.http.post("/v1/prompts", json=body).status_code == 202
    assert calls("smembers") == before["smembers"]  # the admission read pipelines SMEMBERS
    assert calls("evalsha") == before["evalsha"] + 5

    publish_verifiers(redis_client, keys, ["arith"])  # "math" is no longer offered
    length = redis_client.xlen(keys.prompts)
    error_of(api.http.post("/v1/prompts", json=ok), 422, "unknown_verifier")
    assert redis_client.xlen(keys.prompts) == length
    publish_verifiers(redis_client, keys, ["math"])  # and offered again: no stale refusal
    assert api.http.post("/v1/prompts", json={**ok, "text": "9+9"}).status_code == 202
