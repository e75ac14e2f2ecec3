"""What every service process shares: settings, a Redis client, a stop flag, heartbeats, metrics.

Services are plain loops that check ``runtime.stopping`` between units of work: SIGTERM and
SIGINT only set the flag, so a unit in flight finishes (or is released) instead of dying halfway.
A heartbeat thread writes the instance's status and last error to the run's state hash; it keeps
going while the main loop is busy, so a slow step is never mistaken for a dead process. The last
error is current, not a tombstone: a loop that completes a unit of work without a new error calls
``recovered()``, which clears it; its count and time stay in the heartbeat's ``info``
(``errors``, ``last_error_at``), so a flapping service is still visible. Each beat
also checks the run's incarnation (``conspo.incarnation``): if Redis lost the run's state, the
instance logs an error, counts it and says ``redis state lost`` in its heartbeat.

Start-up fails fast (``SettingsError``, exit code 2) when Redis refuses our credentials: retrying
a wrong password forever would look like an outage. An unreachable Redis is waited for as usual.
"""

from __future__ import annotations

import logging
import os
import signal
import socket
import threading
import time
from collections.abc import Callable
from types import FrameType, TracebackType
from typing import Any, Literal

import redis
from prometheus_client import CollectorRegistry, Counter, start_http_server

from conspo import counters
from conspo.incarnation import Incarnation
from conspo.logs import setup as setup_logging
from conspo.protocol import Heartbeat, MetaValue
from conspo.queue import StreamQueue, consumer_name
from conspo.redis_conn import check_auth, client_for
from conspo.settings import CommonSettings
from conspo.state import RunStore

log = logging.getLogger(__name__)
Status = Literal["starting", "running", "waiting", "stopping", "stopped", "failed"]
DEAD_AFTER_BEATS = 5  # a replica whose heartbeat is this many intervals old is gone
FORGET_EVERY_S = 60.0  # how often a process looks for heartbeats to forget
ServiceName = Literal["api", "generator", "verifier", "learner", "demo"]


class ServiceRuntime:
    def __init__(
        self, settings: CommonSettings, service: ServiceName, *, instance: str | None = None
    ) -> None:
        self.settings = settings
        self.service = service
        self.instance = instance or consumer_name(service)
        self.client: redis.Redis = client_for(settings)
        self.keys = settings.keys
        self.store = RunStore(self.client, self.keys)
        self.registry = CollectorRegistry()
        self.stop_event = threading.Event()
        self._status: Status = "starting"
        self.last_error: str | None = None
        self.error_count = 0
        self.last_error_at: float | None = None
        self.info: dict[str, MetaValue] = {}
        self.on_beat: list[Callable[[], None]] = []  # work that must go on while the loop is busy
        self._beat_thread: threading.Thread | None = None
        self._last_forget = -FORGET_EVERY_S
        self.incarnation = Incarnation(self.client, self.keys, self.instance)
        self._state_lost = Counter(
            "conspo_redis_state_lost",
            "Times this instance found that Redis lost the run's state",
            registry=self.registry,
        )

    @property
    def status(self) -> Status:
        return self._status

    @status.setter
    def status(self, value: Status) -> None:
        """The first move out of "starting" is written at once, not at the next heartbeat:
        whoever waits for the service to be up (``LocalStack.start``) learns it within ms."""
        first = self._status == "starting" and value != "starting"
        self._status = value
        if first and self._beat_thread is not None:
            self.beat()

    @property
    def stopping(self) -> bool:
        return self.stop_event.is_set()

    def request_stop(self, *_: Any) -> None:
        if not self.stop_event.is_set():
            log.info("%s %s: stop requested", self.service, self.instance)
        self.stop_event.set()

    def install_signal_handlers(self) -> None:
        def handler(signum: int, frame: FrameType | None) -> None:
            self.request_stop()

        signal.signal(signal.SIGTERM, handler)
        signal.signal(signal.SIGINT, handler)

    def sleep(self, seconds: float) -> bool:
        """Sleep unless asked to stop; returns False when stopping."""
        return not self.stop_event.wait(seconds)

    def error(self, message: str) -> None:
        self.last_error = message[:2000]
        self.error_count += 1
        self.last_error_at = time.time()
        log.error("%s", message)

    def recovered(self) -> None:
        """A unit of work succeeded after an error: the error is history, not the state (a run
        whose Redis state was lost stays flagged: ``check_incarnation`` re-asserts that)."""
        if self.last_error is not None:
            log.info("%s %s works again (last error: %s)", self.service, self.instance,
                     self.last_error[:200])  # fmt: skip
            self.last_error = None

    def hand_back_from_the_dead(self, queue: StreamQueue) -> int:
        """Hand back what replicas of our own service hold in ``queue`` when their heartbeat is
        ``DEAD_AFTER_BEATS`` intervals old or says they stopped (consumer names are instance
        names), then remove those that hold nothing any more from the group. A restarted
        replica takes the entries at its next read instead of after the visibility timeout,
        and the group does not keep one consumer per restart forever. Returns how many entries
        were handed back."""
        horizon = DEAD_AFTER_BEATS * self.settings.heartbeat_s
        alive = {b.instance for b in self.store.alive(self.service, horizon)}.__contains__
        released = queue.release_dead(alive, me=self.instance)
        queue.forget_dead(alive, me=self.instance)
        return released

    def forget_the_long_gone(self, now: float | None = None) -> int:
        """Drop heartbeats silent for ``forget_gone_after_s`` (at most once a minute per
        process): a gone instance stays listed in ``/v1/status`` for that long, with its last
        error, and then stops piling up. Any process may do it for every service: a beat that
        old belongs to nobody alive, and a live instance rewrites its own every beat."""
        now = time.monotonic() if now is None else now
        if now - self._last_forget < FORGET_EVERY_S:
            return 0
        self._last_forget = now
        return self.store.forget_stale(self.settings.forget_gone_after_s)

    def check_incarnation(self) -> None:
        """Compare the run's incarnation with ours; report a loss once (see conspo.incarnation)."""
        before = self.incarnation.state.detections
        state = self.incarnation.check()
        if state.detections > before:
            self._state_lost.inc()
            self.info["redis_state"] = "lost"
            self.info["redis_state_lost"] = state.detections
            self.error(f"{state.detail}")
            try:
                self.store.incr({counters.REDIS_STATE_LOST: 1})
            except redis.RedisError as exc:
                log.warning("could not count the loss: %s", exc)
        if state.lost:
            self.last_error = (state.detail or "")[:2000]

    def beat(self) -> None:
        try:
            self.check_incarnation()
        except redis.RedisError as exc:
            log.warning("incarnation check failed: %s", exc)
        if self.error_count:
            self.info["errors"] = self.error_count
            self.info["last_error_at"] = self.last_error_at
        for hook in (*self.on_beat, self.forget_the_long_gone):
            try:
                hook()
            except redis.RedisError as exc:
                log.warning("heartbeat hook failed: %s", exc)
        try:
            self.store.heartbeat(
                Heartbeat(
                    service=self.service,
                    instance=self.instance,
                    host=socket.gethostname(),
                    pid=os.getpid(),
                    status=self.status,
                    last_error=self.last_error,
                    info=dict(self.info),
                )
            )
        except redis.RedisError as exc:
            log.warning("heartbeat failed: %s", exc)

    def _beat_loop(self) -> None:
        while not self.stop_event.wait(self.settings.heartbeat_s):
            self.beat()

    def __enter__(self) -> ServiceRuntime:
        setup_logging(
            self.settings.log_level, json_lines=self.settings.log_json, service=self.service
        )
        check_auth(self.settings)
        if self.settings.metrics_port:
            start_http_server(self.settings.metrics_port, registry=self.registry)
            log.info("metrics on :%d/metrics", self.settings.metrics_port)
        self.beat()
        self._beat_thread = threading.Thread(target=self._beat_loop, name="heartbeat", daemon=True)
        self._beat_thread.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if exc is not None and not isinstance(exc, KeyboardInterrupt):
            self.status = "failed"
            self.last_error = f"{type(exc).__name__}: {exc}"[:2000]
        else:
            self.status = "stopped"
        self.stop_event.set()
        self.beat()
        self.client.close()
