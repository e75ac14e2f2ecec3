"""GET /v1/rollouts/{group_id} and /v1/dead, on groups built the way the stages build them."""

from __future__ import annotations

from conspo.lineage import GENERATE, LEARN, VERIFY, group_id_for, learn_marker
from conspo.protocol import (
    Completion,
    Label,
    LabeledGroup,
    Prompt,
    RolloutGroup,
    SamplingParams,
    Verdict,
)
from conspo.queue import StreamQueue


class Pipeline:
    """The stages' writes, by hand: generate -> verify -> learn through StreamQueue.commit."""

    def __init__(self, client, keys) -> None:
        self.prompts = StreamQueue(client, keys, "prompts", Prompt)
        self.rollouts = StreamQueue(client, keys, "rollouts", RolloutGroup)
        self.labeled = StreamQueue(client, keys, "labeled", LabeledGroup)

    def submit(self, prompt_id: str) -> str:
        prompt = Prompt(prompt_id=prompt_id, text=f"{prompt_id}: 2+3?", answer="5")
        return self.prompts.publish(prompt, prompt_id)

    def generate(self, version: int = 4) -> RolloutGroup:
        (delivery,) = self.prompts.read("gen-1", count=1, block_ms=None)
        group_id = group_id_for(delivery.entry_id)
        group = RolloutGroup(
            group_id=group_id,
            prompt=delivery.message,
            prompt_token_ids=[1, 2, 3, 4],
            completions=[
                Completion(
                    token_ids=[5, 6, 7],
                    logprobs=[-0.1, -0.2, -0.3],
                    text="\\boxed{5}",
                    finish_reason="stop",
                ),
                Completion(
                    token_ids=[8] * 9,
                    logprobs=[-1.0] * 9,
                    text="it is 6 and",
                    finish_reason="length",
                ),
            ],
            policy_version=version,
            sampling=SamplingParams(n=2, temperature=0.8),
            generator_id="gen-1",
        )
        self.prompts.commit(
            delivery,
            stage=GENERATE,
            item=delivery.entry_id,
            outputs=[(self.rollouts, group, group_id)],
        )
        return group

    def verify(self) -> LabeledGroup:
        (delivery,) = self.rollouts.read("ver-1", count=1, block_ms=None)
        labeled = LabeledGroup(
            rollout=delivery.message,
            labels=[
                Label(reward=1.0, verdict=Verdict.CORRECT, extracted="5"),
                Label(reward=0.0, verdict=Verdict.NO_ANSWER),
            ],
            verifier_id="ver-1",
        )
        self.rollouts.commit(
            delivery,
            stage=VERIFY,
            item=delivery.message.group_id,
            outputs=[(self.labeled, labeled, delivery.message.group_id)],
        )
        return labeled

    def learn(self, marker: str) -> None:
        (delivery,) = self.labeled.read("learn-1", count=1, block_ms=None)
        self.labeled.mark_and_ack([(delivery, delivery.message.group_id, marker)], stage=LEARN)


def test_the_lineage_of_a_trained_group(api, redis_client, keys):
    pipeline = Pipeline(redis_client, keys)
    entry = pipeline.submit("trained-1")
    group = pipeline.generate(version=4)
    assert group.group_id == f"g-{entry}"
    pipeline.verify()
    pipeline.learn(learn_marker("trained", 17))

    response = api.http.get(f"/v1/rollouts/{group.group_id}")
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["group_id"] == group.group_id and body["prompt_entry_id"] == entry
    assert body["stage"] == "trained"
    assert body["prompt"]["prompt_id"] == "trained-1"
    assert body["prompt"]["text"] == "trained-1: 2+3?"
    rollout = body["rollout"]
    assert rollout["retained"] is True and rollout["policy_version"] == 4
    assert rollout["generator_id"] == "gen-1" and rollout["prompt_tokens"] == 4
    assert rollout["sampling"]["temperature"] == 0.8
    first, second = rollout["completions"]
    assert (first["text"], first["num_tokens"], first["finish_reason"]) == ("\\boxed{5}", 3, "stop")
    assert (first["verdict"], first["reward"], first["extracted"]) == ("correct", 1.0, "5")
    assert (second["num_tokens"], second["finish_reason"], second["verdict"]) == (
        9,
        "length",
        "no_answer",
    )
    labeled = body["labeled"]
    assert labeled["verifier_id"] == "ver-1" and labeled["rewards"] == [1.0, 0.0]
    assert labeled["verdicts"] == ["correct", "no_answer"] and labeled["reward_mean"] == 0.5
    assert body["learn"] == {
        "outcome": "trained",
        "step": 17,
        "reason": None,
        "marker": "trained:17",
    }
    assert body["dead_letters"] == []


def test_each_stage_of_a_group_in_flight(api, redis_client, keys):
    pipeline = Pipeline(redis_client, keys)
    entry = pipeline.submit("flight")
    gid = group_id_for(entry)
    assert api.http.get(f"/v1/rollouts/{gid}").json()["stage"] == "queued"
    pipeline.generate()
    body = api.http.get(f"/v1/rollouts/{gid}").json()
    assert body["stage"] == "generated" and body["labeled"] is None
    assert body["rollout"]["completions"][0]["verdict"] is None
    pipeline.verify()
    assert api.http.get(f"/v1/rollouts/{gid}").json()["stage"] == "labeled"
    pipeline.learn(learn_marker("skipped", "all rewards equal"))
    body = api.http.get(f"/v1/rollouts/{gid}").json()
    assert body["stage"] == "skipped"
    assert body["learn"]["reason"] == "all rewards equal" and body["learn"]["step"] is None


def test_a_trimmed_prompt_and_rollout_are_recovered_from_the_labelled_entry(
    api, redis_client, keys
):
    pipeline = Pipeline(redis_client, keys)
    entry = pipeline.submit("trimmed")
    group = pipeline.generate()
    pipeline.verify()
    pipeline.learn(learn_marker("dropped", "stale by 3 versions"))
    rollout_entry = redis_client.get(keys.done(GENERATE, entry)).decode()
    redis_client.xdel(keys.prompts, entry)
    redis_client.xdel(keys.rollouts, rollout_entry)
    body = api.http.get(f"/v1/rollouts/{group.group_id}").json()
    assert body["stage"] == "dropped" and body["learn"]["reason"] == "stale by 3 versions"
    assert body["prompt"]["prompt_id"] == "trimmed"
    assert body["rollout"]["entry_id"] == rollout_entry
    assert body["rollout"]["policy_version"] == 4
    assert any("prompt" in note for note in body["notes"])


def test_a_dead_lettered_group_shows_the_reason(api, redis_client, keys):
    pipeline = Pipeline(redis_client, keys)
    entry = pipeline.submit("poison")
    (delivery,) = pipeline.prompts.read("gen-1", count=1, block_ms=None)
    pipeline.prompts.fail(delivery, "tokenizer exploded", retry=False)
    body = api.http.get(f"/v1/rollouts/{group_id_for(entry)}").json()
    assert body["stage"] == "dead"
    (letter,) = body["dead_letters"]
    assert letter["source"] == "prompts" and letter["entry_id"] == entry
    assert letter["reason"] == "tokenizer exploded" and letter["key"] == "poison"

    dead = api.http.get("/v1/dead").json()
    assert dead["count"] == 1
    (item,) = dead["items"]
    assert item["reason"] == "tokenizer exploded" and item["source"] == "prompts"
    assert item["deliveries"] == 1 and "payload" not in item


def test_dead_letters_page_newest_first(api, redis_client, keys):
    pipeline = Pipeline(redis_client, keys)
    for i in range(5):
        pipeline.submit(f"d{i}")
    for i in range(5):
        (delivery,) = pipeline.prompts.read("gen-1", count=1, block_ms=None)
        pipeline.prompts.fail(delivery, f"reason {i}", retry=False)
    page = api.http.get("/v1/dead", params={"limit": 3}).json()
    assert [x["reason"] for x in page["items"]] == ["reason 4", "reason 3", "reason 2"]
    rest = api.http.get("/v1/dead", params={"limit": 3, "before": page["next_before"]}).json()
    assert [x["reason"] for x in rest["items"]] == ["reason 1", "reason 0"]
    assert rest["next_before"] is None


def test_unknown_groups_are_404_with_a_reason(api, error_of):
    for gid in ("g-1-0", "g-99999999999-0", "nonsense", "g-abc"):
        error = error_of(api.http.get(f"/v1/rollouts/{gid}"), 404, "unknown_group")
        assert "group" in error["message"]
    error_of(api.http.get("/v1/dead", params={"limit": 0}), 422, "validation_error")
    error_of(api.http.get("/v1/dead", params={"before": "x"}), 422, "validation_error")
