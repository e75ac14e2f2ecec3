"""deploy/k8s: every manifest parses, the kustomize tree resolves, resources satisfy the
Kubernetes JSON schemas of K8S_VERSION (bundled by kubernetes-validate), and the objects
reference each other consistently (config, secrets, volumes, selectors, policies, rendezvous).

CRDs (KEDA's ScaledObject and TriggerAuthentication) have no schema in kubernetes-validate's
bundle of core Kubernetes types: they are parsed and checked field by field instead. Patch files
are partial objects by design: they are validated after kustomize applies them (with kubectl
when it is installed) and otherwise checked to target an object that exists.
"""

from __future__ import annotations

import copy
import tomllib
from pathlib import Path
from typing import Any

import pytest
import yaml

from conspo.cli import SERVICES
from conspo.keys import STREAM_GROUPS, Keys
from conspo.settings import SettingsError, load

REPO = Path(__file__).resolve().parents[2]
K8S = REPO / "deploy" / "k8s"
CRD_GROUPS = ("keda.sh/",)
SECRET_KEYS = {"CONSPO_API_TOKEN": "api-token", "CONSPO_REDIS_PASSWORD": "redis-password"}
CLUSTER_SCOPED = {"Namespace", "PersistentVolume", "ClusterRole", "ClusterRoleBinding"}


def _is_crd(doc: dict[str, Any]) -> bool:
    return doc["apiVersion"].startswith(CRD_GROUPS)


def _kustomization(directory: Path) -> dict[str, Any]:
    return yaml.safe_load((directory / "kustomization.yaml").read_text())


# --------------------------------------------------------------------------- offline resolve
def _accumulate(directory: Path) -> list[dict[str, Any]]:
    """The raw objects a kustomization pulls in (resources and components, recursively), before
    patches: enough to check that every patch has a target."""
    spec = _kustomization(directory)
    docs: list[dict[str, Any]] = []
    for entry in [*spec.get("resources", []), *spec.get("components", [])]:
        path = (directory / entry).resolve()
        if path.is_dir():
            docs.extend(_accumulate(path))
        else:
            docs.extend(d for d in yaml.safe_load_all(path.read_text()) if d)
    return docs


def _pointer(doc: Any, path: str) -> Any:
    node = doc
    for part in path.strip("/").split("/"):
        part = part.replace("~1", "/").replace("~0", "~")
        node = node[int(part)] if isinstance(node, list) else node[part]
    return node


def test_every_manifest_parses(kit):
    files = sorted(K8S.rglob("*.yaml"))
    assert len(files) >= 10
    for path in files:
        docs = kit.load_yaml_docs(path)
        assert docs, f"{path} is empty"
        for doc in docs:
            assert {"apiVersion", "kind"} <= set(doc), path
            if doc["kind"] not in ("Kustomization", "Component"):
                assert doc["metadata"]["name"], path
    for toml_file in K8S.rglob("*.toml"):
        tomllib.loads(toml_file.read_text())


def test_kustomizations_point_at_existing_files(kit):
    dirs = kit.kustomization_dirs()
    assert {d.relative_to(K8S).as_posix() for d in dirs} >= {
        "base", "components/keda", "overlays/gpu-cluster", "overlays/gpu-cluster-keda",
        "overlays/dev",
    }  # fmt: skip
    for directory in dirs:
        spec = _kustomization(directory)
        assert spec["kind"] in ("Kustomization", "Component")
        for entry in spec.get("resources", []):
            path = directory / entry
            exists = path.is_file() or (path / "kustomization.yaml").is_file()
            assert exists, f"{directory}: {entry}"
        for entry in spec.get("components", []):
            assert _kustomization(directory / entry)["kind"] == "Component"
        for patch in spec.get("patches", []):
            if "path" in patch:
                assert (directory / patch["path"]).is_file(), f"{directory}: {patch['path']}"
        for gen in spec.get("configMapGenerator", []) + spec.get("secretGenerator", []):
            for f in gen.get("files", []):
                assert (directory / f.split("=")[-1]).is_file()


def test_every_patch_has_a_target(kit):
    for directory in kit.kustomization_dirs():
        spec = _kustomization(directory)
        if not spec.get("patches"):
            continue
        pool = _accumulate(directory) if spec["kind"] == "Kustomization" else []
        if spec["kind"] == "Component":
            # A component patches what its includer brings: the whole base.
            pool = _accumulate(K8S / "base") + _accumulate(directory)
        index = {(d["kind"], d["metadata"]["name"]): d for d in pool}
        for patch in spec["patches"]:
            if "path" in patch:
                for doc in kit.load_yaml_docs(directory / patch["path"]):
                    key = (doc["kind"], doc["metadata"]["name"])
                    assert key in index, f"{directory}/{patch['path']}: no {key} to patch"
            else:
                target = patch["target"]
                key = (target["kind"], target["name"])
                assert key in index, f"{directory}: inline patch without a {key}"
                doc = copy.deepcopy(index[key])
                for op in yaml.safe_load(patch["patch"]):
                    if op["op"] in ("replace", "remove", "test"):
                        _pointer(doc, op["path"])  # raises if the path is not there


def _full_resource_files(kit) -> list[Path]:
    files = []
    for directory in kit.kustomization_dirs():
        for entry in _kustomization(directory).get("resources", []):
            if (directory / entry).is_file():
                files.append((directory / entry).resolve())
    return sorted(set(files))


def test_resources_match_the_kubernetes_schemas(kit):
    errors, checked, crds = [], 0, 0
    for path in _full_resource_files(kit):
        for doc in kit.load_yaml_docs(path):
            if _is_crd(doc):
                crds += 1
                assert doc["spec"], f"{path}: {doc['kind']} without spec"
                continue
            errors += kit.schema_errors(doc)
            checked += 1
    assert errors == []
    assert checked >= 20 and crds == 2


def test_the_schema_check_catches_a_broken_manifest(kit):
    doc = kit.load_yaml_docs(K8S / "base" / "verifier.yaml")[0]
    doc = copy.deepcopy(doc)
    doc["spec"]["template"]["spec"]["containers"][0]["resource"] = {}
    doc["spec"]["replicas"] = "two"
    assert len(kit.schema_errors(doc)) >= 1


# --------------------------------------------------------------------------- built output
def _offline_base(kit) -> list[dict[str, Any]]:
    """What `kustomize build base` yields, computed without kustomize: base has no patches,
    only a namespace, labels, one generated ConfigMap and image tags."""
    spec = _kustomization(K8S / "base")
    assert set(spec) <= {"apiVersion", "kind", "namespace", "labels", "resources",
                         "configMapGenerator", "images"}, "extend _offline_base"  # fmt: skip
    docs = copy.deepcopy(_accumulate(K8S / "base"))
    for gen in spec["configMapGenerator"]:
        data = {Path(f).name: (K8S / "base" / f).read_text() for f in gen["files"]}
        docs.append({"apiVersion": "v1", "kind": "ConfigMap",
                     "metadata": {"name": gen["name"]}, "data": data})  # fmt: skip
    tags = {i["name"]: i for i in spec["images"]}
    for doc in docs:
        if doc["kind"] not in CLUSTER_SCOPED:
            doc["metadata"]["namespace"] = spec["namespace"]
        pod = kit.pod_spec(doc)
        for c in (pod or {}).get("containers", []):
            rule = tags.get(c["image"])
            if rule:
                c["image"] = f"{rule.get('newName', c['image'])}:{rule['newTag']}"
    return docs


@pytest.fixture(scope="module", params=["base", "overlays/dev", "overlays/gpu-cluster",
                                        "overlays/gpu-cluster-keda", "base (offline)"])  # fmt: skip
def built(request, kit) -> tuple[str, list[dict[str, Any]]]:
    name = request.param
    if name == "base (offline)":
        return name, _offline_base(kit)
    import shutil

    kubectl = shutil.which("kubectl")
    if not kubectl:
        pytest.skip("kubectl (built-in kustomize) is not installed; base is checked offline")
    return name, kit.kustomize_build(kubectl, K8S / name)


def _workloads(kit, docs):
    return [d for d in docs if kit.pod_spec(d) is not None]


def _by_kind(docs, kind):
    return {d["metadata"]["name"]: d for d in docs if d["kind"] == kind}


def test_built_objects_match_the_schemas_and_namespace(kit, built):
    name, docs = built
    errors = []
    for doc in docs:
        if doc["kind"] not in CLUSTER_SCOPED:
            assert doc["metadata"].get("namespace") == "conspo", f"{name}: {doc['kind']}"
        assert doc["metadata"].get("labels", {}).get("app.kubernetes.io/part-of") == "conspo" or (
            name == "base (offline)"
        ), f"{name}: {doc['kind']}/{doc['metadata']['name']} unlabeled"
        if not _is_crd(doc):
            errors += kit.schema_errors(doc)
    assert errors == [], name


def test_containers_start_their_conspo_sub_command(kit, built):
    name, docs = built
    roles = set()
    for doc in _workloads(kit, docs):
        role = kit.pod_labels(doc).get("app.kubernetes.io/component")
        if role == "redis":
            continue
        assert role in SERVICES, f"{name}: {doc['metadata']['name']}"
        args = kit.pod_spec(doc)["containers"][0]["args"]
        if args[0] == "torchrun":
            assert "--no-python" in args
            args = args[args.index("--no-python") + 1 :]
        assert args == ["conspo", role], f"{name}: {doc['metadata']['name']}: {args}"
        roles.add(role)
    assert roles == {"api", "generator", "verifier", "learner"}


def test_config_secrets_and_volumes_resolve(kit, built, clean_conspo_env, tmp_path):
    name, docs = built
    config_maps = _by_kind(docs, "ConfigMap")
    pvcs = _by_kind(docs, "PersistentVolumeClaim")
    secrets = _by_kind(docs, "Secret")
    for doc in _workloads(kit, docs):
        pod = kit.pod_spec(doc)
        role = kit.pod_labels(doc)["app.kubernetes.io/component"]
        volumes = {v["name"]: v for v in pod.get("volumes", [])}
        for v in volumes.values():
            if "configMap" in v:
                assert v["configMap"]["name"] in config_maps, f"{name}: {v}"
            if "persistentVolumeClaim" in v:
                assert v["persistentVolumeClaim"]["claimName"] in pvcs, f"{name}: {v}"
        container = pod["containers"][0]
        mounts = {m["name"]: m for m in container.get("volumeMounts", [])}
        assert set(mounts) <= set(volumes) | {
            t["metadata"]["name"] for t in doc["spec"].get("volumeClaimTemplates", [])
        }
        env = {e["name"]: e for e in container.get("env", [])}
        for var, key in SECRET_KEYS.items():
            if var in env:
                ref = env[var]["valueFrom"]["secretKeyRef"]
                assert (ref["name"], ref["key"]) == ("conspo-secrets", key)
                if secrets:
                    assert key in secrets["conspo-secrets"]["stringData"]
        if role == "redis":
            continue
        assert "CONSPO_REDIS_PASSWORD" in env, f"{name}: {role} cannot authenticate"
        assert ("CONSPO_API_TOKEN" in env) == (role == "api"), "only the api holds the token"
        # CONSPO_CONFIG names a file of the mounted ConfigMap; it loads as this role's settings.
        config_path = Path(env["CONSPO_CONFIG"]["value"])
        mount = next(m for m in mounts.values() if m["mountPath"] == str(config_path.parent))
        config = config_maps[volumes[mount["name"]]["configMap"]["name"]]
        text = config["data"][config_path.name]
        local = tmp_path / f"{role}.toml"
        local.write_text(text)
        clean_conspo_env.setenv("CONSPO_CONFIG", str(local))
        for var in SECRET_KEYS:
            clean_conspo_env.setenv(var, "secret-value-123")
        for item in container.get("env", []):
            if (
                item["name"].startswith("CONSPO_")
                and "value" in item
                and item["name"] not in ("CONSPO_CONFIG",)
            ):
                clean_conspo_env.setenv(item["name"], item["value"])
        try:
            settings = load(kit.ROLE_SETTINGS[role])
        except SettingsError as exc:
            pytest.fail(f"{name}: {role}: {exc}")
        assert settings.redis_url.startswith("redis://conspo-redis:")
        if role != "verifier":  # checkpoints, plots, run files: on the shared claim
            data_mount = next(
                m for m in mounts.values() if m["mountPath"] == str(settings.data_dir)
            )
            assert "persistentVolumeClaim" in volumes[data_mount["name"]]
        clean_conspo_env.delenv("CONSPO_METRICS_PORT", raising=False)


def test_settings_file_keys_belong_where_they_are(kit):
    for path in K8S.rglob("conspo.toml"):
        data = tomllib.loads(path.read_text())
        common = set(kit.CommonSettings.model_fields)
        for key, value in data.items():
            if isinstance(value, dict):
                assert key in kit.ROLE_SETTINGS, f"{path}: unknown section [{key}]"
                extra = set(value) - set(kit.ROLE_SETTINGS[key].model_fields)
                assert not extra, f"{path}: [{key}] has no {extra}"
            else:
                assert key in common, f"{path}: top-level {key} is not a shared setting"


def test_pods_run_unprivileged(kit, built):
    _, docs = built
    for doc in _workloads(kit, docs):
        pod = kit.pod_spec(doc)
        assert pod["securityContext"]["runAsNonRoot"] is True
        assert pod["securityContext"]["seccompProfile"]["type"] == "RuntimeDefault"
        assert pod.get("automountServiceAccountToken") is False
        for c in pod["containers"]:
            assert c["securityContext"]["allowPrivilegeEscalation"] is False
            assert c["securityContext"]["capabilities"]["drop"] == ["ALL"]


def _selects(selector: dict[str, Any], labels: dict[str, str]) -> bool:
    for k, v in selector.get("matchLabels", {}).items():
        if labels.get(k) != v:
            return False
    for expr in selector.get("matchExpressions", []):
        if expr["operator"] == "In" and labels.get(expr["key"]) not in expr["values"]:
            return False
    return True


def test_selectors_select_something(kit, built):
    name, docs = built
    pods = [kit.pod_labels(d) for d in _workloads(kit, docs)]
    for svc in _by_kind(docs, "Service").values():
        assert any(_selects({"matchLabels": svc["spec"]["selector"]}, p) for p in pods), svc
    for pol in _by_kind(docs, "NetworkPolicy").values():
        sel = pol["spec"]["podSelector"]
        assert sel == {} or any(_selects(sel, p) for p in pods), f"{name}: {pol['metadata']}"
        for rule in pol["spec"].get("ingress", []):
            for peer in rule.get("from", []):
                if "podSelector" in peer:
                    assert any(_selects(peer["podSelector"], p) for p in pods), (name, rule)
    for hpa in _by_kind(docs, "HorizontalPodAutoscaler").values():
        ref = hpa["spec"]["scaleTargetRef"]
        assert ref["name"] in _by_kind(docs, ref["kind"])


def test_only_conspo_services_reach_redis(kit, built):
    name, docs = built
    policies = _by_kind(docs, "NetworkPolicy")
    assert policies["conspo-default-deny-ingress"]["spec"] == {
        "podSelector": {}, "policyTypes": ["Ingress"]
    }  # fmt: skip
    redis_labels = kit.pod_labels(_by_kind(docs, "StatefulSet")["conspo-redis"])
    rules = [
        rule
        for pol in policies.values()
        if _selects(pol["spec"]["podSelector"], redis_labels) and pol["spec"]["podSelector"]
        for rule in pol["spec"].get("ingress", [])
    ]
    assert rules
    for rule in rules:
        assert [p["port"] for p in rule["ports"]] == [6379]
        for peer in rule["from"]:
            if "podSelector" in peer:
                assert peer["podSelector"] == {"matchLabels": {"conspo.io/redis-client": "true"}}
            else:  # only the KEDA operator's namespace, in the KEDA overlay
                assert peer["namespaceSelector"]["matchLabels"] == {
                    "kubernetes.io/metadata.name": "keda"
                }
                assert name.endswith("keda")
    clients = {
        kit.pod_labels(d)["app.kubernetes.io/component"]
        for d in _workloads(kit, docs)
        if kit.pod_labels(d).get("conspo.io/redis-client") == "true"
    }
    assert clients == {"api", "generator", "verifier", "learner"}


def _learner_settings(config_maps: dict[str, Any]) -> dict[str, Any]:
    (config,) = config_maps.values()
    data = tomllib.loads(config["data"]["conspo.toml"])
    return {**{k: v for k, v in data.items() if not isinstance(v, dict)}, **data["learner"]}


def test_learner_rendezvous_and_gpus_are_consistent(kit, built):
    name, docs = built
    job = _by_kind(docs, "Job")["conspo-learner"]
    pod = kit.pod_spec(job)
    container = pod["containers"][0]
    env = {e["name"]: e.get("value") for e in container["env"]}
    nodes = int(env["LEARNER_NODES"])
    assert job["spec"]["completionMode"] == "Indexed"
    assert job["spec"]["completions"] == job["spec"]["parallelism"] == nodes
    gpus = container["resources"]["limits"].get("nvidia.com/gpu")
    if name == "overlays/dev":
        assert gpus is None
    else:
        assert int(gpus) == int(env["LEARNER_GPUS_PER_NODE"])
    # Pod 0 of the Indexed Job is torchrun's master and the weight-sync rendezvous.
    service = _by_kind(docs, "Service")[pod["subdomain"]]
    assert service["spec"]["clusterIP"] == "None"
    assert service["spec"]["publishNotReadyAddresses"] is True
    rank0 = f"{job['metadata']['name']}-0.{pod['subdomain']}"
    assert f"--master-addr={rank0}" in container["args"]
    learner = _learner_settings(_by_kind(docs, "ConfigMap"))
    assert learner["weight_sync_host"] == rank0
    port = learner["weight_sync_port"]
    assert port in [p["containerPort"] for p in container["ports"]]
    assert port in [p["port"] for p in service["spec"]["ports"]]
    # ... and generators may open that port.
    policy = _by_kind(docs, "NetworkPolicy")["conspo-learner-peers"]
    gen_labels = kit.pod_labels(_by_kind(docs, "StatefulSet")["conspo-generator"])
    allowed = [
        p
        for rule in policy["spec"]["ingress"]
        if any(_selects(peer.get("podSelector", {"matchLabels": {"x": "y"}}), gen_labels)
               for peer in rule["from"])
        for p in rule["ports"]
    ]  # fmt: skip
    assert any(p["port"] == port and "endPort" not in p for p in allowed)


def test_generators_hold_gpus_except_in_dev(kit, built):
    name, docs = built
    gen = _by_kind(docs, "StatefulSet")["conspo-generator"]
    container = kit.pod_spec(gen)["containers"][0]
    gpus = container["resources"]["limits"].get("nvidia.com/gpu")
    assert (gpus is None) == (name == "overlays/dev")
    config = tomllib.loads(next(iter(_by_kind(docs, "ConfigMap").values()))["data"]["conspo.toml"])
    assert config["generator"]["backend"] == ("hf" if name == "overlays/dev" else "vllm")
    if gpus is not None:
        assert int(gpus) == config["generator"].get("vllm_tensor_parallel_size", 1)


def test_verifiers_autoscale_once(kit, built):
    name, docs = built
    hpas = _by_kind(docs, "HorizontalPodAutoscaler")
    scaled = _by_kind(docs, "ScaledObject")
    if name.endswith("keda"):
        assert "conspo-verifier" not in hpas, "KEDA brings its own HPA"
        assert set(scaled) == {"conspo-verifier"}
    else:
        assert set(hpas) == {"conspo-verifier"} and not scaled
        metric = hpas["conspo-verifier"]["spec"]["metrics"][0]
        assert metric["resource"]["name"] == "cpu"


def test_keda_scales_the_verifiers_on_the_rollouts_stream(kit):
    docs = []
    for path in (K8S / "components" / "keda").glob("*.yaml"):
        docs += kit.load_yaml_docs(path)
    scaled = _by_kind(docs, "ScaledObject")["conspo-verifier"]
    auths = _by_kind(docs, "TriggerAuthentication")
    config = tomllib.loads((K8S / "base" / "conspo.toml").read_text())
    stream = Keys(run=config["run"]).rollouts
    assert stream == "conspo:{default}:rollouts"
    assert scaled["spec"]["scaleTargetRef"]["name"] == "conspo-verifier"
    assert scaled["spec"]["minReplicaCount"] >= 1
    kinds = set()
    for trigger in scaled["spec"]["triggers"]:
        assert trigger["type"] == "redis-streams"
        meta = trigger["metadata"]
        assert meta["stream"] == stream
        assert meta["consumerGroup"] == STREAM_GROUPS["rollouts"]
        assert meta["address"].startswith("conspo-redis.conspo.svc")
        kinds |= {k for k in ("lagCount", "pendingEntriesCount") if k in meta}
        auth = auths[trigger["authenticationRef"]["name"]]
        (ref,) = auth["spec"]["secretTargetRef"]
        assert (ref["parameter"], ref["name"], ref["key"]) == (
            "password", "conspo-secrets", "redis-password"
        )  # fmt: skip
    assert kinds == {"lagCount", "pendingEntriesCount"}
