"""Admission control against real Redis: the in-flight budget and the staleness gate."""

from __future__ import annotations

import time

from conspo.flow import CONSUMED, PRODUCED, FlowControl
from conspo.settings import RunSettings
from conspo.state import RunStore


def make(redis_client, keys, **kw) -> FlowControl:
    return FlowControl(
        redis_client, keys, batch_groups=kw.pop("b", 4), max_staleness=kw.pop("s", 0), **kw
    )


def produce(redis_client, keys, n):
    redis_client.hincrby(keys.counters, PRODUCED, n)


def test_synchronous_budget_is_one_batch(redis_client, keys):
    flow = make(redis_client, keys, b=4, s=0)
    assert flow.reserve("g1", 10, served_version=0) == 4
    assert flow.reserve("g2", 10, served_version=0) == 0  # g1 holds the whole budget
    produce(redis_client, keys, 4)
    flow.release("g1")
    assert flow.reserve("g2", 10, served_version=0) == 0  # produced but not yet consumed
    flow.consumed(1)  # the learner skipped one uninformative group: one more may be made
    assert flow.reserve("g2", 10, served_version=0) == 1


def test_max_staleness_widens_the_window(redis_client, keys):
    flow = make(redis_client, keys, b=4, s=2)
    assert flow.reserve("g1", 100, served_version=0) == 12


def test_generator_too_far_behind_the_learner_must_wait(redis_client, keys):
    flow = make(redis_client, keys, b=4, s=1)
    redis_client.hset(keys.state, "policy_version", 3)
    assert flow.reserve("g1", 4, served_version=1) == 0
    assert flow.reserve("g1", 4, served_version=2) == 4


def test_the_learners_announced_limits_are_the_ones_enforced(redis_client, keys):
    flow = make(redis_client, keys, b=4, s=0)  # a generator's own (agreeing) values
    RunStore(redis_client, keys).announce_run(RunSettings(batch_groups=2, max_staleness=1))
    assert flow.reserve("g1", 100, served_version=0) == 4


def test_a_follower_gets_nothing_until_the_learner_has_announced(redis_client, keys):
    flow = FlowControl(redis_client, keys, batch_groups=None, max_staleness=None)
    assert flow.reserve("g1", 100, served_version=0) == 0
    assert not redis_client.hexists(keys.flow_leases, "g1")  # and holds no lease
    RunStore(redis_client, keys).announce_run(RunSettings(batch_groups=3, max_staleness=0))
    assert flow.reserve("g1", 100, served_version=0) == 3


def test_a_dead_generators_lease_expires(redis_client, keys):
    flow = make(redis_client, keys, b=4, s=0, lease_ttl_s=0.2)
    assert flow.reserve("dead", 4, served_version=0) == 4
    assert flow.reserve("alive", 4, served_version=0) == 0
    time.sleep(0.3)
    assert flow.reserve("alive", 4, served_version=0) == 4
    assert redis_client.hget(keys.counters, CONSUMED) is None


def test_budget_is_tied_to_the_generators_own_version(redis_client, keys):
    flow = make(redis_client, keys, b=4, s=1)
    produce(redis_client, keys, 8)
    flow.consumed(8)  # two steps trained: consumption alone would allow 8 more
    redis_client.hset(keys.state, "policy_version", 2)
    assert flow.reserve("g1", 100, served_version=1) == 4  # (1 + 1 + 1) * 4 - 8
    assert flow.reserve("g1", 100, served_version=2) == 8


def test_skipped_groups_widen_the_version_budget(redis_client, keys):
    flow = make(redis_client, keys, b=4, s=0)
    produce(redis_client, keys, 4)
    flow.consumed(3)  # three all-equal groups skipped at version 0: three more are needed
    assert flow.reserve("g1", 100, served_version=0) == 3


def test_a_renewed_lease_outlives_its_ttl_and_a_released_one_is_not_revived(redis_client, keys):
    flow = make(redis_client, keys, b=4, s=0, lease_ttl_s=0.5)
    assert flow.reserve("busy", 4, served_version=0) == 4
    for _ in range(4):  # a long engine call: the heartbeat renews the lease meanwhile
        time.sleep(0.25)
        assert flow.renew("busy")
    assert flow.reserve("other", 4, served_version=0) == 0  # 1 s later, still held
    flow.release("busy")
    assert not flow.renew("busy")  # a beat after the release does not bring it back
    assert flow.reserve("other", 4, served_version=0) == 4


# -- waking instead of polling ---------------------------------------------------------------------
def test_a_wait_with_nothing_new_ends_at_its_timeout(redis_client, keys):
    flow = make(redis_client, keys, b=4, s=0)
    flow.reserve("g1", 4, served_version=0)
    t0 = time.monotonic()
    assert flow.wait(0.2) is False
    assert 0.15 <= time.monotonic() - t0 < 5.0


def test_consumption_between_the_decision_and_the_wait_is_not_lost(redis_client, keys):
    flow = make(redis_client, keys, b=4, s=0)
    produce(redis_client, keys, 4)
    assert flow.reserve("g1", 4, served_version=0) == 0  # nothing consumed yet: wait
    learner = make(redis_client, keys, b=4, s=0)
    learner.consumed(4)  # lands before the generator starts waiting
    t0 = time.monotonic()
    assert flow.wait(30.0) is True
    assert time.monotonic() - t0 < 5.0  # at once, not after the 30 s bound
    assert flow.wait(0.1) is False  # the same wake-up does not wake twice
    assert flow.reserve("g1", 4, served_version=0) == 4


def test_staged_weights_wake_a_waiting_generator(redis_client, keys):
    import threading

    flow = make(redis_client, keys, b=4, s=0)
    flow.reserve("g1", 4, served_version=0)
    woke: list[bool] = []
    waiter = threading.Thread(target=lambda: woke.append(flow.wait(30.0)))
    waiter.start()
    time.sleep(0.2)
    make(redis_client, keys, b=4, s=0).notify("staged")
    waiter.join(timeout=10)
    assert woke == [True]
