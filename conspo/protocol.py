"""Every message that crosses a process boundary, and its wire encoding.

One module on purpose: the generator, verifier, learner and api all import the same models, so a
schema change is one diff and one ``SCHEMA_VERSION`` bump.

Wire format: a msgpack map ``{"v": SCHEMA_VERSION, "t": kind, "d": payload}``. Token ids and
log-probs travel as packed little-endian ``int32`` / ``float32`` byte strings, not msgpack lists:
a G=8 x 1,024-token group is then ~66 KB instead of ~150 KB. In the models these fields are
``PackedArray``s (read-only numpy arrays that read like lists): decoding makes a view of the
entry's bytes and validates it with one vectorised check, and encoding hands the same bytes back,
so no number becomes a Python object on the way through a stage (issue 18: the codec was 75% of
the queue's time). Packing is done by the field types themselves (``TokenIds``, ``LogProbs``)
when a model is dumped with ``context={"packed": True}``; validation accepts bytes, lists or
arrays, and JSON dumps give lists, so the same models also serve JSON in the REST API.

Decoding never raises anything but ``DecodeError`` (or its subclasses) on bad input: truncated
bytes, foreign payloads, wrong schema versions, oversized entries and failed validation all land
there, so a consumer can dead-letter the entry with the reason and carry on.
"""

from __future__ import annotations

import enum
import time
import uuid
from collections.abc import Callable, Iterator, Sequence
from typing import Annotated, Any, ClassVar, Literal, TypeVar

import msgpack
import numpy as np
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    PlainSerializer,
    PlainValidator,
    SerializationInfo,
    TypeAdapter,
    ValidationError,
    WithJsonSchema,
    model_validator,
)

SCHEMA_VERSION = 1
DEFAULT_MAX_BYTES = 16 * 1024 * 1024
_INT32_MAX = 2**31 - 1


class ProtocolError(ValueError):
    """Base class for every protocol failure."""


class DecodeError(ProtocolError):
    """An entry could not be decoded into the expected message (malformed, foreign, invalid)."""


class SchemaVersionError(DecodeError):
    """The entry was written with a schema version this code does not speak."""


class MessageTooLargeError(DecodeError):
    """The encoded entry exceeds the configured size limit."""


def _packed(info: SerializationInfo) -> bool:
    return bool(info.context and info.context.get("packed"))


class PackedArray(Sequence):
    """A read-only one-dimensional array of numbers: how token ids and log-probs live in models.

    Decoded from the wire it is a view of the entry's packed bytes (no per-number Python
    objects), and encoding it again hands back those same bytes: a stage that forwards a rollout
    group (the verifier) never turns 8 x 1,024 numbers into Python ints and back. Built from
    Python lists (a generator's output) it takes the wire's types at once (int32 after the range
    check, float32), so a model holds the values every reader will see and encoding copies
    bytes, converting nothing. It behaves like the list it replaces where code reads it:
    ``len``, indexing and iteration give Python numbers, slices give lists, and it equals a
    list or tuple with the same values. ``array`` is the numpy view (read-only), e.g. for
    ``torch.from_numpy``.
    """

    __slots__ = ("_a",)

    def __init__(self, values: np.ndarray) -> None:
        if values.flags.writeable:  # views of bytes already are not
            values.flags.writeable = False
        self._a = values

    @property
    def array(self) -> np.ndarray:
        return self._a

    def tolist(self) -> list:
        return self._a.tolist()

    def wire(self, dtype: np.dtype) -> bytes:
        """The little-endian packed bytes: the decoded entry's own bytes when they are that."""
        a = self._a
        if a.dtype == dtype:
            base = a.base
            if isinstance(base, bytes) and len(base) == a.nbytes:
                return base
            return a.tobytes()
        return a.astype(dtype).tobytes()

    def __len__(self) -> int:
        return len(self._a)

    def __getitem__(self, index: Any) -> Any:
        if isinstance(index, slice):
            return self._a[index].tolist()
        return self._a[index].item()

    def __iter__(self) -> Iterator:
        return iter(self._a.tolist())

    def __array__(self, dtype: Any = None, copy: bool | None = None) -> np.ndarray:
        if copy:
            return np.array(self._a, dtype=dtype)
        return self._a if dtype is None else self._a.astype(dtype)

    def __eq__(self, other: object) -> bool:
        if isinstance(other, PackedArray):
            return self._a.shape == other._a.shape and bool(np.array_equal(self._a, other._a))
        if isinstance(other, list | tuple):
            return self._a.tolist() == list(other)
        return NotImplemented

    __hash__ = None  # type: ignore[assignment]  # equal to lists, which do not hash

    # Concatenation gives a list, as it did when these fields were lists (``prompt + ids``).
    def __add__(self, other: object) -> list:
        if isinstance(other, PackedArray | list | tuple):
            return self._a.tolist() + list(other)
        return NotImplemented

    def __radd__(self, other: object) -> list:
        if isinstance(other, list | tuple):
            return list(other) + self._a.tolist()
        return NotImplemented

    def __repr__(self) -> str:
        return f"PackedArray({self._a.tolist()!r})"

    def __reduce__(self) -> tuple:
        return (PackedArray, (self._a.copy(),))


_WIRE_INT, _WIRE_FLOAT = np.dtype("<i4"), np.dtype("<f4")
_INT_LIST = TypeAdapter(list[int])
_FLOAT_LIST = TypeAdapter(list[float])


def _from_wire(value: Any, wire: np.dtype, from_list: Callable[[Any], np.ndarray]) -> np.ndarray:
    if type(value) is PackedArray:
        return value.array
    if isinstance(value, bytes | bytearray | memoryview):
        if len(value) % wire.itemsize:
            raise ValueError(f"packed {wire.str} array has a ragged byte length {len(value)}")
        # A view of immutable bytes; a mutable buffer is copied so the model stays frozen.
        return np.frombuffer(value if isinstance(value, bytes) else bytes(value), dtype=wire)
    if isinstance(value, np.ndarray) and value.ndim == 1 and value.dtype.kind in "iuf":
        return from_list(value.tolist())
    return from_list(value)


def _ints_from_list(value: Any) -> np.ndarray:
    values = _INT_LIST.validate_python(value)
    if values and (min(values) < 0 or max(values) > _INT32_MAX):
        raise ValueError(f"token ids must lie in [0, {_INT32_MAX}]")
    return np.array(values, dtype=_WIRE_INT)


def _floats_from_list(value: Any) -> np.ndarray:
    return np.array(_FLOAT_LIST.validate_python(value), dtype=_WIRE_FLOAT)


def _token_ids(value: Any) -> PackedArray:
    if type(value) is bytes and not len(value) % 4:  # the decoding path: no further call
        a = np.frombuffer(value, dtype=_WIRE_INT)
    else:
        a = _from_wire(value, _WIRE_INT, _ints_from_list)
    # An int32 cannot exceed the range's top; only the sign is left to check.
    if len(a) and a.min() < 0:
        raise ValueError(f"token ids must lie in [0, {_INT32_MAX}]")
    return value if type(value) is PackedArray else PackedArray(a)


def _logprobs(value: Any) -> PackedArray:
    if type(value) is bytes and not len(value) % 4:  # the decoding path: no further call
        return PackedArray(np.frombuffer(value, dtype=_WIRE_FLOAT))
    a = _from_wire(value, _WIRE_FLOAT, _floats_from_list)
    return value if type(value) is PackedArray else PackedArray(a)


def _serializer(wire: np.dtype) -> Callable[[PackedArray, SerializationInfo], Any]:
    def serialize(value: PackedArray, info: SerializationInfo) -> Any:
        return value.wire(wire) if _packed(info) else value.tolist()

    return serialize


# Validation is one Python call per array (no per-number validation or objects); the JSON schema
# is the list the REST API shows.
TokenIds = Annotated[
    PackedArray,
    PlainValidator(_token_ids),
    PlainSerializer(_serializer(_WIRE_INT)),
    WithJsonSchema({"type": "array", "items": {"type": "integer", "minimum": 0}}),
]
LogProbs = Annotated[
    PackedArray,
    PlainValidator(_logprobs),
    PlainSerializer(_serializer(_WIRE_FLOAT)),
    WithJsonSchema({"type": "array", "items": {"type": "number"}}),
]
Identifier = Annotated[str, Field(min_length=1, max_length=200, pattern=r"^[A-Za-z0-9_.:@/+=-]+$")]
MetaValue = str | int | float | bool | None


def new_id(prefix: str) -> str:
    """A random, sortable-enough id; callers that need idempotency pass their own ids instead."""
    return f"{prefix}-{uuid.uuid4().hex[:20]}"


class Message(BaseModel):
    """Base of every wire message: strict about unknown fields so schema drift is loud."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    kind: ClassVar[str] = ""


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)
    role: Literal["system", "user", "assistant"]
    content: str = Field(max_length=100_000)


class Prompt(Message):
    """A training prompt as submitted through the api: text or chat messages plus a gold answer."""

    kind: ClassVar[str] = "prompt"
    prompt_id: Identifier
    text: str | None = Field(default=None, max_length=100_000)
    messages: list[ChatMessage] | None = Field(default=None, min_length=1, max_length=64)
    answer: str = Field(max_length=10_000)
    verifier: Identifier = "math"
    dataset: Identifier | None = None
    metadata: dict[str, MetaValue] = Field(default_factory=dict, max_length=64)
    created_at: float = Field(default_factory=time.time)

    @model_validator(mode="after")
    def _one_form(self) -> Prompt:
        if (self.text is None) == (self.messages is None):
            raise ValueError("a prompt has exactly one of `text` or `messages`")
        return self


class SamplingParams(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)
    n: int = Field(default=8, ge=1, le=1024)
    temperature: float = Field(default=1.0, ge=0.0, le=10.0)
    top_p: float = Field(default=1.0, gt=0.0, le=1.0)
    max_tokens: int = Field(default=512, ge=1, le=1_000_000)
    seed: int | None = None
    stop: list[str] = Field(default_factory=list, max_length=16)


class Completion(BaseModel):
    """One sampled completion: its tokens with behaviour log-probs (log_softmax(logits / T))."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    token_ids: TokenIds
    logprobs: LogProbs
    text: str
    finish_reason: Literal["stop", "length"]

    @model_validator(mode="after")
    def _aligned(self) -> Completion:
        if len(self.token_ids) != len(self.logprobs):
            raise ValueError(f"{len(self.token_ids)} token ids but {len(self.logprobs)} log-probs")
        return self


class RolloutGroup(Message):
    """G completions of one prompt, sampled by one policy version: the unit every stage moves."""

    kind: ClassVar[str] = "rollout"
    group_id: Identifier
    prompt: Prompt
    prompt_token_ids: TokenIds
    completions: list[Completion] = Field(min_length=1)
    policy_version: int = Field(ge=0)
    sampling: SamplingParams
    generator_id: str = ""
    gen_seconds: float = Field(default=0.0, ge=0.0)
    created_at: float = Field(default_factory=time.time)


class Verdict(enum.StrEnum):
    CORRECT = "correct"
    WRONG = "wrong"
    NO_ANSWER = "no_answer"
    TIMEOUT = "timeout"
    ERROR = "error"


class Label(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)
    reward: float
    verdict: Verdict
    extracted: str | None = Field(default=None, max_length=1_000)
    detail: str | None = Field(default=None, max_length=1_000)


class LabeledGroup(Message):
    """A rollout group plus one reward and verdict per completion."""

    kind: ClassVar[str] = "labeled"
    rollout: RolloutGroup
    labels: list[Label]
    verifier_id: str = ""
    verify_seconds: float = Field(default=0.0, ge=0.0)
    created_at: float = Field(default_factory=time.time)

    @model_validator(mode="after")
    def _one_label_each(self) -> LabeledGroup:
        if len(self.labels) != len(self.rollout.completions):
            raise ValueError(
                f"{len(self.labels)} labels for {len(self.rollout.completions)} completions"
            )
        return self

    @property
    def group_id(self) -> str:
        return self.rollout.group_id

    @property
    def rewards(self) -> list[float]:
        return [label.reward for label in self.labels]


class Rendezvous(BaseModel):
    """Where the weight-sync process group meets; ``epoch`` changes whenever membership does."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    host: str
    port: int = Field(ge=1, le=65535)
    world_size: int = Field(ge=1)
    epoch: int = Field(ge=0)
    backend: Literal["gloo", "nccl"]
    members: list[str] = Field(
        default_factory=list, description="Generator instances; members[i] joins as rank i + 1."
    )


class WeightAnnouncement(Message):
    """The learner's statement of the newest policy and how generators can obtain it."""

    kind: ClassVar[str] = "weights"
    version: int = Field(ge=0)
    step: int = Field(ge=0)
    transport: Literal["broadcast", "checkpoint"]
    rendezvous: Rendezvous | None = None
    checkpoint_path: str | None = None
    num_params: int = Field(default=0, ge=0)
    num_bytes: int = Field(default=0, ge=0)
    layout_hash: str | None = Field(
        default=None, max_length=64, description="Hash of the (name, shape, dtype) list sent."
    )
    created_at: float = Field(default_factory=time.time)


class Heartbeat(Message):
    """What each service instance writes into the run's state hash every few seconds."""

    kind: ClassVar[str] = "heartbeat"
    service: Literal["api", "generator", "verifier", "learner", "demo"]
    instance: str
    host: str = ""
    pid: int = 0
    status: Literal["starting", "running", "waiting", "stopping", "stopped", "failed"] = "running"
    last_error: str | None = Field(default=None, max_length=2_000)
    info: dict[str, MetaValue] = Field(default_factory=dict)
    at: float = Field(default_factory=time.time)


class RunState(Message):
    """A snapshot of the run as the api reports it."""

    kind: ClassVar[str] = "run_state"
    run: str
    status: Literal["idle", "running", "finished", "failed"] = "idle"
    step: int = 0
    policy_version: int = 0
    counters: dict[str, int] = Field(default_factory=dict)
    updated_at: float = Field(default_factory=time.time)


class DeadLetter(Message):
    """An entry a stage gave up on, with why: nothing is dropped silently."""

    kind: ClassVar[str] = "dead"
    source: str
    entry_id: str
    reason: str = Field(max_length=4_000)
    deliveries: int = 0
    consumer: str = ""
    payload: bytes = b""
    at: float = Field(default_factory=time.time)


MESSAGE_TYPES: dict[str, type[Message]] = {
    cls.kind: cls
    for cls in (
        Prompt,
        RolloutGroup,
        LabeledGroup,
        WeightAnnouncement,
        Heartbeat,
        RunState,
        DeadLetter,
    )
}

M = TypeVar("M", bound=Message)


def encode(message: Message, *, max_bytes: int = DEFAULT_MAX_BYTES) -> bytes:
    """Encode a message for the wire; refuses to produce an entry the reader would refuse."""
    payload = message.model_dump(mode="python", context={"packed": True})
    data = msgpack.packb({"v": SCHEMA_VERSION, "t": message.kind, "d": payload}, use_bin_type=True)
    if len(data) > max_bytes:
        raise MessageTooLargeError(f"{message.kind} entry is {len(data)} bytes, limit {max_bytes}")
    return data


def decode(data: bytes, expected: type[M], *, max_bytes: int = DEFAULT_MAX_BYTES) -> M:
    """Decode one entry into ``expected``; every failure is a ``DecodeError`` with a reason."""
    if not isinstance(data, bytes | bytearray | memoryview):
        raise DecodeError(f"entry must be bytes, got {type(data).__name__}")
    if len(data) > max_bytes:
        raise MessageTooLargeError(f"entry is {len(data)} bytes, limit {max_bytes}")
    try:
        envelope = msgpack.unpackb(data, raw=False, strict_map_key=True)
    except Exception as exc:  # msgpack raises several unrelated types on garbage
        raise DecodeError(f"not a msgpack entry: {type(exc).__name__}: {exc}") from None
    if not isinstance(envelope, dict) or not {"v", "t", "d"} <= envelope.keys():
        raise DecodeError("not a conspo envelope (expected keys v, t, d)")
    version, kind = envelope["v"], envelope["t"]
    if version != SCHEMA_VERSION:
        raise SchemaVersionError(f"schema version {version!r}, this build speaks {SCHEMA_VERSION}")
    if kind != expected.kind:
        raise DecodeError(f"expected a {expected.kind!r} entry, got {kind!r}")
    if not isinstance(envelope["d"], dict):
        raise DecodeError("payload is not a map")
    try:
        return expected.model_validate(envelope["d"])
    except ValidationError as exc:
        raise DecodeError(f"invalid {kind}: {_short(exc)}") from None
    except Exception as exc:
        raise DecodeError(f"invalid {kind}: {type(exc).__name__}: {exc}") from None


def _short(exc: ValidationError, limit: int = 3) -> str:
    errors = exc.errors(include_url=False)
    parts = [f"{'.'.join(map(str, e['loc'])) or '<root>'}: {e['msg']}" for e in errors[:limit]]
    more = f" (+{len(errors) - limit} more)" if len(errors) > limit else ""
    return "; ".join(parts) + more
