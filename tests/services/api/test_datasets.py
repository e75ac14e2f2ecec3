"""POST/GET /v1/datasets: every benchmark file loads with a mapping alone; the feeder tops the
prompts stream up under backpressure and resumes across restarts and replicas exactly once."""

from __future__ import annotations

import json
import os

import pytest

from conspo.protocol import Prompt, decode
from conspo.queue import StreamQueue
from conspo.testing import wait_for

# file -> (mapping, rows, the first row's gold answer as the file states it)
BENCHMARKS = {
    "math500.jsonl": (
        {"prompt_field": "problem", "answer_field": "answer"},
        500,
        r"\left( 3, \frac{\pi}{2} \right)",
    ),
    "aime24.jsonl": (
        {"prompt_field": "problem", "answer_field": "answer", "id_field": "id"},
        30,
        "204",
    ),
    "amc23.jsonl": ({"prompt_field": "question", "answer_field": "answer"}, 40, "27"),
    "gsm8k.jsonl": (
        {"prompt_field": "question", "answer_field": "answer", "answer_after": "#### "},
        1319,
        "18",
    ),
    "olympiadbench.jsonl": (
        {"prompt_field": "question", "answer_field": "final_answer", "id_field": "id"},
        675,
        "2",
    ),
    "minerva_math.jsonl": (
        {"prompt_field": "problem", "answer_field": "solution", "answer_boxed": True},
        272,
        "1.6",
    ),
}
TEMPLATE = "{prompt}\n\nPut the final answer in \\boxed{}."


def prompts_in_stream(redis_client, keys) -> list[Prompt]:
    return [decode(f[b"d"], Prompt) for _, f in redis_client.xrange(keys.prompts)]


def first_fed_prompt(server, redis_client, keys) -> Prompt:
    assert wait_for(lambda: redis_client.xlen(keys.prompts) > 0, timeout=20)
    return prompts_in_stream(redis_client, keys)[0]


@pytest.mark.parametrize("name", sorted(BENCHMARKS))
def test_every_benchmark_file_loads_from_a_server_path(
    start_api, shared_data, redis_client, keys, name
):
    mapping, rows, first_answer = BENCHMARKS[name]
    server = start_api(dataset_roots=[shared_data], feed_max_backlog=1)
    spec = {"path": name, **mapping, "shuffle": False, "template": TEMPLATE, "epochs": 2}
    response = server.http.post("/v1/datasets", json=spec)
    assert response.status_code == 201, response.text
    info = response.json()
    assert info["rows"] == rows
    assert info["rejected_count"] == 0 and info["rejected"] == []
    assert info["total"] == 2 * rows and info["source"] == "path" and info["epochs"] == 2
    prompt = first_fed_prompt(server, redis_client, keys)
    assert prompt.answer == first_answer
    with open(shared_data / name) as f:
        row = json.loads(f.readline())
    question = row[mapping["prompt_field"]]
    assert prompt.text == f"{question}\n\nPut the final answer in \\boxed{{}}."
    assert prompt.dataset == info["dataset_id"]
    assert prompt.metadata["epoch"] == 0
    if "id_field" in mapping:
        assert prompt.metadata["row_id"] == str(row["id"])
    got = server.http.get(f"/v1/datasets/{info['dataset_id']}").json()
    assert got["fed"] == 1 and got["epoch"] == 0 and got["position"] == 1


def test_upload_as_multipart_and_as_raw_jsonl(api, shared_data):
    data = (shared_data / "gsm8k.jsonl").read_bytes()
    multipart = api.http.post(
        "/v1/datasets",
        files={"file": ("gsm8k.jsonl", data, "application/x-ndjson")},
        data={
            "prompt_field": "question",
            "answer_field": "answer",
            "answer_regex": r"####\s*([-0-9.,]+)",
            "metadata_fields": "idx",
            "dataset_id": "gsm8k-up",
            "epochs": "3",
        },
    )
    assert multipart.status_code == 201, multipart.text
    info = multipart.json()
    assert (info["dataset_id"], info["name"], info["source"]) == ("gsm8k-up", "gsm8k", "upload")
    assert (info["rows"], info["total"], info["rejected_count"]) == (1319, 3 * 1319, 0)

    raw = api.http.post(
        "/v1/datasets",
        content=data,
        headers={"Content-Type": "application/x-ndjson"},
        params={"prompt_field": "question", "answer_field": "answer", "answer_after": "####"},
    )
    assert raw.status_code == 201, raw.text
    assert raw.json()["rows"] == 1319
    listed = api.http.get("/v1/datasets").json()["datasets"]
    assert {d["dataset_id"] for d in listed} == {"gsm8k-up", raw.json()["dataset_id"]}


def test_rejected_rows_are_reported_with_line_and_reason(start_api, redis_client, keys):
    server = start_api(feeder_enabled=False)
    lines = [
        json.dumps({"q": "1+1", "a": 2}),
        "{not json",
        json.dumps({"q": "no answer"}),
        json.dumps({"q": "list answer", "a": ["x", "y"]}),
        "",
        json.dumps(["not", "an", "object"]),
        json.dumps({"q": "nested answer", "a": {"v": 1}}),
        json.dumps({"q": "nan", "a": 1.5}),
    ]
    response = server.http.post(
        "/v1/datasets",
        content="\n".join(lines).encode(),
        headers={"Content-Type": "application/x-ndjson"},
        params={"prompt_field": "q", "answer_field": "a", "answer_join": ", "},
    )
    assert response.status_code == 201, response.text
    info = response.json()
    assert info["rows"] == 3 and info["rejected_count"] == 4
    reasons = {r["line"]: r["reason"] for r in info["rejected"]}
    assert set(reasons) == {2, 3, 6, 7}
    assert "not JSON" in reasons[2]
    assert "'a' is missing" in reasons[3]
    assert "JSON object" in reasons[6]
    assert "dict" in reasons[7]


def test_a_dataset_without_any_valid_row_is_refused(api, error_of):
    response = api.http.post(
        "/v1/datasets",
        json={"rows": [{"x": 1}, {"y": 2}], "prompt_field": "q", "answer_field": "a"},
    )
    error = error_of(response, 422, "no_valid_rows")
    assert len(error["details"]) == 2


def test_paths_outside_the_dataset_roots_are_refused(start_api, shared_data, tmp_path, error_of):
    root = tmp_path / "root"
    root.mkdir()
    (root / "ok.jsonl").write_text(json.dumps({"q": "1+1", "a": "2"}) + "\n")
    (tmp_path / "secret.jsonl").write_text(json.dumps({"q": "s", "a": "s"}) + "\n")
    os.symlink(tmp_path / "secret.jsonl", root / "link.jsonl")
    server = start_api(dataset_roots=[root])
    mapping = {"prompt_field": "q", "answer_field": "a"}
    post = lambda path: server.http.post("/v1/datasets", json={"path": path, **mapping})  # noqa: E731
    assert post("ok.jsonl").status_code == 201
    assert post(str(root / "ok.jsonl")).status_code == 201
    for path in (
        "../secret.jsonl",
        str(tmp_path / "secret.jsonl"),
        "link.jsonl",
        "/etc/passwd",
        "sub/../../secret.jsonl",
        str(shared_data / "gsm8k.jsonl"),
    ):
        error_of(post(path), 403, "path_not_allowed")
    error_of(post("missing.jsonl"), 404, "file_not_found")
    error_of(post("."), 404, "file_not_found")
    unrooted = start_api()
    error_of(
        unrooted.http.post("/v1/datasets", json={"path": "ok.jsonl", **mapping}),
        403,
        "path_loading_disabled",
    )


def test_dataset_request_errors(api, error_of):
    mapping = {"prompt_field": "q", "answer_field": "a"}
    rows = [{"q": "1+1", "a": "2"}]
    assert api.http.post("/v1/datasets", json={"rows": rows, "dataset_id": "d1", **mapping})
    error_of(
        api.http.post("/v1/datasets", json={"rows": rows, "dataset_id": "d1", **mapping}),
        409,
        "dataset_exists",
    )
    error_of(api.http.post("/v1/datasets", json={"rows": rows}), 422, "validation_error")
    error_of(api.http.post("/v1/datasets", json=mapping), 422, "validation_error")
    error_of(
        api.http.post("/v1/datasets", json={"rows": rows, "answer_regex": "(", **mapping}),
        422,
        "validation_error",
    )
    error_of(
        api.http.post("/v1/datasets", content=b"x", headers={"Content-Type": "image/png"}),
        415,
        "unsupported_media_type",
    )
    error_of(
        api.http.post(
            "/v1/datasets",
            content=b"{bad",
            headers={"Content-Type": "application/json"},
        ),
        400,
        "malformed_json",
    )
    error_of(
        api.http.post("/v1/datasets", data=mapping, files={"other": ("f", b"x")}),
        422,
        "validation_error",
    )
    error_of(
        api.http.post(
            "/v1/datasets",
            content=b"--xyz\r\nbroken",
            headers={"Content-Type": "multipart/form-data; boundary=xyz"},
        ),
        400,
        "malformed_multipart",
    )
    error_of(api.http.get("/v1/datasets/nope"), 404, "unknown_dataset")


def test_an_upload_above_max_body_bytes_is_413(start_api, shared_data, error_of):
    server = start_api(max_body_bytes=64 * 1024)
    data = (shared_data / "gsm8k.jsonl").read_bytes()
    assert len(data) > 64 * 1024
    response = server.http.post(
        "/v1/datasets",
        files={"file": ("gsm8k.jsonl", data)},
        data={"prompt_field": "question", "answer_field": "answer"},
    )
    error_of(response, 413, "payload_too_large")


def test_mapped_rows_are_bounded_too(start_api, error_of):
    server = start_api(max_body_bytes=4096)
    rows = [{"q": str(i), "a": str(i)} for i in range(5)]
    spec = {"rows": rows, "prompt_field": "q", "answer_field": "a", "template": "x" * 2000}
    response = server.http.post("/v1/datasets", json=spec)
    error = error_of(response, 413, "dataset_too_large")
    assert "8192" in error["message"]  # 2 x max_body_bytes
    assert server.http.get("/v1/datasets").json()["datasets"] == []


def test_the_feeder_respects_backpressure(start_api, shared_data, redis_client, keys):
    server = start_api(feed_max_backlog=10, feed_batch=4)
    created = server.http.post(
        "/v1/datasets",
        files={"file": ("math500.jsonl", (shared_data / "math500.jsonl").read_bytes())},
        data={"prompt_field": "problem", "answer_field": "answer", "seed": "7"},
    ).json()
    assert wait_for(lambda: redis_client.xlen(keys.prompts) >= 10, timeout=20)
    # nobody consumes: many more ticks must not add anything
    assert not wait_for(lambda: redis_client.xlen(keys.prompts) > 10, timeout=1.0)
    assert redis_client.xlen(keys.prompts) == 10

    generators = StreamQueue(redis_client, keys, "prompts", Prompt)
    taken = generators.read("gen-test", count=6, block_ms=None)
    assert len(taken) == 6
    # delivered but unacknowledged entries still count against the bound
    assert not wait_for(lambda: redis_client.xlen(keys.prompts) > 10, timeout=0.5)
    generators.ack(*taken)
    assert wait_for(lambda: redis_client.xlen(keys.prompts) == 16, timeout=20)
    assert not wait_for(lambda: redis_client.xlen(keys.prompts) > 16, timeout=0.5)
    info = server.http.get(f"/v1/datasets/{created['dataset_id']}").json()
    assert (info["fed"], info["epoch"], info["position"], info["total"]) == (16, 0, 16, 500)
    assert info["state"] == "ready"
    prompts = prompts_in_stream(redis_client, keys)
    row_ids = [p.metadata["row_id"] for p in prompts]
    assert len(set(row_ids)) == 16
    assert row_ids != sorted(row_ids, key=int)  # shuffled


def test_a_batch_bound_tick_goes_again_at_once(start_api, redis_client, keys):
    # 5 prompts a tick, 60 of room, a 2 s interval: one tick per interval would take 24 s; a
    # tick that the batch (not the room) cut short is followed by the next one at once, so the
    # room fills within the first interval after the dataset lands.
    server = start_api(feed_max_backlog=60, feed_batch=5, feed_interval_s=2.0)
    rows = [{"q": f"{i}+1", "a": str(i + 1)} for i in range(200)]
    spec = {"rows": rows, "prompt_field": "q", "answer_field": "a"}
    assert server.http.post("/v1/datasets", json=spec).status_code == 201
    assert wait_for(lambda: redis_client.xlen(keys.prompts) >= 60, timeout=6)
    assert not wait_for(lambda: redis_client.xlen(keys.prompts) > 60, timeout=0.5)


def drain(redis_client, keys) -> None:
    queue = StreamQueue(redis_client, keys, "prompts", Prompt)
    while taken := queue.read("drain", count=100, block_ms=None):
        queue.ack(*taken)


def test_a_restarted_api_resumes_without_refeeding_or_skipping(start_api, redis_client, keys):
    rows = [{"q": f"{i}+1", "a": str(i + 1), "id": f"r{i}"} for i in range(25)]
    spec = {"rows": rows, "prompt_field": "q", "answer_field": "a", "id_field": "id"}
    first = start_api(feed_max_backlog=10, feed_batch=3)
    dataset_id = first.http.post("/v1/datasets", json={**spec, "epochs": 2}).json()["dataset_id"]
    assert wait_for(lambda: redis_client.xlen(keys.prompts) == 10, timeout=20)
    first.stop()  # releases its feeder lock on the way out
    drain(redis_client, keys)

    second = start_api(feed_max_backlog=10, feed_batch=3)
    queue = StreamQueue(redis_client, keys, "prompts", Prompt)
    while redis_client.xlen(keys.prompts) < 50:
        assert wait_for(
            lambda: queue.backlog().outstanding > 0 or redis_client.xlen(keys.prompts) == 50,
            timeout=20,
        )
        drain(redis_client, keys)
    assert not wait_for(lambda: redis_client.xlen(keys.prompts) > 50, timeout=0.5)
    ids = [p.prompt_id for p in prompts_in_stream(redis_client, keys)]
    assert len(ids) == len(set(ids)) == 50
    for epoch in (0, 1):
        assert sorted(i for i in ids if i.endswith(f":{epoch}")) == sorted(
            f"{dataset_id}:r{i}:{epoch}" for i in range(25)
        )
    info = second.http.get(f"/v1/datasets/{dataset_id}").json()
    assert (info["fed"], info["epoch"], info["state"]) == (50, 2, "finished")


def test_two_replicas_feed_one_dataset_exactly_once(start_api, redis_client, keys):
    rows = [{"q": f"{i}+2", "a": str(i + 2)} for i in range(60)]
    a = start_api(feed_max_backlog=1000, feed_batch=2, feed_lock_ttl_s=0.3)
    b = start_api(feed_max_backlog=1000, feed_batch=2, feed_lock_ttl_s=0.3)
    created = a.http.post(
        "/v1/datasets", json={"rows": rows, "prompt_field": "q", "answer_field": "a"}
    ).json()
    assert wait_for(lambda: redis_client.xlen(keys.prompts) >= 60, timeout=30)
    assert not wait_for(lambda: redis_client.xlen(keys.prompts) > 60, timeout=0.5)
    ids = [p.prompt_id for p in prompts_in_stream(redis_client, keys)]
    assert len(set(ids)) == 60
    assert b.http.get(f"/v1/datasets/{created['dataset_id']}").json()["state"] == "finished"


def test_the_same_seed_gives_the_same_order_and_no_shuffle_keeps_file_order(
    start_api, redis_client, keys
):
    rows = [{"q": f"{i}+3", "a": str(i + 3)} for i in range(30)]
    server = start_api(feed_max_backlog=1000)
    base = {"rows": rows, "prompt_field": "q", "answer_field": "a"}
    for dataset_id, extra in (
        ("s1", {"seed": 5}),
        ("s2", {"seed": 5}),
        ("s3", {"seed": 6}),
        ("plain", {"shuffle": False}),
    ):
        assert (
            server.http.post("/v1/datasets", json={**base, **extra, "dataset_id": dataset_id})
        ).status_code == 201
    assert wait_for(lambda: redis_client.xlen(keys.prompts) >= 120, timeout=30)
    order: dict[str, list[str]] = {}
    for prompt in prompts_in_stream(redis_client, keys):
        order.setdefault(prompt.dataset, []).append(prompt.metadata["row_id"])
    assert order["plain"] == [str(i) for i in range(1, 31)]
    assert order["s1"] == order["s2"] != order["s3"]
    assert sorted(order["s1"], key=int) == order["plain"]
