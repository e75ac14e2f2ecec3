"""Weight sync: packed layout, the group protocol, and publisher/subscriber with real processes.

The process tests drive generator stand-ins (``weight_sync_worker.py``) that are started once per
module and reused (a fresh run namespace and subscriber per test): importing torch takes seconds
on a loaded 2-core machine. Expected tensors are the publisher's own tensors; every comparison
is exact (``torch.equal`` plus dtype), since a broadcast must deliver bitwise copies.
"""

from __future__ import annotations

import contextlib
import importlib.util
import json
import os
import queue
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import redis
import torch
from safetensors.torch import load_file, save_file

from conspo.keys import Keys
from conspo.protocol import Rendezvous, WeightAnnouncement, decode
from conspo.testing import REPO_ROOT, wait_for
from conspo.weight_sync import (
    GroupError,
    LayoutMismatchError,
    LocalReceiver,
    PushReport,
    StagedWeights,
    WeightPublisher,
    WeightSubscriber,
    bucketize,
    join_buckets,
    layout_of,
    live_members,
    load_checkpoint,
    named_tensors_of,
    open_group,
    read_announcement,
    served_versions,
    unbucketize,
)
from conspo.weight_sync.group import make_store
from conspo.weight_sync.layout import ALIGN, BufferPool

HERE = Path(__file__).resolve().parent
WORKER = HERE / "weight_sync_worker.py"
_spec = importlib.util.spec_from_file_location("conspo_weight_sync_worker", WORKER)
assert _spec is not None and _spec.loader is not None
_helper = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(_helper)
make_named = _helper.make_named

TIMEOUT_S = 10.0  # every collective's timeout in these tests
TTL_S = 4.0
HEARTBEAT_S = 0.5
BUCKET = 4096  # small on purpose: several buckets, tensors straddling bucket boundaries


def assert_same(received: dict[str, torch.Tensor], expected: object) -> None:
    pairs = named_tensors_of(expected)  # type: ignore[arg-type]
    assert sorted(received) == sorted(n for n, _ in pairs)
    for name, tensor in pairs:
        got = received[name]
        assert got.dtype == tensor.dtype, name
        assert torch.equal(got, tensor.detach()), name


# -- worker processes -----------------------------------------------------------------------------
class Worker:
    def __init__(self, log: Path) -> None:
        self.log = log
        self._log_file = open(log, "ab")  # noqa: SIM115 - closed in exit()
        self.proc = subprocess.Popen(
            [sys.executable, str(WORKER)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=self._log_file,
            cwd=REPO_ROOT,
            env={**os.environ, "PYTHONUNBUFFERED": "1"},
            text=True,
        )
        self.replies: queue.Queue[dict | None] = queue.Queue()
        self._ready = False
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self.replies.put(json.loads(line))
        self.replies.put(None)

    def _get(self, timeout: float) -> dict:
        try:
            reply = self.replies.get(timeout=timeout)
        except queue.Empty:
            raise AssertionError(f"worker gave no reply in {timeout}s; {self.tail()}") from None
        if reply is None:
            raise AssertionError(f"worker exited; {self.tail()}")
        return reply

    def call(self, cmd: str, timeout: float = 90.0, **args: object) -> dict:
        if not self._ready:
            assert self._get(timeout).get("ready")
            self._ready = True
        assert self.proc.stdin is not None
        self.proc.stdin.write(json.dumps({"cmd": cmd, **args}) + "\n")
        self.proc.stdin.flush()
        return self._get(timeout)

    @property
    def alive(self) -> bool:
        return self.proc.poll() is None

    def kill(self) -> None:
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(timeout=30)

    def exit(self) -> None:
        if self.alive:
            with contextlib.suppress(Exception):
                self.call("exit", timeout=20)
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.kill()
        self._log_file.close()

    def tail(self, n: int = 3000) -> str:
        return f"log {self.log}:\n" + self.log.read_text(errors="replace")[-n:]


class WorkerPool:
    def __init__(self, logs: Path, prestart: int) -> None:
        self.logs = logs
        self.count = 0
        self.idle = [self._spawn() for _ in range(prestart)]
        self.all: list[Worker] = list(self.idle)

    def _spawn(self) -> Worker:
        self.count += 1
        return Worker(self.logs / f"worker{self.count}.log")

    def acquire(self) -> Worker:
        if self.idle:
            return self.idle.pop(0)
        worker = self._spawn()
        self.all.append(worker)
        return worker

    def release(self, worker: Worker) -> None:
        if worker.alive:
            try:
                worker.call("stop", timeout=30)
            except AssertionError:
                worker.kill()
                return
            self.idle.append(worker)

    def close(self) -> None:
        threads = [threading.Thread(target=w.exit) for w in self.all]
        for t in threads:
            t.start()
        for t in threads:
            t.join(60)


@pytest.fixture(scope="module", autouse=True)
def worker_pool(tmp_path_factory: pytest.TempPathFactory) -> Iterator[WorkerPool]:
    """Started with the module so that the workers import torch while the in-process tests run."""
    pool = WorkerPool(tmp_path_factory.mktemp("weight-sync-logs"), prestart=3)
    yield pool
    pool.close()


Start = Callable[..., Worker]


@pytest.fixture
def start_worker(
    worker_pool: WorkerPool, redis_url: str, run_name: str, tmp_path: Path
) -> Iterator[Start]:
    """``start_worker(instance, variant)``: a generator stand-in subscribed in this test's run."""
    used: list[Worker] = []

    def start(instance: str, variant: str = "mixed") -> Worker:
        worker = worker_pool.acquire()
        used.append(worker)
        reply = worker.call(
            "start",
            redis_url=redis_url,
            run=run_name,
            instance=instance,
            variant=variant,
            out_dir=str(tmp_path),
            timeout_s=TIMEOUT_S,
            heartbeat_s=HEARTBEAT_S,
        )
        assert reply["ok"], reply
        return worker

    yield start
    for worker in used:
        worker_pool.release(worker)


@pytest.fixture
def publisher(redis_client: redis.Redis, keys: Keys) -> Iterator[WeightPublisher]:
    pub = WeightPublisher(
        redis_client, keys, timeout_s=TIMEOUT_S, member_ttl_s=TTL_S, bucket_bytes=BUCKET
    )
    yield pub
    pub.close()


def wait_members(client: redis.Redis, keys: Keys, names: set[str]) -> None:
    assert wait_for(lambda: names <= set(live_members(client, keys, TTL_S)), 60), names


def wait_served(client: redis.Redis, keys: Keys, instance: str, version: int) -> None:
    assert wait_for(lambda: served_versions(client, keys).get(instance) == version, 60), (
        instance,
        version,
        served_versions(client, keys),
    )


def staged(out_dir: Path, instance: str, version: int, source: str) -> dict[str, torch.Tensor]:
    return load_file(str(out_dir / f"{instance}-v{version}-{source}.safetensors"))


# -- layout ---------------------------------------------------------------------------------------
def test_layout_hash_covers_names_shapes_and_dtypes() -> None:
    base = make_named("mixed", 1)
    layout = layout_of(base)
    assert layout_of(make_named("mixed", 2)).hash == layout.hash  # values do not matter
    assert layout_of(make_named("other", 1)).hash != layout.hash  # one shape differs
    renamed = [("x" + n, t) for n, t in base]
    assert layout_of(renamed).hash != layout.hash
    recast = [(n, t.double() if i == 0 else t) for i, (n, t) in enumerate(base)]
    assert layout_of(recast).hash != layout.hash
    assert all(s.offset % ALIGN == 0 for s in layout.specs)
    assert layout.num_params == sum(t.numel() for _, t in base)
    assert layout.total_bytes >= sum(t.numel() * t.element_size() for _, t in base)
    with pytest.raises(ValueError, match="duplicate"):
        layout_of([("a", torch.zeros(1)), ("a", torch.zeros(2))])


@pytest.mark.parametrize("bucket_bytes", [64, 1000, 4096, 1 << 30])
def test_bucketize_round_trip_is_bitwise(bucket_bytes: int) -> None:
    named = make_named("mixed", 7)
    layout = layout_of(named)
    buckets = list(bucketize(named, bucket_bytes))
    assert all(b.numel() <= max(bucket_bytes, ALIGN) for b in buckets)
    assert sum(b.numel() for b in buckets) == layout.total_bytes
    assert_same(dict(join_buckets(buckets, layout)), named)


def test_buffer_pool_never_hands_out_a_buffer_still_in_use() -> None:
    pool = BufferPool(2)
    layout = layout_of([("x", torch.zeros(10))])
    first = pool.get(layout.total_bytes)
    staged = unbucketize(first, layout)  # a generator still holds these views
    first_ptr = first.data_ptr()
    del first
    second = pool.get(layout.total_bytes)
    assert second.data_ptr() != first_ptr
    second_ptr = second.data_ptr()
    del second
    assert pool.get(layout.total_bytes).data_ptr() == second_ptr  # nobody holds it: reused
    del staged
    assert pool.get(layout.total_bytes).data_ptr() in (first_ptr, second_ptr)


# -- the group protocol (threads in one process: each rank is its own ProcessGroupGloo) ----------
def _run_ranks(
    world: int, receivers: dict[int, Callable], sender: Callable, timeout_s: float = TIMEOUT_S
) -> tuple[object, dict[int, object]]:
    store = make_store("127.0.0.1", 0, is_master=True, timeout_s=timeout_s)
    rdv = Rendezvous(
        host="127.0.0.1",
        port=store.port,
        world_size=world,
        epoch=3,
        backend="gloo",
        members=[f"m{r}" for r in range(1, world)],
    )
    results: dict[int, object] = {}

    def run(rank: int, fn: Callable) -> None:
        group = None
        try:
            group = open_group(rdv, rank, timeout_s)
            results[rank] = fn(group)
        except Exception as exc:
            results[rank] = exc
        finally:
            if group is not None:
                group.close()

    threads = [threading.Thread(target=run, args=(r, fn)) for r, fn in receivers.items()]
    for t in threads:
        t.start()
    root = None
    try:
        root = open_group(rdv, 0, timeout_s, store=store)
        sent: object = sender(root)
    except Exception as exc:
        sent = exc
    finally:
        for t in threads:
            t.join(timeout_s * 4)
        if root is not None:
            root.close()
    assert not any(t.is_alive() for t in threads)
    return sent, results


def test_group_broadcast_flat_and_streamed_receivers_get_exact_copies() -> None:
    pushes = {1: make_named("mixed", 1), 2: make_named("mixed", 2)}
    layout = layout_of(make_named("mixed", None))

    def flat(group):
        return [
            {n: t.clone() for n, t in group.receive_tensors(layout, expect_version=v)}
            for v in pushes
        ]

    def streamed(group):
        return [
            {n: t.clone() for n, t in group.iter_receive(layout, expect_version=v)} for v in pushes
        ]

    def send(group):
        return [group.broadcast_tensors(w, version=v, bucket_bytes=1000) for v, w in pushes.items()]

    sent, got = _run_ranks(3, {1: flat, 2: streamed}, send)
    assert not isinstance(sent, Exception), sent
    for result in sent:
        assert result.received == [1, 2] and result.refused == []
        assert result.bytes == layout.total_bytes
    for rank in (1, 2):
        assert not isinstance(got[rank], Exception), got[rank]
        for received, expected in zip(got[rank], pushes.values(), strict=True):
            assert_same(received, expected)


def test_group_refuses_a_mismatched_layout_without_breaking_the_others() -> None:
    weights = make_named("mixed", 1)

    def mismatched(group):
        errors = []
        for v in (1, 2):
            try:
                group.receive_tensors(layout_of(make_named("other", None)), expect_version=v)
            except LayoutMismatchError as exc:
                errors.append(str(exc))
        return errors, group.broken

    def matching(group):
        layout = layout_of(make_named("mixed", None))
        return [dict(group.receive_tensors(layout, expect_version=v)) for v in (1, 2)]

    def send(group):
        return [group.broadcast_tensors(weights, version=v, bucket_bytes=1000) for v in (1, 2)]

    sent, got = _run_ranks(3, {1: mismatched, 2: matching}, send)
    assert not isinstance(sent, Exception), sent
    assert [(r.refused, r.received) for r in sent] == [([1], [2]), ([1], [2])]
    errors, broken = got[1]
    assert len(errors) == 2 and all("layout mismatch" in e for e in errors)
    assert broken is False
    for received in got[2]:
        assert_same(received, weights)


def test_group_desync_fails_both_sides_without_hanging() -> None:
    layout = layout_of(make_named("mixed", None))

    def wrong_version(group):
        return group.receive_tensors(layout, expect_version=99)

    t0 = time.monotonic()
    sent, got = _run_ranks(
        2, {1: wrong_version}, lambda g: g.broadcast_tensors(make_named("mixed", 1), version=1)
    )
    assert isinstance(got[1], GroupError) and "99" in str(got[1])
    assert isinstance(sent, GroupError)
    assert time.monotonic() - t0 < 4 * TIMEOUT_S  # bounded, not a hang


def test_open_group_times_out_when_a_member_never_joins() -> None:
    store = make_store("127.0.0.1", 0, is_master=True, timeout_s=1.0)
    rdv = Rendezvous(
        host="127.0.0.1", port=store.port, world_size=2, epoch=0, backend="gloo", members=["x"]
    )
    with pytest.raises(GroupError, match="could not form"):
        open_group(rdv, 0, 1.0, store=store)


def test_load_checkpoint_reads_single_file_and_sharded_directories(tmp_path: Path) -> None:
    weights = dict(make_named("mixed", 3))
    single = tmp_path / "single"
    single.mkdir()
    save_file(weights, str(single / "model.safetensors"))
    template = make_named("mixed", None)
    assert_same(load_checkpoint(single, template), weights)

    sharded = tmp_path / "sharded"
    sharded.mkdir()
    names = sorted(weights)
    shards = {"a.safetensors": names[:3], "b.safetensors": names[3:]}
    for file, part in shards.items():
        save_file({n: weights[n] for n in part}, str(sharded / file))
    index = {"weight_map": {n: f for f, part in shards.items() for n in part}}
    (sharded / "model.safetensors.index.json").write_text(json.dumps(index))
    assert_same(load_checkpoint(sharded, template), weights)

    with pytest.raises(ValueError, match="shape"):
        load_checkpoint(single, make_named("other", None))


# -- publisher alone ----------------------------------------------------------------------------
def test_push_without_members_only_announces(
    publisher: WeightPublisher, redis_client: redis.Redis, keys: Keys
) -> None:
    listener = redis_client.pubsub(ignore_subscribe_messages=True)
    listener.subscribe(keys.weights_channel)
    weights = make_named("mixed", 1)
    layout = layout_of(weights)

    report = publisher.push(weights, version=3, step=7, checkpoint_path="/ckpt/3")
    assert isinstance(report, PushReport)
    assert report.ok and report.receivers == [] and report.transport == "checkpoint"
    assert report.seconds < TIMEOUT_S  # nobody was waited for
    ann = read_announcement(redis_client, keys)
    assert ann is not None
    assert (ann.version, ann.step, ann.transport) == (3, 7, "checkpoint")
    assert ann.checkpoint_path == "/ckpt/3" and ann.rendezvous is None
    assert (ann.num_params, ann.num_bytes) == (layout.num_params, layout.total_bytes)
    assert ann.layout_hash == layout.hash
    message = None
    deadline = time.monotonic() + 10
    while message is None and time.monotonic() < deadline:
        message = listener.get_message(timeout=0.5)
    assert message is not None
    assert decode(message["data"], WeightAnnouncement) == ann

    report = publisher.push(weights, version=4, step=8)
    assert report.ok and report.transport == "broadcast"
    ann = read_announcement(redis_client, keys)
    assert ann is not None and ann.version == 4 and ann.rendezvous is None
    listener.close()


# -- publisher and subscriber processes ----------------------------------------------------------
def test_two_subscribers_stage_exact_copies_and_report_served(
    start_worker: Start,
    publisher: WeightPublisher,
    redis_client: redis.Redis,
    keys: Keys,
    tmp_path: Path,
) -> None:
    workers = {name: start_worker(name) for name in ("gen-a", "gen-b")}
    wait_members(redis_client, keys, set(workers))

    v1 = make_named("mixed", 1)
    first = publisher.push(v1, version=1, step=10)
    assert first.ok, first
    assert first.receivers == ["gen-a", "gen-b"] and first.rebuilt
    assert first.bytes == layout_of(v1).total_bytes
    ann = read_announcement(redis_client, keys)
    assert ann is not None and ann.rendezvous is not None
    assert ann.rendezvous.members == ["gen-a", "gen-b"] and ann.rendezvous.world_size == 3
    for name in workers:
        wait_served(redis_client, keys, name, 1)
        assert_same(staged(tmp_path, name, 1, "broadcast"), v1)

    v2 = make_named("mixed", 2)
    second = publisher.push(v2, version=2, step=20)
    assert second.ok, second
    assert second.receivers == ["gen-a", "gen-b"]
    assert second.epoch == first.epoch and not second.rebuilt
    for name, worker in workers.items():
        wait_served(redis_client, keys, name, 2)
        assert_same(staged(tmp_path, name, 2, "broadcast"), v2)
        status = worker.call("status")
        assert status["last_error"] is None
        assert [(a["version"], a["source"]) for a in status["applied"]] == [
            (1, "broadcast"),
            (2, "broadcast"),
        ]
    assert served_versions(redis_client, keys) == {"gen-a": 2, "gen-b": 2}


def test_killed_subscriber_does_not_hang_the_learner(
    start_worker: Start,
    publisher: WeightPublisher,
    redis_client: redis.Redis,
    keys: Keys,
    tmp_path: Path,
) -> None:
    survivor, victim = start_worker("gen-a"), start_worker("gen-b")
    wait_members(redis_client, keys, {"gen-a", "gen-b"})
    first = publisher.push(make_named("mixed", 1), version=1, step=1)
    assert first.ok and first.receivers == ["gen-a", "gen-b"], first
    wait_served(redis_client, keys, "gen-b", 1)

    victim.kill()
    t0 = time.monotonic()
    after_kill = publisher.push(make_named("mixed", 2), version=2, step=2)
    assert time.monotonic() - t0 < 2 * TIMEOUT_S + 10  # the timeout bounds it, plus slack
    assert not after_kill.ok or after_kill.receivers == ["gen-a"], after_kill

    # Keep pushing (as a learner would): the survivor is reached once the group was rebuilt.
    version, report = 2, after_kill
    deadline = time.monotonic() + TTL_S + 4 * TIMEOUT_S
    while not (report.ok and report.receivers == ["gen-a"]) and time.monotonic() < deadline:
        time.sleep(0.3)
        version += 1
        report = publisher.push(make_named("mixed", version), version=version, step=version)
        assert report.seconds < 2 * TIMEOUT_S + 10
    assert report.ok and report.receivers == ["gen-a"], report
    assert report.epoch is not None and report.epoch > first.epoch
    wait_served(redis_client, keys, "gen-a", version)
    assert_same(staged(tmp_path, "gen-a", version, "broadcast"), make_named("mixed", version))
    assert survivor.alive


def test_late_joiner_loads_the_checkpoint_then_gets_the_next_push(
    start_worker: Start,
    publisher: WeightPublisher,
    redis_client: redis.Redis,
    keys: Keys,
    tmp_path: Path,
) -> None:
    start_worker("gen-a", "mlp")
    wait_members(redis_client, keys, {"gen-a"})
    v1 = make_named("mlp", 1)
    ckpt = tmp_path / "ckpt-v1"
    ckpt.mkdir()
    save_file(
        {n: t.contiguous() for n, t in v1.state_dict().items()}, str(ckpt / "model.safetensors")
    )
    first = publisher.push(v1, version=1, step=5, checkpoint_path=str(ckpt))
    assert first.ok and first.receivers == ["gen-a"], first

    start_worker("gen-c", "mlp")  # missed version 1
    wait_served(redis_client, keys, "gen-c", 1)
    assert_same(staged(tmp_path, "gen-c", 1, "checkpoint"), v1)

    v2 = make_named("mlp", 2)
    second = publisher.push(v2, version=2, step=6)
    assert second.ok, second
    assert second.rebuilt and second.epoch is not None and second.epoch > first.epoch
    assert second.receivers == ["gen-a", "gen-c"]
    for name in ("gen-a", "gen-c"):
        wait_served(redis_client, keys, name, 2)
        assert_same(staged(tmp_path, name, 2, "broadcast"), v2)


def test_layout_mismatch_is_refused_cleanly(
    start_worker: Start,
    publisher: WeightPublisher,
    redis_client: redis.Redis,
    keys: Keys,
    tmp_path: Path,
) -> None:
    start_worker("gen-good", "mixed")
    bad = start_worker("gen-bad", "other")
    wait_members(redis_client, keys, {"gen-good", "gen-bad"})

    weights = make_named("mixed", 1)
    report = publisher.push(weights, version=1, step=1)
    assert report.ok and report.receivers == ["gen-good"], report
    assert "layout mismatch" in report.skipped["gen-bad"]
    wait_served(redis_client, keys, "gen-good", 1)
    assert_same(staged(tmp_path, "gen-good", 1, "broadcast"), weights)

    assert wait_for(lambda: bad.call("status")["last_error"] is not None, 30)
    status = bad.call("status")
    assert "layout mismatch" in status["last_error"]
    assert status["applied"] == [] and status["epoch"] is None
    assert "gen-bad" not in served_versions(redis_client, keys)
    assert not list(tmp_path.glob("gen-bad-*"))


def _push_until(
    pub: WeightPublisher, done: Callable[[PushReport], bool], first_version: int, limit_s: float
) -> PushReport:
    """Push successive versions (as a learner does) until ``done`` or ``limit_s`` passes."""
    version = first_version
    deadline = time.monotonic() + limit_s
    while True:
        report = pub.push(make_named("mixed", version), version=version, step=version)
        if done(report) or time.monotonic() > deadline:
            return report
        version += 1
        time.sleep(0.3)


def test_wedged_subscriber_is_left_out_then_readmitted(
    start_worker: Start, redis_client: redis.Redis, keys: Keys, tmp_path: Path
) -> None:
    pub = WeightPublisher(
        redis_client, keys, timeout_s=3.0, member_ttl_s=TTL_S, bucket_bytes=BUCKET
    )
    try:
        start_worker("gen-a")
        wedged = start_worker("gen-b")
        wait_members(redis_client, keys, {"gen-a", "gen-b"})
        first = pub.push(make_named("mixed", 1), version=1, step=1)
        assert first.ok and first.receivers == ["gen-a", "gen-b"], first

        os.kill(wedged.proc.pid, signal.SIGSTOP)  # alive, registered, but not answering
        try:
            # Its registration is still fresh: the push includes it and fails after the timeout
            # (or, on a very loaded machine, its registration already expired: then it is out).
            stuck = pub.push(make_named("mixed", 2), version=2, step=2)
            assert (not stuck.ok and stuck.error) or stuck.receivers == ["gen-a"], stuck
            # Left out while it stays silent (a suspect, or expired), however fresh it looks.
            alone = _push_until(pub, lambda r: r.ok and r.receivers == ["gen-a"], 3, 30)
            assert alone.ok and alone.receivers == ["gen-a"], alone
        finally:
            os.kill(wedged.proc.pid, signal.SIGCONT)

        both = _push_until(pub, lambda r: r.receivers == ["gen-a", "gen-b"], alone.version + 1, 60)
        assert both.ok and both.receivers == ["gen-a", "gen-b"], both
        assert both.rebuilt and both.epoch is not None and alone.epoch is not None
        assert both.epoch > alone.epoch
        wait_served(redis_client, keys, "gen-b", both.version)
        assert_same(
            staged(tmp_path, "gen-b", both.version, "broadcast"), make_named("mixed", both.version)
        )
    finally:
        pub.close()


def test_subscriber_in_process_with_a_custom_receiver(
    publisher: WeightPublisher, redis_client: redis.Redis, keys: Keys
) -> None:
    """The ``receiver=`` hook (what an engine-side integration plugs in) sees every round."""

    class Recording(LocalReceiver):
        def __init__(self, template: object) -> None:
            super().__init__(template, timeout_s=TIMEOUT_S)  # type: ignore[arg-type]
            self.calls: list[tuple[str, int]] = []

        def receive(self, announcement: WeightAnnouncement, rank: int) -> StagedWeights:
            self.calls.append(("receive", announcement.version))
            return super().receive(announcement, rank)

        def leave(self, rendezvous: Rendezvous) -> None:
            self.calls.append(("leave", rendezvous.epoch))
            super().leave(rendezvous)

    template = make_named("mixed", None)
    receiver = Recording(template)
    sub = WeightSubscriber(
        redis_client, keys, "gen-x", timeout_s=TIMEOUT_S, heartbeat_s=HEARTBEAT_S, receiver=receiver
    )
    sub.start(template)
    try:
        wait_members(redis_client, keys, {"gen-x"})
        weights = make_named("mixed", 5)
        report = publisher.push(weights, version=5, step=9)
        assert report.ok and report.receivers == ["gen-x"], report
        got: list[StagedWeights] = []
        assert wait_for(lambda: got.append(sub.take_staged()) or got[-1] is not None, 30)
        staged = got[-1]
        assert (staged.version, staged.step, staged.source) == (5, 9, "broadcast")
        staged.apply_to(template)  # what the generator does between requests
        assert_same(dict(template), weights)
        assert sub.take_staged() is None  # handed out once
        assert sub.epoch == report.epoch
    finally:
        sub.close()
    assert receiver.calls[0] == ("receive", 5)
    assert ("leave", report.epoch) in receiver.calls
    assert "gen-x" not in live_members(redis_client, keys, TTL_S)  # deregistered


def test_a_sigkilled_member_costs_seconds_not_the_timeouts(
    start_worker: Start, redis_client: redis.Redis, keys: Keys, tmp_path: Path
) -> None:
    # Transfer timeout and member lifetime of a minute: only the fast paths can make this quick.
    slow = 60.0
    pub = WeightPublisher(
        redis_client, keys, timeout_s=slow, member_ttl_s=slow, bucket_bytes=BUCKET,
        join_timeout_s=3.0,
    )  # fmt: skip
    layout = layout_of(make_named("mixed", 1))
    try:
        start_worker("gen-a")
        victim = start_worker("gen-b")
        wait_members(redis_client, keys, {"gen-a", "gen-b"})
        first = pub.push(make_named("mixed", 1), version=1, step=1)
        assert first.ok and first.receivers == ["gen-a", "gen-b"], first
        wait_served(redis_client, keys, "gen-b", 1)
        assert pub.wants_push(layout.hash, "gloo") == []  # everybody live is reached

        victim.kill()
        # The group it was in fails as soon as the collective touches its closed sockets.
        t0 = time.monotonic()
        hit = pub.push(make_named("mixed", 2), version=2, step=2)
        assert time.monotonic() - t0 < 5.0, hit  # (15 ms on a 2-core box: a closed socket)
        assert not hit.ok or hit.receivers == ["gen-a"], hit
        # It stopped refreshing its registration: gone after 3 missed beats + 1 s, not 60 s.
        gone_after = 3 * HEARTBEAT_S + 1.0
        assert wait_for(
            lambda: "gen-b" not in live_members(redis_client, keys, slow), gone_after + 2.0
        )
        t0 = time.monotonic()
        alone = pub.push(make_named("mixed", 3), version=3, step=3)
        assert alone.ok and alone.receivers == ["gen-a"], alone
        assert time.monotonic() - t0 < 5.0  # nobody waited for

        # A newcomer (the restarted generator) is seen by an idle learner, and reached.
        start_worker("gen-c")
        wait_members(redis_client, keys, {"gen-c"})
        assert pub.wants_push(layout.hash, "gloo") == ["gen-c"]
        both = pub.push(make_named("mixed", 3), version=3, step=3)
        assert both.ok and both.receivers == ["gen-a", "gen-c"], both
        assert pub.wants_push(layout.hash, "gloo") == []
        wait_served(redis_client, keys, "gen-c", 3)
    finally:
        pub.close()


def test_a_rebuilt_group_waits_the_join_timeout_for_a_member_that_never_comes() -> None:
    store = make_store("127.0.0.1", 0, is_master=True, timeout_s=60.0)
    rdv = Rendezvous(
        host="127.0.0.1", port=store.port, world_size=2, epoch=0, backend="gloo", members=["x"]
    )
    t0 = time.monotonic()
    with pytest.raises(GroupError, match="within 1s"):
        open_group(rdv, 0, 60.0, store=store, join_timeout_s=1.0)
    assert time.monotonic() - t0 < 10.0  # the join timeout, not the store's or the transfer's
