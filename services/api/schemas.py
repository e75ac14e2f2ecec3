"""Request and response models of the REST API (the OpenAPI schema is generated from these).

Request models mirror the wire model ``conspo.protocol.Prompt`` field by field, with the same
limits, so that anything they accept converts to a ``Prompt`` without a second failure mode; they
exist separately because the REST contract (optional ids, numeric answers, a batch envelope) is
not the wire contract. Every model forbids unknown fields: a typo is a 422, not a silent default.
"""

from __future__ import annotations

import math
from typing import Annotated, Any, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Discriminator,
    Field,
    StrictFloat,
    StrictInt,
    Tag,
    field_validator,
    model_validator,
)

from conspo.protocol import ChatMessage, Identifier, MetaValue, Prompt, SamplingParams
from conspo.state import Waiting

DatasetId = Annotated[str, Field(pattern=r"^[A-Za-z0-9_.-]{1,64}$", examples=["gsm8k-test"])]
FieldName = Annotated[str, Field(min_length=1, max_length=200)]
EntryId = Annotated[str, Field(pattern=r"^\d{1,20}-\d{1,20}$", examples=["1718000000000-0"])]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


# -- errors ---------------------------------------------------------------------------------------
class ErrorDetail(BaseModel):
    loc: list[str] = Field(default_factory=list, description="Where the problem is.")
    msg: str
    type: str = ""


class ErrorInfo(BaseModel):
    code: str = Field(description="Stable machine-readable reason, e.g. `validation_error`.")
    message: str = Field(description="Human-readable reason.")
    details: list[ErrorDetail] = Field(default_factory=list)


class ErrorBody(BaseModel):
    """The one body every 4xx and 5xx response carries."""

    error: ErrorInfo


# -- prompts --------------------------------------------------------------------------------------
def answer_text(value: str | int | float | bool) -> str:
    """A gold answer as text: integral floats lose their ``.0`` (AMC's ``27.0`` is ``27``)."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        if not math.isfinite(value):
            raise ValueError("the answer must be a finite number")
        return str(int(value)) if value.is_integer() and abs(value) < 1e16 else repr(value)
    return value


class PromptIn(_Strict):
    """One training prompt: exactly one of `text` or `messages`, plus the gold answer."""

    prompt_id: Identifier | None = Field(
        default=None, description="Client id; generated (`p-...`) when absent."
    )
    text: str | None = Field(default=None, max_length=100_000)
    messages: list[ChatMessage] | None = Field(default=None, min_length=1, max_length=64)
    answer: Annotated[str, Field(max_length=10_000)] | StrictInt | StrictFloat = Field(
        description='Gold answer (numbers are formatted as text: 27.0 -> "27").'
    )
    verifier: Identifier = "math"
    dataset: Identifier | None = None
    metadata: dict[str, MetaValue] = Field(default_factory=dict, max_length=64)

    @field_validator("answer")
    @classmethod
    def _finite(cls, v: str | int | float) -> str | int | float:
        answer_text(v)
        return v

    @model_validator(mode="after")
    def _one_form(self) -> PromptIn:
        if (self.text is None) == (self.messages is None):
            raise ValueError("a prompt has exactly one of `text` or `messages`")
        return self


class PromptBatch(_Strict):
    """Many prompts in one request (at most `max_prompts_per_request`)."""

    prompts: list[PromptIn] = Field(min_length=1)


def _submission_kind(value: Any) -> str:
    if isinstance(value, dict) and "prompts" in value:
        return "batch"
    if isinstance(value, PromptBatch):
        return "batch"
    return "single"


PromptSubmission = Annotated[
    Annotated[PromptBatch, Tag("batch")] | Annotated[PromptIn, Tag("single")],
    Discriminator(_submission_kind),
]


class PromptsAccepted(BaseModel):
    count: int = Field(ge=0)
    prompt_ids: list[str]
    entry_ids: list[str] = Field(description="Entry ids in the `prompts` stream, in order.")
    replayed: list[str] = Field(
        default_factory=list,
        description="Prompt ids this run already had with the identical prompt: not enqueued "
        "again, their original entry ids are replayed in `entry_ids`.",
    )
    stream: Literal["prompts"] = "prompts"


# -- datasets -------------------------------------------------------------------------------------
class DatasetSpec(_Strict):
    """Where the rows come from and how a JSONL row becomes a prompt.

    The same flat fields are accepted as a JSON body (with `path` or `rows`), as multipart form
    fields next to the `file` part, or as query parameters next to a raw JSONL body.
    """

    dataset_id: DatasetId | None = Field(default=None, description="Generated when absent.")
    name: str | None = Field(default=None, max_length=200)
    path: str | None = Field(
        default=None,
        max_length=4096,
        description="Server-side JSONL file, relative to or under one of `dataset_roots`.",
    )
    rows: list[dict[str, Any]] | None = Field(default=None, description="Inline rows.")
    prompt_field: FieldName
    answer_field: FieldName
    id_field: FieldName | None = None
    verifier: Identifier = "math"
    template: str | None = Field(
        default=None,
        max_length=20_000,
        description="Prompt text template: `{prompt}` is the prompt field, `{name}` any field; "
        "`{{` and `}}` are literal braces; other braces (e.g. `\\boxed{}`) stay as they are.",
    )
    system_prompt: str | None = Field(
        default=None, max_length=20_000, description="If set, prompts become chat messages."
    )
    chat: bool = Field(
        default=False,
        description="Prompts become chat messages (one user turn, rendered with the model's chat "
        "template by the generator) even without a system prompt.",
    )
    metadata_fields: list[FieldName] = Field(default_factory=list, max_length=60)
    answer_boxed: bool = Field(
        default=False, description="Take the content of the last \\boxed{} of the answer field."
    )
    answer_after: str | None = Field(
        default=None,
        min_length=1,
        max_length=200,
        description="Take the text after the last occurrence of this marker (GSM8K: `#### `).",
    )
    answer_regex: str | None = Field(
        default=None,
        min_length=1,
        max_length=1000,
        description="Search the answer; group 1 if the pattern has groups, else the match.",
    )
    answer_join: str | None = Field(
        default=None,
        max_length=20,
        description="List answers: joined with this separator; the first item when absent.",
    )
    epochs: int = Field(default=1, ge=1, le=10_000)
    seed: int = Field(default=0, ge=0, le=2**63 - 1)
    shuffle: bool = True


class DatasetQuery(_Strict):
    """The `DatasetSpec` fields as query parameters (for a raw JSONL body)."""

    dataset_id: DatasetId | None = None
    name: str | None = Field(default=None, max_length=200)
    prompt_field: FieldName | None = None
    answer_field: FieldName | None = None
    id_field: FieldName | None = None
    verifier: Identifier | None = None
    template: str | None = Field(default=None, max_length=20_000)
    system_prompt: str | None = Field(default=None, max_length=20_000)
    chat: bool | None = None
    metadata_fields: list[FieldName] | None = Field(default=None, max_length=60)
    answer_boxed: bool | None = None
    answer_after: str | None = Field(default=None, min_length=1, max_length=200)
    answer_regex: str | None = Field(default=None, min_length=1, max_length=1000)
    answer_join: str | None = Field(default=None, max_length=20)
    epochs: int | None = Field(default=None, ge=1, le=10_000)
    seed: int | None = Field(default=None, ge=0, le=2**63 - 1)
    shuffle: bool | None = None


class RejectedRow(BaseModel):
    line: int = Field(ge=0, description="1-based line of the JSONL file (row index + 1 inline).")
    reason: str


class DatasetInfo(BaseModel):
    dataset_id: str
    name: str
    source: Literal["upload", "path", "inline"]
    path: str | None = None
    verifier: str
    state: Literal["loading", "ready", "finished"]
    rows: int = Field(ge=0, description="Valid rows stored.")
    rejected_count: int = Field(ge=0)
    rejected: list[RejectedRow] = Field(description="The first rejected rows with reasons.")
    epochs: int
    seed: int
    shuffle: bool
    total: int = Field(ge=0, description="rows x epochs: prompts the feeder will publish.")
    fed: int = Field(ge=0, description="Prompts published so far.")
    epoch: int = Field(ge=0, description="Current epoch (0-based; = epochs when finished).")
    position: int = Field(ge=0, description="Position in the current epoch's shuffled order.")
    created_at: float


class DatasetList(BaseModel):
    datasets: list[DatasetInfo]


# -- run status -----------------------------------------------------------------------------------
class QueueDepth(BaseModel):
    length: int = Field(ge=0, description="Entries in the stream.")
    pending: int = Field(ge=0, description="Delivered to a consumer, not yet acknowledged.")
    lag: int = Field(ge=0, description="Not yet delivered to the consumer group.")


class ServiceInstance(BaseModel):
    service: str
    instance: str
    host: str
    pid: int
    status: str = Field(description="What the instance last said about itself.")
    alive: bool = Field(description="Heartbeat younger than 3 heartbeat intervals.")
    state: Literal["alive", "gone"]
    age_s: float
    last_error: str | None = None
    info: dict[str, MetaValue] = Field(default_factory=dict)


class ReplicaSummary(BaseModel):
    alive: int = Field(ge=0)
    gone: int = Field(ge=0)
    instances: list[str]


class WeightsView(BaseModel):
    current_version: int | None = None
    served: dict[str, int | str] = Field(
        default_factory=dict, description="Generator instance -> policy version it serves."
    )


class Curves(BaseModel):
    train: list[dict[str, Any]] = Field(default_factory=list)
    eval: list[dict[str, Any]] = Field(default_factory=list)


class RunStatus(BaseModel):
    run: str
    status: str = Field(
        description="Run status field (`idle` when nobody set it; `redis_state_lost` when Redis "
        "lost the run's state)."
    )
    redis_state: Literal["ok", "lost"] = Field(
        default="ok",
        description="`lost` when the run's incarnation key vanished or changed: Redis restarted "
        "without persistence or was flushed, and what was in flight is gone.",
    )
    redis_state_detail: str | None = None
    step: int | None = None
    policy_version: int | None = None
    waiting: Waiting | None = Field(
        default=None,
        description="null while steps happen; else why the learner is not stepping (after "
        "`waiting_after_s`), e.g. code `all_equal_rewards` with the numbers in `reason`. "
        "Cleared by the next step.",
    )
    fields: dict[str, str] = Field(default_factory=dict, description="The run's state hash.")
    counters: dict[str, int] = Field(default_factory=dict)
    curves: Curves
    queues: dict[str, QueueDepth]
    services: list[ServiceInstance]
    replicas: dict[str, ReplicaSummary]
    weights: WeightsView
    generated_at: float


class Accounting(BaseModel):
    """Where every submitted prompt went (``conspo.accounting``): exact while the pipeline is
    stopped; while it runs, an item moving between two reads can show as lost for an instant."""

    submitted: int = Field(ge=0, description="Prompts accepted by POST /v1/prompts or fed.")
    generated: int = Field(ge=0, description="Prompts with a committed rollout group.")
    labelled: int = Field(ge=0, description="Groups with committed labels.")
    trained: int = Field(ge=0)
    skipped: int = Field(ge=0, description="Uninformative groups (all rewards equal).")
    dropped: int = Field(ge=0, description="Groups too stale to train on.")
    dead: int = Field(ge=0, description="Entries in the dead stream.")
    queued_prompts: int = Field(ge=0)
    queued_rollouts: int = Field(ge=0)
    queued_labeled: int = Field(ge=0)
    lost: int = Field(description="Submitted but in no state above: must be 0.")
    duplicated: int = Field(ge=0, description="Groups trained more than once: must be 0.")


# -- lineage and dead letters ---------------------------------------------------------------------
class CompletionView(BaseModel):
    index: int
    text: str
    text_truncated: bool
    num_tokens: int
    finish_reason: str
    reward: float | None = None
    verdict: str | None = None
    extracted: str | None = None
    detail: str | None = None


class RolloutView(BaseModel):
    entry_id: str | None = Field(description="Entry in `rollouts` (None if the marker is bare).")
    retained: bool = Field(description="Whether the rollout data below could still be read.")
    policy_version: int | None = None
    generator_id: str | None = None
    sampling: SamplingParams | None = None
    gen_seconds: float | None = None
    prompt_tokens: int | None = None
    created_at: float | None = None
    completions: list[CompletionView] = Field(default_factory=list)


class LabeledView(BaseModel):
    entry_id: str | None
    retained: bool
    verifier_id: str | None = None
    verify_seconds: float | None = None
    rewards: list[float] = Field(default_factory=list)
    verdicts: list[str] = Field(default_factory=list)
    reward_mean: float | None = None


class LearnView(BaseModel):
    outcome: str = Field(description="`trained`, `skipped` or `dropped`.")
    step: int | None = Field(default=None, description="The step that trained on the group.")
    reason: str | None = Field(default=None, description="Why it was skipped or dropped.")
    marker: str


class DeadLetterView(BaseModel):
    dead_entry_id: str
    source: str
    entry_id: str
    key: str
    reason: str
    deliveries: int
    consumer: str
    at: float | None = None


class RolloutLineage(BaseModel):
    group_id: str
    prompt_entry_id: str
    stage: Literal["queued", "generated", "labeled", "trained", "skipped", "dropped", "dead"]
    prompt: Prompt | None = Field(default=None, description="Absent once trimmed from `prompts`.")
    rollout: RolloutView | None = None
    labeled: LabeledView | None = None
    learn: LearnView | None = None
    dead_letters: list[DeadLetterView] = Field(default_factory=list)
    notes: list[str] = Field(default_factory=list)


class DeadList(BaseModel):
    items: list[DeadLetterView]
    count: int
    next_before: str | None = Field(
        default=None, description="Pass as `before` for the next (older) page."
    )


# -- health ---------------------------------------------------------------------------------------
class Health(BaseModel):
    status: Literal["ok"] = "ok"


class Ready(BaseModel):
    status: Literal["ready"] = "ready"
    redis: Literal["ok"] = "ok"
