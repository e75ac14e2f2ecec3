"""POST /v1/prompts: validate, refuse what can only fail later (``services.api.admission``),
convert to ``conspo.protocol.Prompt``, publish (once per key, once per prompt id).

The route is ``async`` on the app's async Redis client, holding no thread, so the event loop
keeps many requests waiting on Redis at once instead of queueing them for FastAPI's thread pool;
and it costs one round trip, the publish script: the admission (what the workers serve) is kept
between requests and the script confirms it is still current (``services.api.publish``), so it
is re-read only when a worker changed it (issue 18). The CPU work in between (validation,
fingerprints, msgpack) is short and bounded by ``max_prompts_per_request``."""

from __future__ import annotations

from typing import Annotated

from fastapi import Depends, Header, Response
from pydantic import ValidationError

from conspo.protocol import Prompt, new_id
from services.api.admission import Admission, Refusal
from services.api.auth import v1_router
from services.api.context import AppContext, get_ctx
from services.api.errors import ApiError, error_responses, validation_details
from services.api.publish import StaleAdmissionError, fingerprint
from services.api.schemas import (
    PromptBatch,
    PromptIn,
    PromptsAccepted,
    PromptSubmission,
    answer_text,
)

router = v1_router(tags=["prompts"])
_STALE_RETRIES = 3  # publishes against a re-read admission before giving up on the basis check

IdempotencyKey = Annotated[
    str | None,
    Header(
        alias="Idempotency-Key",
        min_length=1,
        max_length=255,
        pattern=r"^[\x21-\x7e]+$",
        description="Retries with the same key replay the first response and never enqueue "
        "twice; the same key with a different body is refused (422).",
    ),
]


def to_prompt(item: PromptIn) -> Prompt:
    return Prompt(
        prompt_id=item.prompt_id or new_id("p"),
        text=item.text,
        messages=item.messages,
        answer=answer_text(item.answer),
        verifier=item.verifier,
        dataset=item.dataset,
        metadata=item.metadata,
    )


@router.post(
    "/prompts",
    status_code=202,
    response_model=PromptsAccepted,
    summary="Enqueue one or many training prompts",
    responses={
        **error_responses(400, 401, 409, 413, 422, 503),
        202: {
            "description": "Published to the `prompts` stream (or replayed for a known key)",
            "headers": {
                "Idempotent-Replayed": {
                    "description": "`true` when this is the stored response of an earlier "
                    "request with the same Idempotency-Key",
                    "schema": {"type": "string"},
                }
            },
        },
    },
)
async def submit_prompts(
    body: PromptSubmission,
    response: Response,
    ctx: Annotated[AppContext, Depends(get_ctx)],
    idempotency_key: IdempotencyKey = None,
) -> PromptsAccepted:
    items = body.prompts if isinstance(body, PromptBatch) else [body]
    limit = ctx.settings.max_prompts_per_request
    if len(items) > limit:
        raise ApiError(
            422,
            "too_many_prompts",
            f"{len(items)} prompts in one request; the limit is {limit} "
            "(max_prompts_per_request): split the batch or upload a dataset",
        )
    seen: set[str] = set()
    for i, item in enumerate(items):
        if item.prompt_id is not None:
            if item.prompt_id in seen:
                raise ApiError(
                    422,
                    "duplicate_prompt_id",
                    f"prompt_id {item.prompt_id!r} appears more than once in the request",
                    [{"loc": ["body", "prompts", str(i), "prompt_id"], "msg": "duplicate"}],
                )
            seen.add(item.prompt_id)
    admission = await admit(ctx, items)
    try:
        prompts = [to_prompt(item) for item in items]
    except ValidationError as exc:
        raise ApiError(
            422, "validation_error", "invalid prompt", validation_details(exc.errors())
        ) from None
    fps = [fingerprint(item.model_dump(mode="json", exclude={"prompt_id"})) for item in items]
    fp = "" if idempotency_key is None else fingerprint([i.model_dump(mode="json") for i in items])
    for _ in range(_STALE_RETRIES):
        try:
            result = await ctx.publisher.apublish(
                prompts, fps, key=idempotency_key, fp=fp, basis=admission.basis
            )
            break
        except StaleAdmissionError:  # a worker published since: check against what it says
            admission = await admit(ctx, items, fresh=True)
    else:  # still changing under us: checked against a read just now, publish unconditionally
        result = await ctx.publisher.apublish(prompts, fps, key=idempotency_key, fp=fp)
    if result.replayed:
        response.headers["Idempotent-Replayed"] = "true"
    elif result.enqueued:
        ctx.metrics.prompts_accepted.labels("request").inc(result.enqueued)
    return PromptsAccepted(
        count=len(result.entry_ids),
        prompt_ids=result.prompt_ids,
        entry_ids=result.entry_ids,
        replayed=result.known,
    )


async def admit(ctx: AppContext, items: list[PromptIn], *, fresh: bool = False) -> Admission:
    """422 with the first refused prompt's reason (``services.api.admission``); returns the
    admission the items passed. The app keeps the last one it read (``ctx.admission``): the
    publish script confirms its basis is current, and a refusal is only given after a fresh
    read agrees, so keeping it never changes an answer."""
    admission = None if fresh else ctx.admission
    if admission is None:
        admission = await _read_admission(ctx)
        fresh = True
    refusal = _first_refusal(admission, items)
    if refusal is not None and not fresh:
        admission = await _read_admission(ctx)
        refusal = _first_refusal(admission, items)
    if refusal is not None:
        i, r = refusal
        where = f"prompt {i}: " if len(items) > 1 else ""
        raise ApiError(
            422,
            r.code,
            where + r.message,
            [{"loc": ["body", "prompts", str(i), r.field], "msg": r.message, "type": r.code}],
        )
    return admission


async def _read_admission(ctx: AppContext) -> Admission:
    assert ctx.aclient is not None  # AppContext always builds one
    ctx.admission = await Admission.aread(ctx.aclient, ctx.keys, ctx.settings.verifiers)
    return ctx.admission


def _first_refusal(admission: Admission, items: list[PromptIn]) -> tuple[int, Refusal] | None:
    for i, item in enumerate(items):
        contents = [m.content for m in item.messages] if item.messages is not None else None
        refusal = admission.check_prompt(
            item.text, contents, answer_text(item.answer)
        ) or admission.check_verifier(item.verifier)
        if refusal is not None:
            return i, refusal
    return None
