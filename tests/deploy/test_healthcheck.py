"""deploy/docker/healthcheck.py (``conspo-healthcheck`` in the images) against a real HTTP
server on the loopback: exit 0 for healthy, 1 for unhealthy, as Docker's HEALTHCHECK reads it."""

from __future__ import annotations

import http.server
import importlib.util
import os
import socket
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[2] / "deploy" / "docker" / "healthcheck.py"
STATUS = {"/metrics": 200, "/healthz": 401, "/boom": 503, "/missing": 404}


class _Handler(http.server.BaseHTTPRequestHandler):
    def do_GET(self) -> None:
        code = STATUS.get(self.path, 404)
        self.send_response(code)
        self.send_header("Content-Length", "0")
        self.end_headers()

    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture(scope="module")
def server() -> Iterator[str]:
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}"
    httpd.shutdown()
    httpd.server_close()


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="module")
def probe_main():
    """The script's main(), loaded in-process (a subprocess per case would cost seconds)."""
    spec = importlib.util.spec_from_file_location("conspo_healthcheck", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.main


@pytest.fixture
def run(probe_main, clean_conspo_env, capsys):
    def call(*args: str, env: dict[str, str] | None = None) -> tuple[int, str]:
        for key, value in (env or {}).items():
            clean_conspo_env.setenv(key, value)
        rc = probe_main(["--timeout", "3", *args])
        for key in env or {}:
            clean_conspo_env.delenv(key)
        return rc, capsys.readouterr().out

    return call


def test_runs_as_a_standalone_script(server):
    """As the images run it: its own interpreter, no conspo import needed."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("CONSPO_")}
    proc = subprocess.run(
        [sys.executable, "-I", str(SCRIPT), server + "/metrics"],
        capture_output=True, text=True, timeout=30, env=env, check=False,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert proc.stdout.startswith("healthy")


@pytest.mark.parametrize(
    ("path", "any_status", "rc"),
    [
        ("/metrics", False, 0),
        ("/healthz", False, 1),
        ("/healthz", True, 0),
        ("/missing", True, 0),
        ("/boom", True, 1),
        ("/boom", False, 1),
    ],
)
def test_exit_status_follows_the_http_answer(run, server, path, any_status, rc):
    args = ["--any-status"] if any_status else []
    code, out = run(*args, server + path)
    assert code == rc, out


def test_nothing_listening_is_unhealthy(run):
    code, out = run(f"http://127.0.0.1:{_free_port()}/metrics")
    assert code == 1
    assert "unhealthy" in out


def test_without_url_it_probes_the_configured_metrics_port(run, server):
    port = server.rsplit(":", 1)[1]
    assert run(env={"CONSPO_METRICS_PORT": port})[0] == 0
    assert run(env={"CONSPO_METRICS_PORT": str(_free_port())})[0] == 1


def test_without_url_the_api_port_counts_any_answer(run, server):
    port = server.rsplit(":", 1)[1]
    # /healthz answers 401 here: the api is up, it just wants a token.
    assert run(env={"CONSPO_PORT": port, "CONSPO_METRICS_PORT": "0"})[0] == 0
    assert run(env={"CONSPO_PORT": str(_free_port())})[0] == 1


def test_without_any_port_configured_it_reports_healthy(run):
    code, out = run()
    assert code == 0
    assert "no probe configured" in out
