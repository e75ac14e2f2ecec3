"""GET /v1/rollouts/{group_id}: one group's path through the pipeline, while Redis retains it.

Follows ``conspo.lineage``: the group id names its prompt entry (``g-<entry id>``); the
``generate`` marker of that entry names the rollout entry, the ``verify`` marker of the group the
labelled entry, and the ``learn`` marker says ``trained:<step>``, ``skipped:<reason>`` or
``dropped:<reason>``. Stream entries may have been trimmed while markers remain (or the reverse
for the newest entries); whatever is still there is shown, with notes for what is not. The
``dead`` stream is scanned from its newest entry backwards, at most ``dead_scan_limit`` entries,
for letters about this group's prompt, rollout or labelled entry.
"""

from __future__ import annotations

import math
from typing import Annotated

from fastapi import Depends, Path

from conspo.lineage import GENERATE, LEARN, VERIFY, parse_learn_marker, prompt_entry_of
from conspo.protocol import DeadLetter, LabeledGroup, M, Prompt, RolloutGroup
from conspo.queue import Entry, markers, parse_entry_id
from services.api.auth import v1_router
from services.api.context import AppContext, get_ctx
from services.api.errors import ApiError, error_responses
from services.api.redact import redact
from services.api.schemas import (
    CompletionView,
    DeadLetterView,
    LabeledView,
    LearnView,
    RolloutLineage,
    RolloutView,
)

router = v1_router(tags=["lineage"])
TEXT_LIMIT = 16_000


def _finite(value: float) -> float | None:
    return value if math.isfinite(value) else None


def read_entry(
    ctx: AppContext, stream: str, entry_id: str, kind: type[M], notes: list[str]
) -> M | None:
    if parse_entry_id(entry_id) is None:
        return None
    entry = ctx.queue(stream, kind).get(entry_id)
    if entry is not None and entry.message is None:
        notes.append(f"{stream} entry {entry_id} is undecodable: {redact(entry.error)[:300]}")
    return entry.message if entry is not None else None


def dead_letter_view(entry: Entry[DeadLetter]) -> DeadLetterView:
    letter = entry.message
    if letter is None:
        return DeadLetterView(
            dead_entry_id=entry.entry_id,
            source="?",
            entry_id="",
            key=entry.key,
            reason=f"undecodable dead letter: {redact(entry.error)[:300]}",
            deliveries=0,
            consumer="",
        )
    return DeadLetterView(
        dead_entry_id=entry.entry_id,
        source=letter.source,
        entry_id=letter.entry_id,
        key=entry.key,
        reason=redact(letter.reason),
        deliveries=letter.deliveries,
        consumer=letter.consumer,
        at=letter.at,
    )


def _completions(rollout: RolloutGroup, labeled: LabeledGroup | None) -> list[CompletionView]:
    out = []
    for i, completion in enumerate(rollout.completions):
        label = labeled.labels[i] if labeled is not None and i < len(labeled.labels) else None
        out.append(
            CompletionView(
                index=i,
                text=completion.text[:TEXT_LIMIT],
                text_truncated=len(completion.text) > TEXT_LIMIT,
                num_tokens=len(completion.token_ids),
                finish_reason=completion.finish_reason,
                reward=_finite(label.reward) if label else None,
                verdict=label.verdict.value if label else None,
                extracted=label.extracted if label else None,
                detail=label.detail if label else None,
            )
        )
    return out


def lineage(ctx: AppContext, group_id: str) -> RolloutLineage:
    prompt_entry = prompt_entry_of(group_id)
    if prompt_entry is None or parse_entry_id(prompt_entry) is None:
        raise ApiError(
            404,
            "unknown_group",
            f"{group_id[:100]!r} is not a group id (expected g-<prompt entry id>)",
        )
    notes: list[str] = []
    generated, verified, learned = markers(
        ctx.client,
        ctx.keys,
        [(GENERATE, prompt_entry), (VERIFY, group_id), (LEARN, group_id)],
    )

    prompt = read_entry(ctx, "prompts", prompt_entry, Prompt, notes)
    rollout_view: RolloutView | None = None
    labeled_view: LabeledView | None = None
    labeled = read_entry(ctx, "labeled", verified, LabeledGroup, notes) if verified else None
    rollout = read_entry(ctx, "rollouts", generated, RolloutGroup, notes) if generated else None
    if rollout is None and labeled is not None:
        rollout = labeled.rollout  # the labelled entry carries the whole rollout
    if prompt is None and rollout is not None:
        prompt = rollout.prompt
        notes.append("prompt entry no longer retained; prompt taken from the rollout")
    if generated is not None or rollout is not None:
        rollout_view = RolloutView(
            entry_id=generated or None,
            retained=rollout is not None,
            policy_version=rollout.policy_version if rollout else None,
            generator_id=rollout.generator_id if rollout else None,
            sampling=rollout.sampling if rollout else None,
            gen_seconds=rollout.gen_seconds if rollout else None,
            prompt_tokens=len(rollout.prompt_token_ids) if rollout else None,
            created_at=rollout.created_at if rollout else None,
            completions=_completions(rollout, labeled) if rollout else [],
        )
        if rollout is None:
            notes.append("rollout entry no longer retained")
    if verified is not None:
        rewards = [_finite(r) for r in labeled.rewards] if labeled else []
        finite = [r for r in rewards if r is not None]
        labeled_view = LabeledView(
            entry_id=verified or None,
            retained=labeled is not None,
            verifier_id=labeled.verifier_id if labeled else None,
            verify_seconds=labeled.verify_seconds if labeled else None,
            rewards=finite if len(finite) == len(rewards) else [],
            verdicts=[label.verdict.value for label in labeled.labels] if labeled else [],
            reward_mean=sum(finite) / len(finite) if finite else None,
        )
        if labeled is None:
            notes.append("labelled entry no longer retained")
    learn_view: LearnView | None = None
    if learned is not None:
        outcome, detail = parse_learn_marker(learned)
        learn_view = LearnView(
            outcome=outcome,
            step=int(detail) if outcome == "trained" and detail.isdigit() else None,
            reason=detail if outcome != "trained" else None,
            marker=learned,
        )

    dead = _dead_letters(ctx, group_id, prompt_entry, prompt, generated, verified)
    if prompt is None and not any((generated, verified, learned, dead)):
        raise ApiError(
            404,
            "unknown_group",
            f"group {group_id!r} is unknown or no longer retained",
        )
    if learn_view is not None and learn_view.outcome in ("trained", "skipped", "dropped"):
        stage = learn_view.outcome
    elif dead and verified is None:
        stage = "dead"
    elif verified is not None:
        stage = "labeled"
    elif generated is not None:
        stage = "dead" if dead else "generated"
    else:
        stage = "dead" if dead else "queued"
    return RolloutLineage(
        group_id=group_id,
        prompt_entry_id=prompt_entry,
        stage=stage,
        prompt=prompt,
        rollout=rollout_view,
        labeled=labeled_view,
        learn=learn_view,
        dead_letters=dead,
        notes=notes,
    )


def _dead_letters(
    ctx: AppContext,
    group_id: str,
    prompt_entry: str,
    prompt: Prompt | None,
    rollout_entry: str | None,
    labeled_entry: str | None,
) -> list[DeadLetterView]:
    wanted_keys = {group_id, prompt_entry}
    if prompt is not None:
        wanted_keys.add(prompt.prompt_id)
    wanted_entries = {("prompts", prompt_entry)}
    if rollout_entry:
        wanted_entries.add(("rollouts", rollout_entry))
    if labeled_entry:
        wanted_entries.add(("labeled", labeled_entry))
    found = []
    for entry in ctx.dead.newest(ctx.settings.dead_scan_limit):
        view = dead_letter_view(entry)
        if entry.key in wanted_keys or (view.source, view.entry_id) in wanted_entries:
            found.append(view)
    return found


@router.get(
    "/rollouts/{group_id}",
    response_model=RolloutLineage,
    summary="Lineage of one rollout group: prompt, completions, verdicts, training outcome",
    responses=error_responses(401, 404, 503),
)
def get_rollout(
    group_id: Annotated[str, Path(max_length=200, description="`g-<prompt entry id>`")],
    ctx: Annotated[AppContext, Depends(get_ctx)],
) -> RolloutLineage:
    return lineage(ctx, group_id)
