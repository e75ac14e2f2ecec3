"""POST /v1/datasets (upload or server-side path), GET /v1/datasets[/{id}] (progress)."""

from __future__ import annotations

import contextlib
import json
import time
from pathlib import Path
from typing import Annotated, Any

from fastapi import Depends, Query, Request
from pydantic import ValidationError
from starlette.concurrency import run_in_threadpool

from conspo.protocol import new_id
from services.api.admission import Admission
from services.api.auth import v1_router
from services.api.context import AppContext, get_ctx
from services.api.datasets.mapping import LoadResult, Mapper, load_inline, load_jsonl
from services.api.datasets.sources import parse_multipart, resolve_path
from services.api.datasets.store import serialize_rows
from services.api.errors import ApiError, error_responses, validation_details
from services.api.schemas import DatasetInfo, DatasetList, DatasetQuery, DatasetSpec

router = v1_router(tags=["datasets"])

JSONL_TYPES = frozenset(
    {
        "application/x-ndjson",
        "application/jsonl",
        "application/jsonlines",
        "application/x-jsonlines",
        "application/octet-stream",
        "text/plain",
    }
)
_LIST_FIELDS = {"metadata_fields"}
STORED_BYTES_FACTOR = 2


def _form_schema() -> dict[str, Any]:
    schema = DatasetSpec.model_json_schema()
    properties = {k: v for k, v in schema["properties"].items() if k not in ("path", "rows")}
    properties["file"] = {"type": "string", "format": "binary", "description": "The JSONL file"}
    return {
        "type": "object",
        "properties": properties,
        "required": ["file", "prompt_field", "answer_field"],
    }


def _json_schema() -> dict[str, Any]:
    schema = DatasetSpec.model_json_schema()
    schema.pop("title", None)
    return schema


REQUEST_BODY = {
    "requestBody": {
        "required": True,
        "description": "A JSON spec naming a server-side `path` (under `dataset_roots`) or inline "
        "`rows`; or a multipart upload (`file` plus the spec as form fields); or the raw JSONL "
        "file with the spec in query parameters.",
        "content": {
            "application/json": {"schema": _json_schema()},
            "multipart/form-data": {"schema": _form_schema()},
            "application/x-ndjson": {"schema": {"type": "string", "format": "binary"}},
        },
    }
}


def _spec_fields(query: DatasetQuery) -> dict[str, Any]:
    return query.model_dump(exclude_none=True)


def _form_fields(fields: dict[str, list[str]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for name, values in fields.items():
        if name in _LIST_FIELDS:
            out[name] = [v.strip() for value in values for v in value.split(",") if v.strip()]
        else:
            out[name] = values[-1]
    return out


def _validate_spec(data: dict[str, Any]) -> DatasetSpec:
    try:
        return DatasetSpec.model_validate(data)
    except ValidationError as exc:
        raise ApiError(
            422, "validation_error", "invalid dataset spec", validation_details(exc.errors())
        ) from None


def _check_regex(spec: DatasetSpec) -> None:
    try:
        Mapper(spec)
    except ValueError as exc:
        raise ApiError(
            422, "validation_error", str(exc), [{"loc": ["answer_regex"], "msg": str(exc)}]
        ) from None


def create(ctx: AppContext, body: bytes, content_type: str, query: DatasetQuery) -> DatasetInfo:
    settings = ctx.settings
    media = content_type.split(";", 1)[0].strip().lower()
    base = _spec_fields(query)
    data: bytes | None = None
    source, path_text, name_hint = "upload", None, None
    if media == "application/json":
        try:
            doc = json.loads(body)
        except ValueError as exc:
            raise ApiError(400, "malformed_json", f"the request body is not JSON: {exc}") from None
        if not isinstance(doc, dict):
            raise ApiError(422, "validation_error", "the JSON body must be an object")
        spec = _validate_spec({**base, **doc})
        if (spec.path is None) == (spec.rows is None):
            raise ApiError(
                422,
                "validation_error",
                "a JSON body names exactly one of `path` (a server-side file) or `rows`; "
                "upload a file as multipart/form-data or as a raw JSONL body",
            )
        if spec.path is not None:
            real = resolve_path(spec.path, settings.dataset_roots)
            size = real.stat().st_size
            if size > settings.max_body_bytes:
                raise ApiError(
                    413,
                    "dataset_too_large",
                    f"{spec.path} is {size} bytes; datasets are limited to max_body_bytes "
                    f"({settings.max_body_bytes}) because their rows are stored in Redis",
                )
            data = real.read_bytes()
            source, path_text, name_hint = "path", spec.path, Path(spec.path).stem
        else:
            source = "inline"
    elif media == "multipart/form-data":
        form = parse_multipart(body, content_type)
        upload = form.files.get("file")
        if upload is None:
            raise ApiError(
                422,
                "validation_error",
                "multipart upload without a `file` part",
                [{"loc": ["body", "file"], "msg": "field required", "type": "missing"}],
            )
        name_hint, data = Path(upload[0]).stem or None, upload[1]
        spec = _validate_spec({**base, **_form_fields(form.fields)})
    elif media in JSONL_TYPES:
        data = body
        spec = _validate_spec(base)
    else:
        raise ApiError(
            415,
            "unsupported_media_type",
            f"Content-Type {media or '(none)'!r} is not accepted: send application/json, "
            "multipart/form-data or application/x-ndjson",
        )
    if source != "path" and spec.path is not None:
        raise ApiError(422, "validation_error", "`path` is only accepted in a JSON body")
    _check_regex(spec)
    if data is not None and not data.strip():
        raise ApiError(422, "empty_dataset", "the dataset file is empty")
    admission = Admission.read(ctx.client, ctx.keys, settings.verifiers)
    refusal = admission.check_verifier(spec.verifier)
    if refusal is not None:
        raise ApiError(
            422, refusal.code, refusal.message, [{"loc": ["verifier"], "msg": refusal.message}]
        )

    def check(row: dict[str, Any]) -> str | None:
        contents = [m["content"] for m in row["messages"]] if "messages" in row else None
        refused = admission.check_prompt(row.get("text"), contents, row["answer"])
        return refused.message if refused else None

    limit = settings.max_dataset_rows
    if data is not None:
        result: LoadResult = load_jsonl(data, spec, limit, check)
    else:
        result = load_inline(spec.rows or [], spec, limit, check)
    if len(result.rows) > limit:
        raise ApiError(413, "dataset_too_large", f"more than {limit} valid rows (max_dataset_rows)")
    if not result.rows:
        raise ApiError(
            422,
            "no_valid_rows",
            f"none of the rows could be mapped ({result.rejected_count} rejected)",
            [
                {"loc": ["line", str(r.line)], "msg": r.reason, "type": "rejected_row"}
                for r in result.rejected[:20]
            ],
        )
    serialized = serialize_rows(result.rows)
    stored_bytes = sum(len(row) for row in serialized)
    if stored_bytes > STORED_BYTES_FACTOR * settings.max_body_bytes:
        # a long template times many rows can grow a small upload past what Redis should hold
        raise ApiError(
            413,
            "dataset_too_large",
            f"the mapped rows take {stored_bytes} bytes; the limit is {STORED_BYTES_FACTOR} x "
            f"max_body_bytes ({STORED_BYTES_FACTOR * settings.max_body_bytes})",
        )
    dataset_id = spec.dataset_id or new_id("ds")
    meta = {
        "dataset_id": dataset_id,
        "name": spec.name or name_hint or dataset_id,
        "source": source,
        "path": path_text,
        "verifier": spec.verifier,
        "rows": len(result.rows),
        "rejected_count": result.rejected_count,
        "rejected": [r.model_dump() for r in result.rejected],
        "epochs": spec.epochs,
        "seed": spec.seed,
        "shuffle": spec.shuffle,
        "created_at": time.time(),
    }
    store = ctx.datasets
    if not store.reserve(dataset_id, meta):
        raise ApiError(409, "dataset_exists", f"a dataset with id {dataset_id!r} already exists")
    try:
        store.write_rows(dataset_id, serialized)
        store.publish_ready(dataset_id, meta)
    except BaseException:
        # If Redis is gone the half-made dataset stays `loading`, which the feeder ignores.
        with contextlib.suppress(Exception):
            store.discard(dataset_id)
        raise
    stored = store.meta(dataset_id) or {**meta, "state": "ready"}
    return store.info(stored)


@router.post(
    "/datasets",
    status_code=201,
    response_model=DatasetInfo,
    summary="Register a dataset (upload or server-side path); the feeder publishes it lazily",
    responses=error_responses(400, 401, 403, 404, 409, 413, 415, 422, 503),
    openapi_extra=REQUEST_BODY,
)
async def create_dataset(
    request: Request,
    query: Annotated[DatasetQuery, Query()],
    ctx: Annotated[AppContext, Depends(get_ctx)],
) -> DatasetInfo:
    body = await request.body()
    content_type = request.headers.get("content-type", "")
    return await run_in_threadpool(create, ctx, body, content_type, query)


@router.get(
    "/datasets",
    response_model=DatasetList,
    summary="All datasets of the run with their feeding progress",
    responses=error_responses(401, 503),
)
def list_datasets(ctx: Annotated[AppContext, Depends(get_ctx)]) -> DatasetList:
    store = ctx.datasets
    return DatasetList(datasets=[store.info(m) for m in store.all_meta()])


@router.get(
    "/datasets/{dataset_id}",
    response_model=DatasetInfo,
    summary="One dataset's feeding progress (fed, total, epoch)",
    responses=error_responses(401, 404, 503),
)
def get_dataset(dataset_id: str, ctx: Annotated[AppContext, Depends(get_ctx)]) -> DatasetInfo:
    meta = ctx.datasets.meta(dataset_id)
    if meta is None:
        raise ApiError(404, "unknown_dataset", f"no dataset {dataset_id!r} in this run")
    return ctx.datasets.info(meta)
