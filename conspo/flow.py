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
"""

from __future__ import annotations

import time

import redis

from conspo import counters
from conspo.keys import Keys
from conspo.state import POLICY_VERSION_FIELD

PRODUCED = counters.GENERATOR_GROUPS
CONSUMED = counters.LEARNER_GROUPS_CONSUMED

_RESERVE = """
-- KEYS: counters, leases, state. ARGV: instance, want, B, max_staleness ('' for B and s: only
-- the learner's), now, ttl, served version, the names of the produced and consumed counters
-- (conspo.counters), then the state fields batch_groups, max_staleness, policy_version.
local produced = tonumber(redis.call('HGET', KEYS[1], ARGV[8]) or '0')
local consumed = tonumber(redis.call('HGET', KEYS[1], ARGV[9]) or '0')
local B = tonumber(redis.call('HGET', KEYS[3], ARGV[10]) or ARGV[3])
local s = tonumber(redis.call('HGET', KEYS[3], ARGV[11]) or ARGV[4])
if B == nil or s == nil then
  redis.call('HDEL', KEYS[2], ARGV[1])
  return {0, -2}
end
local learner_version = tonumber(redis.call('HGET', KEYS[3], ARGV[12]) or '0')
local now = tonumber(ARGV[5])
if learner_version - tonumber(ARGV[7]) > s then
  redis.call('HDEL', KEYS[2], ARGV[1])
  return {0, -1}
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
return {grant, cap}
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

    def reserve(self, instance: str, want: int, served_version: int) -> int:
        """How many groups ``instance`` may start now (0: wait). A second call replaces the lease.

        Returns 0 too when the instance's weights are more than ``max_staleness`` versions behind
        the learner (it must apply the next push first), and while neither the learner nor this
        instance has said what ``batch_groups`` and ``max_staleness`` are.
        """
        grant, _ = self._reserve(
            keys=[self.keys.counters, self.keys.flow_leases, self.keys.state],
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
        return int(grant)

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
            self.client.hincrby(self.keys.counters, CONSUMED, n)

    def set_consumed(self, total: int) -> None:
        """The learner's checkpointed total: absolute, so replaying steps after a restart does
        not count their groups twice."""
        self.client.hset(self.keys.counters, CONSUMED, int(total))
