"""``conspo api``: serve the REST API with uvicorn, heartbeating as service ``api``.

Uvicorn owns SIGTERM/SIGINT while it serves (graceful shutdown: stop accepting, finish
in-flight requests within ``shutdown_grace_s``, run the lifespan exit which stops the feeder and
releases its locks). The runtime's own handler is installed first so that uvicorn, which re-raises
the captured signal to the previous handler when it is done, ends in a flag rather than in a
default-action kill: the process then writes its ``stopped`` heartbeat and exits 0.

With ``workers`` > 1 (``CONSPO_WORKERS``) the process binds the port and forks that many worker
processes that serve the one listening socket (the kernel spreads connections among them): one
Python process tops out at about one core, and a request does little else than wait on one Redis
round trip (issue 18). Each worker is a complete api instance (its own heartbeat, metrics on
``metrics_port + i`` when set, feeder: the per-dataset lock keeps one feeding at a time). The
parent only supervises: SIGTERM/SIGINT is passed on to the workers, which shut down gracefully;
a worker that dies takes the others down so the orchestrator restarts the whole replica; and the
workers die with the parent (``PR_SET_PDEATHSIG``), so a SIGKILLed replica leaves no process
holding its port.
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import logging
import multiprocessing
import multiprocessing.connection
import os
import signal
import socket
import sys
import threading

from conspo.settings import ApiSettings, load

log = logging.getLogger(__name__)


def main(args: argparse.Namespace | None = None) -> int:
    settings = load(ApiSettings)
    if settings.workers > 1:
        return _supervise(settings)
    return _serve(settings)


def _serve(settings: ApiSettings, sock: socket.socket | None = None) -> int:
    # Imported after the settings validate, so a misconfigured start fails in a blink.
    import uvicorn

    from conspo.service import ServiceRuntime
    from services.api.app import create_app

    runtime = ServiceRuntime(settings, "api")
    with runtime:
        runtime.install_signal_handlers()
        app = create_app(
            settings,
            instance=runtime.instance,
            on_error=runtime.error,
            on_recovered=runtime.recovered,
            registry=runtime.registry,
        )
        config = uvicorn.Config(
            app,
            host=settings.host,
            port=settings.port,
            log_config=None,
            log_level=settings.log_level.lower(),
            lifespan="on",
            server_header=False,
            timeout_graceful_shutdown=int(max(1, settings.shutdown_grace_s)),
        )
        server = uvicorn.Server(config)

        def stop_when_asked() -> None:
            runtime.stop_event.wait()
            server.should_exit = True

        threading.Thread(target=stop_when_asked, name="api-stop", daemon=True).start()
        runtime.info.update({"host": settings.host, "port": settings.port})
        runtime.status = "running"
        log.info("api serving on %s:%d (run %s)", settings.host, settings.port, settings.run)
        server.run(sockets=[sock] if sock is not None else None)
        runtime.status = "stopping"
        if not server.started:
            runtime.error("uvicorn did not start")
            return 1
    return 0


def _listen(settings: ApiSettings) -> socket.socket:
    family = socket.AF_INET6 if ":" in settings.host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((settings.host, settings.port))
    sock.listen(2048)
    sock.set_inheritable(True)
    return sock


def _worker(settings: ApiSettings, sock: socket.socket, index: int) -> None:
    # Die with the supervisor, whatever killed it (Linux; elsewhere its SIGTERM still works).
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, signal.SIG_DFL)  # not the supervisor's forwarding handler
    if os.getppid() == 1:
        sys.exit(0)  # the supervisor died before the death signal was armed
    port = settings.metrics_port + index if settings.metrics_port else 0
    sys.exit(_serve(settings.model_copy(update={"metrics_port": port}), sock))


def _supervise(settings: ApiSettings) -> int:
    from conspo.logs import setup as setup_logging

    setup_logging(settings.log_level, json_lines=settings.log_json, service="api")
    sock = _listen(settings)  # before any thread or connection exists: forking is safe
    fork = multiprocessing.get_context("fork")
    workers = [
        fork.Process(target=_worker, args=(settings, sock, i), name=f"api-worker-{i}")
        for i in range(settings.workers)
    ]
    stopping = threading.Event()

    def forward(signum: int, frame: object) -> None:
        stopping.set()
        for w in workers:
            if w.pid is not None and w.exitcode is None:
                os.kill(w.pid, signal.SIGTERM)

    signal.signal(signal.SIGTERM, forward)
    signal.signal(signal.SIGINT, forward)
    for w in workers:
        w.start()
    log.info("api: %d workers on %s:%d", len(workers), settings.host, settings.port)
    while not stopping.is_set():
        multiprocessing.connection.wait([w.sentinel for w in workers], timeout=1.0)
        failed = next((w for w in workers if w.exitcode is not None), None)
        if failed is not None and not stopping.is_set():
            log.error("api: %s exited with %s: stopping the others", failed.name, failed.exitcode)
            forward(signal.SIGTERM, None)
    for w in workers:
        w.join(settings.shutdown_grace_s + 5)
        if w.exitcode is None:
            w.kill()
            w.join()
    sock.close()
    # A worker still starting when SIGTERM came has no handler yet and dies of the signal: a
    # stop all the same.
    clean = (0, -signal.SIGTERM) if stopping.is_set() else (0,)
    return 0 if all(w.exitcode in clean for w in workers) else 1
