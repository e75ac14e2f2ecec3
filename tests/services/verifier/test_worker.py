"""The verifier service against real Redis: labels, exactly-once, replicas that die."""

from __future__ import annotations

import functools
import os
import signal
import subprocess
import sys

import pytest

from conspo.keys import Keys
from conspo.lineage import VERIFY
from conspo.protocol import (
    Completion,
    DeadLetter,
    LabeledGroup,
    Prompt,
    RolloutGroup,
    SamplingParams,
    Verdict,
    decode,
)
from conspo.queue import StreamQueue
from conspo.service import ServiceRuntime
from conspo.settings import VerifierSettings, load
from conspo.testing import wait_for
from services.verifier.worker import VerifierWorker, make_pool


def group(i: int, texts: list[str], answer: str, verifier: str) -> RolloutGroup:
    return RolloutGroup(
        group_id=f"g-{i}",
        prompt=Prompt(
            prompt_id=f"p-{i}", text="q", answer=answer, verifier=verifier, created_at=1.0
        ),
        prompt_token_ids=[1, 2],
        completions=[
            Completion(token_ids=[3], logprobs=[-0.1], text=t, finish_reason="stop") for t in texts
        ],
        policy_version=0,
        sampling=SamplingParams(n=len(texts)),
        created_at=1.0,
    )


def labeled_entries(client, keys: Keys) -> list[LabeledGroup]:
    return [decode(f[b"d"], LabeledGroup) for _, f in client.xrange(keys.labeled)]


@pytest.fixture
def worker(redis_url, run_name):
    settings = load(VerifierSettings, redis_url=redis_url, run=run_name, timeout_s=3.0, block_ms=50)
    with ServiceRuntime(settings, "verifier") as runtime:
        w = VerifierWorker(runtime, settings, functools.partial(make_pool, settings))
        yield w
        if w.pool is not None:
            w.pool.close()


def drain(w: VerifierWorker, expected: int) -> None:
    done = 0
    for _ in range(200):
        done += w.step()
        if done >= expected:
            return
    raise AssertionError(f"only {done} of {expected} groups labelled")


def test_groups_are_labelled_with_the_named_verifier(worker, redis_client, keys):
    q = StreamQueue(redis_client, keys, "rollouts", RolloutGroup)
    q.publish(
        group(1, ["\\boxed{\\frac{1}{2}}", "so 0.5", "\\boxed{0.33}", ""], "1/2", "math"), "g-1"
    )
    q.publish(group(2, ["46", "45", "x"], "46", "arith"), "g-2")
    q.publish(group(3, ["hi"], "x", "no-such-verifier"), "g-3")
    drain(worker, 3)
    out = {g.group_id: g for g in labeled_entries(redis_client, keys)}
    assert [lb.verdict for lb in out["g-1"].labels] == [
        Verdict.CORRECT,
        Verdict.NO_ANSWER,
        Verdict.WRONG,
        Verdict.NO_ANSWER,
    ]
    assert out["g-1"].rewards == [1.0, 0.0, 0.0, 0.0]
    assert [lb.verdict for lb in out["g-2"].labels] == [
        Verdict.CORRECT,
        Verdict.WRONG,
        Verdict.NO_ANSWER,
    ]
    assert out["g-3"].labels[0].verdict == Verdict.ERROR
    assert "no-such-verifier" in out["g-3"].labels[0].detail
    counters = {k.decode(): int(v) for k, v in redis_client.hgetall(keys.counters).items()}
    assert counters["verifier.groups"] == 3
    assert counters["verifier.completions"] == 8
    assert counters["verifier.verdict.correct"] == 2
    assert q.backlog().outstanding == 0


def test_a_group_delivered_twice_is_labelled_once(worker, redis_client, keys):
    q = StreamQueue(redis_client, keys, "rollouts", RolloutGroup)
    q.publish(group(4, ["7"], "7", "arith"), "g-4")
    drain(worker, 1)
    q.publish(group(4, ["7"], "7", "arith"), "g-4")  # redelivered after a crash upstream
    for _ in range(5):
        worker.step()
    assert len(labeled_entries(redis_client, keys)) == 1
    assert q.backlog().outstanding == 0
    assert redis_client.get(keys.done(VERIFY, "g-4")) == redis_client.xrange(keys.labeled)[0][0]


def test_undecodable_rollout_is_dead_lettered(worker, redis_client, keys):
    q = StreamQueue(redis_client, keys, "rollouts", RolloutGroup)
    q.ensure_group()
    redis_client.xadd(keys.rollouts, {"k": "g-bad", "d": b"\x00not msgpack"})
    worker.step()
    [(_, fields)] = redis_client.xrange(keys.dead)
    letter = decode(fields[b"d"], DeadLetter)
    assert letter.source == "rollouts"
    assert "undecodable" in letter.reason
    assert labeled_entries(redis_client, keys) == []


def test_a_latex_bomb_costs_at_most_the_timeout(redis_url, run_name, redis_client, keys):
    settings = load(VerifierSettings, redis_url=redis_url, run=run_name, timeout_s=1.0)
    with ServiceRuntime(settings, "verifier") as runtime:
        w = VerifierWorker(runtime, settings, functools.partial(make_pool, settings))
        try:
            q = StreamQueue(redis_client, keys, "rollouts", RolloutGroup)
            bomb = "\\boxed{" + "9^{" * 6 + "9" + "}" * 7
            q.publish(group(5, [bomb, "\\boxed{3}"], "3", "math"), "g-5")
            drain(w, 1)
        finally:
            if w.pool is not None:
                w.pool.close()
    [out] = labeled_entries(redis_client, keys)
    assert out.labels[1].verdict == Verdict.CORRECT
    assert out.labels[0].verdict in (Verdict.TIMEOUT, Verdict.WRONG, Verdict.ERROR)
    assert out.verify_seconds < 30


def start_replica(redis_url: str, run: str) -> subprocess.Popen:
    env = {
        **os.environ,
        "CONSPO_REDIS_URL": redis_url,
        "CONSPO_RUN": run,
        "CONSPO_VISIBILITY_TIMEOUT_S": "2",
        "CONSPO_GROUPS_PER_READ": "16",
        "CONSPO_BLOCK_MS": "100",
        "CONSPO_LOG_LEVEL": "WARNING",
    }
    return subprocess.Popen([sys.executable, "-m", "conspo.cli", "verifier"], env=env)


@pytest.mark.slow
def test_three_replicas_one_killed_every_group_labelled_exactly_once(redis_url, redis_client, keys):
    n = 2000
    q = StreamQueue(redis_client, keys, "rollouts", RolloutGroup)
    replicas = [start_replica(redis_url, keys.run) for _ in range(3)]
    try:
        for start in range(0, n, 250):
            q.publish_many(
                [
                    (group(i, [str(i), str(i + 1)], str(i), "arith"), f"g-{i}")
                    for i in range(start, start + 250)
                ]
            )
        assert wait_for(lambda: redis_client.xlen(keys.labeled) >= n // 4, timeout=120)
        replicas[1].send_signal(signal.SIGKILL)
        replicas[1].wait(timeout=10)
        assert wait_for(lambda: redis_client.xlen(keys.labeled) >= n, timeout=240)
        assert wait_for(lambda: q.backlog().outstanding == 0, timeout=60)
    finally:
        for r in replicas:
            r.send_signal(signal.SIGTERM)
        codes = [r.wait(timeout=60) for r in replicas]
    assert codes[0] == 0
    assert codes[2] == 0
    out = labeled_entries(redis_client, keys)
    ids = [g.group_id for g in out]
    assert len(ids) == n
    assert set(ids) == {f"g-{i}" for i in range(n)}
    assert all(g.labels[0].verdict == Verdict.CORRECT for g in out)
    assert all(g.labels[1].verdict == Verdict.WRONG for g in out)
    assert redis_client.xlen(keys.dead) == 0
    beats = redis_client.hgetall(keys.heartbeats)
    assert len([k for k in beats if k.startswith(b"verifier:")]) == 3


def test_the_replica_publishes_the_verifiers_it_offers_plugins_included(
    redis_url, run_name, redis_client, keys, tmp_path
):
    import uuid

    from conspo.protocol import Heartbeat
    from conspo.serving import read_verifiers
    from services.verifier.verifiers import unregister

    name = f"test-plugin-{uuid.uuid4().hex[:8]}"
    plugin = tmp_path / "my_verifier.py"
    plugin.write_text(
        "from services.verifier.verifiers import register\n\n\n"
        f"@register({name!r})\n"
        "def grade(completion, gold, config):\n"
        "    raise NotImplementedError\n"
    )
    settings = load(
        VerifierSettings, redis_url=redis_url, run=run_name, block_ms=50, plugins=[str(plugin)]
    )
    try:
        with ServiceRuntime(settings, "verifier") as runtime:
            w = VerifierWorker(runtime, settings, functools.partial(make_pool, settings))
            runtime.request_stop()
            w.run()  # publishes, then returns at once (asked to stop)
            assert read_verifiers(redis_client, keys) == {"arith", "exact", "math", name}
            runtime.beat()
            raw = redis_client.hget(keys.heartbeats, f"verifier:{runtime.instance}")
            assert name in str(decode(raw, Heartbeat).info["verifiers"]).split(",")
    finally:
        unregister(name)
