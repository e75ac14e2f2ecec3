"""``conspo api``: serve the REST API with uvicorn, heartbeating as service ``api``.

Uvicorn owns SIGTERM/SIGINT while it serves (graceful shutdown: stop accepting, finish
in-flight requests within ``shutdown_grace_s``, run the lifespan exit which stops the feeder and
releases its locks). The runtime's own handler is installed first so that uvicorn, which re-raises
the captured signal to the previous handler when it is done, ends in a flag rather than in a
default-action kill: the process then writes its ``stopped`` heartbeat and exits 0.
"""

from __future__ import annotations

import argparse
import logging
import threading

from conspo.settings import ApiSettings, load

log = logging.getLogger(__name__)


def main(args: argparse.Namespace | None = None) -> int:
    settings = load(ApiSettings)
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
        server.run()
        runtime.status = "stopping"
        if not server.started:
            runtime.error("uvicorn did not start")
            return 1
    return 0
