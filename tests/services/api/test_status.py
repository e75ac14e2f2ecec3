"""GET /v1/runs/current and /v1/status: fields, counters, curves, queues, replicas, weights,
and no secret in the output."""

from __future__ import annotations

import time

import redis

from conspo.protocol import Heartbeat, Prompt, WeightAnnouncement
from conspo.queue import StreamQueue
from conspo.state import RunStore
from conspo.weight_sync.membership import report_served, write_announcement

REDIS_PASSWORD = "hunter2-redis-password"


def seed_run(redis_client, keys, token: str) -> None:
    store = RunStore(redis_client, keys)
    store.set_fields(status="running", step=12, policy_version=3, note="ok")
    store.incr({"learner.steps": 12, "verifier.groups": 40})
    for step in (1, 2, 3):
        store.append_point("train", {"step": step, "reward_mean": 0.1 * step, "loss": 1.0 / step})
    store.append_point("eval", {"step": 3, "accuracy": 0.42})
    now = time.time()
    store.heartbeat(
        Heartbeat(
            service="generator",
            instance="gen-a",
            host="h1",
            pid=11,
            status="running",
            last_error=f"lost redis://:{REDIS_PASSWORD}@redis:6379/0 (auth {token})",
            info={"served_version": 3},
            at=now,
        )
    )
    store.heartbeat(Heartbeat(service="generator", instance="gen-b", status="running", at=now - 60))
    store.heartbeat(Heartbeat(service="verifier", instance="ver-a", status="waiting", at=now))
    store.heartbeat(Heartbeat(service="learner", instance="learn-a", status="stopped", at=now))
    announcement = WeightAnnouncement(version=3, step=12, transport="checkpoint")
    write_announcement(redis_client, keys, announcement)
    report_served(redis_client, keys, "gen-a", 3)
    report_served(redis_client, keys, "gen-b", 2)
    redis_client.hset(keys.weights, "served:gen-c", "garbage")  # a foreign writer: left out
    prompts = StreamQueue(redis_client, keys, "prompts", Prompt)
    for i in range(3):
        prompts.publish(Prompt(prompt_id=f"p{i}", text="1+1", answer="2"), f"p{i}")
    prompts.read("gen-a", count=1, block_ms=None)  # one pending, two lagging


def test_run_status_reports_the_run(start_api, redis_url, redis_client, keys, token):
    seed_run(redis_client, keys, token)
    client = redis.Redis.from_url(redis_url)
    server = start_api(client=client, redis_password=REDIS_PASSWORD, heartbeat_s=2.0)
    response = server.http.get("/v1/runs/current")
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["run"] == keys.run
    assert (body["status"], body["step"], body["policy_version"]) == ("running", 12, 3)
    assert body["fields"]["note"] == "ok"
    assert body["counters"] == {"learner.steps": 12, "verifier.groups": 40}
    assert [p["step"] for p in body["curves"]["train"]] == [1, 2, 3]
    assert body["curves"]["train"][1]["reward_mean"] == 0.2
    assert body["curves"]["eval"] == [{"step": 3, "accuracy": 0.42}]
    assert body["queues"]["prompts"] == {"length": 3, "pending": 1, "lag": 2}
    assert body["queues"]["rollouts"] == {"length": 0, "pending": 0, "lag": 0}
    assert set(body["queues"]) == {"prompts", "rollouts", "labeled", "dead"}
    assert not redis_client.exists(keys.rollouts)  # a GET creates nothing

    by_instance = {s["instance"]: s for s in body["services"]}
    assert by_instance["gen-a"]["alive"] is True and by_instance["gen-a"]["state"] == "alive"
    assert by_instance["gen-b"]["alive"] is False and by_instance["gen-b"]["state"] == "gone"
    assert by_instance["gen-b"]["age_s"] >= 59
    assert by_instance["learn-a"]["state"] == "gone"  # said it stopped
    assert by_instance["ver-a"]["status"] == "waiting" and by_instance["ver-a"]["alive"]
    assert "lost redis://***@redis:6379/0" in by_instance["gen-a"]["last_error"]
    assert body["replicas"]["generator"] == {
        "alive": 1,
        "gone": 1,
        "instances": ["gen-a", "gen-b"],
    }
    assert body["replicas"]["verifier"]["alive"] == 1
    assert body["weights"] == {"current_version": 3, "served": {"gen-a": 3, "gen-b": 2}}

    assert REDIS_PASSWORD not in response.text
    assert token not in response.text
    alias = server.http.get("/v1/status", params={"points": 2})
    assert alias.status_code == 200
    assert [p["step"] for p in alias.json()["curves"]["train"]] == [2, 3]
    assert token not in alias.text and REDIS_PASSWORD not in alias.text


def test_an_empty_run_has_an_idle_status(api):
    body = api.http.get("/v1/status").json()
    assert body["status"] == "idle" and body["step"] is None
    assert body["services"] == [] and body["counters"] == {}
    assert body["queues"]["prompts"]["length"] == 0
    assert body["weights"] == {"current_version": None, "served": {}}


def test_garbage_written_by_others_does_not_break_the_page(api, redis_client, keys):
    redis_client.hset(keys.heartbeats, "x:y", b"\x00garbage")
    redis_client.hset(keys.counters, "odd", "not-a-number")
    redis_client.rpush(keys.metrics_series("train"), "{broken", '{"step": 1, "loss": NaN}')
    redis_client.hset(
        keys.state, mapping={"step": "twelve", "api_token": "leak-me-please", "bin": b"\xff\xfe"}
    )
    response = api.http.get("/v1/status")
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["services"] == [] and body["counters"] == {} and body["step"] is None
    assert body["curves"]["train"] == [{"step": 1, "loss": None}]
    assert "leak-me-please" not in response.text


def test_metric_names_mentioning_model_tokens_are_not_masked():
    from services.api.redact import redact_mapping

    out = redact_mapping(
        {"tokens_per_s": 812.5, "max_tokens": 8, "api_token": "x", "password": "y"}
    )
    assert out == {"tokens_per_s": 812.5, "max_tokens": 8, "api_token": "***", "password": "***"}


def test_waiting_says_why_the_learner_does_not_step_and_is_null_otherwise(api, redis_client, keys):
    from conspo.state import Waiting

    store = RunStore(redis_client, keys)
    store.set_fields(status="running", step=0)
    assert api.http.get("/v1/status").json()["waiting"] is None
    reason = "last 1,345 groups had equal rewards (all 0: verdicts no_answer 5,380): no contrast"
    store.set_waiting(
        Waiting(service="learner", code="all_equal_rewards", reason=reason, since=5.0)
    )
    body = api.http.get("/v1/status").json()
    assert body["waiting"] == {
        "service": "learner",
        "code": "all_equal_rewards",
        "reason": reason,
        "since": 5.0,
    }
    assert "waiting" not in body["fields"]
    redis_client.hset(keys.state, "waiting", "{not json")  # a foreign writer: no 500
    assert api.http.get("/v1/status").json()["waiting"] is None
    store.clear_waiting()
    assert api.http.get("/v1/status").json()["waiting"] is None


def test_the_weights_hash_is_read_without_torch():
    """The route reads the weights hash through ``conspo.weight_sync.membership``, which (with
    the package's lazy ``__init__``) loads no torch: the api stays light."""
    from conspo.testing import heavy_imports

    light = "import services.api.routes.status, conspo.weight_sync.membership, conspo.weight_sync"
    assert heavy_imports(light, ("torch",)) == []
    assert "torch" in heavy_imports("from conspo.weight_sync import WeightPublisher", ("torch",))
