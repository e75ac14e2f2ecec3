"""Admission control: how far generation may run ahead of training.

Every group sampled with policy version ``v`` and trained at learner version ``v_l`` has staleness
``v_l - v``. Bounding it by ``max_staleness`` means bounding the groups in flight: generators may
have at most ``(max_staleness + 1) * B`` groups produced or being produced beyond what the learner
has finished with (B = groups per learner step). ``max_staleness = 0`` is then exactly the
synchronous baseline: B groups are generated, the learner trains on them, pushes, and only then
does generation resume (with the new weights).

A second bound ties the budget to the generator's own weights: serving version ``v`` it may bring
the total produced to ``(v + s + 1) * B`` plus the groups the learner consumed without training
(skipped or dropped). Every step trains exactly B groups, so the t-th trained group is trained at
version ``t / B``: what is generated under this bound never arrives stale. Without it a generator
one version behind keeps producing groups that the learner then has to drop.

The accounting lives in Redis so any number of generators share one budget:

- ``generator.groups``: groups committed to ``rollouts`` (incremented inside the commit script);
- ``learner.groups_consumed``: groups the learner is done with (skipped and dropped ones as soon as
  they are seen, trained ones when their step completes);
- ``flow:leases``: groups each generator is producing right now, with an expiry, so a generator
  that dies mid-batch stops holding budget after ``lease_ttl_s``. A live generator renews its
  lease every heartbeat (``renew``), so the TTL can be a few heartbeats however long an engine
  call takes, and a SIGKILLed generator's budget comes back within seconds.

``reserve`` runs as one Lua script: it reads the three, grants what fits, and records the lease.
The learner announces ``batch_groups`` and ``max_staleness`` in the state hash at start-up
(``RunStore.announce_run``) and the script enforces those. A generator that follows the learner
(its own left unset) gets no budget before the learner has announced; one with its own values
(checked against the learner's: ``conspo.settings.check_run_settings``) uses them until then.

Waking instead of polling: a generator that gets no budget blocks on ``flow:wake``, a short
stream the learner appends to in the same transaction as every ``consumed`` increment (after it
has written the new policy version), and a generator appends to when it has staged new weights
(``notify``). ``reserve`` returns, atomically with its decision, the id of the newest wake-up,
and ``wait`` reads from there, so a wake-up that lands between the decision and the wait is
never lost; the wait still ends after its timeout (the old poll interval), so a missing
notification costs at most one poll interval, never a hang.
"""

from __future__ import annotations

import time

import redis

from conspo import counters
from conspo.keys import Keys
from conspo.state import POLICY_VERSION_FIELD

PRODUCED = counters.GENERATOR_GROUPS
CONSUMED = counters.LEARNER_GROUPS_CONSUMED
WAKE_KEEP = 64  # wake-ups kept in the stream: a waiter only needs the newest one

_RESERVE = """
-- KEYS: counters, leases, state, wake stream. ARGV: instance, want, B, max_staleness ('' for B
-- and s: only the learner's), now, ttl, served version, the names of the produced and consumed
-- counters (conspo.counters), then the state fields batch_groups, max_staleness, policy_version.
-- Returns {grant, cap, id of the newest wake-up ('0-0': none yet)}.
local newest = redis.call('XREVRANGE', KEYS[4], '+', '-', 'COUNT', 1)
local mark = '0-0'
if #newest > 0 then mark = newest[1][1] end
local produced = tonumber(redis.call('HGET', KEYS[1], ARGV[8]) or '0')
local consumed = tonumber(redis.call('HGET', KEYS[1], ARGV[9]) or '0')
local B = tonumber(redis.call('HGET', KEYS[3], ARGV[10]) or ARGV[3])
local s = tonumber(redis.call('HGET', KEYS[3], ARGV[11]) or ARGV[4])
if B == nil or s == nil then
  redis.call('HDEL', KEYS[2], ARGV[1])
  return {0, -2, mark}
end
local learner_version = tonumber(redis.call('HGET', KEYS[3], ARGV[12]) or '0')
local now = tonumber(ARGV[5])
if learner_version - tonumber(ARGV[7]) > s then
  redis.call('HDEL', KEYS[2], ARGV[1])
  return {0, -1, mark}
end
local others = 0
local leases = redis.call('HGETALL', KEYS[2])
for i = 1, #leases, 2 do
  if leases[i] ~= ARGV[1] then
    local n, expiry = string.match(leases[i + 1], '^(%d+):([%d%.]+)$')
    if n and tonumber(expiry) > now then others = others + tonumber(n)
    else redis.call('HDEL', KEYS[2], leases[i]) end
  end
end
-- Two bounds. Consumption: at most (s + 1) * B groups beyond what the learner is done with.
-- Version: serving v, a generator may bring the total to (v + s + 1) * B plus the groups the
-- learner consumed without training them (skipped, dropped: consumed - learner_version * B, as
-- every step trains exactly B). Group number t among trained ones is trained at version t / B,
-- so what is generated under this bound never arrives stale.
local uncounted = math.max(0, consumed - learner_version * B)
local vcap = (tonumber(ARGV[7]) + s + 1) * B + uncounted
local cap = math.min(consumed + (s + 1) * B, vcap) - produced - others
local grant = math.max(0, math.min(tonumber(ARGV[2]), cap))
if grant > 0 then
  redis.call('HSET', KEYS[2], ARGV[1], grant .. ':' .. (now + tonumber(ARGV[6])))
else
  redis.call('HDEL', KEYS[2], ARGV[1])
end
return {grant, cap, mark}
"""

_RENEW = """
-- KEYS[1] leases. ARGV: instance, new expiry. Only an existing lease is extended.
local lease = redis.call('HGET', KEYS[1], ARGV[1])
if not lease then return 0 end
local n = string.match(lease, '^(%d+):')
if not n then return 0 end
redis.call('HSET', KEYS[1], ARGV[1], n .. ':' .. ARGV[2])
return 1
"""


class FlowControl:
    def __init__(
        self,
        client: redis.Redis,
        keys: Keys,
        *,
        batch_groups: int | None,
        max_staleness: int | None,
        lease_ttl_s: float = 60.0,
    ) -> None:
        self.client = client
        self.keys = keys
        self.batch_groups = batch_groups
        self.max_staleness = max_staleness
        self.lease_ttl_s = lease_ttl_s
        self._reserve = client.register_script(_RESERVE)
        self._renew = client.register_script(_RENEW)
        self.wake_mark = "0-0"  # the newest wake-up seen (by the last reserve or wait)

    def reserve(self, instance: str, want: int, served_version: int) -> int:
        """How many groups ``instance`` may start now (0: wait). A second call replaces the lease.

        Returns 0 too when the instance's weights are more than ``max_staleness`` versions behind
        the learner (it must apply the next push first), and while neither the learner nor this
        instance has said what ``batch_groups`` and ``max_staleness`` are.
        """
        grant, _, mark = self._reserve(
            keys=[self.keys.counters, self.keys.flow_leases, self.keys.state, self.keys.flow_wake],
            args=[
                instance,
                want,
                "" if self.batch_groups is None else self.batch_groups,
                "" if self.max_staleness is None else self.max_staleness,
                time.time(),
                self.lease_ttl_s,
                served_version,
                PRODUCED,
                CONSUMED,
                "batch_groups",  # RunSettings' field names, as RunStore.announce_run writes them
                "max_staleness",
                POLICY_VERSION_FIELD,
            ],
        )
        self.wake_mark = mark.decode() if isinstance(mark, bytes) else str(mark)
        return int(grant)

    def wait(self, timeout_s: float) -> bool:
        """Block until a wake-up newer than ``wake_mark`` (one that came after the last
        ``reserve``), or ``timeout_s``; returns True if woken. The caller re-asks ``reserve``."""
        block_ms = max(1, int(timeout_s * 1000))
        got = self.client.xread({self.keys.flow_wake: self.wake_mark}, count=WAKE_KEEP,
                                block=block_ms)  # fmt: skip
        if not got:
            return False
        entries = got[0][1]
        if entries:
            last = entries[-1][0]
            self.wake_mark = last.decode() if isinstance(last, bytes) else str(last)
        return True

    def notify(self, reason: str = "staged") -> None:
        """Wake every generator waiting for budget (e.g. new weights were staged here)."""
        self.client.xadd(self.keys.flow_wake, {"why": reason}, maxlen=WAKE_KEEP, approximate=True)

    def renew(self, instance: str) -> bool:
        """Push back the expiry of ``instance``'s lease, if it holds one (heartbeat thread)."""
        expiry = time.time() + self.lease_ttl_s
        return bool(self._renew(keys=[self.keys.flow_leases], args=[instance, expiry]))

    def release(self, instance: str) -> None:
        """Drop the lease once the batch is committed (its groups now count as produced)."""
        self.client.hdel(self.keys.flow_leases, instance)

    def consumed(self, n: int) -> None:
        """The learner is done with ``n`` more groups (trained, skipped or dropped)."""
        if n:
            # One round trip, atomic: a generator woken by the entry sees the new count (and
            # the policy version the learner wrote before calling this).
            pipe = self.client.pipeline(transaction=True)
            pipe.hincrby(self.keys.counters, CONSUMED, n)
            pipe.xadd(self.keys.flow_wake, {"why": "consumed"}, maxlen=WAKE_KEEP,
                      approximate=True)  # fmt: skip
            pipe.execute()

    def set_consumed(self, total: int) -> None:
        """The learner's checkpointed total: absolute, so replaying steps after a restart does
        not count their groups twice."""
        pipe = self.client.pipeline(transaction=True)
        pipe.hset(self.keys.counters, CONSUMED, int(total))
        pipe.xadd(self.keys.flow_wake, {"why": "restart"}, maxlen=WAKE_KEEP, approximate=True)
        pipe.execute()
