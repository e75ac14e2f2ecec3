"""One deployment, two descriptions: docker-compose.yml and deploy/k8s must run the same images
with the same settings, and every CONSPO_* name anywhere in them must be a real setting.

Only what necessarily differs between a compose network and a cluster may differ: where Redis
and the learner are reached (service names), and the dev overlay's smaller verifier pool.
"""

from __future__ import annotations

import re
import tomllib
from pathlib import Path
from typing import Any

import pytest

REPO = Path(__file__).resolve().parents[2]
K8S = REPO / "deploy" / "k8s"
ROLES = ("api", "generator", "verifier", "learner")
SECRETS = ("CONSPO_API_TOKEN", "CONSPO_REDIS_PASSWORD")
# Addresses: compose service names vs cluster DNS names.
TOPOLOGY = {"CONSPO_REDIS_URL", "CONSPO_WEIGHT_SYNC_HOST"}


def _deploy_texts() -> dict[Path, str]:
    paths = [REPO / "docker-compose.yml", REPO / ".env.example", REPO / "docs" / "deploy.md"]
    paths += [p for p in (REPO / "deploy").rglob("*") if p.is_file()]
    return {p: p.read_text() for p in paths}


def test_every_conspo_name_in_the_deployment_files_is_a_setting(kit):
    known = kit.all_env_names() | kit.LOADER_VARS
    seen: set[str] = set()
    for path, text in _deploy_texts().items():
        for name in re.findall(r"\bCONSPO_[A-Z0-9_]+\b", text):
            assert name in known, f"{path.relative_to(REPO)}: {name} is not a settings field"
            seen.add(name)
    # The loader variable is real: conspo/settings.py reads it.
    assert "CONSPO_CONFIG" in (REPO / "conspo" / "settings.py").read_text()
    assert {"CONSPO_REDIS_PASSWORD", "CONSPO_API_TOKEN", "CONSPO_CONFIG"} <= seen


def _k8s_base_workloads(kit) -> dict[str, dict[str, Any]]:
    out = {}
    for path in (K8S / "base").glob("*.yaml"):
        for doc in kit.load_yaml_docs(path):
            if kit.pod_spec(doc) is not None:
                out[kit.pod_labels(doc)["app.kubernetes.io/component"]] = doc
    return out


def _k8s_settings(kit, toml_path: Path, role: str) -> dict[str, str]:
    """What a pod of ``role`` is configured with: the settings file plus CONSPO_* env."""
    values = kit.settings_env_from_toml(tomllib.loads(toml_path.read_text()), role)
    container = kit.pod_spec(_k8s_base_workloads(kit)[role])["containers"][0]
    for item in container.get("env", []):
        name = item["name"]
        if name.startswith("CONSPO_") and name not in kit.LOADER_VARS:
            values[name] = "<secret>" if "valueFrom" in item else kit.normalize(item["value"])
    return values


def _compose_settings(kit, compose, service: str) -> dict[str, str]:
    env = kit.env_mapping(compose["services"][service]["environment"])
    return {k: "<secret>" if k in SECRETS else kit.normalize(v) for k, v in env.items()}


@pytest.mark.parametrize("role", ROLES)
def test_gpu_stack_and_cluster_configure_each_service_alike(kit, compose, role):
    k8s = _k8s_settings(kit, K8S / "base" / "conspo.toml", role)
    local = _compose_settings(kit, compose, role)
    assert set(k8s) == set(local), f"{role}: set in only one of them"
    differing = {k: (local[k], k8s[k]) for k in local if local[k] != k8s[k]}
    assert set(differing) <= TOPOLOGY, f"{role}: compose vs k8s {differing}"


@pytest.mark.parametrize("role", ROLES)
def test_cpu_profile_and_dev_overlay_configure_each_service_alike(kit, compose, role):
    k8s = _k8s_settings(kit, K8S / "overlays" / "dev" / "conspo.toml", role)
    service = role if role == "verifier" else f"{role}-cpu"
    local = _compose_settings(kit, compose, service)
    # The dev overlay runs smaller verifiers.
    allowed = TOPOLOGY | {"CONSPO_PROCESSES"}
    assert set(k8s) ^ set(local) <= allowed, f"{role}: set in only one of them"
    differing = {k: (local[k], k8s[k]) for k in set(local) & set(k8s) if local[k] != k8s[k]}
    assert set(differing) <= allowed, f"{role}: compose vs dev overlay {differing}"


def _image_rules(kit) -> dict[str, dict[str, str]]:
    spec = kit.load_yaml_docs(K8S / "base" / "kustomization.yaml")[0]
    return {rule["name"]: rule for rule in spec["images"]}


def test_compose_and_cluster_run_the_same_images(kit, compose):
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["version"]
    rules = _image_rules(kit)
    workloads = _k8s_base_workloads(kit)
    for role in (*ROLES, "redis"):
        image = kit.pod_spec(workloads[role])["containers"][0]["image"]
        rule = rules.get(image)
        k8s_image = f"{rule.get('newName', image)}:{rule['newTag']}" if rule else image
        assert compose["services"][role]["image"] == k8s_image, role
        if rule:
            assert rule["newTag"] == project, "images are tagged with the package version"


def test_overlays_keep_image_names_and_tags(kit):
    base = _image_rules(kit)
    for overlay in ("gpu-cluster", "dev"):
        spec = kit.load_yaml_docs(K8S / "overlays" / overlay / "kustomization.yaml")[0]
        for rule in spec["images"]:
            assert rule["newTag"] == base[rule["name"]]["newTag"], overlay
            new = rule.get("newName", rule["name"])
            assert new.rsplit("/", 1)[-1] in ("conspo-cpu", "conspo-gpu"), overlay


def test_every_conspo_name_on_the_first_run_pages_is_a_setting(kit):
    """docs/byo-model.md and the README name settings a first run sets by hand: each is real
    (CONSPO_SHARED_DATA is the benchmark folder of conspo.paths, CONSPO_CONFIG the loader's)."""
    known = kit.all_env_names() | kit.LOADER_VARS | {"CONSPO_SHARED_DATA"}
    assert "CONSPO_SHARED_DATA" in (REPO / "conspo" / "paths.py").read_text()
    for page in (REPO / "docs" / "byo-model.md", REPO / "README.md"):
        for name in re.findall(r"\bCONSPO_[A-Z0-9_]+\b", page.read_text()):
            assert name in known, f"{page.name}: {name} is not a settings field"
