"""GET /v1/accounting: the books of the run, as conspo.accounting keeps them.

Prompts enter through the real POST /v1/prompts and move through the real stream commits each
stage uses (commit with an idempotency marker, the learner's mark-and-ack with its tally); the
route must find each one's fate, and show a prompt acknowledged without any output as lost and a
group trained twice as duplicated.
"""

from __future__ import annotations

from conspo.lineage import GENERATE, LEARN, VERIFY, group_id_for, learn_marker
from conspo.protocol import Prompt
from conspo.queue import StreamQueue


def _queue(client, keys, name: str) -> StreamQueue[Prompt]:
    # The books only count entries and markers, so every stage carries the prompt itself.
    return StreamQueue(client, keys, name, Prompt)


def test_books_follow_each_prompt_and_catch_losses_and_duplicates(api, redis_client, keys):
    body = {"prompts": [{"text": f"{i}+1", "answer": str(i + 1)} for i in range(3)]}
    assert api.http.post("/v1/prompts", json=body).status_code == 202
    prompts = _queue(redis_client, keys, "prompts")
    rollouts = _queue(redis_client, keys, "rollouts")
    labeled = _queue(redis_client, keys, "labeled")

    first, second, _third = prompts.read("gen-a", count=3, block_ms=None)
    group = group_id_for(first.entry_id)
    prompts.commit(
        first, stage=GENERATE, item=first.entry_id, outputs=[(rollouts, first.message, group)]
    )
    (rollout,) = rollouts.read("ver-a", count=1, block_ms=None)
    rollouts.commit(rollout, stage=VERIFY, item=group, outputs=[(labeled, rollout.message, group)])
    (label,) = labeled.read("learner-a", count=1, block_ms=None)
    labeled.mark_and_ack([(label, group, learn_marker("trained", 1))], stage=LEARN)
    prompts.ack(second)  # acknowledged with no output: the one way to lose a prompt

    response = api.http.get("/v1/accounting")
    assert response.status_code == 200, response.text
    assert response.json() == {
        "submitted": 3,
        "generated": 1,
        "labelled": 1,
        "trained": 1,
        "skipped": 0,
        "dropped": 0,
        "dead": 0,
        "queued_prompts": 1,  # the third one, still pending with gen-a
        "queued_rollouts": 0,
        "queued_labeled": 0,
        "lost": 1,
        "duplicated": 0,
    }

    # The same group recorded again with another outcome is a second training of it.
    labeled.mark_and_ack([(label, group, learn_marker("trained", 2))], stage=LEARN)
    assert api.http.get("/v1/accounting").json()["duplicated"] == 1


def test_books_of_an_empty_run_balance(api):
    books = api.http.get("/v1/accounting").json()
    assert books["submitted"] == 0 and books["lost"] == 0 and books["duplicated"] == 0
