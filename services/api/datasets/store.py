"""Datasets in Redis, where every api replica can read them.

Layout under the run's namespace (named by ``conspo.keys.Keys``; ``keys.datasets`` is the index):

- ``datasets``              hash: dataset id -> JSON metadata (name, source, spec, rows, rejected);
- ``datasets:<id>:rows``    hash: row index -> JSON prompt row (text or messages, answer, ...);
- ``datasets:<id>:cursor``  hash: ``epoch``, ``position`` (in that epoch's shuffled order), ``fed``;
- ``datasets:<id>:lock``    string: the api instance feeding it now, with a TTL.

Rows are stored once; the order an epoch feeds them in is a permutation recomputed from
``(seed, epoch)``, so the cursor is two integers and any replica resumes exactly where another
stopped. A hash (not a list) gives O(1) reads by index. Size is bounded by ``max_body_bytes`` per
upload (and ``max_dataset_rows``): this is meant for benchmark- and RL-sized prompt sets (up to
tens of MB), not for pre-training corpora.

Creation reserves the id first (HSETNX with ``state: loading``), so two uploads racing for one id
cannot interleave rows; the metadata turns ``ready`` only after every row is written, and the
feeder ignores datasets that are not ready.
"""

from __future__ import annotations

import json
from typing import Any

import redis

from conspo.keys import Keys
from conspo.redis_conn import as_text
from services.api.schemas import DatasetInfo

ROW_CHUNK = 1000


def serialize_rows(rows: list[dict[str, Any]]) -> list[str]:
    return [json.dumps(row, ensure_ascii=False) for row in rows]


class DatasetStore:
    def __init__(self, client: redis.Redis, keys: Keys) -> None:
        self.client = client
        self.keys = keys

    @property
    def index(self) -> str:
        return self.keys.datasets

    # -- creation -------------------------------------------------------------------------------
    def reserve(self, dataset_id: str, meta: dict[str, Any]) -> bool:
        doc = json.dumps({**meta, "state": "loading"})
        return bool(self.client.hsetnx(self.index, dataset_id, doc))

    def write_rows(self, dataset_id: str, rows: list[str]) -> None:
        """Store pre-serialized rows (``serialize_rows``) under their index."""
        key = self.keys.dataset_rows(dataset_id)
        pipe = self.client.pipeline(transaction=False)
        pipe.delete(key)
        for start in range(0, len(rows), ROW_CHUNK):
            chunk = rows[start : start + ROW_CHUNK]
            pipe.hset(key, mapping={str(start + i): row for i, row in enumerate(chunk)})
            if len(pipe) >= 8:
                pipe.execute()
        pipe.execute()

    def publish_ready(self, dataset_id: str, meta: dict[str, Any]) -> None:
        pipe = self.client.pipeline(transaction=True)
        pipe.hset(
            self.keys.dataset_cursor(dataset_id), mapping={"epoch": 0, "position": 0, "fed": 0}
        )
        pipe.hset(self.index, dataset_id, json.dumps({**meta, "state": "ready"}))
        pipe.execute()

    def discard(self, dataset_id: str) -> None:
        self.client.delete(self.keys.dataset_rows(dataset_id), self.keys.dataset_cursor(dataset_id))
        self.client.hdel(self.index, dataset_id)

    # -- reading --------------------------------------------------------------------------------
    def meta(self, dataset_id: str) -> dict[str, Any] | None:
        raw = self.client.hget(self.index, dataset_id)
        return _load(raw)

    def all_meta(self) -> list[dict[str, Any]]:
        metas = [_load(raw) for raw in self.client.hgetall(self.index).values()]
        return sorted(
            (m for m in metas if m is not None),
            key=lambda m: (m.get("created_at", 0.0), m.get("dataset_id", "")),
        )

    def cursor(self, dataset_id: str) -> tuple[int, int, int]:
        raw = self.client.hgetall(self.keys.dataset_cursor(dataset_id))
        values = {as_text(k): int(v) for k, v in raw.items()}
        return values.get("epoch", 0), values.get("position", 0), values.get("fed", 0)

    def rows(self, dataset_id: str, indices: list[int]) -> list[dict[str, Any] | None]:
        if not indices:
            return []
        raw = self.client.hmget(self.keys.dataset_rows(dataset_id), [str(i) for i in indices])
        return [_load(r) for r in raw]

    def info(self, meta: dict[str, Any]) -> DatasetInfo:
        epoch, position, fed = self.cursor(meta["dataset_id"])
        finished = meta.get("state") == "ready" and epoch >= meta["epochs"]
        return DatasetInfo(
            dataset_id=meta["dataset_id"],
            name=meta["name"],
            source=meta["source"],
            path=meta.get("path"),
            verifier=meta["verifier"],
            state="finished" if finished else meta.get("state", "loading"),
            rows=meta["rows"],
            rejected_count=meta["rejected_count"],
            rejected=meta["rejected"],
            epochs=meta["epochs"],
            seed=meta["seed"],
            shuffle=meta["shuffle"],
            total=meta["rows"] * meta["epochs"],
            fed=fed,
            epoch=epoch,
            position=position,
            created_at=meta["created_at"],
        )


def _load(raw: bytes | str | None) -> Any:
    if raw is None:
        return None
    try:
        return json.loads(raw)
    except ValueError:
        return None
