"""Fault-injection harness: the real stack (``conspo.launch.LocalStack``: every service a real
subprocess, tiny model on CPU, real Redis), faults injected from outside, and an exact trace of
where every submitted prompt went.

Bounded by default (CI: the whole directory in about four minutes on a 2-core box);
``CONSPO_CHAOS_LONG=1`` injects more faults and runs longer. Nothing here asserts speed: the
timeouts are hang detectors.

What a scenario checks, whatever the fault:

- training continues: the learner's step grows after every injection, and no service exits
  on its own unless the scenario says it may;
- nothing is lost or trained twice: the two views of ``conspo.accounting``, the balance
  (``LocalStack.accounting()``) and the trace (``fates``: every prompt entry, one by one), must
  agree, with ``lost == 0`` and ``duplicated == 0``;
- the groups the victim held when it was hit (its pending entries, read from Redis just before
  the signal) each reach a fate, individually.

Every scenario adds rows to one table, printed at the end of the session and written to
``bench/results/chaos.json`` (rows of scenarios that did not run this time are kept).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import random
import signal
import subprocess
import threading
import time
import uuid
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import httpx
import pytest
import redis

from conspo.accounting import fates as trace_fates
from conspo.accounting import summarize
from conspo.keys import Keys
from conspo.launch import LocalStack, StackConfig
from conspo.lineage import prompt_entry_of
from conspo.protocol import Message
from conspo.queue import StreamQueue
from conspo.redis_conn import connect, free_port, redis_server_binary
from conspo.testing import REPO_ROOT, delete_run

LONG = os.environ.get("CONSPO_CHAOS_LONG", "").strip() not in ("", "0", "false")
MODE = "long" if LONG else "bounded"
RESULTS = REPO_ROOT / "bench" / "results" / "chaos.json"
QUEUED = ("queued_prompts", "queued_rollouts", "queued_labeled")

# Hang detectors, not performance bounds: a healthy 2-core box needs a small fraction of these.
PROGRESS_TIMEOUT_S = 180.0
READY_TIMEOUT_S = 180.0


# -- the table ---------------------------------------------------------------------------------
_ROWS: list[dict[str, Any]] = []
_SESSION_START = time.monotonic()


@dataclass
class Row:
    fault: str
    scenario: str
    injected: int
    accounting: dict[str, int]
    fates: Counter
    hit: Counter = field(default_factory=Counter)
    notes: str = ""
    wall_s: float = 0.0
    counts_na: bool = False  # the run's state was wiped: only detection is measured

    def as_dict(self) -> dict[str, Any]:
        acc = self.accounting
        row = {
            "fault": self.fault,
            "scenario": self.scenario,
            "injected": self.injected,
            "submitted": acc.get("submitted", 0),
            "trained": acc.get("trained", 0),
            "skipped": acc.get("skipped", 0),
            "dropped": acc.get("dropped", 0),
            "dead_lettered": acc.get("dead", 0),
            "queued": sum(acc.get(k, 0) for k in QUEUED),
            "lost": acc.get("lost", 0) + self.fates.get("lost", 0),
            "duplicated": acc.get("duplicated", 0),
            "hit_groups": sum(self.hit.values()),
            "hit_fates": dict(self.hit),
            "wall_s": round(self.wall_s, 1),
            "mode": MODE,
            "notes": self.notes,
            "measured_at": time.strftime("%Y-%m-%dT%H:%M:%S"),
        }
        if self.counts_na:
            for name in ("trained", "skipped", "dropped", "dead_lettered", "queued", "lost"):
                row[name] = "n/a"
            row["duplicated"] = "n/a"
        return row


@pytest.fixture(scope="session")
def chaos_table() -> Callable[[Row], None]:
    def add(row: Row) -> None:
        _ROWS.append(row.as_dict())

    return add


COLUMNS = [
    ("fault", 42),
    ("injected", 8),
    ("submitted", 9),
    ("trained", 7),
    ("skipped", 7),
    ("dropped", 7),
    ("dead_lettered", 13),
    ("queued", 6),
    ("lost", 4),
    ("duplicated", 10),
    ("hit_groups", 10),
]


def format_table(rows: list[dict[str, Any]]) -> list[str]:
    head = " | ".join(name.ljust(width) for name, width in COLUMNS)
    lines = [head, "-" * len(head)]
    for row in rows:
        lines.append(" | ".join(str(row.get(name, "")).ljust(width) for name, width in COLUMNS))
    return lines


def pytest_terminal_summary(terminalreporter: Any) -> None:
    if not _ROWS:
        return
    wall = time.monotonic() - _SESSION_START
    terminalreporter.section(f"chaos table ({MODE} mode)")
    for line in format_table(_ROWS):
        terminalreporter.write_line(line)
    terminalreporter.write_line(
        "hit_groups: groups the victim held when the fault hit, each traced to a fate. "
        "Faults of one scenario share its run, hence its totals."
    )
    previous: list[dict[str, Any]] = []
    with contextlib.suppress(OSError, ValueError):
        previous = json.loads(RESULTS.read_text()).get("rows", [])
    seen = {(r["fault"], r["mode"]) for r in _ROWS}
    kept = [r for r in previous if (r.get("fault"), r.get("mode")) not in seen]
    doc = {
        "generated_at": time.strftime("%Y-%m-%dT%H:%M:%S"),
        "mode": MODE,
        "session_wall_s": round(wall, 1),
        "cpus": os.cpu_count(),
        "rows": kept + _ROWS,
        "extras": _EXTRAS,
    }
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(doc, indent=2) + "\n")
    terminalreporter.write_line(f"written to {RESULTS} (session {wall:.0f}s)")


_EXTRAS: dict[str, Any] = {}


class Phases:
    """Wall time per phase of a scenario (reported in chaos.json under extras.phases)."""

    def __init__(self, name: str) -> None:
        self.t0 = self.last = time.monotonic()
        self.times: dict[str, float] = {}
        _EXTRAS.setdefault("phases", {})[name] = self.times

    def __call__(self, phase: str) -> None:
        now = time.monotonic()
        self.times[phase] = round(now - self.last, 1)
        self.last = now


@pytest.fixture
def phases(request: pytest.FixtureRequest) -> Phases:
    return Phases(request.node.name)


@pytest.fixture(scope="session")
def chaos_extras() -> dict[str, Any]:
    """Free-form results (load-test latencies, ...) that go into chaos.json next to the rows."""
    return _EXTRAS


# -- model and budget ---------------------------------------------------------------------------
@pytest.fixture(scope="session")
def chaos_model() -> Path:
    """The bundled warm-started tiny model (``$CONSPO_CHAOS_MODEL`` overrides it)."""
    from conspo.models import default_checkpoint

    override = os.environ.get("CONSPO_CHAOS_MODEL")
    path = Path(override) if override else Path(default_checkpoint())
    if not (path / "config.json").is_file():
        pytest.skip(f"no model checkpoint at {path}")
    return path


@pytest.fixture
def rng(request: pytest.FixtureRequest) -> random.Random:
    """Seeded per test (``$CONSPO_CHAOS_SEED`` changes every schedule at once)."""
    seed = int(os.environ.get("CONSPO_CHAOS_SEED", "0"))
    return random.Random(f"{seed}:{request.node.name}")


# -- a Redis we can kill, restart and password-protect -------------------------------------------
class RedisServer:
    """A private redis-server on a fixed port, restartable with other persistence settings."""

    def __init__(self, workdir: Path, *, password: str | None = None) -> None:
        self.workdir = workdir
        self.port = free_port()
        self.password = password
        self.proc: subprocess.Popen | None = None
        self.restarts = 0

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def client(self, **kwargs: Any) -> redis.Redis:
        return redis.Redis.from_url(self.url, password=self.password, **kwargs)

    def start(self, *, appendonly: bool, fsync: str = "everysec") -> None:
        self.workdir.mkdir(parents=True, exist_ok=True)
        args = [
            redis_server_binary(),
            "--port", str(self.port),
            "--bind", "127.0.0.1",
            "--save", "",
            "--appendonly", "yes" if appendonly else "no",
            "--appendfsync", fsync,
            "--dir", str(self.workdir),
            "--logfile", str(self.workdir / "redis.log"),
        ]  # fmt: skip
        if self.password:
            args += ["--requirepass", self.password]
        self.proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 30
        while True:
            with contextlib.suppress(redis.RedisError, OSError):
                if self.client(socket_timeout=0.5, socket_connect_timeout=0.5).ping():
                    return
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"redis-server did not start (see {self.workdir}/redis.log)")
            time.sleep(0.05)

    def stop(self, sig: int = signal.SIGTERM) -> None:
        """SIGTERM: a clean shutdown (the AOF is flushed); SIGKILL: a crash."""
        if self.proc is None:
            return
        self.proc.send_signal(sig)
        try:
            self.proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        self.proc = None

    def restart(self, *, appendonly: bool, down_s: float, sig: int, fsync: str) -> None:
        self.stop(sig)
        time.sleep(down_s)
        self.start(appendonly=appendonly, fsync=fsync)
        self.restarts += 1


@pytest.fixture(scope="module")
def redis_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Callable[..., RedisServer]]:
    """``redis_server(appendonly=, fsync=, password=)``: private servers for the module."""
    servers: list[RedisServer] = []

    def make(*, appendonly: bool = False, fsync: str = "everysec", password: str | None = None):
        server = RedisServer(tmp_path_factory.mktemp("redis"), password=password)
        server.start(appendonly=appendonly, fsync=fsync)
        servers.append(server)
        return server

    yield make
    for server in servers:
        server.stop(signal.SIGKILL)


# -- a TCP proxy that delays and drops -----------------------------------------------------------
class ChaosProxy:
    """Between the services and Redis: adds latency to every chunk, closes connections at
    random (a Poisson process per connection with ``drop_per_s``) and, with ``reply_loss_p`` per
    reply chunk, cuts a connection instead of delivering a reply (the command ran, the client
    never hears of it: the case that tests whether every retried command is idempotent). Runs
    its own event loop in a thread of the test process."""

    def __init__(
        self,
        upstream_port: int,
        *,
        seed: int,
        latency_ms: tuple[float, float] = (0.0, 15.0),
        spike_ms: float = 150.0,
        spike_p: float = 0.01,
        drop_per_s: float = 0.1,
        reply_loss_p: float = 0.0,
    ) -> None:
        self.upstream_port = upstream_port
        self.port = free_port()
        self.rng = random.Random(seed)
        self.latency_ms = latency_ms
        self.spike_ms, self.spike_p = spike_ms, spike_p
        self.drop_per_s = drop_per_s
        self.reply_loss_p = reply_loss_p
        self.stats = Counter()
        self.dropping = True
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._run, name="chaos-proxy", daemon=True)
        self._ready = threading.Event()
        self._server: asyncio.AbstractServer | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> None:
        self._thread.start()
        if not self._ready.wait(10):
            raise RuntimeError("proxy did not start")

    def stop(self) -> None:
        async def shutdown() -> None:
            if self._server is not None:
                self._server.close()
            tasks = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            self._loop.stop()

        if self._loop.is_running():
            asyncio.run_coroutine_threadsafe(shutdown(), self._loop)
        self._thread.join(10)

    def _run(self) -> None:
        asyncio.set_event_loop(self._loop)

        async def serve() -> None:
            self._server = await asyncio.start_server(self._handle, "127.0.0.1", self.port)
            self._ready.set()

        self._loop.run_until_complete(serve())
        self._loop.run_forever()

    def _delay(self) -> float:
        if self.rng.random() < self.spike_p:
            return self.spike_ms / 1000
        return self.rng.uniform(*self.latency_ms) / 1000

    async def _pump(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, *, replies: bool
    ) -> None:
        try:
            while True:
                chunk = await reader.read(65536)
                if not chunk:
                    break
                if replies and self.dropping and self.rng.random() < self.reply_loss_p:
                    # Redis executed the command; its reply never arrives (cut mid-flight).
                    self.stats["replies_lost"] += 1
                    break
                await asyncio.sleep(self._delay())
                writer.write(chunk)
                await writer.drain()
                self.stats["bytes"] += len(chunk)
        except (ConnectionError, OSError):
            pass
        finally:
            with contextlib.suppress(Exception):
                writer.close()

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            up_reader, up_writer = await asyncio.open_connection("127.0.0.1", self.upstream_port)
        except OSError:
            writer.close()
            return
        self.stats["connections"] += 1
        tasks = [
            asyncio.ensure_future(self._pump(reader, up_writer, replies=False)),
            asyncio.ensure_future(self._pump(up_reader, writer, replies=True)),
        ]
        while True:  # a Poisson process: cut when it fires while dropping is on
            lifetime = self.rng.expovariate(self.drop_per_s) if self.drop_per_s > 0 else None
            done, _ = await asyncio.wait(
                tasks, timeout=lifetime, return_when=asyncio.FIRST_COMPLETED
            )
            if done:
                break
            if self.dropping:
                self.stats["dropped"] += 1
                break
        for task in tasks:
            task.cancel()
        for w in (writer, up_writer):
            with contextlib.suppress(Exception):
                w.close()


@pytest.fixture(scope="module")
def chaos_proxy() -> Iterator[Callable[..., ChaosProxy]]:
    proxies: list[ChaosProxy] = []

    def make(upstream_port: int, **kwargs: Any) -> ChaosProxy:
        proxy = ChaosProxy(upstream_port, **kwargs)
        proxy.start()
        proxies.append(proxy)
        return proxy

    yield make
    for proxy in proxies:
        proxy.stop()


# -- tracing every prompt ------------------------------------------------------------------------
def in_flight(
    client: redis.Redis, keys: Keys, stream: str, owner: Callable[[str], bool]
) -> list[str]:
    """Prompt entry ids whose group sits, unacknowledged, with a consumer ``owner`` accepts."""
    queue = StreamQueue(client, keys, stream, Message)
    ids = [entry_id for entry_id, consumer in queue.pending().items() if owner(consumer)]
    if stream == "prompts":
        return ids
    groups = queue.entry_keys(ids).values()
    return [entry for entry in map(prompt_entry_of, groups) if entry is not None]


# -- the stack under test ------------------------------------------------------------------------
class ChaosStack(LocalStack):
    """``LocalStack`` plus a Redis password, a resilient client, progress waits and tracing."""

    def __init__(self, config: StackConfig, *, redis_password: str | None = None) -> None:
        super().__init__(config)
        self.redis_password = redis_password
        self.client.close()
        self.client = redis.Redis.from_url(config.redis_url, password=redis_password)
        self.started_wall = time.monotonic()

    def direct(self, url: str | None = None) -> redis.Redis:
        """A retrying client (rides through Redis restarts), optionally to another URL."""
        kwargs = {"password": self.redis_password} if self.redis_password else {}
        return connect(url or self.cfg.redis_url, socket_timeout=10, **kwargs)

    def step(self, client: redis.Redis | None = None) -> int:
        raw = (client or self.client).hget(self.keys.state, "step")
        return int(raw) if raw is not None else 0

    def pid(self, service: str, index: int = 0) -> int:
        popen = self.find(service, index).popen
        assert popen is not None
        return popen.pid

    def wait_step(
        self,
        target: int,
        *,
        client: redis.Redis | None = None,
        timeout: float = PROGRESS_TIMEOUT_S,
        allow: Callable[[Any], bool] | None = None,
    ) -> int:
        """Until the learner's step reaches ``target``; raises if a service died on its own."""
        deadline = time.monotonic() + timeout
        while True:
            self.check_alive(allow)
            with contextlib.suppress(redis.RedisError):
                step = self.step(client)
                if step >= target:
                    return step
            if time.monotonic() > deadline:
                raise TimeoutError(
                    f"no training progress: step stayed below {target} for {timeout:.0f}s "
                    f"(see {self.log_dir})"
                )
            time.sleep(0.2)

    def owner_of(self, service: str, index: int = 0) -> Callable[[str], bool]:
        if service == "learner":
            name = f"learner-{self.cfg.run}-rank0"
            return lambda consumer: consumer == name
        marker = f"-{self.pid(service, index)}-"
        return lambda consumer: marker in consumer

    def hit(self, service: str, index: int = 0) -> list[str]:
        """Prompt entry ids of the groups ``service`` holds right now."""
        stream = {"generator": "prompts", "verifier": "rollouts", "learner": "labeled"}[service]
        if getattr(self, "_watch", None) is None:
            self._watch = self.direct()
        return in_flight(self._watch, self.keys, stream, self.owner_of(service, index))

    def hit_while_busy(self, service: str, index: int = 0, patience_s: float = 3.0) -> list[str]:
        """Wait (a little) until ``service`` holds work, so the signal lands inside it; returns
        what it holds (possibly nothing, when it stayed idle)."""
        deadline = time.monotonic() + patience_s
        while True:
            held = self.hit(service, index)
            if held or time.monotonic() > deadline:
                return held
            time.sleep(0.01)

    def frozen_books(self) -> tuple[dict[str, int], dict[str, str]]:
        """Exact books of a running stack: SIGSTOP every service, account, SIGCONT. Every
        stage commits atomically, so a frozen instant is a consistent one."""
        procs = [p for p in self.procs if p.alive()]
        for p in procs:
            p.signal(signal.SIGSTOP)
        try:
            return self.accounting(), trace_fates(self.client, self.keys)
        finally:
            for p in procs:
                p.signal(signal.SIGCONT)

    def stop(self, timeout: float = 60.0) -> dict[str, int | None]:
        """SIGTERM every service at once (each finishes or releases its unit of work), then
        wait; stragglers are killed. Stopping one by one is not needed for exact books (every
        stage commits atomically) and costs a lot of wall time on a small machine."""
        for p in self.procs:
            p.signal(signal.SIGTERM)
        return super().stop(timeout)

    def settle_and_trace(self) -> tuple[dict[str, int], dict[str, str]]:
        """Stop every service gracefully, then account (exact: nothing moves any more)."""
        self.stop()
        client = redis.Redis.from_url(self.cfg.redis_url, password=self.redis_password)
        self.client = client
        try:
            accounting = self.accounting()
            fates = trace_fates(client, self.keys)
        finally:
            client.close()
        return accounting, fates

    def ensure_fed(self, seed: int = 0, rows: int = 4000, epochs: int = 3) -> None:
        """Submit a training dataset (fed lazily by the api) unless one is already there."""
        if getattr(self, "_fed", False):
            return
        self.submit_dataset(arith_rows(seed, rows), epochs=epochs, name="arith")
        self._fed = True

    def logs(self) -> dict[str, str]:
        return {p.name: p.read_text(errors="replace") for p in sorted(self.log_dir.glob("*.log"))}


def check_books(accounting: dict[str, int], fates: dict[str, str]) -> Counter:
    """The balance and the per-prompt trace must agree, and neither may lose anything."""
    totals = summarize(fates)
    lost = sorted(e for e, f in fates.items() if f.startswith("lost"))
    assert not lost, f"lost prompts: {[(e, fates[e]) for e in lost[:20]]}"
    assert accounting["lost"] == 0, accounting
    assert accounting["duplicated"] == 0, accounting
    assert accounting["submitted"] == len(fates), (accounting, len(fates))
    for fate in ("trained", "skipped", "dropped", "dead"):
        assert totals.get(fate, 0) == accounting[fate], (fate, totals, accounting)
    queued = sum(accounting[k] for k in QUEUED)
    assert totals.get("queued", 0) == queued, (totals, accounting)
    return totals


CHAOS_ENV: dict[str, dict[str, str]] = {
    # Keep every entry so that trace_fates can follow each prompt; heartbeat every second.
    "all": {"CONSPO_RETAIN_ENTRIES": "1000000", "CONSPO_HEARTBEAT_S": "1"},
    # A push to a hung (SIGSTOPped) generator gives up after 10 s (a run setting: learner and
    # generators must agree, conspo.settings.RunSettings). A dead generator is let go
    # by the defaults (its registration lapses 3 beats after its last, its flow lease is
    # renewed by the heartbeat and expires 10 s later, its prompts are handed back once its
    # heartbeat is 5 beats old): the suite checks the defaults, not a tuned stack.
    "learner": {"CONSPO_WEIGHT_SYNC_TIMEOUT_S": "10"},
    "generator": {"CONSPO_WEIGHT_SYNC_TIMEOUT_S": "10"},
}


def merge_env(*envs: dict[str, dict[str, str]]) -> dict[str, dict[str, str]]:
    out: dict[str, dict[str, str]] = {}
    for env in envs:
        for service, values in env.items():
            out.setdefault(service, {}).update(values)
    return out


@pytest.fixture(scope="module")
def chaos_stack(
    tmp_path_factory: pytest.TempPathFactory,
    chaos_model: Path,
    redis_url: str,
    redis_server: Callable[..., RedisServer],
    chaos_proxy: Callable[..., ChaosProxy],
) -> Iterator[Callable[..., ChaosStack]]:
    """``chaos_stack(name, redis_url_=None, redis_password=None, env=None, **config)``: a started
    stack on its own run namespace (not yet fed), shared by the tests of a module: each stack
    costs tens of seconds to start on a small CPU, so a module's scenarios run one after the
    other on one stack, each with its own faults, rows and books. Stopped and wiped at the end
    of the module, before any private Redis or proxy goes (hence the fixture dependencies)."""
    stacks: list[ChaosStack] = []

    def make(
        name: str,
        *,
        redis_url_: str | None = None,
        redis_password: str | None = None,
        env: dict[str, dict[str, str]] | None = None,
        **config: Any,
    ) -> ChaosStack:
        values: dict[str, Any] = {
            "run": f"chaos-{name}-{uuid.uuid4().hex[:6]}",
            "out_dir": _out_dir(tmp_path_factory, name),
            "redis_url": redis_url_ or redis_url,
            "model_path": chaos_model,
            "steps": 100_000,  # scenarios end with a graceful stop, not at a step budget
            "batch_groups": 4,
            "group_size": 4,
            "max_tokens": 8,
            "verifiers": 2,
            "checkpoint_every": 2,
            "max_staleness": 1,
            "lr": 1e-4,
            "env": merge_env(CHAOS_ENV, env or {}),
            **config,
        }
        stack = ChaosStack(StackConfig(**values), redis_password=redis_password)
        stacks.append(stack)
        stack.start(ready_timeout=READY_TIMEOUT_S)
        return stack

    yield make
    for stack in stacks:
        with contextlib.suppress(Exception):
            stack.stop(timeout=30)
        with contextlib.suppress(Exception):
            client = redis.Redis.from_url(stack.cfg.redis_url, password=stack.redis_password)
            delete_run(client, stack.cfg.run)
            client.close()


POISON = "What is {{7*7}} \N{SNOWMAN}?"  # characters the tiny tokenizer does not know


def _out_dir(factory: pytest.TempPathFactory, name: str) -> Path:
    """Logs and checkpoints of a stack: a pytest temp dir, or ``$CONSPO_CHAOS_OUT/<name>-<id>``
    to keep them past pytest's rotation of temp dirs."""
    base = os.environ.get("CONSPO_CHAOS_OUT")
    if not base:
        return factory.mktemp(name)
    out = Path(base) / f"{name}-{uuid.uuid4().hex[:6]}"
    out.mkdir(parents=True)
    return out


def arith_rows(seed: int, n: int, poison_every: int = 20) -> list[dict[str, str]]:
    """``n`` problems of the demo's arithmetic task, with every ``poison_every``-th prompt one
    the generator must refuse (it cannot tokenise it): those are dead-lettered with the reason,
    so that fate is exercised under every fault too."""
    from conspo.tasks.arith import make_split

    rows = [
        {"prompt": p.prompt, "answer": p.answer}
        for p in make_split(n_train=n, n_test=0, seed=seed).train
    ]
    for i in range(poison_every - 1, len(rows), poison_every):
        rows[i] = {"prompt": f"{POISON} ({i})", "answer": "49"}
    return rows


# -- a client that submits prompts the way the api's contract asks: Idempotency-Key + retry -------
@dataclass
class Submission:
    key: str
    prompt_ids: list[str]
    entry_ids: list[str] = field(default_factory=list)
    attempts: int = 0
    failures: int = 0
    replayed: bool = False


class Submitter:
    """Keeps the prompts backlog topped up through ``POST /v1/prompts``. Each request carries an
    Idempotency-Key and is retried with it until the api acknowledges it, whatever happens to
    the api in between; a request retried after a failure is one the fault hit. With
    ``idempotent=False`` requests go without a key (a retry may then enqueue twice, which the
    books must still count)."""

    def __init__(
        self,
        stack: ChaosStack,
        rows: list[dict[str, str]],
        *,
        backlog: int,
        batch: int,
        trickle_s: float = 0.5,
        idempotent: bool = True,
    ) -> None:
        self.stack = stack
        self.trickle_s = trickle_s
        self.idempotent = idempotent
        self.tag = uuid.uuid4().hex[:6]
        self.rows = rows
        self.backlog = backlog
        self.batch = batch
        self.done: list[Submission] = []
        self.errors: list[str] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="submitter", daemon=True)
        self._next = 0

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(PROGRESS_TIMEOUT_S)
        assert not self._thread.is_alive(), "submitter did not finish its last request"

    def _outstanding(self, client: redis.Redis) -> int:
        return StreamQueue(client, self.stack.keys, "prompts", Message).depth().outstanding

    def _run(self) -> None:
        client = self.stack.direct()
        with httpx.Client(
            base_url=f"http://127.0.0.1:{self.stack.api_port}",
            headers={"Authorization": f"Bearer {self.stack.token}"},
            timeout=10,
        ) as http:
            last = 0.0
            while not self._stop.is_set():
                # Top the backlog up, and send at least every ``trickle_s`` anyway, so that a
                # fault of the api always meets requests (and their retries).
                try:
                    full = self._outstanding(client) >= self.backlog
                except redis.RedisError:
                    full = True
                if full and time.monotonic() - last < self.trickle_s:
                    self._stop.wait(0.1)
                    continue
                last = time.monotonic()
                self._submit(http)
        client.close()

    def _submit(self, http: httpx.Client) -> None:
        rows = [self.rows[(self._next + i) % len(self.rows)] for i in range(self.batch)]
        base = self._next
        self._next += self.batch
        sub = Submission(
            key=uuid.uuid4().hex,
            prompt_ids=[f"sub-{self.tag}-{base + i}" for i in range(self.batch)],
        )
        body = {
            "prompts": [
                {"prompt_id": pid, "text": r["prompt"], "answer": r["answer"], "verifier": "arith"}
                for pid, r in zip(sub.prompt_ids, rows, strict=True)
            ]
        }
        deadline = time.monotonic() + PROGRESS_TIMEOUT_S
        while True:  # retried even when stopping: the outcome of a sent request must be known
            sub.attempts += 1
            try:
                headers = {"Idempotency-Key": sub.key} if self.idempotent else {}
                response = http.post("/v1/prompts", json=body, headers=headers)
                if response.status_code == 202:
                    sub.entry_ids = response.json()["entry_ids"]
                    sub.replayed = response.headers.get("Idempotent-Replayed") == "true"
                    self.done.append(sub)
                    return
                if response.status_code < 500:
                    self.errors.append(f"{response.status_code}: {response.text[:300]}")
                    return
            except httpx.HTTPError:
                pass
            sub.failures += 1
            if time.monotonic() > deadline:
                self.errors.append(f"request {sub.key} never acknowledged")
                return
            time.sleep(0.3)

    @property
    def hit(self) -> list[Submission]:
        return [s for s in self.done if s.failures]


def wait_until(predicate: Callable[[], object], timeout: float, what: str, every: float = 0.2):
    deadline = time.monotonic() + timeout
    while True:
        with contextlib.suppress(redis.RedisError, httpx.HTTPError):
            value = predicate()
            if value:
                return value
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out after {timeout:.0f}s waiting for {what}")
        time.sleep(every)


@pytest.fixture(scope="session")
def kit() -> SimpleNamespace:
    """The harness's helpers for test modules (test folders are not packages: see
    docs/contributing.md)."""
    return SimpleNamespace(
        LONG=LONG,
        PROGRESS_TIMEOUT_S=PROGRESS_TIMEOUT_S,
        Row=Row,
        Submitter=Submitter,
        arith_rows=arith_rows,
        check_books=check_books,
        in_flight=in_flight,
        summarize=summarize,
        wait_until=wait_until,
    )
