"""What every service process does for the run beside its own work: tending the dead."""

from __future__ import annotations

import time

import pytest

from conspo.protocol import Heartbeat, Prompt
from conspo.queue import StreamQueue
from conspo.service import FORGET_EVERY_S, ServiceRuntime
from conspo.settings import CommonSettings, load


@pytest.fixture
def runtime(redis_url, run_name):
    settings = load(CommonSettings, redis_url=redis_url, run=run_name, heartbeat_s=0.5,
                    forget_gone_after_s=60)  # fmt: skip
    rt = ServiceRuntime(settings, "generator", instance="generator-me")
    yield rt
    rt.client.close()


def beat(rt: ServiceRuntime, instance: str, age_s: float, service: str = "generator") -> None:
    rt.store.heartbeat(
        Heartbeat(
            service=service,
            instance=instance,
            host="h",
            pid=1,
            status="running",
            at=time.time() - age_s,
        )
    )


def test_a_dead_replicas_entries_come_back_and_its_consumer_goes(runtime, keys):
    q = StreamQueue(runtime.client, keys, "prompts", Prompt, visibility_timeout_s=600)
    for i in range(3):
        q.publish(Prompt(prompt_id=f"p-{i}", text="1+1=", answer="2", verifier="arith"), f"p-{i}")
    beat(runtime, "generator-me", 0)
    beat(runtime, "generator-alive", 0)
    beat(runtime, "generator-dead", 30)  # 60 beats old: gone
    q.read("generator-dead", count=2, block_ms=None)
    q.read("generator-alive", count=1, block_ms=None)
    assert runtime.hand_back_from_the_dead(q) == 2
    names = {c["name"].decode() for c in runtime.client.xinfo_consumers(q.key, q.group)}
    assert names == {"generator-alive", "released"}
    assert len(q.read("generator-me", count=3, block_ms=None)) == 2  # handed back, not lost


def test_heartbeats_silent_for_long_are_forgotten_at_most_once_a_minute(runtime):
    beat(runtime, "generator-fresh", 1)
    beat(runtime, "verifier-gone", 30, service="verifier")  # gone, still listed
    beat(runtime, "api-long-gone", 61, service="api")
    assert runtime.forget_the_long_gone(now=1000.0) == 1
    assert {b.instance for b in runtime.store.heartbeats()} == {"generator-fresh", "verifier-gone"}
    beat(runtime, "verifier-gone", 61, service="verifier")
    assert runtime.forget_the_long_gone(now=1000.0 + FORGET_EVERY_S / 2) == 0  # not yet
    assert runtime.forget_the_long_gone(now=1000.0 + FORGET_EVERY_S) == 1
    assert {b.instance for b in runtime.store.heartbeats()} == {"generator-fresh"}


def test_every_beat_tends_to_the_long_gone(runtime):
    beat(runtime, "api-long-gone", 61, service="api")
    runtime.beat()  # writes our own heartbeat and forgets the old one
    assert {b.instance for b in runtime.store.heartbeats()} == {"generator-me"}
