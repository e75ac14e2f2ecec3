"""A grading process pool with a hard per-item wall-clock timeout.

Why not ``concurrent.futures.ProcessPoolExecutor`` or ``multiprocessing.Pool``: neither can kill
one stuck task. A sympy call on ``9^{9^{9^{9}}}`` sits in C code where no signal-based timeout
(math-verify's own included) can interrupt it; the only reliable limit is killing the process.
So each worker is a ``multiprocessing.Process`` with its own duplex ``Pipe`` and at most one
item in flight; the parent multiplexes all pipes and process sentinels with
``multiprocessing.connection.wait`` and enforces deadlines itself:

* an item that exceeds ``timeout_s`` (measured from the moment it was handed to a worker, so
  queueing never eats into it) gets verdict ``timeout`` and its worker is SIGKILLed and
  replaced; the other workers keep grading meanwhile;
* a worker that dies (segfault, ``os._exit``, OOM kill) yields ``error`` with the exit code or
  signal for its item, and is replaced; a ``MemoryError`` inside a worker yields ``error`` and
  the worker is recycled, since its heap may be in a poor state;
* results come back in input order; items are spread over all workers as they become free.

Start method: ``forkserver`` by default (``spawn`` works too; ``fork`` is refused). Forking a
process that runs threads (redis-py, torch, logging handlers) is unsafe, and both of these start
children from a clean interpreter. The forkserver preloads math-verify and runs one warm-up
grading (``services.verifier._warmup``), so a replacement worker is a fork of a hot process.
Measured on the 2-core dev box: the first pool start takes 1.3 s idle / 3-4 s under load
(forkserver start, imports, warm-up; later pools in the same process start in ~0.1 s), and a
replacement after a kill is ready in 30-50 ms; with ``spawn`` every worker, replacements
included, pays a fresh interpreter plus imports and warm-up: 2-3.5 s under load. The forkserver
is process-global: if something else started it first, our preload is not applied and workers
import what they need themselves (correct, just slower).

Children are hardened at start:

* signals: SIGINT ignored (a Ctrl-C in a terminal reaches the whole process group; the parent
  decides), SIGTERM default. Children never carry the parent's handlers (they are not forked
  from it), so a parent SIGTERM handler cannot make them linger;
* ``RLIMIT_AS`` (``memory_limit_mb``, default 2 GiB; a worker peaks at ~210 MB of address
  space and ~80 MB resident after all of MATH-500) makes an input that allocates without bound
  fail with ``MemoryError`` in its own worker instead of pushing the host into swap or the OOM
  killer;
* orphan protection: if the parent dies without closing the pool, idle workers see EOF on their
  pipe and exit; under forkserver ``PR_SET_PDEATHSIG`` kills even busy workers when the
  forkserver exits, which it does with the parent because workers drop their copy of the
  forkserver's "alive" pipe (a private detail of ``multiprocessing.forkserver``, guarded; tested
  by SIGTERM-ing a parent whose workers spin); and before each item the soft ``RLIMIT_CPU`` is
  set to the CPU used so far plus ``2 * timeout_s + 5`` s, so a busy orphan dies by SIGXCPU even
  where the rest fails.

Threading: ``grade`` may be called from any thread; calls are serialised by a lock. ``close()``
may be called from anywhere, including a signal handler, and is idempotent; a ``grade``
interrupted by ``close`` raises ``PoolClosedError``. A ``grade`` aborted by any exception
(``KeyboardInterrupt`` from a handler, say) replaces the workers it left busy, so no stale
result can reach a later call.
"""

from __future__ import annotations

import contextlib
import itertools
import logging
import math
import multiprocessing
import multiprocessing.connection
import os
import signal
import sys
import threading
import time
import weakref
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from conspo.grading.config import GradeConfig, GradeItem
from conspo.grading.labels import make_label
from conspo.protocol import Label, Verdict

logger = logging.getLogger(__name__)

_PRELOAD = "services.verifier._warmup"
_PR_SET_PDEATHSIG = 1


class PoolError(RuntimeError):
    """Base class for grading-pool failures (never raised because of an item's content)."""


class PoolStartError(PoolError):
    """Workers could not be started (a plugin failed to import, the interpreter is broken)."""


class PoolClosedError(PoolError):
    """The pool was closed before or while grading."""


@dataclass
class PoolStats:
    """Cumulative counters, plus per-item seconds of the most recent ``grade`` call."""

    graded: int = 0
    timeouts: int = 0
    crashes: int = 0
    worker_starts: int = 0
    last_item_seconds: list[float] = field(default_factory=list)


@dataclass(frozen=True)
class _ChildLimits:
    memory_bytes: int | None
    cpu_budget_s: int
    pdeathsig: bool
    quiet_math_verify: bool


# ---------------------------------------------------------------------------------------------
# Child side
# ---------------------------------------------------------------------------------------------


def _harden(limits: _ChildLimits) -> None:
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    if limits.pdeathsig and sys.platform.startswith("linux"):
        with contextlib.suppress(Exception):
            import ctypes

            libc = ctypes.CDLL(None, use_errno=True)
            libc.prctl(_PR_SET_PDEATHSIG, int(signal.SIGKILL))
        # The forkserver hands every child the write end of its "alive" pipe and exits only
        # when all holders are gone; a busy orphan would keep it (and so itself) alive forever.
        # We never start grandchildren, so drop our copy: the forkserver then exits with the
        # parent, and PDEATHSIG above takes the workers with it.
        with contextlib.suppress(Exception):
            from multiprocessing import forkserver

            server = forkserver._forkserver
            alive_fd = server._forkserver_alive_fd
            if alive_fd is not None:
                server._forkserver_alive_fd = None
                os.close(alive_fd)
    if limits.memory_bytes is not None:
        with contextlib.suppress(Exception):
            import resource

            _, hard = resource.getrlimit(resource.RLIMIT_AS)
            soft = limits.memory_bytes
            if hard != resource.RLIM_INFINITY:
                soft = min(soft, hard)
            resource.setrlimit(resource.RLIMIT_AS, (soft, hard))
    if limits.quiet_math_verify:
        # math-verify logs every timeout with the full offending text; the verdict says enough.
        logging.getLogger("math_verify").setLevel(logging.ERROR)


def _arm_cpu_limit(budget_s: int) -> None:
    """Soft RLIMIT_CPU = CPU used so far + budget: an orphaned busy worker dies by SIGXCPU."""
    with contextlib.suppress(Exception):
        import resource

        usage = resource.getrusage(resource.RUSAGE_SELF)
        used = math.ceil(usage.ru_utime + usage.ru_stime)
        _, hard = resource.getrlimit(resource.RLIMIT_CPU)
        soft = used + budget_s
        if hard != resource.RLIM_INFINITY:
            soft = min(soft, hard)
        resource.setrlimit(resource.RLIMIT_CPU, (soft, hard))


def load_plugin(spec: str) -> None:
    """Import a verifier plugin: a dotted module name or a path to a ``.py`` file."""
    import importlib
    import importlib.util

    if spec.endswith(".py") or os.sep in spec:
        path = os.path.abspath(spec)
        name = "conspo_verifier_plugin_" + str(abs(hash(path)))
        if name in sys.modules:
            return
        module_spec = importlib.util.spec_from_file_location(name, path)
        if module_spec is None or module_spec.loader is None:
            raise ImportError(f"cannot load verifier plugin from {path}")
        module = importlib.util.module_from_spec(module_spec)
        sys.modules[name] = module
        try:
            module_spec.loader.exec_module(module)
        except BaseException:
            del sys.modules[name]
            raise
    else:
        importlib.import_module(spec)


def _child_main(
    conn: multiprocessing.connection.Connection,
    config: GradeConfig,
    plugins: tuple[str, ...],
    limits: _ChildLimits,
) -> None:
    _harden(limits)
    try:
        import services.verifier._warmup  # noqa: F401 - no-op when the forkserver preloaded it
        from conspo.grading.grade import grade_one

        for plugin in plugins:
            load_plugin(plugin)
    except BaseException as exc:
        with contextlib.suppress(Exception):
            conn.send(("fatal", f"{type(exc).__name__}: {exc}"))
        return
    conn.send(("ready", os.getpid()))
    while True:
        try:
            message = conn.recv()
        except (EOFError, OSError):
            return  # the parent went away
        if message is None:
            return
        seq, completion, gold, verifier = message
        _arm_cpu_limit(limits.cpu_budget_s)
        recycle = False
        try:
            label = grade_one(completion, gold, verifier, config)
        except MemoryError:
            recycle = True
            label = make_label(Verdict.ERROR, config, detail="MemoryError in worker")
        except BaseException as exc:  # SystemExit/KeyboardInterrupt from a plugin, leaked timeouts
            recycle = True
            label = make_label(Verdict.ERROR, config, detail=f"worker caught {type(exc).__name__}")
        result = (label.reward, label.verdict.value, label.extracted, label.detail)
        conn.send(("result", seq, result, recycle))
        if recycle:
            return


# ---------------------------------------------------------------------------------------------
# Parent side
# ---------------------------------------------------------------------------------------------

_STARTING, _IDLE, _BUSY, _DEAD = "starting", "idle", "busy", "dead"


class _Worker:
    """One child process, its pipe, and what it is doing."""

    _ids = itertools.count()

    def __init__(self, ctx: Any, args: tuple[Any, ...], start_timeout_s: float) -> None:
        parent_conn, child_conn = ctx.Pipe(duplex=True)
        self.process = ctx.Process(
            target=_child_main,
            args=(child_conn, *args),
            name=f"conspo-verifier-{next(self._ids)}",
            daemon=True,
        )
        try:
            self.process.start()
        finally:
            child_conn.close()
        self.conn = parent_conn
        self.state = _STARTING
        self.deadline = time.monotonic() + start_timeout_s
        self.item: int | None = None
        self.sent_at = 0.0

    def kill(self) -> None:
        """SIGKILL (if alive), reap, release the pipe. Safe to call twice."""
        if self.state == _DEAD:
            return
        self.state = _DEAD
        with contextlib.suppress(Exception):
            self.process.kill()
        with contextlib.suppress(Exception):
            self.process.join(5)
        with contextlib.suppress(Exception):
            self.conn.close()

    def stop(self) -> None:
        """Ask an idle child to exit (it reads None); kill() follows in close()."""
        with contextlib.suppress(Exception):
            self.conn.send(None)

    def exit_reason(self) -> str:
        with contextlib.suppress(Exception):
            self.process.join(1)
        code = self.process.exitcode
        if code is None:
            return "worker pipe closed unexpectedly"
        if code < 0:
            try:
                name = signal.Signals(-code).name
            except ValueError:
                name = f"signal {-code}"
            return f"worker killed by {name}"
        return f"worker exited with code {code}"


def _shutdown(workers: list[_Worker]) -> None:
    for worker in workers:
        if worker.state in (_IDLE, _STARTING):
            worker.stop()
    deadline = time.monotonic() + 0.5
    for worker in workers:
        with contextlib.suppress(Exception):
            worker.process.join(max(0.0, deadline - time.monotonic()))
        worker.kill()


class GradingPool:
    """Grade completions in ``processes`` worker processes, each item under a hard timeout.

    >>> with GradingPool(processes=2, timeout_s=5.0, config=GradeConfig()) as pool:
    ...     labels = pool.grade([GradeItem(completion="\\\\boxed{2}", gold="2")])
    """

    def __init__(
        self,
        processes: int = 2,
        timeout_s: float = 10.0,
        config: GradeConfig | None = None,
        *,
        plugins: Sequence[str] = (),
        memory_limit_mb: int | None = 2048,
        start_method: str = "forkserver",
        start_timeout_s: float = 120.0,
        max_start_failures: int = 3,
    ) -> None:
        if processes < 1:
            raise ValueError("processes must be >= 1")
        if not timeout_s > 0:
            raise ValueError("timeout_s must be > 0")
        if start_method not in ("forkserver", "spawn"):
            raise ValueError("start_method must be 'forkserver' or 'spawn' (fork is not safe)")
        self.processes = processes
        self.timeout_s = float(timeout_s)
        self.config = config or GradeConfig()
        self.plugins = tuple(plugins)
        self.stats = PoolStats()
        self._start_timeout_s = start_timeout_s
        self._max_start_failures = max_start_failures
        self._start_failures = 0
        self._lock = threading.Lock()
        self._closed = False
        self._ctx = multiprocessing.get_context(start_method)
        if start_method == "forkserver":
            self._ctx.set_forkserver_preload(_forkserver_preload())
        limits = _ChildLimits(
            memory_bytes=memory_limit_mb * 2**20 if memory_limit_mb else None,
            cpu_budget_s=math.ceil(2 * self.timeout_s) + 5,
            pdeathsig=start_method == "forkserver",
            quiet_math_verify=True,
        )
        self._child_args = (self.config, self.plugins, limits)
        self._workers: list[_Worker] = []
        self._finalizer = weakref.finalize(self, _shutdown, self._workers)
        try:
            for _ in range(processes):
                self._workers.append(self._spawn())
            self._wait_ready()
        except BaseException:
            self.close()
            raise

    # -- lifecycle --------------------------------------------------------------------------

    def __enter__(self) -> GradingPool:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        """Stop all workers (idle ones exit, busy ones are killed). Idempotent."""
        self._closed = True
        self._finalizer()

    @property
    def closed(self) -> bool:
        return self._closed

    def worker_pids(self) -> list[int | None]:
        return [w.process.pid for w in self._workers]

    def _spawn(self) -> _Worker:
        if self._closed:
            raise PoolClosedError("grading pool is closed")
        self.stats.worker_starts += 1
        return _Worker(self._ctx, self._child_args, self._start_timeout_s)

    def _wait_ready(self) -> None:
        while any(w.state == _STARTING for w in self._workers):
            starting = [w for w in self._workers if w.state == _STARTING]
            timeout = max(0.0, min(w.deadline for w in starting) - time.monotonic())
            ready = multiprocessing.connection.wait(
                [w.conn for w in starting] + [w.process.sentinel for w in starting], timeout
            )
            for worker in starting:
                if worker.conn in ready or worker.process.sentinel in ready:
                    message = self._receive(worker)
                    if message is not None and message[0] == "nothing":
                        continue
                    if message is None or message[0] != "ready":
                        reason = message[1] if message else worker.exit_reason()
                        raise PoolStartError(f"verifier worker failed to start: {reason}")
                    worker.state = _IDLE
                elif time.monotonic() >= worker.deadline:
                    raise PoolStartError(
                        f"verifier worker not ready after {self._start_timeout_s:.0f} s"
                    )

    @staticmethod
    def _receive(worker: _Worker) -> tuple[Any, ...] | None:
        """One message from ``worker``, or None when its pipe is closed or broken."""
        try:
            if not worker.conn.poll():
                return None if not worker.process.is_alive() else ("nothing",)
            return worker.conn.recv()
        except Exception:
            return None

    # -- grading ----------------------------------------------------------------------------

    def grade(self, items: Sequence[GradeItem]) -> list[Label]:
        """Labels for ``items``, in input order. Never raises because of an item's content."""
        with self._lock:
            if self._closed:
                raise PoolClosedError("grading pool is closed")
            try:
                return self._grade(items)
            except PoolError:
                self._abandon_in_flight()
                raise
            except BaseException as exc:
                # KeyboardInterrupt/SystemExit from a signal handler, or a bug: items still in
                # flight belong to this aborted call and must not leak into the next one.
                self._abandon_in_flight()
                if self._closed and isinstance(exc, Exception):
                    raise PoolClosedError("grading pool was closed during grade()") from exc
                raise

    def wait_ready(self, timeout_s: float | None = None) -> bool:
        """Block until no worker is starting (e.g. after replacements); False on timeout.

        Not needed for correctness (``grade`` uses whichever workers are ready), but useful
        for health checks and for measuring throughput with all workers up."""
        deadline = None if timeout_s is None else time.monotonic() + timeout_s
        with self._lock:
            while any(w.state == _STARTING for w in self._workers):
                if self._closed:
                    raise PoolClosedError("grading pool is closed")
                left = None if deadline is None else deadline - time.monotonic()
                if left is not None and left <= 0:
                    return False
                self._wait_and_collect([], [], max_wait=left)
        return True

    def _abandon_in_flight(self) -> None:
        for worker in list(self._workers):
            if worker.state == _BUSY:
                if self._closed:
                    worker.kill()
                else:
                    with contextlib.suppress(PoolError):
                        self._replace(worker, crashed=False)

    def _grade(self, items: Sequence[GradeItem]) -> list[Label]:
        results: list[Label | None] = [None] * len(items)
        seconds = [0.0] * len(items)
        pending = deque(range(len(items)))
        cap = self.config.scan_chars
        while pending or any(w.state == _BUSY for w in self._workers):
            if self._closed:
                raise PoolClosedError("grading pool was closed during grade()")
            # Hand out work to every idle worker.
            for worker in self._workers:
                if worker.state != _IDLE or not pending:
                    continue
                index = pending[0]
                item = items[index]
                try:
                    worker.conn.send(
                        (index, _precut(item.completion, cap), item.gold, item.verifier)
                    )
                except Exception:
                    # It died while idle; the item never started, so it stays queued.
                    self._replace(worker, crashed=False)
                    continue
                pending.popleft()
                worker.state, worker.item = _BUSY, index
                worker.sent_at = time.monotonic()
                worker.deadline = worker.sent_at + self.timeout_s
            self._wait_and_collect(results, seconds)
        self.stats.graded += len(items)
        self.stats.last_item_seconds = seconds
        missing = make_label(Verdict.ERROR, self.config, detail="internal: item was not graded")
        return [missing if label is None else label for label in results]

    def _wait_and_collect(
        self,
        results: list[Label | None],
        seconds: list[float],
        max_wait: float | None = None,
    ) -> None:
        active = [w for w in self._workers if w.state in (_BUSY, _STARTING)]
        if not active:
            if not any(w.state == _IDLE for w in self._workers):
                raise PoolError("no usable verifier workers")  # pragma: no cover - defensive
            return
        timeout = max(0.0, min(w.deadline for w in active) - time.monotonic())
        if max_wait is not None:
            timeout = min(timeout, max_wait)
        waitables: list[Any] = [w.conn for w in active] + [w.process.sentinel for w in active]
        ready = set(multiprocessing.connection.wait(waitables, timeout))
        now = time.monotonic()
        for worker in active:
            if worker.conn in ready or worker.process.sentinel in ready:
                self._handle_message(worker, results, seconds)
            elif now >= worker.deadline:
                self._handle_deadline(worker, results, seconds, now)

    def _handle_message(
        self, worker: _Worker, results: list[Label | None], seconds: list[float]
    ) -> None:
        message = self._receive(worker)
        if message is not None and message[0] == "nothing":
            return  # sentinel fired spuriously or data not complete yet
        if worker.state == _STARTING:
            if message is not None and message[0] == "ready":
                worker.state = _IDLE
                self._start_failures = 0
                return
            reason = message[1] if message else worker.exit_reason()
            self._start_failed(worker, reason)
            return
        index = worker.item
        if message is not None and message[0] == "result" and message[1] == index:
            _, _, (reward, verdict, extracted, detail), recycle = message
            results[index] = Label(
                reward=reward, verdict=Verdict(verdict), extracted=extracted, detail=detail
            )
            seconds[index] = time.monotonic() - worker.sent_at
            worker.state, worker.item = _IDLE, None
            if recycle:
                self._replace(worker, crashed=False)
            return
        # EOF or garbage while busy: the worker crashed on this item.
        reason = worker.exit_reason() if message is None else f"unexpected message {message[0]!r}"
        pid = worker.process.pid
        logger.warning("verifier worker %s crashed on item %s: %s", pid, index, reason)
        results[index] = make_label(Verdict.ERROR, self.config, detail=f"crash: {reason}")
        seconds[index] = time.monotonic() - worker.sent_at
        self.stats.crashes += 1
        self._replace(worker, crashed=True)

    def _handle_deadline(
        self, worker: _Worker, results: list[Label | None], seconds: list[float], now: float
    ) -> None:
        if worker.state == _STARTING:
            self._start_failed(worker, f"not ready after {self._start_timeout_s:.0f} s")
            return
        index = worker.item
        assert index is not None
        logger.warning(
            "verifier item %s exceeded %.1f s; killing worker %s",
            index,
            self.timeout_s,
            worker.process.pid,
        )
        results[index] = make_label(
            Verdict.TIMEOUT, self.config, detail=f"grading exceeded {self.timeout_s:g} s"
        )
        seconds[index] = now - worker.sent_at
        self.stats.timeouts += 1
        self._replace(worker, crashed=True)

    def _start_failed(self, worker: _Worker, reason: str) -> None:
        self._start_failures += 1
        count = self._start_failures
        logger.error("verifier worker failed to start (%d in a row): %s", count, reason)
        if self._start_failures >= self._max_start_failures:
            worker.kill()
            raise PoolError(
                f"{self._start_failures} verifier workers in a row failed to start: {reason}"
            )
        self._replace(worker, crashed=True)

    def _replace(self, worker: _Worker, *, crashed: bool) -> None:
        worker.kill()
        position = self._workers.index(worker)
        self._workers[position] = self._spawn()
        if crashed:
            logger.debug("replaced verifier worker %s", worker.process.pid)


def _precut(completion: str | bytes, scan_chars: int) -> str | bytes:
    """Cheap tail cut before pickling (the child sanitises properly; see sanitize.py)."""
    limit = (4 if isinstance(completion, str) else 16) * scan_chars
    return completion if len(completion) <= limit else completion[-limit:]


def _forkserver_preload() -> list[str]:
    """``__main__`` (the default preload: when the main module was started from a path, children
    then skip re-running it) and the warm-up module. A main module started with ``python -m``
    is re-imported by each child as ``__mp_main__`` (its imports are what cost); preloading it
    by name here would make runpy warn in every child, so keep service entry points light."""
    return ["__main__", _PRELOAD]
