"""Who is in the weight-sync group, what the learner announced, what each generator serves.

Everything lives in the run's ``keys.weights`` hash, so one HGETALL shows the whole picture:

- ``current``: the newest ``WeightAnnouncement`` (``conspo.protocol.encode``); the same bytes are
  PUBLISHed on ``keys.weights_channel`` in one MULTI, so a subscriber that polls the hash and one
  that listens on the channel see the same announcements in the same order.
- ``member:<instance>``: a JSON ``MemberInfo`` refreshed every ``beat_s`` seconds. Freshness is
  judged against Redis' own clock (``TIME``), written by the member and read by the learner, so
  clock skew between machines cannot evict or resurrect anybody. A member that says how often it
  beats is live for ``3 * beat_s + 1`` seconds after its last beat (capped by the learner's
  ``member_ttl_s``): a SIGKILLed generator drops out of the next group within seconds instead of
  being waited for until a fixed lifetime runs out. ``incarnation`` changes when a
  generator restarts under the same name, which the learner treats as a membership change.
  ``seen_at`` is the ``created_at`` of the newest announcement the member's sync loop has
  finished processing (the learner's own clock, so comparable with the learner's values): after
  a failed push the learner re-admits a member only once it has processed that announcement,
  i.e. once it is demonstrably alive and out of the failed round.
- ``served:<instance>``: the policy version that instance serves now.

This module is the only reader and writer of that hash, and it imports no torch (neither does the
package's ``__init__``), so the api reads the hash through ``read_sync_state`` too.
"""

from __future__ import annotations

import logging
import os
import socket
import uuid
from collections.abc import Mapping
from dataclasses import dataclass, field

import redis
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from conspo.keys import Keys
from conspo.protocol import DecodeError, WeightAnnouncement, decode, encode
from conspo.redis_conn import as_text

logger = logging.getLogger(__name__)

CURRENT_FIELD = "current"
MEMBER_PREFIX = "member:"
SERVED_PREFIX = "served:"


class MemberInfo(BaseModel):
    """One generator's registration (JSON in ``member:<instance>``)."""

    model_config = ConfigDict(extra="ignore", frozen=True)
    instance: str = Field(min_length=1, max_length=200)
    incarnation: str = Field(default_factory=lambda: uuid.uuid4().hex[:12])
    layout_hash: str
    backends: list[str] = Field(default_factory=lambda: ["gloo"])
    beat_s: float = Field(default=0.0, ge=0, description="Refresh period; 0: unknown.")
    epoch_seen: int = -1
    seen_at: float = 0.0
    at: float = 0.0
    host: str = Field(default_factory=socket.gethostname)
    pid: int = Field(default_factory=os.getpid)


def redis_now(client: redis.Redis) -> float:
    seconds, micros = client.time()
    return float(seconds) + float(micros) / 1e6


def register_member(client: redis.Redis, keys: Keys, info: MemberInfo) -> MemberInfo:
    """Write (or refresh) a registration, stamped with Redis' clock."""
    stamped = info.model_copy(update={"at": redis_now(client)})
    client.hset(keys.weights, MEMBER_PREFIX + info.instance, stamped.model_dump_json())
    return stamped


def deregister_member(client: redis.Redis, keys: Keys, instance: str) -> None:
    client.hdel(keys.weights, MEMBER_PREFIX + instance)


@dataclass(frozen=True)
class SyncState:
    """The whole ``keys.weights`` hash, parsed; malformed entries are left out (and logged)."""

    announcement: WeightAnnouncement | None = None
    members: dict[str, MemberInfo] = field(default_factory=dict)
    served: dict[str, int] = field(default_factory=dict)


def _parse(raw: Mapping[bytes, bytes]) -> SyncState:
    announcement, members, served = None, {}, {}
    for field_name, value in raw.items():
        name = as_text(field_name)
        if name == CURRENT_FIELD:
            announcement = _decode_announcement(value)
        elif name.startswith(MEMBER_PREFIX):
            try:
                info = MemberInfo.model_validate_json(value)
            except (ValidationError, ValueError) as exc:
                logger.warning("ignoring malformed weight-sync member %s: %s", name, exc)
                continue
            members[info.instance] = info
        elif name.startswith(SERVED_PREFIX):
            try:
                served[name.removeprefix(SERVED_PREFIX)] = int(value)
            except ValueError:
                continue
    return SyncState(announcement, members, served)


def read_sync_state(client: redis.Redis, keys: Keys) -> SyncState:
    """Announcement, members and served versions in one HGETALL (the api's status page)."""
    return _parse(client.hgetall(keys.weights))


def read_members(client: redis.Redis, keys: Keys) -> dict[str, MemberInfo]:
    return read_sync_state(client, keys).members


BEATS_MISSED = 3  # a member is gone after this many missed refreshes (plus one second of slack)


def member_ttl(info: MemberInfo, ttl_s: float) -> float:
    """How long after its last refresh ``info`` still counts as live."""
    return min(ttl_s, BEATS_MISSED * info.beat_s + 1.0) if info.beat_s > 0 else ttl_s


def live_members(client: redis.Redis, keys: Keys, ttl_s: float) -> dict[str, MemberInfo]:
    """Members whose registration is younger than their ``member_ttl`` by Redis' clock."""
    now = redis_now(client)
    return {
        n: m for n, m in read_members(client, keys).items() if now - m.at <= member_ttl(m, ttl_s)
    }


def prune_members(client: redis.Redis, keys: Keys, older_than_s: float) -> list[str]:
    """Delete registrations older than ``older_than_s`` (members that died without closing)."""
    now = redis_now(client)
    stale = [n for n, m in read_members(client, keys).items() if now - m.at > older_than_s]
    if stale:
        client.hdel(keys.weights, *(MEMBER_PREFIX + n for n in stale))
    return stale


def write_announcement(client: redis.Redis, keys: Keys, announcement: WeightAnnouncement) -> None:
    """Store the announcement as ``current`` and publish it, atomically."""
    data = encode(announcement)
    pipe = client.pipeline(transaction=True)
    pipe.hset(keys.weights, CURRENT_FIELD, data)
    pipe.publish(keys.weights_channel, data)
    pipe.execute()


def _decode_announcement(raw: bytes) -> WeightAnnouncement | None:
    try:
        return decode(raw, WeightAnnouncement)
    except DecodeError as exc:
        logger.warning("ignoring undecodable weight announcement: %s", exc)
        return None


def read_announcement(client: redis.Redis, keys: Keys) -> WeightAnnouncement | None:
    raw = client.hget(keys.weights, CURRENT_FIELD)
    return None if raw is None else _decode_announcement(raw)


def report_served(client: redis.Redis, keys: Keys, instance: str, version: int) -> None:
    client.hset(keys.weights, SERVED_PREFIX + instance, str(int(version)))


def served_versions(client: redis.Redis, keys: Keys) -> dict[str, int]:
    """``instance -> policy version`` it serves, for the learner's staleness view."""
    return read_sync_state(client, keys).served
