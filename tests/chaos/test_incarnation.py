"""``conspo.incarnation``: the run's state vanishing is noticed by every process, once each, and
stays noticed; an outage is not a loss."""

from __future__ import annotations

import pytest
import redis
from redis.backoff import NoBackoff
from redis.retry import Retry

from conspo.incarnation import LOST, TOMBSTONE, Incarnation

pytestmark = pytest.mark.chaos


def test_first_process_writes_the_token_and_the_others_adopt_it(redis_client, keys):
    a, b = Incarnation(redis_client, keys, "a"), Incarnation(redis_client, keys, "b")
    sa, sb = a.check(), b.check()
    assert sa.token and sa.token == sb.token and not sa.lost and not sb.lost
    assert redis_client.get(keys.incarnation).decode() == sa.token
    assert a.check() == sa  # nothing changed, nothing reported


def test_a_vanished_key_is_a_loss_reported_once_and_left_as_a_tombstone(redis_client, keys):
    a, b = Incarnation(redis_client, keys, "a"), Incarnation(redis_client, keys, "b")
    token = a.check().token
    b.check()
    redis_client.delete(keys.incarnation)  # what a restart without persistence does
    state = a.check()
    assert state.lost and state.detections == 1 and state.detail.startswith(LOST)
    assert "vanished" in state.detail
    stored = redis_client.get(keys.incarnation).decode()
    assert stored.startswith(f"{TOMBSTONE}{token}:") and stored.endswith(":a")
    assert a.check().detections == 1  # sticky, not re-counted
    other = b.check()  # the other process learns it from the tombstone
    assert other.lost and "another process" in other.detail
    late = Incarnation(redis_client, keys, "late").check()  # and so does a process started later
    assert late.lost and late.token is None


def test_a_replaced_token_is_a_loss_too(redis_client, keys):
    a = Incarnation(redis_client, keys, "a")
    a.check()
    redis_client.set(keys.incarnation, "someone-started-afresh")
    state = a.check()
    assert state.lost and "changed" in state.detail
    assert redis_client.get(keys.incarnation).decode().startswith(TOMBSTONE)


def test_an_unreachable_redis_is_an_outage_not_a_loss(redis_client, keys):
    a = Incarnation(redis_client, keys, "a")
    a.check()
    down = redis.Redis(
        host="127.0.0.1", port=1, socket_connect_timeout=0.2, retry=Retry(NoBackoff(), 0)
    )
    a.client = down
    with pytest.raises(redis.ConnectionError):
        a.check()
    a.client = redis_client
    assert not a.check().lost
