"""Process faults on one running stack: services killed (SIGKILL) and hung (SIGSTOP).

The tests of this module run one after the other on one stack (``stack``), each with its own
faults, its own table rows and exact books at its end (a frozen snapshot: every service
SIGSTOPped while the books are read). Stack settings that the scenarios need: a short
visibility timeout for verifiers (3 s, so a hung replica's groups are reclaimed quickly), 10 s
for the other consumers, a 4 s weight-sync timeout on the learner (a push to a hung generator
fails fast), and ``max_staleness=3`` (the generator may run far enough ahead that the learner
still has data to step with while the generator hangs).

SIGKILL: every kind of service, several times, at seeded random points. The run is fed through
``POST /v1/prompts`` by a client that keeps the prompts backlog topped up, with an
Idempotency-Key per request and retries until acknowledged (the api's contract for a client
that cannot know whether a request it sent was applied). Each victim is restarted at once, as a
supervisor would; the learner resumes from its newest checkpoint. Faults overlap across
services (the schedule does not wait for one victim to recover before hitting another), but the
same service is hit again only after it has done real work since its restart. Per kill the test
records the groups the victim held (its pending entries, read just before the signal); for the
api, the requests that failed and were retried. Each one is traced to its fate.

SIGSTOP:

- a verifier replica frozen while it holds groups: the other replica reclaims them (XAUTOCLAIM)
  and labels them; training goes on; when the frozen one wakes up, its late commits find the
  markers and write nothing twice;
- the generator frozen across weight pushes, after it has filled its budget (it has fallen
  behind, not run dry): the learner's push to it fails within the sync timeout and is reported,
  the frozen member is left out of the following pushes, the learner trains on what is already
  generated and then waits (its heartbeat keeps beating: waiting, not hung). Thawed, the
  generator catches up, serves the newest version, and training resumes.
"""

from __future__ import annotations

import re
import signal
import time
from collections import Counter
from collections.abc import Callable

import pytest
import redis

from conspo.lineage import VERIFY, group_id_for
from conspo.protocol import Heartbeat, decode

pytestmark = [pytest.mark.chaos, pytest.mark.timeout(900)]

SERVICES = ("verifier", "generator", "learner", "api")
SYNC_TIMEOUT_S = 4  # the learner's weight-sync timeout in this stack


@pytest.fixture(scope="module")
def stack(chaos_stack):
    return chaos_stack(
        "processes",
        max_staleness=3,
        env={
            "all": {"CONSPO_VISIBILITY_TIMEOUT_S": "10"},
            "verifier": {"CONSPO_VISIBILITY_TIMEOUT_S": "3"},
            # A run setting: the generators must agree with the learner (conspo.settings).
            "learner": {"CONSPO_WEIGHT_SYNC_TIMEOUT_S": str(SYNC_TIMEOUT_S)},
            "generator": {"CONSPO_WEIGHT_SYNC_TIMEOUT_S": str(SYNC_TIMEOUT_S)},
        },
    )


def test_sigkill_each_service_repeatedly(stack, kit, rng, chaos_table, phases):
    started = time.monotonic()
    per_service = 5 if kit.LONG else 2
    submitter = kit.Submitter(stack, kit.arith_rows(1, 4000), backlog=24, batch=2)
    phases("start")
    submitter.start()
    stack.wait_step(stack.step() + 2)  # a checkpoint exists: learner kills resume from one
    phases("first steps")

    schedule = [s for s in SERVICES for _ in range(per_service)]
    rng.shuffle(schedule)
    hits: dict[str, list[str]] = {s: [] for s in SERVICES}
    injected: Counter = Counter()
    recovered: dict[str, Callable[[], bool]] = {}
    last_step = 0
    for victim in schedule:
        # Faults overlap (a verifier may die while the generator restarts), but a service is
        # killed again only once it has recovered from the previous kill: done real work since.
        if victim in recovered:
            kit.wait_until(recovered.pop(victim), kit.PROGRESS_TIMEOUT_S, f"{victim} to recover")
        time.sleep(rng.uniform(0.3, 2.0))  # a random moment, then one inside the victim's work
        index = rng.randrange(stack.cfg.verifiers) if victim == "verifier" else 0
        if victim != "api":
            hits[victim] += stack.hit_while_busy(victim, index)
        last_step = max(last_step, stack.step())
        stack.kill(victim, index, signal.SIGKILL)
        injected[victim] += 1
        stack.restart(victim, index)
        recovered[victim] = _recovery_check(stack, victim)
        stack.check_alive()
        phases(f"kill {sum(injected.values())} {victim}")
    for victim, check in recovered.items():
        kit.wait_until(check, kit.PROGRESS_TIMEOUT_S, f"{victim} to recover")
    stack.wait_step(last_step + 2)  # training went on past every kill
    phases("recovery")

    submitter.stop()
    assert not submitter.errors, submitter.errors[:5]
    hits["api"] = [e for s in submitter.hit for e in s.entry_ids]
    accounting, fates = stack.frozen_books()
    totals = kit.check_books(accounting, fates)
    phases("books")

    # Every acknowledged request is in the stream exactly once, retried ones included.
    keys_in_stream = Counter(p for p in _prompt_keys(stack))
    for sub in submitter.done:
        assert [keys_in_stream[p] for p in sub.prompt_ids] == [1] * len(sub.prompt_ids), sub
        assert all(e in fates for e in sub.entry_ids)
    # The learner resumed from a checkpoint after every kill.
    learner_log = (stack.log_dir / "learner-0.log").read_text(errors="replace")
    assert learner_log.count("resuming from") >= injected["learner"], learner_log[-3000:]
    assert totals["trained"] > 0

    wall = time.monotonic() - started
    for victim in SERVICES:
        hit = kit.summarize(fates, hits[victim])
        assert hit.get("lost", 0) == 0, (victim, hit)
        notes = ""
        if victim == "api":
            replayed = sum(s.replayed for s in submitter.hit)
            notes = (
                f"{len(submitter.hit)} requests failed and were retried with their "
                f"Idempotency-Key ({replayed} replayed an earlier success); none enqueued twice"
            )
        elif victim == "learner":
            notes = "restarted from its newest checkpoint each time"
        chaos_table(
            kit.Row(
                fault=f"SIGKILL {victim}",
                scenario="processes",
                injected=injected[victim],
                accounting=accounting,
                fates=totals,
                hit=hit,
                notes=notes,
                wall_s=wall,
            )
        )


def _recovery_check(stack, victim: str) -> Callable[[], bool]:
    """True once the restarted ``victim`` has done work: the learner stepped past where it
    was, the generator or a verifier committed groups, the api answers /readyz."""
    client = stack.direct()
    if victim == "learner":
        step = stack.step(client)
        return lambda: stack.step(client) > step
    if victim == "api":

        def api_ready() -> bool:
            with stack.http(timeout=5) as http:
                return http.get("/readyz").status_code == 200

        return api_ready
    counter = {"generator": "generator.groups", "verifier": "verifier.groups"}[victim]
    before = int(client.hget(stack.keys.counters, counter) or 0)
    return lambda: int(client.hget(stack.keys.counters, counter) or 0) > before


def _prompt_keys(stack) -> list[str]:
    client = redis.Redis.from_url(stack.cfg.redis_url)
    try:
        return [f[b"k"].decode() for _, f in client.xrange(stack.keys.prompts)]
    finally:
        client.close()


def _freeze_while_busy(stack, index: int, attempts: int = 100) -> list[str]:
    """SIGSTOP verifier ``index`` at a moment it holds groups; returns what it holds, frozen."""
    proc = stack.find("verifier", index)
    for _ in range(attempts):
        stack.hit_while_busy("verifier", index, patience_s=2.0)
        proc.signal(signal.SIGSTOP)
        held = stack.hit("verifier", index)
        if held:
            return held
        proc.signal(signal.SIGCONT)
    raise AssertionError("the verifier never held a group when looked at")


def _heartbeat_age(client, keys, service: str) -> float:
    ages = [
        time.time() - decode(raw, Heartbeat).at
        for name, raw in client.hgetall(keys.heartbeats).items()
        if name.decode().startswith(f"{service}:")
    ]
    return min(ages)


def _wait_stable(value: Callable[[], int], *, still_s: float, timeout: float) -> int:
    """Until ``value()`` has not changed for ``still_s`` (or ``timeout``); returns it."""
    deadline = time.monotonic() + timeout
    last, since = value(), time.monotonic()
    while time.monotonic() < deadline and time.monotonic() - since < still_s:
        time.sleep(0.2)
        now = value()
        if now != last:
            last, since = now, time.monotonic()
    return last


def _in_flight_groups(client, stack) -> int:
    """Groups generated that the learner is not done with (what flow control bounds)."""
    counters = client.hmget(stack.keys.counters, "generator.groups", "learner.groups_consumed")
    produced, consumed = (int(x or 0) for x in counters)
    return produced - consumed


def test_hung_verifier_is_reclaimed_by_the_other(stack, kit, rng, chaos_table, phases):
    started = time.monotonic()
    stack.ensure_fed(seed=3)
    client = stack.direct()
    stack.wait_step(stack.step(client) + 1, client=client)
    phases("fed")
    verifier_hits: list[str] = []
    rounds = 3 if kit.LONG else 1
    for _ in range(rounds):
        index = rng.randrange(stack.cfg.verifiers)
        held = _freeze_while_busy(stack, index)
        verifier_hits += held
        step = stack.step(client)

        def labelled_by_the_other(held=held) -> bool:
            markers = [client.exists(stack.keys.done(VERIFY, group_id_for(e))) for e in held]
            return all(markers)

        kit.wait_until(labelled_by_the_other, 60, "the other replica to reclaim and label")
        stack.wait_step(step + 2, client=client)  # training goes on without the frozen one
        stack.find("verifier", index).signal(signal.SIGCONT)
        time.sleep(rng.uniform(1.0, 2.0))  # its late commits land on existing markers
        stack.check_alive()
        phases("freeze and thaw")

    accounting, fates = stack.frozen_books()
    totals = kit.check_books(accounting, fates)
    hit = kit.summarize(fates, verifier_hits)
    assert hit.get("lost", 0) == 0, hit  # (labelled by the other replica: checked above)
    chaos_table(
        kit.Row(
            fault="SIGSTOP verifier (hang)",
            scenario="processes",
            injected=rounds,
            accounting=accounting,
            fates=totals,
            hit=hit,
            notes="visibility timeout 3 s: the other replica reclaimed and labelled every group "
            "the frozen one held; its late commits wrote nothing twice",
            wall_s=time.monotonic() - started,
        )
    )


def test_generator_behind_across_pushes_rejoins(stack, kit, chaos_table, phases):
    started = time.monotonic()
    stack.ensure_fed(seed=3)
    client = stack.direct()
    stack.wait_step(stack.step(client) + 1, client=client)
    # Let it fill its budget first (learner paused), so the learner has data to step and push
    # with while the generator is frozen: the generator has fallen behind, not run dry.
    gen, learner = stack.find("generator"), stack.find("learner")
    learner.signal(signal.SIGSTOP)
    try:
        kit.wait_until(
            lambda: _in_flight_groups(client, stack) >= 3 * stack.cfg.batch_groups,
            60,
            "the generator to fill its budget",
        )
        _wait_stable(lambda: _in_flight_groups(client, stack), still_s=1.5, timeout=20)
        frozen_s = 30.0 if kit.LONG else 2 * SYNC_TIMEOUT_S
        pushed_before = int(client.hget(stack.keys.state, "last_push_version") or 0)
        failures_before = int(client.hget(stack.keys.counters, "learner.push_failures") or 0)
        step_frozen = stack.step(client)
        hit_generator = stack.hit("generator")
        gen.signal(signal.SIGSTOP)
    finally:
        learner.signal(signal.SIGCONT)
    phases("budget filled")
    deadline = time.monotonic() + frozen_s
    while time.monotonic() < deadline:
        stack.check_alive()
        assert _heartbeat_age(client, stack.keys, "learner") < 5.0, "the learner stopped beating"
        time.sleep(0.5)
    pushes_while_frozen = int(client.hget(stack.keys.state, "last_push_version") or 0)
    pushes_while_frozen -= pushed_before
    step_thawed = stack.step(client)
    version_at_thaw = int(client.hget(stack.keys.state, "policy_version") or 0)
    gen.signal(signal.SIGCONT)
    phases("frozen")

    # It rejoins and serves the newest version, and training resumes.
    assert gen.popen is not None
    marker = f"-{gen.popen.pid}-"
    instance = next(
        name.decode().split(":", 1)[1]
        for name in client.hgetall(stack.keys.heartbeats)
        if name.decode().startswith("generator:") and marker in name.decode()
    )

    def served() -> int:
        raw = client.hget(stack.keys.weights, f"served:{instance}")
        return int(raw) if raw is not None else -1

    kit.wait_until(
        lambda: served() >= version_at_thaw, 120, f"the generator to serve v{version_at_thaw}"
    )
    stack.wait_step(step_thawed + 2, client=client)
    phases("rejoined")
    failures = int(client.hget(stack.keys.counters, "learner.push_failures") or 0)
    learner_log = (stack.log_dir / "learner-0.log").read_text(errors="replace")
    generator_log = gen.log.read_text(errors="replace")
    # A push while the generator was frozen either failed within the sync timeout or left the
    # member out (its registration had expired); either way the learner went on. (A budget of
    # all-equal groups can leave nothing to train on: then the learner just waited.)
    if failures > failures_before:
        assert re.search(r"weight push v\d+ failed", learner_log)
    assert re.search(r"now serving v\d+", generator_log)

    accounting, fates = stack.frozen_books()
    totals = kit.check_books(accounting, fates)
    hit = kit.summarize(fates, hit_generator)
    assert hit.get("lost", 0) == 0, hit
    chaos_table(
        kit.Row(
            fault="SIGSTOP generator (behind)",
            scenario="processes",
            injected=1,
            accounting=accounting,
            fates=totals,
            hit=hit,
            notes=f"frozen {frozen_s:.0f}s: the learner went from step {step_frozen} to "
            f"{step_thawed} with {pushes_while_frozen} push(es) meanwhile "
            f"({failures - failures_before} failed, each within the {SYNC_TIMEOUT_S} s sync "
            f"timeout), kept beating; thawed, the generator served v{served()} >= "
            f"v{version_at_thaw}",
            wall_s=time.monotonic() - started,
        )
    )
