"""deploy/docker: pinned bases, non-root runtime, health checks, and a build context that holds
what the Dockerfiles copy and nothing the .dockerignore promises to keep out.

No Docker engine runs here, so the Dockerfiles are read as text: instructions are joined across
line continuations and checked against pyproject.toml's pins.
"""

from __future__ import annotations

import re
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest
from packaging.specifiers import SpecifierSet

REPO = Path(__file__).resolve().parents[2]
DOCKER = REPO / "deploy" / "docker"
DOCKERFILES = {"cpu": DOCKER / "cpu.Dockerfile", "gpu": DOCKER / "gpu.Dockerfile"}
# File names as test ids: a bare "gpu" id would make the root conftest skip the test on CPU.
IDS = [DOCKERFILES[k].name for k in sorted(DOCKERFILES)]


def instructions(path: Path) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) pairs, comments dropped, continuations joined."""
    out: list[tuple[str, str]] = []
    pending = ""
    for raw in path.read_text().splitlines():
        line = raw.rstrip()
        if not pending and (not line.strip() or line.lstrip().startswith("#")):
            continue
        if line.endswith("\\"):
            pending += line[:-1] + " "
            continue
        full = (pending + line).strip()
        pending = ""
        word, _, rest = full.partition(" ")
        out.append((word.upper(), rest.strip()))
    return out


def stages(path: Path) -> list[list[tuple[str, str]]]:
    result: list[list[tuple[str, str]]] = []
    for ins in instructions(path):
        if ins[0] == "FROM":
            result.append([])
        if result:
            result[-1].append(ins)
    return result


def global_args(path: Path) -> dict[str, str]:
    args = {}
    for word, rest in instructions(path):
        if word == "FROM":
            break
        if word == "ARG":
            key, _, default = rest.partition("=")
            args[key] = default
    return args


def expand(text: str, args: dict[str, str]) -> str:
    for _ in range(5):
        text = re.sub(r"\$\{(\w+)\}", lambda m: args.get(m.group(1), m.group(0)), text)
    return text


@pytest.fixture(scope="module")
def pyproject() -> dict:
    return tomllib.loads((REPO / "pyproject.toml").read_text())


def _pin(requirements: list[str], name: str) -> str:
    for req in requirements:
        m = re.fullmatch(rf"{name}==([\w.]+)", req.split(";")[0].strip())
        if m:
            return m.group(1)
    raise AssertionError(f"{name} is not pinned with == in {requirements}")


@pytest.mark.parametrize("kind", sorted(DOCKERFILES), ids=IDS)
def test_builds_need_no_frontend_image(kind):
    # A `# syntax=` parser directive makes BuildKit pull that frontend image from a registry
    # before the first step: offline (or behind a registry mirror) the build fails at once.
    # The daemon's built-in frontend handles everything these files use.
    for line in DOCKERFILES[kind].read_text().splitlines():
        if not re.match(r"#\s*\w+\s*=", line):
            break  # directives are only valid above the first other line
        assert not re.match(r"#\s*syntax\s*=", line, re.IGNORECASE), line


@pytest.mark.parametrize("kind", sorted(DOCKERFILES), ids=IDS)
def test_base_images_are_pinned(kind):
    path = DOCKERFILES[kind]
    args = global_args(path)
    stage_names = set()
    for stage in stages(path):
        image = expand(stage[0][1].split()[0], args)
        if image in stage_names:
            continue
        assert ":" in image and not image.endswith(":latest"), image
        tag = image.rsplit(":", 1)[1]
        assert re.search(r"\d+\.\d+\.\d+", tag), f"{image}: pin a full version"
        if " AS " in stage[0][1].upper():
            stage_names.add(stage[0][1].split()[-1])
    assert ":latest" not in path.read_text()


def test_cpu_image_installs_the_pinned_cpu_torch_first(pyproject):
    path = DOCKERFILES["cpu"]
    build = stages(path)[0]
    args = dict(global_args(path))
    args.update({k: v for w, r in build if w == "ARG" for k, _, v in [r.partition("=")]})
    # The image takes the CPU torch the Makefile installs, which the project's range admits.
    make_pin = re.search(r"pip install -q torch==([\w.]+)", (REPO / "Makefile").read_text())
    assert make_pin and args["TORCH_VERSION"] == make_pin.group(1)
    torch_req = next(r for r in pyproject["project"]["dependencies"] if r.startswith("torch"))
    assert SpecifierSet(torch_req.removeprefix("torch")).contains(args["TORCH_VERSION"])
    assert args["TORCH_INDEX_URL"] == "https://download.pytorch.org/whl/cpu"
    assert expand(stages(path)[0][0][1], args).startswith("python:3.11")
    runs = [r for w, r in build if w == "RUN"]
    torch_at = next(i for i, r in enumerate(runs) if "torch==" in r and "--index-url" in r)
    deps_at = next(i for i, r in enumerate(runs) if "--requirement" in r)
    project_at = next(i for i, r in enumerate(runs) if r.startswith("pip install") and "/src" in r)
    assert torch_at < deps_at < project_at
    assert "+cpu" in runs[deps_at], "a constraint keeps the CPU torch in place"
    assert "pyproject.toml" in runs[deps_at] and "--no-deps" in runs[project_at]
    assert "pip check" in runs[project_at]


def test_cpu_image_installs_dependencies_before_the_sources_arrive():
    # Layer cache: a change to the code must not invalidate the dependency layer (minutes).
    build = stages(DOCKERFILES["cpu"])[0]
    copies = [(i, r) for i, (w, r) in enumerate(build) if w == "COPY"]
    deps_at = next(i for i, (w, r) in enumerate(build) if w == "RUN" and "--requirement" in r)
    before = [r.split()[0] for i, r in copies if i < deps_at]
    assert before == ["pyproject.toml"], f"only pyproject.toml before the dependencies: {before}"
    assert any(r.startswith(". ") for i, r in copies if i > deps_at)


def test_gpu_image_is_the_vllm_release_that_the_extra_pins(pyproject):
    path = DOCKERFILES["gpu"]
    args = global_args(path)
    vllm = _pin(pyproject["project"]["optional-dependencies"]["vllm"], "vllm")
    assert args["VLLM_VERSION"] == vllm
    runtime = stages(path)[-1]
    assert expand(runtime[0][1].split()[0], args) == f"vllm/vllm-openai:v{vllm}"
    text = " ".join(r for w, r in runtime if w == "RUN")
    assert "freeze_constraints.py" in text and "--constraint" in text
    assert "[vllm]" in text


@pytest.mark.parametrize("kind", sorted(DOCKERFILES), ids=IDS)
def test_runtime_stage_is_non_root_with_healthcheck_and_init(kind):
    runtime = stages(DOCKERFILES[kind])[-1]
    users = [r for w, r in runtime if w == "USER"]
    assert users, "the final stage must switch user"
    uid = users[-1].split(":")[0]
    assert uid.isdigit() and int(uid) != 0, "numeric non-root uid (runAsNonRoot can verify it)"
    health = [r for w, r in runtime if w == "HEALTHCHECK"]
    assert health and "conspo-healthcheck" in health[-1]
    entry = [r for w, r in runtime if w == "ENTRYPOINT"]
    assert entry and "tini" in entry[-1]


def _dockerignore_rules() -> list[tuple[bool, re.Pattern[str]]]:
    rules = []
    for raw in (REPO / ".dockerignore").read_text().splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        negate = line.startswith("!")
        pattern = line.lstrip("!").strip("/")
        regex = ""
        i = 0
        while i < len(pattern):
            if pattern.startswith("**", i):
                regex += ".*"
                i += 2
                if pattern.startswith("/", i):
                    regex += "/?"
                    i += 1
                continue
            ch = pattern[i]
            regex += {"*": "[^/]*", "?": "[^/]"}.get(ch, re.escape(ch))
            if ch == "[":
                end = pattern.index("]", i)
                regex = regex[: -len(re.escape(ch))] + pattern[i : end + 1]
                i = end
            i += 1
        rules.append((negate, re.compile(regex)))
    return rules


def excluded(path: str) -> bool:
    """Docker's rule: the last pattern matching the path or one of its parents decides."""
    parts = path.split("/")
    prefixes = ["/".join(parts[: i + 1]) for i in range(len(parts))]
    verdict = False
    for negate, regex in _dockerignore_rules():
        if any(regex.fullmatch(p) for p in prefixes):
            verdict = not negate
    return verdict


@pytest.mark.parametrize(
    "path",
    [".venv/bin/python", "runs/demo/ckpt.pt", "bench/results/x.json", ".git/HEAD", "tests/a.py",
     ".pytest_cache/v", ".ruff_cache/x", "conspo/__pycache__/cli.cpython-311.pyc", ".env",
     ".hypothesis/examples/x", "deploy/k8s/base/api.yaml", "docs/deploy.md", "x.egg-info/PKG"],
)  # fmt: skip
def test_dockerignore_keeps_out(path):
    assert excluded(path)


def test_build_context_holds_everything_the_dockerfiles_copy():
    needed = {"pyproject.toml", "conspo/cli.py", "conspo/settings.py", "services/__init__.py"}
    for path in DOCKERFILES.values():
        for word, rest in instructions(path):
            if word != "COPY" or "--from=" in rest:
                continue
            sources = [a for a in rest.split() if not a.startswith("--")][:-1]
            for src in sources:
                if src == ".":
                    continue
                assert (REPO / src).exists(), f"{path.name}: COPY {src} does not exist"
                needed.add(src)
    for src in sorted(needed):
        assert not excluded(src), f"{src} is copied but .dockerignore excludes it"
    assets = REPO / "conspo" / "assets"
    if assets.is_dir():
        for f in assets.rglob("*"):
            if f.is_file():
                assert not excluded(str(f.relative_to(REPO))), f"bundled model file {f} excluded"


def test_compose_builds_with_these_dockerfiles(kit, compose_raw):
    for name, svc in compose_raw["services"].items():
        if "build" in svc:
            assert (REPO / svc["build"]["context"] / svc["build"]["dockerfile"]).is_file(), name


def test_freeze_constraints_prints_plain_pins():
    out = subprocess.run(
        [sys.executable, str(DOCKER / "freeze_constraints.py")],
        capture_output=True, text=True, check=True, timeout=60,
    ).stdout.split()  # fmt: skip
    assert out, "no installed distributions listed"
    for line in out:
        assert re.fullmatch(r"[a-z0-9][a-z0-9-]*==[\w.+!-]+", line), line
    names = {line.split("==")[0] for line in out}
    assert "torch" in names and "pydantic" in names
    assert "conspo" not in names, "the package installed on top must not be frozen"
