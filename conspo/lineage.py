"""How a group's path through the pipeline is recorded, so the api can tell its story.

Every stage commits through an idempotency marker ``done:<stage>:<item>`` (see conspo.queue);
the marker's value says what happened:

- ``generate`` / item = the prompt's entry id in ``prompts`` -> the rollout's entry id;
- ``verify``   / item = group id -> the labelled entry's id in ``labeled``;
- ``learn``    / item = group id -> ``trained:<step>``, ``skipped:<reason>``, ``dropped:<reason>``.

Group ids are derived from the prompt entry (``g-<entry id>``): a prompt entry that two generators
both sample (one died before committing) yields one group id, and the marker lets only one win.
"""

from __future__ import annotations

from typing import Literal

GENERATE, VERIFY, LEARN = "generate", "verify", "learn"
Outcome = Literal["trained", "skipped", "dropped"]


def group_id_for(prompt_entry_id: str) -> str:
    return f"g-{prompt_entry_id}"


def prompt_entry_of(group_id: str) -> str | None:
    return group_id[2:] if group_id.startswith("g-") else None


def learn_marker(outcome: Outcome, detail: str | int) -> str:
    return f"{outcome}:{detail}"


def parse_learn_marker(value: str) -> tuple[str, str]:
    outcome, _, detail = value.partition(":")
    return outcome, detail
