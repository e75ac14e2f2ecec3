"""The compose `cpu` profile, run outside containers with the exact commands and environment.

`make test` has no Docker engine (`make compose-check` runs the containers where one is), so
this is the closest check there that `docker compose --profile cpu up` would train: every conspo
service of the profile is started as a process with the command and environment the compose
file gives it (Redis URL, data directory and ports adapted to the host), against a real
password-protected Redis, and one learner step must complete.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import tempfile
from pathlib import Path

import httpx
import pytest
import redis

from conspo.keys import Keys
from conspo.redis_conn import free_port, redis_server_binary
from conspo.tasks.arith import DEFAULT_N_TEST, DEFAULT_SPLIT_SEED, make_split
from conspo.testing import wait_for


def executable(argv: list[str]) -> list[str]:
    """`conspo` from this interpreter's environment (what the image's PATH would resolve)."""
    script = Path(sys.executable).parent / argv[0]
    return [str(script) if script.exists() else shutil.which(argv[0]) or argv[0], *argv[1:]]


@pytest.fixture
def password_redis():
    password = "test-pw-0123"
    port = free_port()
    workdir = tempfile.mkdtemp(prefix="conspo-redis-pw-")
    proc = subprocess.Popen(
        [
            redis_server_binary(),
            "--port",
            str(port),
            "--bind",
            "127.0.0.1",
            "--save",
            "",
            "--appendonly",
            "no",
            "--dir",
            workdir,
            "--requirepass",
            password,
        ],
        stdout=subprocess.DEVNULL,
    )
    client = redis.Redis(port=port, password=password)
    assert wait_for(lambda: _pings(client), timeout=15)
    yield f"redis://127.0.0.1:{port}/0", client
    client.close()
    proc.terminate()
    proc.wait(timeout=10)
    shutil.rmtree(workdir, ignore_errors=True)


def _pings(client: redis.Redis) -> bool:
    try:
        return bool(client.ping())
    except redis.RedisError:
        return False


@pytest.mark.slow
def test_cpu_profile_commands_train_one_step(compose_processes, kit, password_redis, tmp_path):
    url, client = password_redis
    api_port = free_port()
    specs = compose_processes(
        "cpu",
        redis_url=url,
        data_dir=tmp_path / "data",
        weight_sync_port=free_port(),
        api_port=api_port,
    )
    assert sorted(s.argv[1] for s in specs) == ["api", "generator", "learner", "verifier"]
    procs = []
    logs = tmp_path / "logs"
    logs.mkdir()
    try:
        for spec in specs:
            env = {"PATH": os.environ["PATH"], "HOME": os.environ.get("HOME", "/tmp"), **spec.env}
            with open(logs / f"{spec.service}.log", "wb") as out:
                procs.append(
                    (
                        spec,
                        subprocess.Popen(
                            executable(spec.argv), env=env, stdout=out, stderr=subprocess.STDOUT
                        ),
                    )
                )
        token = kit.SECRETS["CONSPO_API_TOKEN"]
        http = httpx.Client(
            base_url=f"http://127.0.0.1:{api_port}",
            headers={"Authorization": f"Bearer {token}"},
            timeout=30,
        )
        assert wait_for(lambda: _ready(http), timeout=180), _logs(logs)
        split = make_split(n_train=2000, n_test=DEFAULT_N_TEST, seed=DEFAULT_SPLIT_SEED)
        rows = [{"prompt": p.prompt, "answer": p.answer} for p in split.train]
        body = {
            "name": "arith",
            "rows": rows,
            "prompt_field": "prompt",
            "answer_field": "answer",
            "verifier": "arith",
            "epochs": 1,
        }
        assert http.post("/v1/datasets", json=body).status_code == 201
        run = specs[0].env.get("CONSPO_RUN", "default")
        state = Keys(run=run).state
        assert wait_for(lambda: int(client.hget(state, "step") or 0) >= 1, timeout=600), _logs(logs)
    finally:
        for _, proc in procs:
            proc.send_signal(signal.SIGTERM)
        codes = {spec.service: proc.wait(timeout=120) for spec, proc in procs}
    assert all(code == 0 for code in codes.values()), (codes, _logs(logs))


def _ready(http: httpx.Client) -> bool:
    try:
        return http.get("/readyz").status_code == 200
    except httpx.HTTPError:
        return False


def _logs(folder: Path) -> str:
    return "\n".join(
        f"--- {p.name}\n" + "\n".join(p.read_text(errors="replace").splitlines()[-15:])
        for p in sorted(folder.glob("*.log"))
    )
