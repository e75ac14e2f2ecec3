"""docker-compose.yml and .env.example: schema, commands, scaling, health, GPUs, settings.

Expected values come from the Compose Specification schema, conspo.cli.SERVICES and the
settings models, never from the compose file itself.
"""

from __future__ import annotations

import importlib.resources
import json
import re
import subprocess

import jsonschema
import pytest

from conspo.cli import SERVICES, build_parser
from conspo.settings import SettingsError, load

ROLES = ("api", "generator", "verifier", "learner")


def _compose_schema() -> dict:
    # The Compose Specification JSON schema as vendored by check-jsonschema (its
    # `--builtin-schema vendor.compose-spec`), read offline from the installed package.
    files = importlib.resources.files("check_jsonschema.builtin_schemas")
    return json.loads(files.joinpath("vendor", "compose-spec.json").read_text())


@pytest.fixture(scope="module")
def compose_validator() -> jsonschema.protocols.Validator:
    schema = _compose_schema()
    assert schema.get("title") == "Compose Specification"
    cls = jsonschema.validators.validator_for(schema)
    cls.check_schema(schema)
    return cls(schema)


def _errors(validator, doc) -> list[str]:
    return [
        f"{'/'.join(map(str, e.absolute_path))}: {e.message}" for e in validator.iter_errors(doc)
    ]


def test_compose_file_matches_the_compose_specification(compose_validator, compose_raw):
    assert _errors(compose_validator, compose_raw) == []


def test_interpolated_compose_file_matches_the_compose_specification(compose_validator, compose):
    assert _errors(compose_validator, compose) == []


def test_the_schema_check_catches_a_broken_file(compose_validator, compose_raw):
    broken = json.loads(json.dumps(compose_raw))
    broken["services"]["verifier"]["restart"] = ["always"]
    broken["services"]["verifier"]["healthcheck"]["interval"] = 30
    assert len(_errors(compose_validator, broken)) >= 2


def test_every_conspo_service_starts_its_conspo_sub_command(compose):
    roles_seen = set()
    for name, svc in compose["services"].items():
        if name == "redis":
            continue
        role = name.removesuffix("-cpu")
        assert role in SERVICES, f"{name}: no `conspo {role}` sub-command"
        assert svc["command"] == ["conspo", role], f"{name}: command {svc['command']!r}"
        args = build_parser().parse_args(svc["command"][1:])
        assert args.module == SERVICES[role]
        roles_seen.add(role)
    assert roles_seen == set(ROLES)


# ids avoid the bare word "gpu": the root conftest skips tests with a `gpu` keyword on CPU.
@pytest.mark.parametrize("profile", ["gpu", "cpu"], ids=["gpu-stack", "cpu-stack"])
def test_each_profile_runs_the_whole_pipeline_once(kit, compose, profile):
    active = kit.active_services(compose, profile)
    roles = sorted(name.removesuffix("-cpu") for name in active if name != "redis")
    assert roles == sorted(ROLES)
    assert "redis" in active


def test_verifier_scales_freely(compose):
    verifier = compose["services"]["verifier"]
    assert "container_name" not in verifier
    assert "ports" not in verifier
    assert not verifier.get("profiles"), "the verifier must run in both stacks"
    assert int(verifier["deploy"]["replicas"]) >= 1
    for name, svc in compose["services"].items():
        assert "container_name" not in svc, f"{name}: container_name prevents --scale"


def test_only_the_api_publishes_host_ports_on_loopback_by_default(compose):
    for name, svc in compose["services"].items():
        if name.removesuffix("-cpu") == "api":
            assert svc["ports"] == ["127.0.0.1:8000:8000"]
        else:
            assert "ports" not in svc, f"{name} must not publish host ports"


def test_depends_on_waits_for_health(compose):
    services = compose["services"]
    for name, svc in services.items():
        deps = svc.get("depends_on", {})
        assert isinstance(deps, dict), f"{name}: use the long depends_on form"
        for dep, spec in deps.items():
            assert dep in services
            if "healthcheck" in services[dep]:
                assert spec.get("condition") == "service_healthy", f"{name} -> {dep}"
        if name != "redis":
            assert "redis" in deps, f"{name} needs Redis before it starts"


def test_every_service_has_a_healthcheck_and_a_restart_policy(compose):
    for name, svc in compose["services"].items():
        check = svc.get("healthcheck")
        assert check and check["test"][0] in ("CMD", "CMD-SHELL"), name
        assert svc.get("restart") in ("unless-stopped", "always", "on-failure"), name
    # A learner that finished its run exits 0 and must stay down.
    assert compose["services"]["learner"]["restart"] == "on-failure"


def test_conspo_healthchecks_probe_the_ports_the_services_serve(compose):
    for name, svc in compose["services"].items():
        if name == "redis":
            continue
        env = svc["environment"]
        url = svc["healthcheck"]["test"][-1]
        port = int(re.search(r":(\d+)/", url).group(1))
        if name.removesuffix("-cpu") == "api":
            assert port == int(env["CONSPO_PORT"])
        else:
            assert port == int(env["CONSPO_METRICS_PORT"])


def test_redis_is_pinned_persistent_and_password_protected(compose_raw, compose):
    redis_svc = compose["services"]["redis"]
    assert re.fullmatch(r"redis:7\.\d+\.\d+(-[a-z0-9]+)?", redis_svc["image"])
    command = " ".join(redis_svc["command"])
    assert "--appendonly yes" in command
    assert "--maxmemory-policy noeviction" in command
    # $$ survives interpolation as a literal $: the shell, not compose, reads the password.
    assert '--requirepass "$CONSPO_REDIS_PASSWORD"' in command
    assert redis_svc["environment"]["CONSPO_REDIS_PASSWORD"]
    assert "redis-data:/data" in redis_svc["volumes"]
    assert "redis-data" in compose_raw["volumes"]
    assert "ports" not in redis_svc


def test_gpu_services_reserve_their_own_nvidia_device(compose_raw, compose):
    for name, var in (("generator", "GENERATOR_GPU"), ("learner", "LEARNER_GPU")):
        devices = compose_raw["services"][name]["deploy"]["resources"]["reservations"]["devices"]
        assert devices[0]["driver"] == "nvidia"
        assert "gpu" in devices[0]["capabilities"]
        assert len(devices[0]["device_ids"]) == 1 and var in devices[0]["device_ids"][0]
    gen = compose["services"]["generator"]["deploy"]["resources"]["reservations"]["devices"]
    lrn = compose["services"]["learner"]["deploy"]["resources"]["reservations"]["devices"]
    assert gen[0]["device_ids"] != lrn[0]["device_ids"], "one GPU each by default"
    for name, svc in compose["services"].items():
        if name.endswith("-cpu") or name in ("redis", "verifier", "api"):
            assert "devices" not in svc.get("deploy", {}).get("resources", {}).get(
                "reservations", {}
            ), name


def test_backends_and_images_per_stack(compose):
    svcs = compose["services"]
    assert svcs["generator"]["environment"]["CONSPO_BACKEND"] == "vllm"
    assert svcs["generator-cpu"]["environment"]["CONSPO_BACKEND"] == "hf"
    for name in ("generator-cpu", "learner-cpu"):
        assert "CONSPO_MODEL_PATH" not in svcs[name]["environment"], "bundled tiny model"
    for name in ("generator", "learner"):
        assert svcs[name]["image"].endswith("-gpu:0.1.0")
        assert svcs[name]["build"]["dockerfile"] == "deploy/docker/gpu.Dockerfile"
    for name in ("api", "verifier", "api-cpu", "generator-cpu", "learner-cpu"):
        assert svcs[name]["image"].endswith("-cpu:0.1.0")
        assert svcs[name]["build"]["dockerfile"] == "deploy/docker/cpu.Dockerfile"


def test_learner_publishes_a_reachable_weight_sync_address(compose):
    for learner, generator in (("learner", "generator"), ("learner-cpu", "generator-cpu")):
        env = compose["services"][learner]["environment"]
        assert env["CONSPO_WEIGHT_SYNC_HOST"] == learner, "the service name is its DNS name"
        port = int(env["CONSPO_WEIGHT_SYNC_PORT"])
        assert port > 0, "a fixed port, not a random one"
        assert str(port) in compose["services"][learner]["expose"]
        assert "ports" not in compose["services"][learner], "network-internal, not on the host"
        gen_profiles = compose["services"][generator]["profiles"]
        assert compose["services"][learner]["profiles"] == gen_profiles


def test_checkpoints_and_models_live_on_shared_volumes(compose_raw, compose):
    assert {"data", "models", "redis-data"} <= set(compose_raw["volumes"])
    for name in ("generator", "learner"):
        assert "data:/data" in compose["services"][name]["volumes"]
        assert "models:/models" in compose["services"][name]["volumes"]
        assert compose["services"][name]["environment"]["CONSPO_DATA_DIR"] == "/data"
    assert "data:/data" in compose["services"]["learner-cpu"]["volumes"]


def test_conspo_variables_are_settings_fields_of_the_service(kit, compose):
    for name, svc in compose["services"].items():
        env = kit.env_mapping(svc.get("environment"))
        names = {k for k in env if k.startswith("CONSPO_")}
        allowed = kit.env_names(kit.CommonSettings)
        if name != "redis":
            allowed = kit.env_names(kit.ROLE_SETTINGS[name.removesuffix("-cpu")])
        assert names - allowed == set(), f"{name}: not settings of this service"
        assert not any(k.startswith("CONSPO") and not k.startswith("CONSPO_") for k in env)


def test_env_example_names_only_settings_or_interpolation_variables(kit, compose_raw):
    example = kit.parse_env_file(kit.ENV_EXAMPLE)
    used = kit.referenced_vars(compose_raw)
    for key in example:
        if key.startswith("CONSPO_"):
            assert key in kit.all_env_names(), f"{key} is not a settings field"
        elif not key.startswith("COMPOSE_"):
            assert key in used, f"{key} is set in .env.example but unused in docker-compose.yml"
    # ... and every knob the compose file reads is documented in .env.example.
    assert used - set(example) == set()


@pytest.mark.parametrize("secret", ["CONSPO_API_TOKEN", "CONSPO_REDIS_PASSWORD"])
def test_compose_refuses_to_start_without_secrets(kit, compose_raw, compose_env, secret):
    assert kit.parse_env_file(kit.ENV_EXAMPLE)[secret] == "", "no usable default secret"
    with pytest.raises(kit.InterpolationError, match=secret):
        kit.interpolate(compose_raw, {**compose_env, secret: ""})


@pytest.mark.parametrize("service", ["api", "generator", "verifier", "learner", "api-cpu",
                                     "generator-cpu", "learner-cpu"])  # fmt: skip
def test_service_environment_validates_as_its_settings(kit, compose, clean_conspo_env, service):
    role = service.removesuffix("-cpu")
    for key, value in kit.env_mapping(compose["services"][service]["environment"]).items():
        clean_conspo_env.setenv(key, value)
    try:
        settings = load(kit.ROLE_SETTINGS[role])
    except SettingsError as exc:
        pytest.fail(f"{service}: {exc}")
    assert str(settings.data_dir) == "/data"
    assert settings.redis_password is not None
    assert settings.metrics_port == 9100
    if role == "api":
        assert settings.api_token is not None and settings.host == "0.0.0.0"
    if role == "generator":
        assert settings.backend == ("hf" if service.endswith("-cpu") else "vllm")
        assert (settings.model_path is None) == service.endswith("-cpu")


def test_cpu_profile_needs_no_container_paths_but_its_mounts(kit, compose):
    for name, svc in kit.active_services(compose, "cpu").items():
        if name == "redis":
            continue
        for key, value in kit.env_mapping(svc["environment"]).items():
            if key == "CONSPO_DATA_DIR":
                assert value == "/data"
                continue
            if key == "CONSPO_DATASET_ROOTS":  # the host data folder, see the test below
                continue
            assert "/" not in value or value.startswith("redis://"), f"{name}: {key}={value}"


@pytest.mark.parametrize("service", ["api", "api-cpu"])
def test_each_api_reads_server_side_datasets_from_the_host_data_folder(kit, compose, service):
    svc = compose["services"][service]
    roots = json.loads(kit.env_mapping(svc["environment"])["CONSPO_DATASET_ROOTS"])
    mounts = {}
    for volume in svc["volumes"]:
        source, target, *mode = volume.split(":")
        mounts[target] = (source, mode)
    for root in roots:
        assert root in mounts, f"{service}: dataset root {root} is not mounted"
        source, mode = mounts[root]
        assert source == kit.parse_env_file(kit.ENV_EXAMPLE)["DATASET_DIR"], "DATASET_DIR"
        assert mode == ["ro"], f"{service}: mount {root} read-only"


def test_cpu_stack_needs_no_variable_that_only_gpu_services_read(kit, compose_raw, compose_env):
    gpu_only = {n: s for n, s in compose_raw["services"].items() if s.get("profiles") == ["gpu"]}
    others = {n: s for n, s in compose_raw["services"].items() if n not in gpu_only}
    only_gpu = kit.referenced_vars(gpu_only) - kit.referenced_vars(others)
    assert "CONSPO_MODEL_PATH" in only_gpu
    env = {k: v for k, v in compose_env.items() if k not in only_gpu}
    # Compose interpolates the whole file whatever the profile: this must not raise.
    doc = kit.interpolate(compose_raw, env)
    assert "CONSPO_MODEL_PATH" not in doc["services"]["generator-cpu"]["environment"]


def test_a_first_docker_compose_up_starts_the_stack_that_runs_anywhere(env_example):
    # `cp .env.example .env && docker compose up` must not pick the GPU stack on a machine
    # without NVIDIA GPUs; GPU users set COMPOSE_PROFILES=gpu (docs/deploy.md).
    assert env_example["COMPOSE_PROFILES"] == "cpu"


def test_cpu_profile_runs_as_local_processes(kit, compose_processes, clean_conspo_env, tmp_path):
    specs = compose_processes(
        "cpu", redis_url="redis://127.0.0.1:6399/0", data_dir=tmp_path / "runs"
    )
    assert sorted(s.service for s in specs) == ["api-cpu", "generator-cpu", "learner-cpu",
                                                 "verifier"]  # fmt: skip
    for spec in specs:
        role = spec.argv[1]
        build_parser().parse_args(spec.argv[1:])
        for key, value in spec.env.items():
            clean_conspo_env.setenv(key, value)
        settings = load(kit.ROLE_SETTINGS[role])
        assert settings.data_dir == tmp_path / "runs"
        if role == "learner":
            assert settings.weight_sync_host == "127.0.0.1"
            assert settings.device == "cpu" and settings.bf16 is False
        for key in spec.env:
            clean_conspo_env.delenv(key)


# ------------------------------------------------------------------ real Docker Compose v2
def _compose_cli(kit, binary, env_file, *args):
    """Run `docker compose` on the repo's file with only ``env_file`` as the environment file
    (the project directory is a scratch folder, so a developer's own .env never leaks in)."""
    import os

    env = {k: v for k, v in os.environ.items() if not k.startswith(("CONSPO_", "COMPOSE_"))}
    project = env_file.parent.parent / "project"
    project.mkdir(exist_ok=True)
    return subprocess.run(
        [str(binary), "--project-directory", str(project), "-f", str(kit.COMPOSE_FILE),
         "--env-file", str(env_file), *args],
        capture_output=True, text=True, timeout=60, env=env, check=False,
    )  # fmt: skip


@pytest.fixture
def filled_env_file(kit, tmp_path):
    env_file = tmp_path / "cfg" / "test.env"
    env_file.parent.mkdir()
    text = kit.ENV_EXAMPLE.read_text()
    for key, value in kit.SECRETS.items():
        text = re.sub(rf"(?m)^{key}=$", f"{key}={value}", text)
    env_file.write_text(text)
    return env_file


CPU_STACK = {"redis", "api-cpu", "generator-cpu", "verifier", "learner-cpu"}
GPU_STACK = {"redis", "api", "generator", "verifier", "learner"}


@pytest.mark.parametrize(
    ("args", "expected"),
    [([], CPU_STACK), (["--profile", "cpu"], CPU_STACK), (["--profile", "gpu"], GPU_STACK)],
    ids=["env-example-default", "profile-cpu", "profile-gpu-stack"],
)
def test_docker_compose_loads_each_stack(kit, compose_binary, filled_env_file, args, expected):
    proc = _compose_cli(kit, compose_binary, filled_env_file, *args, "config", "--services")
    assert proc.returncode == 0, proc.stderr
    assert set(proc.stdout.split()) == expected


def test_docker_compose_loads_the_cpu_stack_without_a_model_path(kit, compose_binary, tmp_path):
    env_file = tmp_path / "cfg" / "cpu.env"
    env_file.parent.mkdir()
    lines = [f"{k}={v}" for k, v in kit.SECRETS.items()] + ["COMPOSE_PROFILES=cpu"]
    env_file.write_text("\n".join(lines) + "\n")
    proc = _compose_cli(kit, compose_binary, env_file, "config", "--format", "json")
    assert proc.returncode == 0, proc.stderr
    model = json.loads(proc.stdout)
    assert set(model["services"]) == CPU_STACK
    api = model["services"]["api-cpu"]
    assert any(v["target"] == "/datasets" and v.get("read_only") for v in api["volumes"])


def test_docker_compose_resolves_the_model_it_would_run(compose_binary, filled_env_file, kit):
    args = ("--profile", "gpu", "config", "--format", "json")
    proc = _compose_cli(kit, compose_binary, filled_env_file, *args)
    assert proc.returncode == 0, proc.stderr
    model = json.loads(proc.stdout)
    verifier = model["services"]["verifier"]
    assert verifier["command"] == ["conspo", "verifier"]
    assert verifier["deploy"]["replicas"] == 2
    assert verifier["depends_on"]["redis"]["condition"] == "service_healthy"
    assert (
        model["services"]["generator"]["environment"]["CONSPO_REDIS_PASSWORD"]
        == (kit.SECRETS["CONSPO_REDIS_PASSWORD"])
    )


def test_docker_compose_rejects_missing_secrets(kit, compose_binary, tmp_path):
    env_file = tmp_path / "cfg" / "empty.env"
    env_file.parent.mkdir()
    env_file.write_text(kit.ENV_EXAMPLE.read_text())
    proc = _compose_cli(kit, compose_binary, env_file, "config", "--services")
    assert proc.returncode != 0
    assert "CONSPO_" in proc.stderr
