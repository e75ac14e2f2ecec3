"""Verifiers that misbehave on purpose, registered only inside the test pools' workers.

Loaded by file path through ``GradingPool(plugins=[...])``; never imported by the service.
"""

from __future__ import annotations

import ctypes
import os
import time

from conspo.grading.config import GradeConfig
from conspo.grading.verifiers import register
from conspo.protocol import Label, Verdict


@register("test-sleep-forever")
def sleep_forever(completion: str, gold: str, config: GradeConfig) -> Label:
    time.sleep(3600)
    raise AssertionError("unreachable")


@register("test-busy-loop")
def busy_loop(completion: str, gold: str, config: GradeConfig) -> Label:
    x = 0
    while True:  # pure-Python spin: no I/O, no sleep
        x += 1


@register("test-sleep")
def sleep_briefly(completion: str, gold: str, config: GradeConfig) -> Label:
    """Sleeps ``float(gold)`` seconds, then reports its pid (to observe parallelism)."""
    time.sleep(float(gold))
    return Label(reward=1.0, verdict=Verdict.CORRECT, detail=str(os.getpid()))


@register("test-pid")
def report_pid(completion: str, gold: str, config: GradeConfig) -> Label:
    return Label(reward=1.0, verdict=Verdict.CORRECT, extracted=completion, detail=str(os.getpid()))


@register("test-exit")
def hard_exit(completion: str, gold: str, config: GradeConfig) -> Label:
    os._exit(3)


@register("test-segfault")
def segfault(completion: str, gold: str, config: GradeConfig) -> Label:
    ctypes.string_at(0)  # reads address 0: SIGSEGV
    raise AssertionError("unreachable")


@register("test-memory-hog")
def memory_hog(completion: str, gold: str, config: GradeConfig) -> Label:
    blob = bytearray(8 * 2**30)  # 8 GiB: beyond the pool's RLIMIT_AS
    return Label(reward=1.0, verdict=Verdict.CORRECT, detail=str(len(blob)))


@register("test-raise")
def raises(completion: str, gold: str, config: GradeConfig) -> Label:
    raise ValueError("verifier bug")


@register("test-not-a-label")
def not_a_label(completion: str, gold: str, config: GradeConfig) -> Label:
    return "correct"  # type: ignore[return-value]


@register("test-system-exit")
def system_exit(completion: str, gold: str, config: GradeConfig) -> Label:
    raise SystemExit(0)
