"""Faults on the Redis side, on one running stack: a bad network, restarts with persistence,
and finally a restart without persistence (the state is wiped).

Every service reaches Redis through ``ChaosProxy`` (an asyncio TCP proxy in the test process)
in front of a private redis-server with AOF (``appendfsync always``, so even a SIGKILL loses no
acknowledged write). The tests of this module run in order on that one stack (starting a stack
costs tens of seconds on a small CPU), each with its own faults, rows and exact books (a frozen
snapshot); the wipe comes last because it destroys the run.

- network: latency on every chunk, connections cut at random, and replies lost after Redis ran
  the command (the case that tests whether every retried command is idempotent). Services
  reconnect (their clients retry with backoff), nothing exits, training continues, nothing is
  lost or counted twice. A 5 s visibility timeout bounds how long an entry whose XREADGROUP
  reply was lost waits before it is reclaimed.
- restart with AOF, same port, alternately SIGTERM (clean shutdown) and SIGKILL (crash): the
  services ride through and carry on.
- restart without persistence: the run's incarnation key is gone (``conspo.incarnation``), so
  the api's /v1/status says ``redis_state_lost``, every service's heartbeat says ``redis state
  lost``, each logs it as an error and counts it. Nothing pretends the run is merely idle.
"""

from __future__ import annotations

import os
import signal
import time
from types import SimpleNamespace

import pytest

from conspo.protocol import Heartbeat, decode

pytestmark = [pytest.mark.chaos, pytest.mark.timeout(900)]


@pytest.fixture(scope="module")
def world(chaos_stack, redis_server, chaos_proxy):
    server = redis_server(appendonly=True, fsync="always")
    proxy = chaos_proxy(
        server.port,
        seed=int(os.environ.get("CONSPO_CHAOS_SEED", "0")),
        latency_ms=(0.0, 10.0),
        spike_ms=200.0,
        spike_p=0.005,
        drop_per_s=0.5,
        reply_loss_p=0.01,
    )
    proxy.dropping = False  # calm weather unless a test says otherwise
    stack = chaos_stack(
        "redis", redis_url_=proxy.url, env={"all": {"CONSPO_VISIBILITY_TIMEOUT_S": "5"}}
    )
    stack.ensure_fed(seed=4)
    return SimpleNamespace(server=server, proxy=proxy, stack=stack, client=stack.direct(server.url))


def _all_in_flight(world, kit) -> list[str]:
    out: list[str] = []
    for stream in ("prompts", "rollouts", "labeled"):
        out += kit.in_flight(world.client, world.stack.keys, stream, lambda consumer: True)
    return out


def test_network_latency_drops_and_lost_replies(world, kit, chaos_table, phases):
    started = time.monotonic()
    stack, proxy, client = world.stack, world.proxy, world.client
    stack.wait_step(stack.step(client) + 1, client=client)
    phases("warm")
    before = dict(proxy.stats)
    step = stack.step(client)
    # Clients posting prompts with and without an Idempotency-Key while the api's own Redis
    # connection suffers: whatever a retry does, the books must count it.
    submitters = [
        kit.Submitter(stack, kit.arith_rows(6, 400), backlog=0, batch=2, trickle_s=1.0),
        kit.Submitter(
            stack, kit.arith_rows(7, 400), backlog=0, batch=2, trickle_s=1.0, idempotent=False
        ),
    ]
    proxy.dropping = True
    duration = 60.0 if kit.LONG else 12.0
    try:
        for submitter in submitters:
            submitter.start()
        deadline = time.monotonic() + duration
        while time.monotonic() < deadline:
            stack.check_alive()
            time.sleep(0.5)
        stack.wait_step(step + 3, client=client)  # training went on through it
    finally:
        proxy.dropping = False
        for submitter in submitters:
            submitter.stop()
    assert not any(s.errors for s in submitters), [s.errors[:3] for s in submitters]
    phases("bad network")
    cut = proxy.stats["dropped"] - before.get("dropped", 0)
    lost_replies = proxy.stats["replies_lost"] - before.get("replies_lost", 0)
    assert cut + lost_replies >= 3, proxy.stats

    accounting, fates = stack.frozen_books()
    totals = kit.check_books(accounting, fates)
    assert totals["trained"] > 0
    chaos_table(
        kit.Row(
            fault="Redis network: latency, cuts, lost replies",
            scenario="redis",
            injected=cut + lost_replies,
            accounting=accounting,
            fates=totals,
            notes=f"{duration:.0f}s of 0-10 ms per chunk (0.5% 200 ms spikes), each connection "
            f"cut after Exp(0.5/s), 1% of replies lost after Redis ran the command: {cut} "
            f"connections cut, {lost_replies} replies lost",
            wall_s=time.monotonic() - started,
        )
    )


def test_redis_restart_with_aof(world, kit, rng, chaos_table, phases):
    started = time.monotonic()
    stack, server, client = world.stack, world.server, world.client
    stack.wait_step(stack.step(client) + 1, client=client)
    restarts = 4 if kit.LONG else 2
    hits: list[str] = []
    for i in range(restarts):
        time.sleep(rng.uniform(0.3, 2.0))
        hits += _all_in_flight(world, kit)
        step = stack.step(client)
        sig = signal.SIGTERM if i % 2 == 0 else signal.SIGKILL
        down_s = rng.uniform(1.0, 6.0 if kit.LONG else 2.5)
        server.restart(appendonly=True, down_s=down_s, sig=sig, fsync="always")
        stack.wait_step(step + 2, client=client)  # and check_alive: nobody exited
        phases(f"restart {i + 1} ({signal.Signals(sig).name})")

    accounting, fates = stack.frozen_books()
    totals = kit.check_books(accounting, fates)
    hit = kit.summarize(fates, hits)
    assert hit.get("lost", 0) == 0, hit
    chaos_table(
        kit.Row(
            fault="Redis restart, AOF on",
            scenario="redis",
            injected=restarts,
            accounting=accounting,
            fates=totals,
            hit=hit,
            notes="alternately SIGTERM and SIGKILL (appendfsync always), same port; hit = every "
            "group in flight anywhere at the restart",
            wall_s=time.monotonic() - started,
        )
    )


def test_redis_wipe_is_detected_and_reported(world, kit, chaos_table, phases):
    started = time.monotonic()
    stack, server, client = world.stack, world.server, world.client
    stack.wait_step(stack.step(client) + 1, client=client)
    submitted = sum(
        int(x or 0)
        for x in client.hmget(stack.keys.counters, "api.prompts_fed", "api.prompts_accepted")
    )
    lost_at = time.monotonic()
    server.restart(appendonly=False, down_s=0.5, sig=signal.SIGTERM, fsync="everysec")

    def api_says_lost() -> dict | None:
        with stack.http(timeout=5) as http:
            body = http.get("/v1/status").json()
        return body if body.get("redis_state") == "lost" else None

    status = kit.wait_until(api_says_lost, 60, "the api to report the loss")
    assert status["status"] == "redis_state_lost"
    assert "redis state lost" in status["redis_state_detail"]

    def reporting() -> set[str]:
        beats = [decode(raw, Heartbeat) for raw in client.hgetall(stack.keys.heartbeats).values()]
        return {
            b.service
            for b in beats
            if b.info.get("redis_state") == "lost" and "redis state lost" in (b.last_error or "")
        }

    expected = {"api", "generator", "verifier", "learner"}
    kit.wait_until(lambda: reporting() >= expected, 60, f"heartbeats of {sorted(expected)}")
    detected_s = time.monotonic() - lost_at
    counted = int(client.hget(stack.keys.counters, "redis.state_lost") or 0)
    assert counted >= len(expected), counted
    for proc in stack.procs:
        assert "redis state lost" in proc.log.read_text(errors="replace"), proc.name
    with stack.http(timeout=5) as http:
        assert http.get("/readyz").status_code == 200  # Redis answers: only its state is gone
    phases("detected")
    chaos_table(
        kit.Row(
            fault="Redis restart, no persistence",
            scenario="redis",
            injected=1,
            accounting={"submitted": submitted},
            fates=kit.summarize({}),
            counts_na=True,
            notes=f"state wiped: detected in {detected_s:.1f}s by the api (/v1/status "
            f"redis_state=lost) and by {sorted(expected)} (heartbeat, ERROR log, counter "
            "redis.state_lost); the other counts are n/a after a wipe",
            wall_s=time.monotonic() - started,
        )
    )
