"""Run the whole pipeline as local processes: api, generators, verifiers and the learner.

The embedded demo, the end-to-end and chaos tests and the pipeline benchmarks all need the same
thing: start every service as a real subprocess (``python -m conspo.cli <service>``) with its
settings in environment variables, exactly as a container would, then watch the run through the
REST API and Redis. ``LocalStack`` is that, and nothing more: it owns process lifecycles, log
files and the final accounting of where every submitted prompt ended up (``conspo.accounting``:
idempotency markers, not counters).
"""

from __future__ import annotations

import contextlib
import logging
import os
import secrets
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, Literal

import httpx
import redis
from pydantic import BaseModel, ConfigDict, Field

from conspo.accounting import accounting
from conspo.keys import Keys
from conspo.redis_conn import free_port
from conspo.state import RunStore
from conspo.testing import delete_run

log = logging.getLogger(__name__)
SERVICES = ("api", "generator", "verifier", "learner")

#: A knob of the stack (a ``StackConfig`` field, and the ``conspo train`` flag of the same name:
#: ``conspo.train_config.KNOBS``) -> the service settings it sets. Run settings (batch_groups,
#: max_staleness) are the learner's alone: generators follow what it announces.
KNOBS: dict[str, tuple[tuple[str, str], ...]] = {
    "model_path": (("learner", "model_path"), ("generator", "model_path")),
    "backend": (("generator", "backend"),),
    "objective": (("learner", "objective"),),
    "steps": (("learner", "total_steps"),),
    "batch_groups": (("learner", "batch_groups"),),
    "group_size": (("generator", "group_size"),),
    "max_staleness": (("learner", "max_staleness"),),
    "seed": (("learner", "seed"), ("generator", "seed")),
    "lr": (("learner", "lr"),),
    "temperature": (("generator", "temperature"),),
    "max_tokens": (("generator", "max_tokens"),),
    "eval_every": (("learner", "eval_every"),),
    "eval_samples": (("learner", "eval_samples"),),
    "checkpoint_every": (("learner", "checkpoint_every"),),
    "threads": (("learner", "num_threads"), ("generator", "cpu_threads")),
}


class StackConfig(BaseModel):
    """What differs between runs of the local stack; everything else is a service default."""

    model_config = ConfigDict(extra="forbid")

    run: str = Field(pattern=r"^[A-Za-z0-9_.-]{1,64}$")
    out_dir: Path
    redis_url: str
    model_path: Path
    backend: Literal["hf", "vllm"] = "hf"
    objective: str = "conspo"
    steps: int = Field(default=100, ge=1)
    batch_groups: int = Field(default=32, ge=1)
    group_size: int = Field(default=8, ge=1)
    generators: int = Field(default=1, ge=1)
    verifiers: int = Field(default=2, ge=1)
    max_staleness: int = Field(default=1, ge=0)
    seed: int = 0
    lr: float = 1e-4
    temperature: float = 1.0
    max_tokens: int = 8
    eval_every: int = 0
    eval_samples: int = 200
    checkpoint_every: int = 10
    threads: int = Field(default=1, ge=1, description="torch threads per generator / learner")
    learner_threads: int | None = Field(
        default=None,
        ge=1,
        description="torch threads of the learner (None: threads). More than one pays where "
        "its forward/backward has cores to itself: docs/benchmarks.md, vs TRL.",
    )
    generator_threads: int | None = Field(
        default=None, ge=1, description="torch threads of each hf generator (None: threads)."
    )
    log_level: str = "INFO"
    env: dict[str, dict[str, str]] = Field(
        default_factory=dict, description="Extra env per service name (or 'all')."
    )


class Proc:
    """One service process and where its output goes."""

    def __init__(self, service: str, index: int, argv: list[str], env: dict[str, str], log: Path):
        self.service, self.index, self.argv, self.env, self.log = service, index, argv, env, log
        self.popen: subprocess.Popen | None = None
        self.starts = 0

    @property
    def name(self) -> str:
        return f"{self.service}-{self.index}"

    def start(self) -> None:
        self.log.parent.mkdir(parents=True, exist_ok=True)
        with open(self.log, "ab") as out:
            self.popen = subprocess.Popen(
                self.argv,
                env=self.env,
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        self.starts += 1

    def alive(self) -> bool:
        return self.popen is not None and self.popen.poll() is None

    def signal(self, sig: int) -> None:
        if self.alive():
            assert self.popen is not None
            self.popen.send_signal(sig)

    def stop(self, timeout: float) -> int | None:
        if self.popen is None:
            return None
        self.signal(signal.SIGTERM)
        try:
            return self.popen.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            log.warning("%s did not stop in %.0fs: killing it", self.name, timeout)
            self.popen.kill()
            return self.popen.wait()


class LocalStack:
    def __init__(self, config: StackConfig) -> None:
        self.cfg = config
        self.keys = Keys(run=config.run)
        self.client = redis.Redis.from_url(config.redis_url)
        self.token = secrets.token_urlsafe(24)
        self.api_port = free_port()
        self.procs: list[Proc] = []

    # -- configuration ---------------------------------------------------------------------------
    def env_for(self, service: str) -> dict[str, str]:
        c = self.cfg
        threads = str(self.threads_for(service))
        base = {
            "CONSPO_RUN": c.run,
            "CONSPO_REDIS_URL": c.redis_url,
            "CONSPO_DATA_DIR": str(c.out_dir),
            "CONSPO_LOG_LEVEL": c.log_level,
            "CONSPO_HEARTBEAT_S": "1",
            "PYTHONUNBUFFERED": "1",
            # One thread per process unless told: the services already run in parallel. With
            # more, OpenMP's idle threads sleep at once instead of spinning on cores that the
            # other services need.
            "OMP_NUM_THREADS": threads,
            "MKL_NUM_THREADS": threads,
            **({"OMP_WAIT_POLICY": "PASSIVE"} if threads != "1" else {}),
            "TOKENIZERS_PARALLELISM": "false",
        }
        # The stack's own tuning for a small machine (not knobs).
        per: dict[str, dict[str, Any]] = {
            "api": {
                "CONSPO_HOST": "127.0.0.1",
                "CONSPO_PORT": self.api_port,
                "CONSPO_API_TOKEN": self.token,
                "CONSPO_FEED_MAX_BACKLOG": max(2 * c.batch_groups, 8),
                # A backlog of two steps refilled every 0.5 s capped the stack at one step per
                # 0.25 s (vs_trl's bottleneck): refill at the pace of a step.
                "CONSPO_FEED_INTERVAL_S": 0.05,
            },
            "generator": {
                "CONSPO_PROMPTS_PER_BATCH": min(c.batch_groups, 32),
                "CONSPO_HF_SEED_MODE": "batch",
                "CONSPO_WEIGHT_SYNC_BACKEND": "gloo",
            },
            "verifier": {"CONSPO_PROCESSES": 1, "CONSPO_BLOCK_MS": 200, "CONSPO_TIMEOUT_S": 5},
            "learner": {
                "CONSPO_PROGRESS_BAR": "false",
                "CONSPO_WEIGHT_SYNC_BACKEND": "gloo",
                "CONSPO_BLOCK_MS": 200,
            },
        }
        for knob, targets in KNOBS.items():
            for target, setting in targets:
                if target == service:
                    per[service][f"CONSPO_{setting.upper()}"] = getattr(c, knob)
        if service in ("learner", "generator"):
            setting = "CONSPO_NUM_THREADS" if service == "learner" else "CONSPO_CPU_THREADS"
            per[service][setting] = threads
        env = {**os.environ, **base, **{k: str(v) for k, v in per[service].items()}}
        env.update(c.env.get("all", {}))
        env.update(c.env.get(service, {}))
        return env

    def threads_for(self, service: str) -> int:
        """torch / OpenMP threads of ``service``'s processes (api and verifiers: ``threads``)."""
        c = self.cfg
        own = {"learner": c.learner_threads, "generator": c.generator_threads}.get(service)
        return own or c.threads

    def _add(self, service: str, index: int) -> Proc:
        argv = [sys.executable, "-m", "conspo.cli", service]
        log_path = self.cfg.out_dir / "logs" / f"{service}-{index}.log"
        proc = Proc(service, index, argv, self.env_for(service), log_path)
        self.procs.append(proc)
        return proc

    # -- lifecycle -------------------------------------------------------------------------------
    def start(self, *, fresh: bool = True, ready_timeout: float = 120.0) -> None:
        """Start every service; with ``fresh`` the run's Redis keys are wiped first."""
        self.cfg.out_dir.mkdir(parents=True, exist_ok=True)
        if fresh:
            delete_run(self.client, self.cfg.run)
        self._add("api", 0).start()
        self._add("learner", 0).start()
        for i in range(self.cfg.verifiers):
            self._add("verifier", i).start()
        for i in range(self.cfg.generators):
            self._add("generator", i).start()
        self.wait_ready(ready_timeout)

    def wait_ready(self, timeout: float) -> None:
        """Until the api answers ``/readyz`` and every process has left "starting" (its
        heartbeat says so: models loaded, weight sync joined, loop entered), so that what
        follows (a benchmark's clock, a test's first request) does not time start-up."""
        deadline = time.monotonic() + timeout
        api_ready = False
        while time.monotonic() < deadline:
            self.check_alive()
            if not api_ready:
                with contextlib.suppress(httpx.HTTPError):
                    api_ready = self.http().get("/readyz").status_code == 200
            if api_ready and not self.starting():
                return
            time.sleep(0.05)
        what = "the api" if not api_ready else ", ".join(p.name for p in self.starting())
        raise TimeoutError(f"{what} did not become ready in {timeout:.0f}s (see {self.log_dir})")

    def starting(self) -> list[Proc]:
        """Processes with no heartbeat yet, or one that still says "starting"."""
        up = {b.pid for b in RunStore(self.client, self.keys).heartbeats()
              if b.status != "starting"}  # fmt: skip
        return [p for p in self.procs if p.popen is not None and p.popen.pid not in up]

    @property
    def log_dir(self) -> Path:
        return self.cfg.out_dir / "logs"

    def find(self, service: str, index: int = 0) -> Proc:
        for p in self.procs:
            if p.service == service and p.index == index:
                return p
        raise KeyError(f"{service}-{index}")

    def check_alive(self, allow: Callable[[Proc], bool] | None = None) -> None:
        """Raise if a service exited on its own (the learner may finish)."""
        for p in self.procs:
            if p.popen is None or p.alive():
                continue
            if p.service == "learner" and p.popen.returncode == 0:
                continue
            if allow is not None and allow(p):
                continue
            raise RuntimeError(
                f"{p.name} exited with code {p.popen.returncode}; last lines of {p.log}:\n"
                + tail(p.log)
            )

    def kill(self, service: str, index: int = 0, sig: int = signal.SIGKILL) -> None:
        proc = self.find(service, index)
        proc.signal(sig)
        if sig == signal.SIGKILL and proc.popen is not None:
            proc.popen.wait(timeout=30)

    def restart(self, service: str, index: int = 0) -> None:
        proc = self.find(service, index)
        if proc.alive():
            proc.stop(timeout=60)
        proc.start()

    def stop(self, timeout: float = 60.0) -> dict[str, int | None]:
        """SIGTERM everyone (generators first, api last), then SIGKILL stragglers."""
        order = {"generator": 0, "verifier": 1, "learner": 2, "api": 3}
        codes = {}
        finished = self._finished_quietly()
        for p in sorted(self.procs, key=lambda p: order[p.service]):
            if p.service == "learner" and finished and p.popen is not None:
                # A learner that reached total_steps exits by itself; a SIGTERM during its
                # interpreter teardown (when Python has dropped its handlers) would kill it.
                with contextlib.suppress(subprocess.TimeoutExpired):
                    p.popen.wait(timeout=timeout)
            codes[p.name] = p.stop(timeout)
        self.client.close()
        return codes

    def _finished_quietly(self) -> bool:
        try:
            return self.learner_finished()
        except redis.RedisError:
            return False

    def __enter__(self) -> LocalStack:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # -- talking to the run ----------------------------------------------------------------------
    def http(self, timeout: float = 30.0) -> httpx.Client:
        return httpx.Client(
            base_url=f"http://127.0.0.1:{self.api_port}",
            headers={"Authorization": f"Bearer {self.token}"},
            timeout=timeout,
        )

    def submit_dataset(
        self, rows: list[dict[str, Any]], *, epochs: int, name: str, verifier: str = "arith"
    ) -> dict:
        """Inline ``{"prompt", "answer"}`` rows, fed ``epochs`` times in a seeded shuffle."""
        return self.register_dataset(
            {
                "name": name,
                "rows": rows,
                "prompt_field": "prompt",
                "answer_field": "answer",
                "verifier": verifier,
                "epochs": epochs,
            }
        )

    def register_dataset(self, spec: dict[str, Any]) -> dict:
        """POST /v1/datasets with ``spec`` (rows or a ``path`` under the api's dataset roots, and
        the field mapping); the run's seed shuffles it unless the spec says otherwise."""
        body = {"seed": self.cfg.seed, "shuffle": True, **spec}
        with self.http(timeout=120) as client:
            response = client.post("/v1/datasets", json=body)
        if response.status_code >= 300:
            raise RuntimeError(f"dataset submission failed: {response.status_code} {response.text}")
        return response.json()

    def datasets(self) -> list[dict[str, Any]]:
        with self.http() as client:
            response = client.get("/v1/datasets")
        response.raise_for_status()
        return list(response.json()["datasets"])

    def status(self) -> dict[str, Any]:
        with self.http() as client:
            response = client.get("/v1/status")
        response.raise_for_status()
        return response.json()

    def learner_finished(self) -> bool:
        return self.client.hget(self.keys.state, "status") == b"finished"

    def wait_finished(
        self,
        timeout: float,
        on_tick: Callable[[dict[str, Any]], None] | None = None,
        allow: Callable[[Proc], bool] | None = None,
        every: float = 1.0,
    ) -> None:
        deadline = time.monotonic() + timeout
        while not self.learner_finished():
            if time.monotonic() > deadline:
                raise TimeoutError(f"the run did not finish in {timeout:.0f}s (see {self.log_dir})")
            self.check_alive(allow)
            if on_tick is not None:
                with contextlib.suppress(httpx.HTTPError):
                    on_tick(self.status())
            time.sleep(every)

    # -- where every prompt went -----------------------------------------------------------------
    def accounting(self) -> dict[str, int]:
        """Counts per fate (``conspo.accounting``); ``lost`` and ``duplicated`` must be 0."""
        return accounting(self.client, self.keys)


def tail(path: Path, lines: int = 30) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return "<no log>"
