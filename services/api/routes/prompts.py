"""POST /v1/prompts: validate, refuse what can only fail later (``services.api.admission``),
convert to ``conspo.protocol.Prompt``, publish (once per key, once per prompt id)."""

from __future__ import annotations

from typing import Annotated

from fastapi import Depends, Header, Response
from pydantic import ValidationError

from conspo.protocol import Prompt, new_id
from services.api.admission import Admission
from services.api.auth import v1_router
from services.api.context import AppContext, get_ctx
from services.api.errors import ApiError, error_responses, validation_details
from services.api.publish import fingerprint
from services.api.schemas import (
    PromptBatch,
    PromptIn,
    PromptsAccepted,
    PromptSubmission,
    answer_text,
)

router = v1_router(tags=["prompts"])

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
def submit_prompts(
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
    admit(ctx, items)
    try:
        prompts = [to_prompt(item) for item in items]
    except ValidationError as exc:
        raise ApiError(
            422, "validation_error", "invalid prompt", validation_details(exc.errors())
        ) from None
    fps = [fingerprint(item.model_dump(mode="json", exclude={"prompt_id"})) for item in items]
    if idempotency_key is None:
        result = ctx.publisher.publish(prompts, fps)
    else:
        fp = fingerprint([item.model_dump(mode="json") for item in items])
        result = ctx.publisher.publish(prompts, fps, key=idempotency_key, fp=fp)
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


def admit(ctx: AppContext, items: list[PromptIn]) -> None:
    """422 with the first refused prompt's reason (``services.api.admission``)."""
    admission = Admission.read(ctx.client, ctx.keys, ctx.settings.verifiers)
    for i, item in enumerate(items):
        contents = [m.content for m in item.messages] if item.messages is not None else None
        refusal = admission.check_prompt(
            item.text, contents, answer_text(item.answer)
        ) or admission.check_verifier(item.verifier)
        if refusal is not None:
            where = f"prompt {i}: " if len(items) > 1 else ""
            raise ApiError(
                422,
                refusal.code,
                where + refusal.message,
                [{"loc": ["body", "prompts", str(i), refusal.field], "msg": refusal.message,
                  "type": refusal.code}],
            )  # fmt: skip
