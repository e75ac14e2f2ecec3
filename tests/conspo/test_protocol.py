"""Protocol round trips, typed failures, and encoding properties."""

from __future__ import annotations

import contextlib
import pickle

import msgpack
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from conspo.protocol import (
    SCHEMA_VERSION,
    ChatMessage,
    Completion,
    DeadLetter,
    DecodeError,
    Heartbeat,
    Label,
    LabeledGroup,
    MessageTooLargeError,
    PackedArray,
    Prompt,
    Rendezvous,
    RolloutGroup,
    RunState,
    SamplingParams,
    SchemaVersionError,
    Verdict,
    WeightAnnouncement,
    decode,
    encode,
)


def make_group(g: int = 8, t: int = 1024) -> RolloutGroup:
    completions = [
        Completion(
            token_ids=[(i * 7 + j) % 50_000 for j in range(t)],
            logprobs=[-(j % 13) / 4 for j in range(t)],
            text=f"completion {i} \\boxed{{{i}}}",
            finish_reason="stop" if i % 2 else "length",
        )
        for i in range(g)
    ]
    return RolloutGroup(
        group_id="g-1700000000000-0",
        prompt=Prompt(prompt_id="p-1", text="What is 1+1?", answer="2", verifier="math"),
        prompt_token_ids=list(range(40)),
        completions=completions,
        policy_version=3,
        sampling=SamplingParams(n=g, temperature=1.0, max_tokens=t, seed=7),
        generator_id="gen-0",
        gen_seconds=1.5,
    )


def all_messages() -> list:
    group = make_group(4, 16)
    labels = [
        Label(reward=float(i % 2), verdict=Verdict.CORRECT if i % 2 else Verdict.WRONG)
        for i in range(4)
    ]
    return [
        Prompt(
            prompt_id="p-2",
            messages=[ChatMessage(role="user", content="hi")],
            answer="x",
            metadata={"level": 3, "subject": "algebra", "ok": True, "w": 0.5, "none": None},
        ),
        group,
        LabeledGroup(rollout=group, labels=labels, verifier_id="v-1", verify_seconds=0.2),
        WeightAnnouncement(
            version=4,
            step=4,
            transport="broadcast",
            rendezvous=Rendezvous(
                host="10.0.0.1", port=29500, world_size=3, epoch=2, backend="gloo"
            ),
            num_params=10,
            num_bytes=40,
        ),
        WeightAnnouncement(version=5, step=5, transport="checkpoint", checkpoint_path="/ckpt/5"),
        Heartbeat(service="verifier", instance="v-1", status="running", info={"groups": 3}),
        RunState(run="r", status="running", step=3, policy_version=3, counters={"a": 1}),
        DeadLetter(source="rollouts", entry_id="1-0", reason="boom", deliveries=5, payload=b"\x00"),
    ]


@pytest.mark.parametrize("message", all_messages(), ids=lambda m: type(m).__name__)
def test_round_trip_every_message_type(message) -> None:
    assert decode(encode(message), type(message)) == message


def test_token_arrays_are_packed_not_lists() -> None:
    group = make_group(8, 1024)
    data = encode(group)
    # 8 x 1024 x (4 bytes id + 4 bytes log-prob) plus text and framing; a msgpack list of ints
    # and floats would take 8 x 1024 x (3..5 + 9) bytes.
    assert 8 * 1024 * 8 <= len(data) < 8 * 1024 * 8 + 4096
    envelope = msgpack.unpackb(data, raw=False)
    assert isinstance(envelope["d"]["completions"][0]["token_ids"], bytes)
    assert isinstance(envelope["d"]["completions"][0]["logprobs"], bytes)


def test_logprobs_survive_as_float32() -> None:
    c = Completion(token_ids=[1, 2], logprobs=[-1e-9, -12345.678], text="", finish_reason="stop")
    back = decode(encode(make_group(1, 1).model_copy(update={"completions": [c]})), RolloutGroup)
    assert back.completions[0].logprobs == pytest.approx([-1e-9, -12345.678], rel=1e-6)


def test_decoded_arrays_are_views_of_the_entry_and_encode_back_to_it() -> None:
    """What makes the queue cheap: decoding builds no Python number per token, and a stage
    that forwards the group (the verifier) sends the very bytes it received."""
    data = encode(make_group(8, 512))
    back = decode(data, RolloutGroup)
    ids = back.completions[0].token_ids
    assert isinstance(ids, PackedArray) and ids.array.dtype == np.dtype("<i4")
    assert isinstance(ids.array.base, bytes)  # a view, not a copy
    assert not ids.array.flags.writeable  # frozen models stay frozen
    assert encode(back) == data


def test_packed_array_reads_like_the_list_it_replaces() -> None:
    c = Completion(token_ids=[5, 6, 7], logprobs=[-0.5, -0.25, 0.0], text="", finish_reason="stop")
    ids = decode(encode(make_group(1, 1).model_copy(update={"completions": [c]})), RolloutGroup)
    ids = ids.completions[0].token_ids
    for value in (c.token_ids, ids):
        assert len(value) == 3 and value[0] == 5 and value[-1] == 7 and value[1:] == [6, 7]
        assert type(value[0]) is int and all(type(x) is int for x in value)
        assert value == [5, 6, 7] and value == (5, 6, 7) and value != [5, 6]
        assert list(value) == [5, 6, 7] and tuple(value) == (5, 6, 7)
        assert np.asarray(value).tolist() == [5, 6, 7]
        assert pickle.loads(pickle.dumps(value)) == value
        assert [1, 2] + value == [1, 2, 5, 6, 7] and value + (8,) == [5, 6, 7, 8]  # noqa: RUF005
    assert c.token_ids == ids  # int64 (from a list) equals int32 (from the wire)
    assert type(c.logprobs[1]) is float and c.logprobs == [-0.5, -0.25, 0.0]
    with pytest.raises(IndexError):
        ids[3]
    with pytest.raises(TypeError):
        hash(ids)


def test_lists_take_the_wire_types_at_once() -> None:
    c = Completion(token_ids=[1, 7], logprobs=[-0.1, -2.5], text="", finish_reason="stop")
    assert c.token_ids.array.dtype == np.dtype("<i4")
    assert c.logprobs.array.dtype == np.dtype("<f4")
    assert c.logprobs == [float(np.float32(-0.1)), -2.5]  # what every reader will see
    back = decode(encode(make_group(1, 1).model_copy(update={"completions": [c]})), RolloutGroup)
    assert back.completions[0] == c  # the same values before and after the wire


def test_negative_packed_token_id_is_a_decode_error() -> None:
    payload = msgpack.unpackb(encode(make_group(1, 4)), raw=False)
    payload["d"]["completions"][0]["token_ids"] = np.array([1, -2, 3, 4], "<i4").tobytes()
    with pytest.raises(DecodeError, match="must lie in"):
        decode(msgpack.packb(payload, use_bin_type=True), RolloutGroup)


def test_truncated_entry_raises_decode_error() -> None:
    data = encode(make_group(2, 32))
    for cut in (1, len(data) // 2, len(data) - 1):
        with pytest.raises(DecodeError):
            decode(data[:cut], RolloutGroup)


def test_oversized_entry_is_refused_both_ways() -> None:
    group = make_group(8, 1024)
    with pytest.raises(MessageTooLargeError):
        encode(group, max_bytes=10_000)
    with pytest.raises(MessageTooLargeError):
        decode(encode(group), RolloutGroup, max_bytes=10_000)


def test_wrong_version_raises_schema_version_error() -> None:
    payload = msgpack.unpackb(encode(make_group(1, 4)), raw=False)
    payload["v"] = SCHEMA_VERSION + 1
    with pytest.raises(SchemaVersionError, match="schema version"):
        decode(msgpack.packb(payload, use_bin_type=True), RolloutGroup)


def test_foreign_and_mismatched_entries() -> None:
    with pytest.raises(DecodeError, match="expected a 'labeled'"):
        decode(encode(make_group(1, 4)), LabeledGroup)
    with pytest.raises(DecodeError, match="envelope"):
        decode(msgpack.packb({"hello": "world"}), RolloutGroup)
    with pytest.raises(DecodeError, match="envelope"):
        decode(msgpack.packb([1, 2, 3]), RolloutGroup)
    with pytest.raises(DecodeError, match="bytes"):
        decode("a string", RolloutGroup)  # type: ignore[arg-type]


def test_invalid_payloads_raise_decode_error_with_the_field() -> None:
    payload = msgpack.unpackb(encode(make_group(1, 4)), raw=False)
    payload["d"]["completions"][0]["logprobs"] = payload["d"]["completions"][0]["logprobs"][:-4]
    with pytest.raises(DecodeError, match="log-probs"):
        decode(msgpack.packb(payload, use_bin_type=True), RolloutGroup)
    payload = msgpack.unpackb(encode(make_group(1, 4)), raw=False)
    payload["d"]["completions"][0]["token_ids"] = b"\x01\x02\x03"  # ragged int32 buffer
    with pytest.raises(DecodeError, match="ragged"):
        decode(msgpack.packb(payload, use_bin_type=True), RolloutGroup)
    payload = msgpack.unpackb(encode(make_group(1, 4)), raw=False)
    payload["d"]["surprise"] = 1
    with pytest.raises(DecodeError, match="surprise"):
        decode(msgpack.packb(payload, use_bin_type=True), RolloutGroup)


def test_model_invariants() -> None:
    with pytest.raises(ValueError, match="exactly one"):
        Prompt(prompt_id="p", answer="1")
    with pytest.raises(ValueError, match="exactly one"):
        Prompt(
            prompt_id="p", text="x", messages=[ChatMessage(role="user", content="y")], answer="1"
        )
    with pytest.raises(ValueError, match="pattern"):
        Prompt(prompt_id="bad id with spaces", text="x", answer="1")
    group = make_group(2, 4)
    with pytest.raises(ValueError, match="labels"):
        LabeledGroup(rollout=group, labels=[Label(reward=1.0, verdict=Verdict.CORRECT)])
    with pytest.raises(ValueError, match="must lie in"):
        Completion(token_ids=[-1], logprobs=[0.0], text="", finish_reason="stop")


def test_json_form_uses_plain_lists() -> None:
    """The REST api serves the same models as JSON: arrays must stay lists there."""
    doc = make_group(1, 3).model_dump(mode="json")
    assert doc["completions"][0]["token_ids"] == [0, 1, 2]
    assert isinstance(doc["completions"][0]["logprobs"], list)


finite = st.floats(min_value=-1e4, max_value=0.0, allow_nan=False, width=32)
completions = st.integers(min_value=0, max_value=64).flatmap(
    lambda n: st.builds(
        Completion,
        token_ids=st.lists(st.integers(0, 2**31 - 1), min_size=n, max_size=n),
        logprobs=st.lists(finite, min_size=n, max_size=n),
        text=st.text(max_size=200),
        finish_reason=st.sampled_from(["stop", "length"]),
    )
)
groups = st.builds(
    RolloutGroup,
    group_id=st.from_regex(r"[A-Za-z0-9_.:-]{1,40}", fullmatch=True),
    prompt=st.builds(
        Prompt,
        prompt_id=st.from_regex(r"[A-Za-z0-9_-]{1,30}", fullmatch=True),
        text=st.text(max_size=300),
        answer=st.text(max_size=50),
        metadata=st.dictionaries(
            st.text(max_size=10),
            st.one_of(st.none(), st.integers(-(2**40), 2**40), st.text(max_size=20), st.booleans()),
            max_size=5,
        ),
    ),
    prompt_token_ids=st.lists(st.integers(0, 2**31 - 1), max_size=100),
    completions=st.lists(completions, min_size=1, max_size=6),
    policy_version=st.integers(0, 2**40),
    sampling=st.builds(SamplingParams),
)


@settings(max_examples=150, deadline=None)
@given(groups)
def test_property_round_trip(group: RolloutGroup) -> None:
    assert decode(encode(group), RolloutGroup) == group


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=2048))
def test_property_random_bytes_only_raise_decode_error(data: bytes) -> None:
    for cls in (Prompt, RolloutGroup, LabeledGroup, WeightAnnouncement):
        with contextlib.suppress(DecodeError):
            decode(data, cls)


@settings(max_examples=200, deadline=None)
@given(st.data())
def test_property_corrupted_entries_only_raise_decode_error(data: st.DataObject) -> None:
    raw = bytearray(encode(make_group(2, 8)))
    for _ in range(data.draw(st.integers(1, 8))):
        pos = data.draw(st.integers(0, len(raw) - 1))
        raw[pos] = data.draw(st.integers(0, 255))
    with contextlib.suppress(DecodeError):
        decode(bytes(raw), RolloutGroup)
