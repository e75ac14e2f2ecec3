"""Security under a real stack, and the api under load while the pipeline trains.

One stack behind a password-protected Redis (``--requirepass``; the services get it from
``CONSPO_REDIS_PASSWORD``, never in a URL) with a known api token:

- without the password, or with a wrong one, a service refuses to start with a message naming
  the setting (exit code 2) instead of retrying a refusal forever; without an api token the api
  refuses to start;
- a load test posts prompts at a fixed rate (open loop) through ``POST /v1/prompts`` while the
  pipeline runs: zero errors (no 5xx, no connection error), p50/p99 latency reported, never
  asserted;
- oversized bodies get 413, missing or wrong tokens 401 (the comparison is constant time);
- neither the token nor the password appears in any service log or in /v1/status.
"""

from __future__ import annotations

import asyncio
import inspect
import os
import secrets
import statistics
import subprocess
import sys
import time
from collections import Counter

import httpx
import pytest
import yaml

from conspo.testing import REPO_ROOT

pytestmark = [pytest.mark.chaos, pytest.mark.timeout(900)]


def _start_service(service: str, env: dict[str, str]) -> subprocess.Popen:
    base = {k: v for k, v in os.environ.items() if not k.startswith("CONSPO_")}
    return subprocess.Popen(
        [sys.executable, "-m", "conspo.cli", service],
        env={**base, "PYTHONUNBUFFERED": "1", **env},
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        cwd=REPO_ROOT,
    )


def _percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


async def _load(url: str, token: str, rate: float, duration: float, in_flight: int = 64) -> dict:
    """Request i is due at start + i / rate. At most ``in_flight`` requests are outstanding:
    when the api cannot keep up, sending slips (the offered rate drops below the target) instead
    of queueing without bound, so the test lasts about ``duration`` whatever the machine."""
    statuses: Counter = Counter()
    errors: list[str] = []
    latencies: list[float] = []
    limits = httpx.Limits(max_connections=in_flight, max_keepalive_connections=in_flight)
    headers = {"Authorization": f"Bearer {token}"}
    slots = asyncio.Semaphore(in_flight)
    async with httpx.AsyncClient(base_url=url, headers=headers, timeout=60, limits=limits) as http:

        async def one(i: int) -> None:
            body = {"text": f"What is {i % 50} + {i % 7}?", "answer": str(i % 50 + i % 7)}
            body["verifier"] = "arith"
            extra = {"Idempotency-Key": f"load-{i}"} if i % 2 else {}
            t0 = time.perf_counter()
            try:
                response = await http.post("/v1/prompts", json=body, headers=extra)
                statuses[response.status_code] += 1
                if response.status_code != 202:
                    errors.append(f"{response.status_code}: {response.text[:200]}")
            except httpx.HTTPError as exc:
                errors.append(f"{type(exc).__name__}: {exc}")
            finally:
                latencies.append(time.perf_counter() - t0)
                slots.release()

        tasks = []
        start = time.perf_counter()
        for i in range(int(rate * duration)):
            delay = start + i / rate - time.perf_counter()
            if delay > 0:
                await asyncio.sleep(delay)
            await slots.acquire()
            if time.perf_counter() - start > duration:
                slots.release()
                break
            tasks.append(asyncio.create_task(one(i)))
        sent_s = time.perf_counter() - start
        await asyncio.gather(*tasks)
        elapsed = time.perf_counter() - start
    return {
        "requests": len(tasks),
        "target_rate": rate,
        "offered_rate": round(len(tasks) / sent_s, 1),
        "achieved_rate": round(sum(statuses.values()) / elapsed, 1),
        "duration_s": round(elapsed, 1),
        "in_flight_cap": in_flight,
        "p50_ms": round(1000 * statistics.median(latencies), 1),
        "p99_ms": round(1000 * _percentile(latencies, 0.99), 1),
        "max_ms": round(1000 * max(latencies), 1),
        "statuses": {str(k): v for k, v in statuses.items()},
        "errors": errors,
    }


def test_secrets_auth_limits_and_load(chaos_stack, redis_server, kit, chaos_table, chaos_extras):
    started = time.monotonic()
    password = "redispw-" + secrets.token_hex(16)
    server = redis_server(password=password)

    # -- a service without the right password refuses to start, and says why --------------------
    base = {"CONSPO_REDIS_URL": server.url, "CONSPO_RUN": "refused"}
    checks = {
        (service, given): {**base, "CONSPO_API_TOKEN": "a-token-for-this-check"}
        | ({"CONSPO_REDIS_PASSWORD": given} if given else {})
        for service in ("verifier", "api")
        for given in (None, "not-the-password")
    }
    checks[("api", "no token")] = {**base, "CONSPO_REDIS_PASSWORD": password}
    procs = {case: _start_service(case[0], env) for case, env in checks.items()}  # in parallel
    for (service, given), proc in procs.items():
        out, err = proc.communicate(timeout=120)
        assert proc.returncode == 2, (service, given, out[-500:], err[-2000:])
        assert password not in out + err
        if given == "no token":
            assert "CONSPO_API_TOKEN" in err, err[-2000:]
        else:
            assert "CONSPO_REDIS_PASSWORD" in err and "refused" in err, err[-2000:]

    # -- the stack, authenticated ------------------------------------------------------------------
    stack = chaos_stack(
        "security",
        redis_url_=server.url,
        redis_password=password,
        env={
            "all": {"CONSPO_REDIS_PASSWORD": password},
            "api": {"CONSPO_MAX_BODY_BYTES": str(1024 * 1024)},
        },
    )
    token = stack.token
    stack.submit_dataset(kit.arith_rows(5, 4000), epochs=3, name="arith")
    stack.wait_step(1)
    step = stack.step()

    rate, duration = (200.0, 30.0) if kit.LONG else (200.0, 10.0)
    url = f"http://127.0.0.1:{stack.api_port}"
    load = asyncio.run(_load(url, token, rate, duration))
    chaos_extras["load"] = {k: v for k, v in load.items() if k != "errors"}
    assert load["errors"] == [], load["errors"][:10]
    stack.wait_step(step + 2)  # the pipeline trained through the load

    with httpx.Client(base_url=url, timeout=30) as http:
        auth = {"Authorization": f"Bearer {token}"}
        big = http.post(
            "/v1/prompts",
            headers={**auth, "Content-Type": "application/json"},
            content=b'{"text": "' + b"1" * (2 * 1024 * 1024) + b'", "answer": "1"}',
        )
        assert big.status_code == 413, big.text[:300]
        assert big.json()["error"]["code"] == "payload_too_large"
        assert http.get("/v1/status").status_code == 401
        wrong = "x" * len(token)  # same length: only the comparison can refuse it
        assert (
            http.get("/v1/status", headers={"Authorization": f"Bearer {wrong}"}).status_code == 401
        )
        status = http.get("/v1/status", headers=auth)
        assert status.status_code == 200
        assert token not in status.text and password not in status.text

    from services.api.auth import token_matches

    assert "hmac.compare_digest" in inspect.getsource(token_matches)

    accounting, fates = stack.settle_and_trace()
    totals = kit.check_books(accounting, fates)
    for name, text in stack.logs().items():
        assert token not in text, f"the api token leaked into {name}"
        assert password not in text, f"the Redis password leaked into {name}"
    assert password not in (server.workdir / "redis.log").read_text(errors="replace")

    chaos_table(
        kit.Row(
            fault="load: POST /v1/prompts",
            scenario="security",
            injected=load["requests"],
            accounting=accounting,
            fates=totals,
            notes=f"target {rate:.0f}/s for {duration:.0f}s (at most {load['in_flight_cap']} "
            f"in flight): {load['offered_rate']}/s sent, {load['achieved_rate']}/s answered, "
            f"p50 {load['p50_ms']} ms, p99 {load['p99_ms']} ms, 0 errors, while training; "
            "password-protected Redis, no secret in any log or in /v1/status",
            wall_s=time.monotonic() - started,
        )
    )


def test_compose_wires_the_redis_password():
    compose = yaml.safe_load((REPO_ROOT / "docker-compose.yml").read_text())
    redis_service = compose["services"]["redis"]
    command = redis_service["command"]
    command = " ".join(command) if isinstance(command, list) else str(command)
    assert "--requirepass" in command and "CONSPO_REDIS_PASSWORD" in command
    for name, service in compose["services"].items():
        if name == "redis":
            continue
        env = service.get("environment", {})
        names = env if isinstance(env, dict) else [e.split("=", 1)[0] for e in env]
        assert "CONSPO_REDIS_PASSWORD" in names, f"{name} does not get the Redis password"
