"""``conspo api`` as a process: serves, heartbeats as service ``api``, stops cleanly on SIGTERM."""

from __future__ import annotations

import os
import signal
import subprocess
import sys

import httpx

from conspo.redis_conn import free_port
from conspo.state import RunStore
from conspo.testing import REPO_ROOT, spawn, wait_for


def _healthy(url: str) -> bool:
    try:
        return httpx.get(f"{url}/healthz", timeout=1).status_code == 200
    except httpx.HTTPError:
        return False


def test_conspo_api_serves_heartbeats_and_stops_on_sigterm(
    redis_url, redis_client, keys, token, tmp_path
):
    port, metrics_port = free_port(), free_port()
    log = tmp_path / "api.log"
    env = {
        "CONSPO_REDIS_URL": redis_url,
        "CONSPO_RUN": keys.run,
        "CONSPO_API_TOKEN": token,
        "CONSPO_PORT": str(port),
        "CONSPO_HEARTBEAT_S": "0.2",
        "CONSPO_METRICS_PORT": str(metrics_port),
    }
    proc = spawn(["-m", "conspo.cli", "api"], env=env, log=log)
    url = f"http://127.0.0.1:{port}"
    store = RunStore(redis_client, keys)
    try:
        assert wait_for(lambda: _healthy(url), timeout=60), log.read_text()
        response = httpx.post(
            f"{url}/v1/prompts",
            json={"text": "1+1", "answer": "2"},
            headers={"Authorization": f"Bearer {token}"},
        )
        assert response.status_code == 202
        assert wait_for(
            lambda: any(b.service == "api" and b.status == "running" for b in store.heartbeats()),
            timeout=20,
        )
        status = httpx.get(f"{url}/v1/status", headers={"Authorization": f"Bearer {token}"})
        assert status.json()["replicas"]["api"]["alive"] == 1
        # the runtime's metrics port serves the api's metrics too, like every service's
        scraped = httpx.get(f"http://127.0.0.1:{metrics_port}/metrics").text
        assert (
            'conspo_api_requests_total{method="POST",route="/v1/prompts",status="202"}' in scraped
        )
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=30) == 0, log.read_text()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    (beat,) = [b for b in store.heartbeats() if b.service == "api"]
    assert beat.status == "stopped"
    assert token not in log.read_text()


def test_conspo_api_without_a_token_exits_2_with_the_reason(redis_url):
    env = {k: v for k, v in os.environ.items() if not k.startswith("CONSPO_")}
    env["CONSPO_REDIS_URL"] = redis_url
    proc = subprocess.run(
        [sys.executable, "-m", "conspo.cli", "api"],
        env=env,
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 2
    assert "CONSPO_API_TOKEN" in proc.stderr


def test_conspo_api_workers_share_the_port_and_stop_together(
    redis_url, redis_client, keys, token, tmp_path
):
    """``CONSPO_WORKERS=2``: two serving processes behind one port, each a heartbeating api;
    SIGTERM stops both cleanly, and a SIGKILLed supervisor takes its workers with it."""
    port = free_port()
    log = tmp_path / "api.log"
    env = {
        "CONSPO_REDIS_URL": redis_url,
        "CONSPO_RUN": keys.run,
        "CONSPO_API_TOKEN": token,
        "CONSPO_PORT": str(port),
        "CONSPO_HEARTBEAT_S": "0.2",
        "CONSPO_WORKERS": "2",
    }
    url = f"http://127.0.0.1:{port}"
    store = RunStore(redis_client, keys)

    def running() -> set[int]:
        return {b.pid for b in store.heartbeats() if b.service == "api" and b.status == "running"}

    for sig in (signal.SIGTERM, signal.SIGKILL):
        proc = spawn(["-m", "conspo.cli", "api"], env=env, log=log)
        try:
            assert wait_for(lambda: len(running()) >= 2, timeout=90), log.read_text()
            for i in range(20):
                response = httpx.post(
                    f"{url}/v1/prompts",
                    json={"text": f"{i}+1", "answer": str(i + 1)},
                    headers={"Authorization": f"Bearer {token}"},
                )
                assert response.status_code == 202
            pids = running()
            proc.send_signal(sig)
            code = proc.wait(timeout=30)
            assert code == (0 if sig == signal.SIGTERM else -signal.SIGKILL), log.read_text()

            def gone(pids: set[int] = pids) -> bool:
                return not any(os.path.exists(f"/proc/{pid}") for pid in pids)

            assert wait_for(gone, timeout=30), "a worker outlived its supervisor"
            assert not _healthy(url)  # nobody holds the port
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
        redis_client.delete(keys.heartbeats)
    assert redis_client.xlen(keys.prompts) == 40
