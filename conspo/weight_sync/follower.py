"""A generator's view of the learner's weights: one ``Follower`` per transport.

The learner's ``WeightPublisher`` writes one announcement per version; how the tensors travel
decides who follows it:

- broadcast (over the learner's process group): ``WeightSubscriber`` registers as a member,
  receives each push it is named in and falls back to the announced checkpoint for a round it
  missed (``subscriber``).
- checkpoint (on disk): ``CheckpointFollower`` (here) stages every announced checkpoint and never
  registers, so the learner never waits on it; for engines that cannot be one rank of the
  learner's group (a tensor-parallel vLLM engine: every TP worker needs the full tensors). The
  learner checkpoints for late joiners anyway.

Both stage into the same ``StagedWeights`` and are driven the same way by the generator loop
(``take_staged`` between two engine calls, ``report_served`` once applied).
"""

from __future__ import annotations

import logging
import threading
from typing import Protocol

import redis

from conspo.keys import Keys
from conspo.protocol import WeightAnnouncement
from conspo.weight_sync.membership import read_announcement, report_served
from conspo.weight_sync.subscriber import CheckpointLoader, StagedWeights

logger = logging.getLogger(__name__)


class Follower(Protocol):
    """What the generator loop sees of weight sync, whatever the transport."""

    #: The last failure to receive, load or read (shown in the generator's heartbeat); cleared
    #: when a version is staged.
    last_error: str | None

    def take_staged(self) -> StagedWeights | None:
        """The newest staged version not handed out yet (each one is handed out once)."""
        ...

    def report_served(self, version: int) -> None:
        """Record that this instance now serves ``version`` (``served:<instance>``)."""
        ...

    def latest_announcement(self) -> WeightAnnouncement | None: ...

    def close(self) -> None: ...


class CheckpointFollower:
    """Stages every announced checkpoint (polling the ``current`` announcement); never a group
    member. ``loader`` does the staging: a ``LocalReceiver`` reads the tensors in this thread, an
    engine that reads files itself stages the path."""

    def __init__(
        self,
        client: redis.Redis,
        keys: Keys,
        instance: str,
        loader: CheckpointLoader,
        *,
        poll_s: float,
    ) -> None:
        self.client = client
        self.keys = keys
        self.instance = instance
        self.loader = loader
        self.poll_s = poll_s
        self.last_error: str | None = None
        self._latest: WeightAnnouncement | None = None
        self._staged: StagedWeights | None = None
        self._have = -1
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="weights-checkpoints", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.wait(self.poll_s):
            try:
                ann = read_announcement(self.client, self.keys)
            except redis.RedisError as exc:
                self.last_error = f"redis: {exc}"
                continue
            if ann is None:
                continue
            self._latest = ann
            if ann.checkpoint_path and ann.version != self._have:
                self._have = ann.version  # tried once, like a subscriber's fallback
                self._stage(ann)

    def _stage(self, ann: WeightAnnouncement) -> None:
        try:
            staged = self.loader.load_checkpoint(ann)
        except (OSError, KeyError, ValueError, RuntimeError) as exc:
            self.last_error = f"could not load v{ann.version} from {ann.checkpoint_path}: {exc}"
            logger.error("checkpoint follower %s: %s", self.instance, self.last_error)
            return
        with self._lock:
            self._staged = staged
            self.last_error = None
        logger.info("checkpoint follower %s staged v%d", self.instance, staged.version)

    def take_staged(self) -> StagedWeights | None:
        with self._lock:
            staged, self._staged = self._staged, None
            return staged

    def report_served(self, version: int) -> None:
        report_served(self.client, self.keys, self.instance, version)

    def latest_announcement(self) -> WeightAnnouncement | None:
        return self._latest

    def close(self) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(timeout=5)
