"""A data row as a prompt and a gold answer: templates, chat forms, answer fields."""

from __future__ import annotations

import pytest

from conspo.rows import AnswerField, PromptFormat, RowError, gold_answer, render_template


def test_plain_text_is_the_question_itself():
    assert PromptFormat().render("1+1=") == {"text": "1+1="}


def test_template_substitutes_prompt_and_fields_and_keeps_other_braces():
    fmt = PromptFormat(template="[{subject}] {prompt} Put it in \\boxed{}. {{literal}}")
    out = fmt.render("What is 2+2?", {"subject": "Algebra"})
    assert out == {"text": "[Algebra] What is 2+2? Put it in \\boxed{}. {literal}"}


def test_a_missing_template_field_is_a_row_error():
    with pytest.raises(RowError, match="template field 'level' is missing"):
        render_template("{level}: {prompt}", "q", {})


def test_system_prompt_or_chat_gives_messages():
    assert PromptFormat(system_prompt="Be brief.").render("q") == {
        "messages": [
            {"role": "system", "content": "Be brief."},
            {"role": "user", "content": "q"},
        ]
    }
    assert PromptFormat(chat=True).render("q") == {"messages": [{"role": "user", "content": "q"}]}


def test_prompt_builds_the_feeders_prompt():
    p = PromptFormat(chat=True, template="{prompt}!").prompt("id1", "hi", "3", "math")
    assert p.text is None
    assert [(m.role, m.content) for m in p.messages] == [("user", "hi!")]
    assert (p.answer, p.verifier) == ("3", "math")


@pytest.mark.parametrize(
    ("value", "spec", "expected"),
    [
        (27.0, AnswerField(answer_field="a"), "27"),
        (2.5, AnswerField(answer_field="a"), "2.5"),
        (["$2$", "$3$"], AnswerField(answer_field="a"), "$2$"),
        (["2", "3"], AnswerField(answer_field="a", answer_join=", "), "2, 3"),
        ("so $\\boxed{1.6}$ cm", AnswerField(answer_field="a", answer_boxed=True), "1.6"),
        ("x = 5\n#### 1,450 \nmore", AnswerField(answer_field="a", answer_after="#### "), "1,450"),
    ],
)
def test_gold_answer_forms(value, spec, expected):
    assert gold_answer({"a": value}, spec) == expected


@pytest.mark.parametrize(
    ("row", "spec", "reason"),
    [
        ({}, AnswerField(answer_field="a"), "is missing"),
        ({"a": []}, AnswerField(answer_field="a"), "empty list"),
        ({"a": {"x": 1}}, AnswerField(answer_field="a"), "is a dict"),
        ({"a": float("nan")}, AnswerField(answer_field="a"), "not a finite number"),
        ({"a": "no box"}, AnswerField(answer_field="a", answer_boxed=True), "no \\\\boxed"),
        ({"a": "12"}, AnswerField(answer_field="a", answer_after="####"), "not found"),
    ],
)
def test_gold_answer_errors_name_the_problem(row, spec, reason):
    with pytest.raises(RowError, match=reason):
        gold_answer(row, spec)
