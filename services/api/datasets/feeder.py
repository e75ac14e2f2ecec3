"""Feeding stored datasets into the ``prompts`` stream lazily, under backpressure.

Every ``feed_interval_s`` the feeder reads the prompts backlog (``StreamQueue.backlog()``: entries
delivered but unacknowledged plus entries not yet delivered) and tops it up to
``feed_max_backlog``, at most ``feed_batch`` prompts per dataset per tick (a tick that the batch,
not the room, cut short is followed by another at once); the free room is shared evenly between
the datasets that still have prompts to feed. Nothing is fed while generators
are behind, so a 100k-row dataset does not become a 100k-entry stream.

Exactly-once feeding across restarts and replicas rests on two things:

- a per-dataset lock (``SET NX PX``, refreshed every tick by its owner, released on shutdown):
  only one replica feeds a dataset at a time, and a dead replica's lock expires after
  ``feed_lock_ttl_s`` so another one takes over;
- one Lua script that, atomically, checks the caller still holds the lock and that the cursor is
  still where the caller read it, XADDs the batch and advances the cursor. A replica that lost its
  lock or raced another writes nothing (it re-reads next tick), so no prompt is fed twice and
  none is skipped, whatever dies when.

Epoch ``e`` feeds the rows in ``random.Random(seed * 1_000_003 + e)``'s permutation (identity
when ``shuffle`` is off), recomputed identically by any replica. Prompt ids are
``<dataset>:<row id>:<epoch>`` with ``row_id`` and ``epoch`` in the metadata.
"""

from __future__ import annotations

import contextlib
import logging
import math
import random
import threading
from collections.abc import Callable
from typing import Any

import redis

from conspo import counters
from conspo.protocol import DecodeError, Prompt, encode
from conspo.queue import XADD_ENTRY, StreamQueue
from services.api.datasets.store import DatasetStore
from services.api.redact import redact

log = logging.getLogger(__name__)

_FEED = (
    XADD_ENTRY
    + """
-- KEYS[1] lock, KEYS[2] cursor hash, KEYS[3] prompts stream, KEYS[4] counters hash
-- ARGV[1] owner, ARGV[2] expected epoch, ARGV[3] expected position, ARGV[4] new epoch,
-- ARGV[5] new position, ARGV[6] the fed counter, then (k, d) pairs
if redis.call('GET', KEYS[1]) ~= ARGV[1] then return -1 end
local epoch = tonumber(redis.call('HGET', KEYS[2], 'epoch') or '0')
local position = tonumber(redis.call('HGET', KEYS[2], 'position') or '0')
if epoch ~= tonumber(ARGV[2]) or position ~= tonumber(ARGV[3]) then return -2 end
local n = 0
for i = 7, #ARGV, 2 do
  xadd_entry(KEYS[3], ARGV[i], ARGV[i + 1])
  n = n + 1
end
redis.call('HSET', KEYS[2], 'epoch', ARGV[4], 'position', ARGV[5])
redis.call('HINCRBY', KEYS[2], 'fed', n)
redis.call('HINCRBY', KEYS[4], ARGV[6], n)
return n
"""
)

_ACQUIRE = """
local owner = redis.call('GET', KEYS[1])
if owner == false or owner == ARGV[1] then
  redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[2])
  return 1
end
return 0
"""

_RELEASE = """
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end
return 0
"""


def epoch_order(n: int, seed: int, epoch: int, shuffle: bool) -> list[int]:
    order = list(range(n))
    if shuffle:
        random.Random(seed * 1_000_003 + epoch).shuffle(order)
    return order


class DatasetFeeder:
    def __init__(
        self,
        store: DatasetStore,
        prompts: StreamQueue[Prompt],
        *,
        owner: str,
        max_backlog: int,
        batch: int,
        interval_s: float,
        lock_ttl_s: float,
        on_fed: Callable[[int], None] | None = None,
        on_error: Callable[[str], None] | None = None,
        on_recovered: Callable[[], None] | None = None,
    ) -> None:
        self.store = store
        self.prompts = prompts
        self.owner = owner
        self.max_backlog = max_backlog
        self.batch = batch
        self.interval_s = interval_s
        self.lock_ttl_ms = max(1, int(lock_ttl_s * 1000))
        self.on_fed = on_fed
        self.on_error = on_error
        self.on_recovered = on_recovered
        client = store.client
        self._feed = client.register_script(_FEED)
        self._acquire = client.register_script(_ACQUIRE)
        self._release = client.register_script(_RELEASE)
        self._orders: dict[tuple[str, int], list[int]] = {}
        self._held: set[str] = set()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._last_error: str | None = None
        self._batch_bound = False

    # -- lifecycle ------------------------------------------------------------------------------
    def start(self) -> None:
        self._thread = threading.Thread(target=self._loop, name="dataset-feeder", daemon=True)
        self._thread.start()

    def stop(self, timeout: float = 10.0) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout)
        for dataset_id in list(self._held):
            with contextlib.suppress(redis.RedisError):  # else the TTL frees it
                self._release(keys=[self.prompts.keys.dataset_lock(dataset_id)], args=[self.owner])
        self._held.clear()

    def _loop(self) -> None:
        while not self._stop.is_set():
            try:
                self.tick()
                if self._last_error is not None and self.on_recovered is not None:
                    self.on_recovered()
                self._last_error = None
            except Exception as exc:  # the feeder must outlive Redis outages and bad rows
                message = f"dataset feeder: {type(exc).__name__}: {redact(exc)}"
                self._batch_bound = False  # an error waits the interval, never spins
                if message != self._last_error:
                    log.warning("%s", message)
                    if self.on_error is not None:
                        self.on_error(message)
                self._last_error = message
            # A tick cut short by ``batch`` (not by the backlog's room) goes again at once, so
            # the feed rate is not capped at batch / interval (128 per 0.5 s was a ceiling a
            # 2-core box already hit); a tick that filled the room waits.
            if not self._batch_bound:
                self._stop.wait(self.interval_s)

    # -- one round ------------------------------------------------------------------------------
    def tick(self) -> int:
        """Top the prompts backlog up once; returns how many prompts were fed."""
        active = []
        for meta in self.store.all_meta():
            if meta.get("state") != "ready":
                continue
            epoch, position, _ = self.store.cursor(meta["dataset_id"])
            if epoch < meta["epochs"]:
                active.append((meta, epoch, position))
            elif meta["dataset_id"] in self._held:
                self._unlock(meta["dataset_id"])
        self._batch_bound = False
        if not active:
            return 0
        room = self.max_backlog - self.prompts.backlog().outstanding
        fed = 0
        for i, (meta, epoch, position) in enumerate(active):
            if room <= 0:
                break
            share = min(self.batch, math.ceil(room / (len(active) - i)))
            if not self._lock(meta["dataset_id"]):
                continue
            n = self._feed_one(meta, epoch, position, share)
            room -= n
            fed += n
            self._batch_bound |= n == self.batch and room > 0
        if fed and self.on_fed is not None:
            self.on_fed(fed)
        return fed

    def _lock(self, dataset_id: str) -> bool:
        got = bool(
            self._acquire(
                keys=[self.prompts.keys.dataset_lock(dataset_id)],
                args=[self.owner, self.lock_ttl_ms],
            )
        )
        if got:
            self._held.add(dataset_id)
        else:
            self._held.discard(dataset_id)
        return got

    def _unlock(self, dataset_id: str) -> None:
        self._release(keys=[self.prompts.keys.dataset_lock(dataset_id)], args=[self.owner])
        self._held.discard(dataset_id)

    def _order(self, meta: dict[str, Any], epoch: int) -> list[int]:
        key = (meta["dataset_id"], epoch)
        order = self._orders.get(key)
        if order is None:
            if len(self._orders) > 16:
                self._orders.clear()
            order = epoch_order(meta["rows"], meta["seed"], epoch, meta["shuffle"])
            self._orders[key] = order
        return order

    def _feed_one(self, meta: dict[str, Any], epoch: int, position: int, count: int) -> int:
        dataset_id, rows = meta["dataset_id"], meta["rows"]
        plan: list[tuple[int, int]] = []  # (epoch, row index)
        e, p = epoch, position
        while len(plan) < count and e < meta["epochs"]:
            order = self._order(meta, e)
            take = order[p : p + count - len(plan)]
            plan.extend((e, index) for index in take)
            p += len(take)
            if p >= rows:
                e, p = e + 1, 0
        if not plan:
            return 0
        loaded = self.store.rows(dataset_id, [index for _, index in plan])
        args: list[Any] = [self.owner, epoch, position, e, p, counters.API_PROMPTS_FED]
        for (row_epoch, index), row in zip(plan, loaded, strict=True):
            if row is None:
                raise DecodeError(f"dataset {dataset_id}: row {index} is missing or corrupt")
            prompt = Prompt(
                prompt_id=f"{dataset_id}:{row['id']}:{row_epoch}",
                text=row.get("text"),
                messages=row.get("messages"),
                answer=row["answer"],
                verifier=meta["verifier"],
                dataset=dataset_id,
                metadata={**row.get("metadata", {}), "row_id": row["id"], "epoch": row_epoch},
            )
            args.extend([prompt.prompt_id, encode(prompt, max_bytes=self.prompts.max_entry_bytes)])
        self.prompts.ensure_group()
        keys = [
            self.prompts.keys.dataset_lock(dataset_id),
            self.prompts.keys.dataset_cursor(dataset_id),
            self.prompts.key,
            self.prompts.keys.counters,
        ]
        result = int(self._feed(keys=keys, args=args))
        if result == -1:
            self._held.discard(dataset_id)
            log.info("dataset %s: lock lost before feeding; another replica has it", dataset_id)
            return 0
        if result == -2:
            log.info("dataset %s: cursor moved under us; re-reading next tick", dataset_id)
            return 0
        log.debug(
            "dataset %s: fed %d prompts (epoch %d -> %d, pos %d)", dataset_id, result, epoch, e, p
        )
        return result
