"""Property-based conformance: schemathesis generates requests (valid and invalid) from the
OpenAPI schema the live server serves, and checks that no response is a 5xx and that every
status, content type, header and body matches what the schema declares.

Schemathesis's pytest integration (``from_fixture``) does not run under pytest 9, so the test
drives its Python API directly: one Hypothesis run per operation and generation mode.
"""

from __future__ import annotations

import schemathesis
from hypothesis import HealthCheck, given, settings
from hypothesis.errors import Unsatisfiable
from schemathesis import GenerationMode
from schemathesis.checks import (
    content_type_conformance,
    not_a_server_error,
    response_headers_conformance,
    response_schema_conformance,
    status_code_conformance,
)

CHECKS = [
    not_a_server_error,
    status_code_conformance,
    content_type_conformance,
    response_schema_conformance,
    response_headers_conformance,
]
# Examples per operation: every valid-data run gets 30, the invalid-data runs (which mostly
# exercise the 422 path) 15, to keep the whole test well under a minute on a busy 2-core box.
MAX_EXAMPLES = {GenerationMode.POSITIVE: 30, GenerationMode.NEGATIVE: 15}


def test_api_conforms_to_its_schema(start_api, shared_data, token):
    server = start_api(dataset_roots=[shared_data], max_body_bytes=256 * 1024)
    schema = schemathesis.openapi.from_url(f"{server.url}/openapi.json")
    headers = {"Authorization": f"Bearer {token}"}
    operations = [result.ok() for result in schema.get_all_operations()]
    labels = {op.label for op in operations}
    assert {"POST /v1/prompts", "POST /v1/datasets", "GET /v1/rollouts/{group_id}"} <= labels
    failures: list[str] = []
    calls = 0
    for operation in operations:
        for mode in (GenerationMode.POSITIVE, GenerationMode.NEGATIVE):

            @given(case=operation.as_strategy(generation_mode=mode))
            @settings(
                max_examples=MAX_EXAMPLES[mode],
                deadline=None,
                suppress_health_check=list(HealthCheck),
                database=None,
                derandomize=True,
            )
            def run(case: schemathesis.Case) -> None:
                nonlocal calls
                calls += 1
                case.call_and_validate(base_url=server.url, headers=headers, checks=CHECKS)

            try:
                run()
            except Unsatisfiable:
                continue  # no invalid input exists (an operation without parameters or body)
            except Exception as exc:  # collect every operation's failure, then report them all
                failures.append(f"{operation.label} [{mode.value}]: {exc}"[:2000])

    assert not failures, "\n\n".join(failures)
    assert calls >= len(operations) * 2
