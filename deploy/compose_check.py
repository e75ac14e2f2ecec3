#!/usr/bin/env python3
"""``make compose-check``: prove that ``docker compose`` runs the cpu stack and loses nothing.

What a user gets from ``cp .env.example .env`` (secrets filled in) and ``docker compose up``, on
the project's own docker-compose.yml, end to end:

1. build the cpu profile's image, then ``up -d --wait`` until every container is healthy;
2. write the arithmetic task's training split into a host folder mounted as DATASET_DIR and
   submit it by server-side path through the REST API; wait for N learner steps;
3. ``--scale verifier=3``, SIGKILL one verifier while it holds unacknowledged rollouts, and time
   until each of them is with a live replica or acknowledged;
4. SIGKILL the learner's process inside its container (``docker kill`` would cancel the restart
   policy): tini exits 137, ``restart: on-failure`` starts the container again and the learner
   resumes from its last checkpoint; time the restart and the first step after it;
5. once the run has passed the step the learner was killed at, stop the pipeline services
   (SIGTERM: each finishes or hands back its unit of work) and read the books from ``GET
   /v1/accounting`` (``conspo.accounting``): lost 0 and duplicated 0, or the check fails.

The stack is its own compose project (``conspo-check``) with a generated env file, so a user's
``.env``, shell variables and volumes never leak in, and it is torn down (``down -v``) on
success, failure, Ctrl-C and SIGTERM; images and the build cache stay, so a rerun builds in
seconds. Where Docker, Compose v2 or a daemon is missing it says which in one line and exits 2;
a failed check exits 1.

Redis publishes no host port, so the books come through the api. Only the reclaim measurement
asks Redis itself (``XPENDING`` through ``redis-cli`` in the redis container): which consumer
holds which entry is not something the api shows.

Hosts that build offline (docs/deploy.md): ``TORCH_INDEX_URL`` sets the Dockerfile's torch index
and ``COMPOSE_CHECK_BUILD_NETWORK`` the build network (``host`` reaches an index on loopback).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import yaml

from conspo.keys import STREAM_GROUPS, Keys
from conspo.queue import RELEASED

REPO = Path(__file__).resolve().parents[1]
COMPOSE_FILE = REPO / "docker-compose.yml"
ENV_EXAMPLE = REPO / ".env.example"
PROFILE = "cpu"
VERIFIERS = 3
# What the learner logs when it resumes, replays and steps (services/learner).
RESUMED = re.compile(r"resuming from \S+ \(step (\d+)\)")
REPLAYED = re.compile(r"replaying (\d+) pending entries")
STEPPED = re.compile(r"^step (\d+)/")


class MissingError(RuntimeError):
    """A prerequisite is absent: exit 2 with this one-line reason."""


class CheckFailedError(RuntimeError):
    """The stack did not do what it must: exit 1."""


def say(message: str) -> None:
    print(f"compose-check: {message}", flush=True)


def run(argv: list[str], *, env: dict[str, str], timeout: float) -> subprocess.CompletedProcess:
    try:
        return subprocess.run(
            argv, env=env, capture_output=True, text=True, timeout=timeout, check=False
        )
    except FileNotFoundError:
        raise MissingError(f"{argv[0]} not found on PATH") from None
    except subprocess.TimeoutExpired:
        raise CheckFailedError(f"`{' '.join(argv[:5])} ...` ran over {timeout:.0f} s") from None


def tail(text: str, lines: int = 25) -> str:
    return "\n".join(text.strip().splitlines()[-lines:])


# -- prerequisites and configuration ---------------------------------------------------------------
def compose_major(version: str) -> int | None:
    match = re.match(r"v?(\d+)\.", version.strip())
    return int(match.group(1)) if match else None


def preflight(env: dict[str, str]) -> None:
    if shutil.which("docker", path=env.get("PATH")) is None:
        raise MissingError(
            "no docker CLI on PATH: install Docker Engine with the Compose v2 plugin"
        )
    version = run(["docker", "compose", "version", "--short"], env=env, timeout=60)
    major = compose_major(version.stdout) if version.returncode == 0 else None
    if major is None or major < 2:
        raise MissingError("`docker compose` (Compose v2) is missing: install the compose plugin")
    info = run(["docker", "info", "--format", "{{.ServerVersion}}"], env=env, timeout=60)
    if info.returncode != 0:
        where = env.get("DOCKER_HOST") or "the default socket"
        raise MissingError(f"no Docker daemon answers on {where}: start dockerd or set DOCKER_HOST")


def _setting(line: str) -> str | None:
    """The variable a ``.env`` line sets, if it sets one."""
    if "=" not in line or line.lstrip().startswith("#"):
        return None
    return line.split("=", 1)[0].strip()


def env_names(text: str) -> set[str]:
    return {name for line in text.splitlines() if (name := _setting(line))}


def env_file_text(example: str, values: dict[str, str], drop: set[str]) -> str:
    """``example`` as a user fills it in: ``values`` set, ``drop`` removed, comments kept."""
    out = []
    for line in example.splitlines():
        name = _setting(line)
        if name in drop:
            continue
        out.append(f"{name}={values[name]}" if name in values else line)
    out += [f"{k}={v}" for k, v in values.items() if k not in env_names(example)]
    return "\n".join(out) + "\n"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def write_dataset(folder: Path) -> tuple[str, int]:
    """The demo's training split as a server-side JSONL file; returns (path under the folder,
    rows). Readable by everyone: the api runs as uid 10001."""
    from conspo.demo import training_rows

    rows = training_rows()
    (folder / "arith").mkdir(parents=True)
    path = folder / "arith" / "train.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    for p in (folder, folder / "arith"):
        p.chmod(0o755)
    path.chmod(0o644)
    return "arith/train.jsonl", len(rows)


# -- docker ----------------------------------------------------------------------------------------
@dataclass
class Compose:
    """``docker compose`` on the check's own project, and plain ``docker`` with the same env."""

    project: str
    env_file: Path
    env: dict[str, str]
    files: list[Path] = field(default_factory=lambda: [COMPOSE_FILE])

    def argv(self, *args: str) -> list[str]:
        out = ["docker", "compose", "-p", self.project, "--env-file", str(self.env_file)]
        for path in self.files:
            out += ["-f", str(path)]
        return [*out, *args]

    def __call__(self, *args: str, timeout: float = 600, check: bool = True) -> str:
        proc = run(self.argv(*args), env=self.env, timeout=timeout)
        if check and proc.returncode != 0:
            raise CheckFailedError(
                f"docker compose {' '.join(args)}:\n{tail(proc.stderr + proc.stdout)}"
            )
        return proc.stdout

    def docker(self, *args: str, timeout: float = 120, check: bool = True) -> str:
        proc = run(["docker", *args], env=self.env, timeout=timeout)
        if check and proc.returncode != 0:
            raise CheckFailedError(f"docker {' '.join(args)}: {tail(proc.stderr, 5)}")
        return proc.stdout

    def containers(self, service: str) -> list[str]:
        return self("ps", "-q", service, timeout=60).split()

    def inspect(self, container: str, template: str) -> str:
        return self.docker("inspect", "-f", template, container).strip()

    def logs(self, service: str, since: float) -> list[dict[str, Any]]:
        """The service's JSON log records written after ``since`` (Unix time)."""
        out = self("logs", "--no-log-prefix", "--since", str(int(since) - 1), service)
        records = []
        for line in out.splitlines():
            with contextlib.suppress(ValueError):
                record = json.loads(line)
                if isinstance(record, dict) and float(record.get("ts", 0)) >= since:
                    records.append(record)
        return records

    def pending(self, stream_key: str, group: str) -> dict[str, str]:
        """Every unacknowledged entry of ``group`` on the stream -> the consumer holding it."""
        script = 'REDISCLI_AUTH="$CONSPO_REDIS_PASSWORD" exec redis-cli "$@"'
        argv = ("XPENDING", stream_key, group, "-", "+", "100000")
        return parse_xpending(self("exec", "-T", "redis", "sh", "-c", script, "sh", *argv))


def parse_xpending(text: str) -> dict[str, str]:
    """``redis-cli XPENDING <key> <group> - + <count>`` as printed without a TTY: four lines per
    entry (id, consumer, idle ms, deliveries), nothing when none is pending."""
    lines = [line.strip() for line in text.strip().splitlines()]
    if len(lines) % 4 or any(not re.fullmatch(r"\d+-\d+", i) for i in lines[::4]):
        raise CheckFailedError(f"unexpected XPENDING reply: {text[:200]!r}")
    return {lines[i]: lines[i + 1] for i in range(0, len(lines), 4)}


def services_to_build(model: dict[str, Any]) -> list[str]:
    """One service per built image (``model`` is ``docker compose config``): the cpu services
    all run conspo-cpu, and building it once per service, concurrently, costs one copy and
    export of its 1.5 GB virtualenv layer each."""
    first: dict[str, str] = {}
    for name, svc in sorted(model["services"].items()):
        if "build" in svc:
            first.setdefault(svc.get("image") or name, name)
    return sorted(first.values())


def build_override(model: dict[str, Any], index_url: str, network: str) -> dict[str, Any]:
    """Build settings for every service that ``model`` (``docker compose config``) builds: the
    torch index and the build network of an offline host."""
    build: dict[str, Any] = {}
    if network:
        build["network"] = network
    if index_url:
        build["args"] = {"TORCH_INDEX_URL": index_url}
    return {
        "services": {
            name: {"build": build} for name, svc in model["services"].items() if "build" in svc
        }
    }


# -- the api ---------------------------------------------------------------------------------------
class Api:
    def __init__(self, port: int, token: str) -> None:
        self.http = httpx.Client(
            base_url=f"http://127.0.0.1:{port}",
            headers={"Authorization": f"Bearer {token}"},
            timeout=60,
        )

    def get(self, path: str) -> dict[str, Any]:
        response = self.http.get(path)
        if response.status_code != 200:
            raise CheckFailedError(f"GET {path}: HTTP {response.status_code} {response.text[:300]}")
        return response.json()

    def status(self) -> dict[str, Any]:
        return self.get("/v1/status?points=1")

    def wait(
        self, what: str, done: Callable[[dict[str, Any]], bool], timeout: float
    ) -> dict[str, Any]:
        """Poll the run's status until ``done``; a restarting api only delays the answer."""
        deadline = time.monotonic() + timeout
        while True:
            with contextlib.suppress(httpx.HTTPError):
                status = self.status()
                if done(status):
                    return status
            if time.monotonic() > deadline:
                raise CheckFailedError(f"waited {timeout:.0f} s for {what}")
            time.sleep(0.5)


def step_of(status: dict[str, Any]) -> int:
    return int(status.get("step") or 0)


# -- the scenario ----------------------------------------------------------------------------------
@dataclass
class Check:
    compose: Compose
    api: Api
    steps: int
    figures: dict[str, Any] = field(default_factory=dict)

    def timed(self, name: str, action: Callable[[], Any]) -> Any:
        started = time.monotonic()
        result = action()
        self.figures[name] = round(time.monotonic() - started, 1)
        return result

    def submit(self, path: str) -> None:
        body = {
            "name": "arith-train",
            "path": path,
            "prompt_field": "prompt",
            "answer_field": "answer",
            "verifier": "arith",
            "epochs": 3,
        }
        response = self.api.http.post("/v1/datasets", json=body)
        if response.status_code >= 300:
            raise CheckFailedError(
                f"POST /v1/datasets: HTTP {response.status_code} {response.text}"
            )
        self.figures["dataset_prompts"] = response.json()["total"]

    def first_steps(self) -> None:
        self.timed(
            "first_step_s",
            lambda: self.api.wait("the first learner step", lambda s: step_of(s) >= 1, 600),
        )
        self.api.wait(f"{self.steps} learner steps", lambda s: step_of(s) >= self.steps, 900)

    def scale_verifiers(self) -> None:
        def scale() -> None:
            self.compose(
                "up", "-d", "--no-recreate", "--wait", "--wait-timeout", "300",
                "--scale", f"verifier={VERIFIERS}", "verifier",
            )  # fmt: skip
            self.api.wait(
                f"{VERIFIERS} verifiers alive",
                lambda s: s["replicas"].get("verifier", {}).get("alive", 0) >= VERIFIERS,
                120,
            )

        self.timed("scale_s", scale)
        if len(self.compose.containers("verifier")) != VERIFIERS:
            raise CheckFailedError(
                f"--scale verifier={VERIFIERS} did not give {VERIFIERS} containers"
            )

    def kill_a_busy_verifier(self, stream_key: str, group: str) -> tuple[dict[str, str], float]:
        """SIGKILL a verifier that holds unacknowledged rollouts; returns (the entries it held ->
        its consumer name, the kill's time).

        A verifier grades a group in milliseconds, so at a random instant it usually holds
        nothing. With every replica paused, rollouts pile up; one replica unpaused for a moment
        takes a read's worth, is frozen again holding them, and is killed frozen: a verifier
        dying in the middle of grading."""
        ids = self.compose.containers("verifier")
        # A verifier's consumer name is verifier-<hostname>-<pid>-<random> (conspo.queue).
        hosts = {c: self.compose.inspect(c, "{{.Config.Hostname}}") for c in ids}
        deadline = time.monotonic() + 300
        for attempt in range(10_000):
            victim = ids[attempt % len(ids)]
            prefix = f"verifier-{hosts[victim]}-"
            killed = False
            self.compose.docker("pause", *ids)
            try:
                self.api.wait(
                    "rollouts to pile up", lambda s: s["queues"]["rollouts"]["lag"] >= 4, 120
                )
                self.compose.docker("unpause", victim)
                time.sleep(0.2)
                self.compose.docker("pause", victim)
                pending = self.compose.pending(stream_key, group)
                held = {e: owner for e, owner in pending.items() if owner.startswith(prefix)}
                if held:
                    self.compose.docker("kill", victim)
                    killed, at = True, time.time()
                    self.figures["verifier_entries_held"] = len(held)
                    return held, at
            finally:
                for c in ids:
                    if not (killed and c == victim):
                        self.compose.docker("unpause", c, check=False)
            if time.monotonic() > deadline:
                break
            time.sleep(1.0)
        raise CheckFailedError("no verifier held an unacknowledged rollout to be killed with")

    def reclaim(self, stream_key: str, group: str, held: dict[str, str], killed_at: float) -> None:
        """Until every entry the killed verifier held is with another replica or acknowledged
        (not with the dead consumer, nor handed back and still waiting for a reader)."""
        deadline = time.monotonic() + 600
        while time.monotonic() < deadline:
            pending = self.compose.pending(stream_key, group)
            waiting = [e for e, dead in held.items() if pending.get(e) in (dead, RELEASED)]
            if not waiting:
                self.figures["reclaim_s"] = round(time.time() - killed_at, 1)
                return
            time.sleep(1.0)
        raise CheckFailedError("the killed verifier's rollouts were never reclaimed")

    def kill_learner(self) -> None:
        """SIGKILL the learner process (tini's child), time its restart and resume, and wait
        until the run has passed the step it was killed at."""
        (container,) = self.compose.containers("learner-cpu")
        restarts = int(self.compose.inspect(container, "{{.RestartCount}}"))
        killed_step = step_of(self.api.status())
        killed_at = time.time()
        self.compose(
            "exec", "-T", "learner-cpu", "sh", "-c", "kill -KILL $(cat /proc/1/task/1/children)",
            check=False,
        )  # fmt: skip
        deadline = time.monotonic() + 300
        while int(self.compose.inspect(container, "{{.RestartCount}}")) <= restarts:
            if time.monotonic() > deadline:
                raise CheckFailedError("the killed learner's container was not restarted")
            time.sleep(0.2)
        self.figures["learner_restart_s"] = round(time.time() - killed_at, 1)
        self.figures["learner_killed_at_step"] = killed_step
        self.wait_learner_log(killed_at)
        self.api.wait(
            f"the run to pass step {killed_step}",
            lambda s: step_of(s) >= killed_step + 2,
            600,
        )

    def wait_learner_log(self, killed_at: float) -> int:
        """From the restarted learner's log: the checkpoint step it resumed from, how many
        pending entries it replayed, and when its first step after the kill finished."""
        deadline = time.monotonic() + 600
        resumed: int | None = None
        while time.monotonic() < deadline:
            for record in self.compose.logs("learner-cpu", killed_at):
                message = str(record.get("msg", ""))
                if resumed is None and (m := RESUMED.search(message)):
                    resumed = int(m.group(1))
                    self.figures["learner_resumed_from_step"] = resumed
                    self.figures["learner_resumed_s"] = round(float(record["ts"]) - killed_at, 1)
                elif m := REPLAYED.search(message):
                    self.figures["learner_replayed_entries"] = int(m.group(1))
                elif resumed is not None and (m := STEPPED.match(message)):
                    self.figures["learner_resume_s"] = round(float(record["ts"]) - killed_at, 1)
                    return resumed
            time.sleep(1.0)
        if resumed is None:
            raise CheckFailedError("the restarted learner did not resume from a checkpoint")
        raise CheckFailedError(f"the learner resumed from step {resumed} but trained no further")

    def books(self) -> dict[str, int]:
        """Stop the pipeline (the api stays) and read the books once nothing moves."""
        self.compose("stop", "-t", "60", "generator-cpu", "verifier", "learner-cpu")
        previous: dict[str, int] | None = None
        for _ in range(60):
            books = self.api.get("/v1/accounting")
            if books == previous:  # the api's feeder stops at its backlog bound
                return books
            previous = books
            time.sleep(2.0)
        raise CheckFailedError(f"the books kept moving after the pipeline stopped: {previous}")


FIGURES = [
    ("build_s", "build (docker compose build)", "s"),
    ("up_s", "up until every service is healthy", "s"),
    ("dataset_prompts", "prompts in the dataset (rows x epochs)", ""),
    ("first_step_s", "dataset submitted -> first learner step", "s"),
    ("scale_s", f"--scale verifier={VERIFIERS} until healthy", "s"),
    ("verifier_entries_held", "rollouts held by the killed verifier", ""),
    ("reclaim_s", "verifier killed -> rollouts with a live one", "s"),
    ("learner_killed_at_step", "learner killed at step", ""),
    ("learner_restart_s", "learner killed -> container restarted", "s"),
    ("learner_resumed_s", "learner killed -> checkpoint loaded", "s"),
    ("learner_resumed_from_step", "learner resumed from checkpoint step", ""),
    ("learner_replayed_entries", "pending entries it replayed", ""),
    ("learner_resume_s", "learner killed -> first step after resume", "s"),
    ("total_s", "whole check", "s"),
]


def report(books: dict[str, int] | None, figures: dict[str, Any]) -> str:
    lines = []
    if books is not None:
        lines.append("the books (GET /v1/accounting, pipeline stopped):")
        lines += [f"  {name:<18}{value:>10}" for name, value in books.items()]
    lines.append("figures:")
    for key, label, unit in FIGURES:
        if key in figures:
            lines.append(f"  {label:<44}{figures[key]:>8} {unit}".rstrip())
    return "\n".join(lines)


# -- main ------------------------------------------------------------------------------------------
def compose_env() -> dict[str, str]:
    """The caller's environment minus everything compose would interpolate: the generated env
    file alone configures the stack (a variable set in the shell would win over it)."""
    names = env_names(ENV_EXAMPLE.read_text())
    return {
        k: v
        for k, v in os.environ.items()
        if k not in names and not k.startswith(("CONSPO_", "COMPOSE_"))
    }


def check(args: argparse.Namespace, workdir: Path, figures: dict[str, Any]) -> dict[str, int]:
    example = ENV_EXAMPLE.read_text()
    env = compose_env()
    preflight(env)
    token, port = secrets.token_hex(16), free_port()
    datasets = workdir / "datasets"
    dataset_path, rows = write_dataset(datasets)
    values = {
        "COMPOSE_PROFILES": PROFILE,
        "CONSPO_API_TOKEN": token,
        "CONSPO_REDIS_PASSWORD": secrets.token_hex(16),
        "DATASET_DIR": str(datasets),
        "API_BIND": "127.0.0.1",
        "API_PORT": str(port),
    }
    env_file = workdir / "check.env"
    # No CONSPO_MODEL_PATH: the cpu stack must not need what only the gpu services read.
    env_file.write_text(env_file_text(example, values, drop={"CONSPO_MODEL_PATH"}))
    env_file.chmod(0o600)
    compose = Compose(args.project, env_file, env)
    index_url = os.environ.get("TORCH_INDEX_URL", "")
    network = os.environ.get("COMPOSE_CHECK_BUILD_NETWORK", "")
    model = json.loads(compose("config", "--format", "json", timeout=60))
    if index_url or network:
        override = workdir / "build.yml"
        override.write_text(yaml.safe_dump(build_override(model, index_url, network)))
        compose.files.append(override)
    compose("down", "-v", "--remove-orphans", timeout=300)  # leftovers of a killed earlier run
    scenario = Check(compose, Api(port, token), args.steps, figures)

    say(f"building the {PROFILE} profile")
    build = services_to_build(model)
    scenario.timed("build_s", lambda: compose("build", *build, timeout=3600))
    say("docker compose up -d --wait")
    scenario.timed("up_s", lambda: compose("up", "-d", "--wait", "--wait-timeout", "600"))
    say(f"submitting {dataset_path} ({rows} rows) by server-side path")
    scenario.submit(dataset_path)
    scenario.first_steps()
    say(f"scaling to {VERIFIERS} verifiers")
    scenario.scale_verifiers()
    run_name = scenario.api.status()["run"]
    stream_key, group = Keys(run=run_name).stream("rollouts"), STREAM_GROUPS["rollouts"]
    say("killing a verifier that holds rollouts")
    held, killed_at = scenario.kill_a_busy_verifier(stream_key, group)
    scenario.reclaim(stream_key, group, held, killed_at)
    say("killing the learner's process")
    scenario.kill_learner()
    say("stopping the pipeline and reading the books")
    books = scenario.books()
    if books["lost"] != 0 or books["duplicated"] != 0:
        raise CheckFailedError(f"lost {books['lost']}, duplicated {books['duplicated']}")
    if books["trained"] <= 0 or books["submitted"] <= 0:
        raise CheckFailedError(f"nothing was trained: {books}")
    return books


def teardown(args: argparse.Namespace, workdir: Path, failed: bool) -> None:
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    env_file = workdir / "check.env"
    if env_file.exists():
        compose = Compose(args.project, env_file, compose_env())
        build = workdir / "build.yml"
        if build.exists():
            compose.files.append(build)
        with contextlib.suppress(MissingError, CheckFailedError):
            if failed:
                print(tail(compose("ps", "-a", check=False), 20), file=sys.stderr)
                print(tail(compose("logs", "--tail", "15", check=False), 90), file=sys.stderr)
            say("docker compose down -v")
            compose("down", "-v", "--remove-orphans", "-t", "20", timeout=300, check=False)
    shutil.rmtree(workdir, ignore_errors=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="compose_check.py", description=__doc__.split("\n")[0])
    parser.add_argument("--project", default="conspo-check", help="compose project name")
    parser.add_argument("--steps", type=int, default=12, help="learner steps before the kills")
    parser.add_argument("--json", type=Path, help="also write the books and figures here")
    args = parser.parse_args(argv)

    def terminate(signum: int, _frame: object) -> None:
        raise SystemExit(128 + signum)

    signal.signal(signal.SIGTERM, terminate)
    started = time.monotonic()
    workdir = Path(tempfile.mkdtemp(prefix="conspo-compose-check-"))
    figures: dict[str, Any] = {}
    books: dict[str, int] | None = None
    code = 1
    try:
        books = check(args, workdir, figures)
        code = 0
    except MissingError as exc:
        print(f"compose-check: cannot run: {exc}", file=sys.stderr)
        code = 2
    except CheckFailedError as exc:
        print(f"compose-check: FAILED: {exc}", file=sys.stderr)
    except KeyboardInterrupt:
        print("compose-check: interrupted", file=sys.stderr)
        code = 130
    except SystemExit as exc:  # SIGTERM, e.g. from `timeout`
        print("compose-check: terminated", file=sys.stderr)
        code = exc.code if isinstance(exc.code, int) else 1
    finally:
        teardown(args, workdir, failed=code not in (0, 2))
    figures["total_s"] = round(time.monotonic() - started, 1)
    if code != 2:
        print(report(books, figures))
    if args.json and books is not None:
        args.json.write_text(json.dumps({"books": books, "figures": figures}, indent=2) + "\n")
    if code == 0:
        say(f"PASSED: lost {books['lost']}, duplicated {books['duplicated']}")  # type: ignore[index]
    return code


if __name__ == "__main__":
    sys.exit(main())
