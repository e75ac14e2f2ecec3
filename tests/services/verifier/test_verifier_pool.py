"""GradingPool: hard per-item timeouts, crash recovery, ordering, parallelism, shutdown.

The misbehaving verifiers live in ``faulty_verifiers.py`` and are loaded only into the test
pools' worker processes (``plugins=[path]``).
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import pytest

from conspo.grading.config import GradeConfig, GradeItem
from conspo.protocol import Verdict
from services.verifier.pool import GradingPool, PoolClosedError, PoolStartError

HERE = Path(__file__).resolve().parent
FAULTY = str(HERE / "faulty_verifiers.py")
REPO = Path(__file__).resolve().parents[3]
# Slack on top of the hard timeout for the kill, the reap and a loaded CI machine.
SLACK_S = 2.0


def ok_item(n: int = 2) -> GradeItem:
    return GradeItem(completion=f"so \\boxed{{{n}}}", gold=str(n))


def gone(pid: int) -> bool:
    """True when ``pid`` no longer runs (a zombie awaiting its reaper counts as gone)."""
    try:
        with open(f"/proc/{pid}/status", encoding="ascii") as status:
            return any(line.startswith("State:") and "Z" in line for line in status)
    except FileNotFoundError:
        return True


def wait_gone(pids: list[int], within_s: float = 5.0) -> bool:
    deadline = time.monotonic() + within_s
    while time.monotonic() < deadline:
        if all(gone(pid) for pid in pids):
            return True
        time.sleep(0.05)
    return all(gone(pid) for pid in pids)


def test_results_come_back_in_input_order(fast_pool: GradingPool) -> None:
    items = [GradeItem(completion=str(i), gold="", verifier="test-pid") for i in range(40)]
    items[7] = ok_item(7)
    labels = fast_pool.grade(items)
    assert [label.extracted for i, label in enumerate(labels) if i != 7] == [
        str(i) for i in range(40) if i != 7
    ]
    assert labels[7].verdict is Verdict.CORRECT
    assert len(fast_pool.stats.last_item_seconds) == 40


def test_items_are_graded_in_parallel(fast_pool: GradingPool) -> None:
    assert fast_pool.wait_ready(30.0)
    items = [GradeItem(completion="", gold="0.4", verifier="test-sleep") for _ in range(4)]
    start = time.monotonic()
    labels = fast_pool.grade(items)
    elapsed = time.monotonic() - start
    assert {label.detail for label in labels} == {str(p) for p in fast_pool.worker_pids()}
    assert 0.8 <= elapsed < 1.45  # serial would be 1.6 s


def test_empty_batch(fast_pool: GradingPool) -> None:
    assert fast_pool.grade([]) == []


@pytest.mark.parametrize("verifier", ["test-sleep-forever", "test-busy-loop"])
def test_hung_item_is_killed_at_the_timeout_and_pool_keeps_serving(
    fast_pool: GradingPool, verifier: str
) -> None:
    before = set(fast_pool.worker_pids())
    timeouts = fast_pool.stats.timeouts
    items = [GradeItem(completion="x", gold="1", verifier=verifier)] + [
        ok_item(n) for n in range(8)
    ]
    start = time.monotonic()
    labels = fast_pool.grade(items)
    elapsed = time.monotonic() - start
    assert labels[0].verdict is Verdict.TIMEOUT
    assert labels[0].reward == 0.0
    assert all(label.verdict is Verdict.CORRECT for label in labels[1:])
    assert fast_pool.timeout_s <= elapsed < fast_pool.timeout_s + SLACK_S
    # The other worker served the quick items long before the hung one was killed.
    assert max(fast_pool.stats.last_item_seconds[1:]) < fast_pool.timeout_s
    assert fast_pool.stats.timeouts == timeouts + 1
    after = set(fast_pool.worker_pids())
    killed = before - after
    assert len(killed) == 1 and len(after) == 2
    assert wait_gone(list(killed))
    # And the replacement works.
    assert [label.verdict for label in fast_pool.grade([ok_item(3)] * 4)] == [Verdict.CORRECT] * 4


def test_timeout_reward_is_the_no_answer_reward() -> None:
    config = GradeConfig(no_answer_reward=-0.5)
    with GradingPool(processes=1, timeout_s=0.5, config=config, plugins=[FAULTY]) as pool:
        (label,) = pool.grade([GradeItem(completion="", gold="", verifier="test-sleep-forever")])
    assert label.verdict is Verdict.TIMEOUT
    assert label.reward == -0.5


@pytest.mark.parametrize(
    ("verifier", "reason"),
    [("test-exit", "exited with code 3"), ("test-segfault", "SIGSEGV")],
)
def test_crashing_item_gives_error_and_pool_recovers(
    fast_pool: GradingPool, verifier: str, reason: str
) -> None:
    crashes = fast_pool.stats.crashes
    labels = fast_pool.grade(
        [ok_item(1), GradeItem(completion="", gold="", verifier=verifier), ok_item(2)]
    )
    assert labels[1].verdict is Verdict.ERROR
    assert reason in (labels[1].detail or "")
    assert labels[1].reward == 0.0
    assert labels[0].verdict is Verdict.CORRECT and labels[2].verdict is Verdict.CORRECT
    assert fast_pool.stats.crashes == crashes + 1
    assert all(label.verdict is Verdict.CORRECT for label in fast_pool.grade([ok_item()] * 4))


def test_memory_error_gives_error_and_worker_is_replaced(fast_pool: GradingPool) -> None:
    before = set(fast_pool.worker_pids())
    (label,) = fast_pool.grade([GradeItem(completion="", gold="", verifier="test-memory-hog")])
    assert label.verdict is Verdict.ERROR
    assert "MemoryError" in (label.detail or "")
    assert len(before - set(fast_pool.worker_pids())) == 1


@pytest.mark.parametrize(
    ("verifier", "recycled"),
    [("test-raise", False), ("test-not-a-label", False), ("test-system-exit", True)],
)
def test_verifier_failures_are_errors(
    fast_pool: GradingPool, verifier: str, recycled: bool
) -> None:
    before = set(fast_pool.worker_pids())
    labels = fast_pool.grade([GradeItem(completion="", gold="", verifier=verifier), ok_item()])
    assert labels[0].verdict is Verdict.ERROR
    assert labels[1].verdict is Verdict.CORRECT
    assert (set(fast_pool.worker_pids()) != before) is recycled


def test_unknown_verifier_is_an_error_listing_known_ones(fast_pool: GradingPool) -> None:
    (label,) = fast_pool.grade([GradeItem(completion="1", gold="1", verifier="nope")])
    assert label.verdict is Verdict.ERROR
    assert "nope" in (label.detail or "")
    assert "math" in (label.detail or "") and "test-pid" in (label.detail or "")


def test_mixed_failures_in_one_batch(fast_pool: GradingPool) -> None:
    kinds = ["test-exit", "test-sleep-forever", None, "test-segfault", None, "test-busy-loop"]
    items = [
        ok_item(i) if kind is None else GradeItem(completion="", gold="", verifier=kind)
        for i, kind in enumerate(kinds)
    ]
    start = time.monotonic()
    verdicts = [label.verdict for label in fast_pool.grade(items)]
    elapsed = time.monotonic() - start
    assert verdicts == [
        Verdict.ERROR,
        Verdict.TIMEOUT,
        Verdict.CORRECT,
        Verdict.ERROR,
        Verdict.CORRECT,
        Verdict.TIMEOUT,
    ]
    # Two hung items on two workers overlap: about one timeout, not two.
    assert elapsed < 2 * fast_pool.timeout_s + SLACK_S


def test_close_terminates_children_and_is_idempotent() -> None:
    pool = GradingPool(processes=2, timeout_s=5.0)
    pids = [pid for pid in pool.worker_pids() if pid is not None]
    assert len(pids) == 2 and not any(gone(pid) for pid in pids)
    pool.close()
    pool.close()
    assert pool.closed
    assert wait_gone(pids, within_s=3.0)
    with pytest.raises(PoolClosedError):
        pool.grade([ok_item()])


def test_close_from_another_thread_interrupts_grade() -> None:
    pool = GradingPool(processes=1, timeout_s=60.0, plugins=[FAULTY])
    pids = [pid for pid in pool.worker_pids() if pid is not None]
    errors: list[BaseException] = []

    def run() -> None:
        try:
            pool.grade([GradeItem(completion="", gold="", verifier="test-sleep-forever")])
        except BaseException as exc:
            errors.append(exc)

    thread = threading.Thread(target=run)
    thread.start()
    time.sleep(0.3)
    pool.close()
    thread.join(5.0)
    assert not thread.is_alive()
    assert len(errors) == 1 and isinstance(errors[0], PoolClosedError)
    assert wait_gone(pids)


def test_interrupted_grade_does_not_leak_into_the_next_call(fast_pool: GradingPool) -> None:
    """A grade() aborted by an exception (here KeyboardInterrupt from a signal handler while
    items are in flight) must leave no stale in-flight item behind."""

    def interrupt(*_: object) -> None:
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGALRM, interrupt)
    signal.setitimer(signal.ITIMER_REAL, 0.3)
    try:
        with pytest.raises(KeyboardInterrupt):
            fast_pool.grade([GradeItem(completion="", gold="0.6", verifier="test-sleep")] * 2)
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)
    labels = fast_pool.grade(
        [GradeItem(completion=str(i), gold="", verifier="test-pid") for i in range(6)]
    )
    assert [label.extracted for label in labels] == [str(i) for i in range(6)]


def test_wait_ready_after_replacements(fast_pool: GradingPool) -> None:
    fast_pool.grade([GradeItem(completion="", gold="", verifier="test-exit")])
    assert fast_pool.wait_ready(30.0)
    assert fast_pool.wait_ready(0.0)  # nothing starting: immediately true


def test_plugin_import_failure_is_a_start_error(tmp_path: Path) -> None:
    broken = tmp_path / "broken_verifier.py"
    broken.write_text("raise RuntimeError('plugin is broken')\n")
    with pytest.raises(PoolStartError, match="plugin is broken"):
        GradingPool(processes=1, timeout_s=1.0, plugins=[str(broken)])


@pytest.mark.parametrize(
    "kwargs",
    [{"processes": 0}, {"timeout_s": 0}, {"start_method": "fork"}],
)
def test_invalid_arguments(kwargs: dict) -> None:
    with pytest.raises(ValueError):
        GradingPool(**kwargs)


PARENT_SCRIPT = textwrap.dedent(
    """
    import signal, sys
    from conspo.grading.config import GradeItem
    from services.verifier.pool import GradingPool

    def main():
        if sys.argv[2] == "handler":
            signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
        pool = GradingPool(processes=1, timeout_s=600.0, plugins=[sys.argv[1]])
        print(" ".join(str(p) for p in pool.worker_pids()), flush=True)
        pool.grade([GradeItem(completion="", gold="", verifier="test-busy-loop")])

    if __name__ == "__main__":
        main()
    """
)


def test_sigterm_to_the_parent_does_not_hang(tmp_path: Path) -> None:
    """A service that gets SIGTERM while its worker is busy exits at once, and the worker
    (busy in a pure-Python loop, i.e. never reading its pipe) dies with it: with the default
    action (the parent vanishes without any cleanup) and with a handler that exits cleanly.
    Both parents run at the same time to keep the test short."""
    script = tmp_path / "parent.py"
    script.write_text(PARENT_SCRIPT)
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    procs = {
        mode: subprocess.Popen(
            [sys.executable, str(script), FAULTY, mode],
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
            text=True,
            env=env,
            cwd=tmp_path,
        )
        for mode in ("default", "handler")
    }
    try:
        pids = {}
        for mode, proc in procs.items():
            assert proc.stdout is not None
            pids[mode] = [int(pid) for pid in proc.stdout.readline().split()]
            assert len(pids[mode]) == 1, mode
        time.sleep(0.3)  # let the workers enter the busy loop
        start = time.monotonic()
        for proc in procs.values():
            proc.send_signal(signal.SIGTERM)
        for proc in procs.values():
            proc.wait(timeout=10)
        assert time.monotonic() - start < 3.0
        for mode, worker_pids in pids.items():
            assert wait_gone(worker_pids, within_s=5.0), mode
    finally:
        for proc in procs.values():
            if proc.poll() is None:
                proc.kill()
                proc.wait()
