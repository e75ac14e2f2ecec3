"""A data row as a training prompt and its gold answer: the one mapping the api and eval share.

The api's dataset loader maps every JSONL row with these functions, and ``conspo eval`` (and the
learner's held-out evaluation) map benchmark rows with them too, so a question becomes the same
``Prompt`` (then the same ids, ``conspo.prompting.encode_prompt``) in training and in evaluation,
and its gold answer is read the same way.

- ``PromptFormat``: the question optionally goes through a ``template`` (``{prompt}`` is the
  question, ``{name}`` any field of the row, ``{{``/``}}`` literal braces; other braces such as
  ``\\boxed{}`` stay as written); with a ``system_prompt`` or ``chat`` the result becomes chat
  messages (system, then one user turn), else plain text.
- ``gold_answer``: a field that may be a number (AMC's ``27.0`` -> ``"27"``), a list
  (OlympiadBench: first item, or joined), a full solution whose last ``\\boxed{}`` is the answer
  (Minerva), or text whose answer follows a marker (GSM8K's ``#### ``). The boxed answer is found
  by the verifier's own extractor (``conspo.grading.extract``), so gold and completions are read
  by one brace matcher.

Every failure is a ``RowError`` naming the field; the api turns it into a rejected row.
"""

from __future__ import annotations

import math
import re
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from conspo.grading.extract import last_boxed
from conspo.protocol import ChatMessage, Prompt

_PLACEHOLDER = re.compile(r"\{\{|\}\}|\{([A-Za-z_][A-Za-z0-9_]*)\}")
# Reference solutions rarely hold more than a few boxes; later ones win, empty ones are skipped.
_GOLD_BOX_CANDIDATES = 20


class RowError(ValueError):
    """This row cannot become a prompt; the message says why."""


def field_text(value: Any, what: str) -> str:
    """A scalar field as text (``27.0`` -> ``"27"``); ``RowError`` for anything else."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        if not math.isfinite(value):
            raise RowError(f"{what} is not a finite number")
        return str(int(value)) if value.is_integer() and abs(value) < 1e16 else repr(value)
    if isinstance(value, str):
        return value
    raise RowError(f"{what} is a {type(value).__name__}, expected text or a number")


def render_template(template: str, prompt: str, row: dict[str, Any]) -> str:
    """``template`` with ``{prompt}`` and ``{field}`` substituted and ``{{``/``}}`` unescaped."""

    def substitute(match: re.Match[str]) -> str:
        token = match.group(0)
        if token == "{{":
            return "{"
        if token == "}}":
            return "}"
        name = match.group(1)
        if name == "prompt":
            return prompt
        if name not in row or row[name] is None:
            raise RowError(f"template field {name!r} is missing")
        return field_text(row[name], f"template field {name!r}")

    return _PLACEHOLDER.sub(substitute, template)


class PromptFormat(BaseModel):
    """How a row's question becomes a prompt: an optional template, then text or chat."""

    model_config = ConfigDict(extra="forbid", frozen=True)

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
        description="Prompts become chat messages (one user turn) even without a system prompt.",
    )

    def render(self, prompt: str, row: dict[str, Any] | None = None) -> dict[str, Any]:
        """``{"text": ...}`` or ``{"messages": [...]}``: the two forms of a ``Prompt``."""
        text = prompt
        if self.template is not None:
            text = render_template(self.template, prompt, row or {})
        if self.system_prompt is None and not self.chat:
            return {"text": text}
        messages = []
        if self.system_prompt is not None:
            messages.append({"role": "system", "content": self.system_prompt})
        messages.append({"role": "user", "content": text})
        return {"messages": messages}

    def prompt(
        self, prompt_id: str, question: str, answer: str, verifier: str, row: dict | None = None
    ) -> Prompt:
        """The ``Prompt`` the api's dataset feeder publishes for this row."""
        fields = self.render(question, row)
        messages = fields.get("messages")
        return Prompt(
            prompt_id=prompt_id,
            text=fields.get("text"),
            messages=[ChatMessage(**m) for m in messages] if messages else None,
            answer=answer,
            verifier=verifier,
        )


class AnswerField(BaseModel):
    """Where a row's gold answer is and how to read it."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    answer_field: str
    answer_boxed: bool = False
    answer_after: str | None = None
    answer_join: str | None = None


def gold_answer(row: dict[str, Any], spec: AnswerField) -> str:
    """The gold answer of ``row`` (not yet stripped of a regex or checked for emptiness)."""
    value = row.get(spec.answer_field)
    if value is None:
        raise RowError(f"answer field {spec.answer_field!r} is missing")
    if isinstance(value, list):
        items = [field_text(v, "answer item") for v in value if v is not None]
        if not items:
            raise RowError(f"answer field {spec.answer_field!r} is an empty list")
        text = spec.answer_join.join(items) if spec.answer_join is not None else items[0]
    else:
        text = field_text(value, f"answer field {spec.answer_field!r}")
    if spec.answer_boxed:
        boxed = last_boxed(text, _GOLD_BOX_CANDIDATES)
        if boxed is None:
            raise RowError(f"no \\boxed{{}} answer in field {spec.answer_field!r}")
        text = boxed
    if spec.answer_after is not None:
        at = text.rfind(spec.answer_after)
        if at < 0:
            raise RowError(f"marker {spec.answer_after!r} not found in the answer field")
        text = text[at + len(spec.answer_after) :].strip()
        text = text.splitlines()[0] if text else ""
    return text.strip()
