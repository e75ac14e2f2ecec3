"""The verifier registry and the in-process grading wrapper."""

from __future__ import annotations

import pytest

from conspo.grading.config import GradeConfig
from conspo.grading.grade import grade_one
from conspo.grading.verifiers import (
    UnknownVerifierError,
    get_verifier,
    known_verifiers,
    register,
    unregister,
)
from conspo.protocol import Label, Verdict
from services.verifier.pool import load_plugin

CONFIG = GradeConfig()


def test_builtins_are_registered() -> None:
    assert {"math", "exact", "arith"} <= set(known_verifiers())


def test_unknown_name_raises_typed_error_listing_known() -> None:
    with pytest.raises(UnknownVerifierError) as info:
        get_verifier("nope")
    assert isinstance(info.value, KeyError)
    assert info.value.name == "nope"
    message = str(info.value)
    assert "nope" in message and "math" in message and "arith" in message


def test_unknown_name_becomes_error_label() -> None:
    label = grade_one("\\boxed{1}", "1", "nope", CONFIG)
    assert label.verdict is Verdict.ERROR
    assert "known verifiers" in (label.detail or "")


def test_register_one_function_and_undo() -> None:
    @register("test-always-right")
    def always(completion: str, gold: str, config: GradeConfig) -> Label:
        return Label(reward=config.correct_reward, verdict=Verdict.CORRECT)

    try:
        assert grade_one("x", "y", "test-always-right", CONFIG).verdict is Verdict.CORRECT
        with pytest.raises(ValueError, match="already registered"):
            register("test-always-right")(lambda c, g, k: always(c, g, k))
        register("test-always-right", replace=True)(always)  # deliberate replacement is fine
    finally:
        unregister("test-always-right")
    assert "test-always-right" not in known_verifiers()


def test_verifier_exception_and_bad_return_become_errors() -> None:
    @register("test-buggy")
    def buggy(completion: str, gold: str, config: GradeConfig) -> Label:
        raise ZeroDivisionError("oops")

    @register("test-bad-return")
    def bad_return(completion: str, gold: str, config: GradeConfig) -> Label:
        return 1.0  # type: ignore[return-value]

    try:
        label = grade_one("x", "y", "test-buggy", CONFIG)
        assert label.verdict is Verdict.ERROR and "ZeroDivisionError" in (label.detail or "")
        label = grade_one("x", "y", "test-bad-return", CONFIG)
        assert label.verdict is Verdict.ERROR and "not a Label" in (label.detail or "")
    finally:
        unregister("test-buggy")
        unregister("test-bad-return")


def test_verifiers_receive_sanitised_text() -> None:
    seen: list[str] = []

    @register("test-echo")
    def echo(completion: str, gold: str, config: GradeConfig) -> Label:
        seen.append(completion)
        return Label(reward=0.0, verdict=Verdict.WRONG)

    try:
        grade_one(b"a\x00b\xff", "g", "test-echo", GradeConfig(scan_chars=3))
    finally:
        unregister("test-echo")
    assert seen == ["ab\ufffd"]


def test_plugin_by_path(tmp_path) -> None:
    """A plugin written against the documented import path ``services.verifier.verifiers``."""
    plugin = tmp_path / "my_verifier.py"
    plugin.write_text(
        "from conspo.protocol import Label, Verdict\n"
        "from services.verifier.verifiers import register\n"
        "@register('test-plugin-file')\n"
        "def v(completion, gold, config):\n"
        "    return Label(reward=0.5, verdict=Verdict.WRONG)\n"
    )
    try:
        load_plugin(str(plugin))
        load_plugin(str(plugin))  # idempotent
        assert grade_one("x", "y", "test-plugin-file", CONFIG).reward == 0.5
    finally:
        unregister("test-plugin-file")
