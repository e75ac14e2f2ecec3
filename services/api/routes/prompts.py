"""POST /v1/prompts: validate, convert to ``conspo.protocol.Prompt``, publish (once per key)."""

from __future__ import annotations

from typing import Annotated

from fastapi import Depends, Header, Response
from pydantic import ValidationError

from conspo.protocol import Prompt, new_id
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
        **error_responses(400, 401, 413, 422, 503),
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
    try:
        prompts = [to_prompt(item) for item in items]
    except ValidationError as exc:
        raise ApiError(
            422, "validation_error", "invalid prompt", validation_details(exc.errors())
        ) from None
    publisher = ctx.publisher
    if idempotency_key is None:
        result = publisher.publish(prompts)
    else:
        fp = fingerprint([item.model_dump(mode="json") for item in items])
        result = publisher.publish_once(idempotency_key, fp, prompts)
    if result.replayed:
        response.headers["Idempotent-Replayed"] = "true"
    else:
        ctx.metrics.prompts_accepted.labels("request").inc(len(result.entry_ids))
    return PromptsAccepted(
        count=len(result.entry_ids), prompt_ids=result.prompt_ids, entry_ids=result.entry_ids
    )
