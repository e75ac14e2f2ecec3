"""The generator loop against real Redis with the tiny model: publishing, lineage, dead letters,
admission control, idempotent redos and engine failures."""

from __future__ import annotations

import time
from typing import Any

import pytest

from conspo.flow import CONSUMED, FlowControl
from conspo.lineage import GENERATE
from conspo.protocol import ChatMessage, DeadLetter, Prompt, decode
from conspo.queue import StreamQueue
from conspo.service import ServiceRuntime
from conspo.settings import RunSettings, RunSettingsMismatchError
from conspo.state import RunStore
from conspo.testing import wait_for
from services.generator.backends.base import BackendError
from services.generator.loop import GeneratorLoop
from services.generator.prompting import group_seed

TIMEOUT = 60.0  # generous: the machine is shared


def publish(redis_client, keys, prompts: list[Prompt]) -> list[str]:
    queue = StreamQueue(redis_client, keys, "prompts", Prompt)
    return [queue.publish(p, key=p.prompt_id) for p in prompts]


def arith(i: int) -> Prompt:
    a, b = 10 + i, 20 + 3 * i
    return Prompt(prompt_id=f"p{i}", text=f"{a}+{b}=", answer=str(a + b), verifier="arith")


def dead_letters(redis_client, keys) -> list[DeadLetter]:
    return [decode(f[b"d"], DeadLetter) for _, f in redis_client.xrange(keys.dead)]


def pending_prompts(redis_client, keys) -> int:
    return int(redis_client.xpending(keys.prompts, "generators")["pending"])


def test_prompts_become_rollout_groups_with_lineage(
    hf_backend, run_loop, redis_client, keys, read_rollouts
):
    prompts = [arith(i) for i in range(5)]
    chat = Prompt(
        prompt_id="chat",
        messages=[ChatMessage(role="user", content="40+2=")],
        answer="42",
        verifier="arith",
    )
    entry_ids = publish(redis_client, keys, [*prompts, chat])
    with run_loop(hf_backend, group_size=4) as running:
        assert wait_for(lambda: len(read_rollouts()) == 6, TIMEOUT)
        instance = running.runtime.instance
    tok = hf_backend.tokenizer
    by_group = {g.group_id: (eid, g) for eid, g in read_rollouts()}
    n_tokens = 0
    for entry_id, prompt in zip(entry_ids, [*prompts, chat], strict=True):
        rollout_entry, group = by_group[f"g-{entry_id}"]
        assert group.prompt.prompt_id == prompt.prompt_id
        if prompt.text is not None:
            assert group.prompt_token_ids == tok(prompt.text)["input_ids"]
        else:
            rendered = tok.apply_chat_template(
                [{"role": "user", "content": "40+2="}], add_generation_prompt=True, tokenize=False
            )
            assert group.prompt_token_ids == tok(rendered, add_special_tokens=False)["input_ids"]
        assert len(group.completions) == 4
        assert all(len(c.token_ids) == len(c.logprobs) >= 1 for c in group.completions)
        assert group.policy_version == 0
        assert group.sampling.n == 4 and group.sampling.max_tokens == 8
        assert group.sampling.seed == group_seed(7, entry_id)
        assert group.generator_id == instance
        assert group.gen_seconds > 0
        marker = redis_client.get(keys.done(GENERATE, entry_id))
        assert marker is not None and marker.decode() == rollout_entry
        n_tokens += sum(len(c.token_ids) for c in group.completions)
    assert pending_prompts(redis_client, keys) == 0
    counters = {k.decode(): int(v) for k, v in redis_client.hgetall(keys.counters).items()}
    assert counters["generator.groups"] == 6
    assert counters["generator.completions"] == 24
    assert counters["generator.tokens"] == n_tokens
    registry = running.runtime.registry
    assert registry.get_sample_value("conspo_generator_groups_total") == 6
    assert registry.get_sample_value("conspo_generator_tokens_total") == n_tokens
    assert registry.get_sample_value("conspo_generator_served_version") == 0
    assert 0 < registry.get_sample_value("conspo_generator_batch_occupancy") <= 1
    assert running.runtime.info["groups"] == 6 and running.runtime.info["backend"] == "hf"


def test_unusable_prompts_are_dead_lettered_with_the_reason(
    hf_backend, run_loop, redis_client, keys, read_rollouts
):
    bad = [
        Prompt(prompt_id="long", text="1+" * 100 + "1=", answer="101"),
        Prompt(prompt_id="alien", text="\u00e9+1=", answer="?"),
    ]
    good = arith(1)
    publish(redis_client, keys, [*bad, good])
    with run_loop(hf_backend):
        assert wait_for(lambda: len(dead_letters(redis_client, keys)) == 2, TIMEOUT)
        assert wait_for(lambda: len(read_rollouts()) == 1, TIMEOUT)
    reasons = {d.entry_id: d.reason for d in dead_letters(redis_client, keys)}
    assert any("too long" in r for r in reasons.values())
    assert any("cannot tokenise" in r for r in reasons.values())
    assert all(d.source == "prompts" for d in dead_letters(redis_client, keys))
    assert read_rollouts()[0][1].prompt.prompt_id == good.prompt_id
    assert pending_prompts(redis_client, keys) == 0


def test_flow_control_holds_generation_to_the_learners_budget(
    hf_backend, run_loop, redis_client, keys, read_rollouts
):
    RunStore(redis_client, keys).announce_run(RunSettings(batch_groups=2, max_staleness=0))
    publish(redis_client, keys, [arith(i) for i in range(6)])
    with run_loop(hf_backend, batch_groups=None, max_staleness=None) as running:  # follows
        assert wait_for(lambda: len(read_rollouts()) == 2, TIMEOUT)
        # Nobody consumes: the generator keeps polling but must not produce a third group.
        deadline = time.monotonic() + 1.5
        while time.monotonic() < deadline:
            assert len(read_rollouts()) == 2
            time.sleep(0.05)
        assert running.runtime.status == "waiting"
        redis_client.hincrby(keys.counters, CONSUMED, 2)  # the learner finished one step
        assert wait_for(lambda: len(read_rollouts()) == 4, TIMEOUT)
        time.sleep(0.5)
        assert len(read_rollouts()) == 4
    waited = running.loop.metrics.heartbeat_info()["backpressure_s"]
    assert waited > 1.0


def test_a_waiting_generator_wakes_when_the_learner_consumes_not_at_its_next_poll(
    hf_backend, run_loop, redis_client, keys, read_rollouts
):
    RunStore(redis_client, keys).announce_run(RunSettings(batch_groups=2, max_staleness=0))
    publish(redis_client, keys, [arith(i) for i in range(6)])
    # A 20 s fallback bound: only the learner's wake-up can explain a prompt resumption.
    with run_loop(hf_backend, batch_groups=None, max_staleness=None, poll_ms=20_000) as running:
        assert wait_for(lambda: len(read_rollouts()) == 2, TIMEOUT)
        assert wait_for(lambda: running.runtime.status == "waiting", TIMEOUT)
        time.sleep(0.3)  # inside its wait
        t0 = time.monotonic()
        FlowControl(redis_client, keys, batch_groups=2, max_staleness=0).consumed(2)
        assert wait_for(lambda: len(read_rollouts()) == 4, 15.0)
        assert time.monotonic() - t0 < 15.0


def test_downstream_backlog_stops_the_pulling(
    hf_backend, run_loop, redis_client, keys, read_rollouts
):
    publish(redis_client, keys, [arith(i) for i in range(6)])
    with run_loop(hf_backend, prompts_per_batch=1, max_backlog=2):
        # Checked before each read: backlog 0, 1, 2 admit one more each, 3 > 2 stops.
        assert wait_for(lambda: len(read_rollouts()) == 3, TIMEOUT)
        time.sleep(1.0)
        assert len(read_rollouts()) == 3
        verifiers = StreamQueue(redis_client, keys, "rollouts", Prompt)
        redis_client.xreadgroup("verifiers", "v1", {keys.rollouts: ">"}, count=2)
        redis_client.xack(keys.rollouts, "verifiers", *[e for e, _ in read_rollouts()[:2]])
        assert verifiers.backlog().outstanding == 1
        assert wait_for(lambda: len(read_rollouts()) == 5, TIMEOUT)


def test_prompts_already_generated_are_acked_without_work(
    hf_backend, run_loop, redis_client, keys, read_rollouts
):
    first, second = publish(redis_client, keys, [arith(1), arith(2)])
    redis_client.set(keys.done(GENERATE, first), "0-1")  # another generator committed it
    with run_loop(hf_backend):
        assert wait_for(lambda: len(read_rollouts()) == 1, TIMEOUT)
        assert wait_for(lambda: pending_prompts(redis_client, keys) == 0, TIMEOUT)
    assert read_rollouts()[0][1].group_id == f"g-{second}"
    assert redis_client.get(keys.done(GENERATE, first)) == b"0-1"


class PoisonedEngine:
    """Delegates to the real engine but fails on every batch that holds one given prompt."""

    def __init__(self, inner: Any, poison: list[int]) -> None:
        self.inner = inner
        self.poison = poison
        self.name = inner.name
        self.tokenizer = inner.tokenizer
        self.max_model_len = inner.max_model_len
        self.receives_broadcast = False
        self.calls = 0

    def generate(self, prompts, params, *, stop_event=None):
        self.calls += 1
        if any(list(p) == self.poison for p in prompts):
            raise BackendError("CUDA error: an illegal memory access (simulated)")
        return self.inner.generate(prompts, params, stop_event=stop_event)

    def load_weights(self, named_tensors):
        self.inner.load_weights(named_tensors)

    def load_checkpoint(self, path):
        self.inner.load_checkpoint(path)

    def close(self):
        pass


def test_a_failing_prompt_is_isolated_then_dead_lettered(
    hf_backend, run_loop, redis_client, keys, read_rollouts
):
    poison = arith(3)
    engine = PoisonedEngine(hf_backend, hf_backend.tokenizer(poison.text)["input_ids"])
    ids = publish(redis_client, keys, [arith(1), arith(2), poison, arith(4)])
    with run_loop(engine, max_deliveries=3, visibility_timeout_s=0.2):
        assert wait_for(lambda: len(read_rollouts()) == 3, TIMEOUT)
        assert wait_for(lambda: len(dead_letters(redis_client, keys)) == 1, TIMEOUT)
        assert wait_for(lambda: pending_prompts(redis_client, keys) == 0, TIMEOUT)
    letter = dead_letters(redis_client, keys)[0]
    assert letter.entry_id == ids[2]
    assert "illegal memory access" in letter.reason
    assert letter.deliveries == 3
    assert {g.prompt.prompt_id for _, g in read_rollouts()} == {"p1", "p2", "p4"}


def test_stopping_releases_prompts_read_but_not_started(
    hf_backend, settings_for, redis_client, keys
):
    settings = settings_for()
    runtime = ServiceRuntime(settings, "generator")
    loop = GeneratorLoop(runtime, settings, hf_backend)
    publish(redis_client, keys, [arith(1), arith(2)])
    deliveries = loop.prompts.read(loop.instance, count=2, block_ms=100)
    assert len(deliveries) == 2
    runtime.request_stop()  # what SIGTERM does
    assert loop.process(deliveries) == 0
    owners = {
        c["name"].decode(): int(c["pending"])
        for c in redis_client.xinfo_consumers(keys.prompts, "generators")
    }
    assert owners.get("released") == 2  # any generator's next read reclaims them
    assert owners.get(loop.instance, 0) == 0
    assert redis_client.xlen(keys.rollouts) == 0
    runtime.client.close()


def test_no_prompts_yet_is_not_an_error_and_errors_clear_once_it_works_again(
    hf_backend, run_loop, redis_client, keys
):
    from conspo.protocol import Heartbeat

    with run_loop(hf_backend, heartbeat_s=0.2) as running:
        runtime = running.runtime
        # Started before anything exists: it polls an empty, not-yet-created stream quietly.
        time.sleep(1.0)
        assert (runtime.last_error, runtime.error_count) == (None, 0)
        # Something else sits under the prompts key: the error names the stream.
        redis_client.delete(keys.prompts)
        redis_client.set(keys.prompts, "not a stream")
        assert wait_for(lambda: runtime.error_count > 0, TIMEOUT)
        assert keys.prompts in (runtime.last_error or ""), runtime.last_error
        redis_client.delete(keys.prompts)
        # It works again: the error clears; its count and time stay in the heartbeat.
        assert wait_for(lambda: runtime.last_error is None, TIMEOUT)
        publish(redis_client, keys, [arith(0)])
        assert wait_for(lambda: redis_client.exists(keys.rollouts), TIMEOUT)

        runtime.beat()  # (the fixture's runtime has no heartbeat thread)
        beat = decode(
            redis_client.hget(keys.heartbeats, f"generator:{runtime.instance}"), Heartbeat
        )
        assert beat.last_error is None
        assert beat.info["errors"] == runtime.error_count >= 1
        assert beat.info["last_error_at"] <= time.time()


def test_the_generator_publishes_what_it_serves_for_the_apis_checks(
    hf_backend, settings_for, redis_client, keys
):
    from pathlib import Path

    from conspo.serving import read_served_model
    from services.generator.main import publish_serving

    settings = settings_for()
    runtime = ServiceRuntime(settings, "generator")
    try:
        publish_serving(runtime, settings, hf_backend)
    finally:
        runtime.client.close()
    served = read_served_model(redis_client, keys)
    assert served is not None
    assert (served.max_model_len, served.instance) == (hf_backend.max_model_len, runtime.instance)
    assert served.tokenizer_path is not None
    assert (Path(served.tokenizer_path) / "tokenizer.json").is_file()
    longest = max(len(t) for t in hf_backend.tokenizer.get_vocab())
    assert served.max_token_chars == longest
    assert runtime.info["max_model_len"] == hf_backend.max_model_len


def test_a_generator_held_back_by_flow_control_says_so(hf_backend, settings_for, keys, caplog):
    settings = settings_for(max_staleness=0)
    runtime = ServiceRuntime(settings, "generator")
    try:
        runtime.store.announce_run(RunSettings(batch_groups=2, max_staleness=0))
        runtime.store.set_fields(policy_version=3)
        loop = GeneratorLoop(runtime, settings, hf_backend, served_version=1)
        caplog.set_level("INFO", logger="services.generator.loop")
        loop._say_why_no_budget(100.0)
        loop._say_why_no_budget(105.0)
        assert "no generation budget" not in caplog.text  # quiet for the first 10 s
        loop._say_why_no_budget(111.0)
        assert (
            "no generation budget for 11 s (serving v1, learner at v3, max_staleness 0): waiting "
            "for the learner to consume what is in flight or for newer weights" in caplog.text
        )
        loop._say_why_no_budget(130.0)
        assert caplog.text.count("no generation budget") == 1  # at most once a minute
    finally:
        runtime.client.close()


def test_a_following_generator_waits_for_the_learner_to_announce_its_limits(
    hf_backend, run_loop, redis_client, keys, read_rollouts
):
    publish(redis_client, keys, [arith(i) for i in range(4)])
    with run_loop(hf_backend, batch_groups=None, max_staleness=None) as running:
        time.sleep(1.0)
        assert read_rollouts() == [] and running.runtime.status == "waiting"
        RunStore(redis_client, keys).announce_run(RunSettings(batch_groups=1, max_staleness=1))
        assert wait_for(lambda: len(read_rollouts()) == 2, TIMEOUT)  # (s + 1) * B


def test_a_generator_whose_own_limits_disagree_with_the_learner_stops_naming_both(
    hf_backend, run_loop, redis_client, keys, read_rollouts
):
    RunStore(redis_client, keys).announce_run(RunSettings(batch_groups=2, max_staleness=0))
    publish(redis_client, keys, [arith(i) for i in range(4)])
    with (
        pytest.raises(RunSettingsMismatchError) as caught,
        run_loop(hf_backend, batch_groups=50, max_staleness=0) as running,
    ):
        assert wait_for(lambda: not running.thread.is_alive(), TIMEOUT)
    assert "batch_groups: this generator has 50" in str(caught.value)
    assert "the learner announced 2" in str(caught.value)
    assert read_rollouts() == []  # nothing generated under the wrong limits
