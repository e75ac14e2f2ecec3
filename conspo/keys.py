"""Redis key names for one run: every key any process reads or writes is named here.

Every key of a run shares the hash tag ``{run}`` so that on Redis Cluster they live in one slot:
the Lua commit script touches the input stream, the idempotency marker and the output stream in
one atomic call, which cluster mode only allows within a slot. Keeping every name in this one
class is what lets ``everything`` (the pattern of the whole run) and the tests that wipe a run
be sure they found all of it.
"""

from __future__ import annotations

from dataclasses import dataclass

# stream -> the one consumer group that works it
STREAM_GROUPS: dict[str, str] = {
    "prompts": "generators",
    "rollouts": "verifiers",
    "labeled": "learners",
}


@dataclass(frozen=True)
class Keys:
    run: str = "default"
    prefix: str = "conspo"

    @property
    def base(self) -> str:
        return f"{self.prefix}:{{{self.run}}}"

    def stream(self, name: str) -> str:
        if name not in (*STREAM_GROUPS, "dead"):
            raise KeyError(f"unknown stream {name!r}")
        return f"{self.base}:{name}"

    @property
    def prompts(self) -> str:
        return self.stream("prompts")

    @property
    def rollouts(self) -> str:
        return self.stream("rollouts")

    @property
    def labeled(self) -> str:
        return self.stream("labeled")

    @property
    def dead(self) -> str:
        return self.stream("dead")

    @property
    def weights(self) -> str:
        """Hash: the current WeightAnnouncement and the versions each generator serves."""
        return f"{self.base}:weights"

    @property
    def weights_channel(self) -> str:
        return f"{self.base}:weights:events"

    @property
    def state(self) -> str:
        """Hash: run status, step, policy version."""
        return f"{self.base}:state"

    @property
    def counters(self) -> str:
        """Hash of monotonically increasing counters (HINCRBY), e.g. ``verifier.groups``."""
        return f"{self.base}:counters"

    @property
    def heartbeats(self) -> str:
        """Hash ``service:instance`` -> encoded Heartbeat."""
        return f"{self.base}:heartbeats"

    @property
    def failures(self) -> str:
        """Hash ``stream entry id`` -> last failure reason, read when an entry is dead-lettered."""
        return f"{self.base}:failures"

    def done(self, stage: str, item: str) -> str:
        """Idempotency marker: set once when ``stage`` has committed its output for ``item``."""
        return f"{self.base}:done:{stage}:{item}"

    def tally(self, stage: str) -> str:
        """Hash item -> how many times ``stage`` committed it (anything above 1 is a duplicate)."""
        return f"{self.base}:tally:{stage}"

    def idempotency(self, key: str) -> str:
        """API Idempotency-Key -> the response it produced."""
        return f"{self.base}:idem:{key}"

    @property
    def prompt_ids(self) -> str:
        """Hash prompt id -> ``<fingerprint> <entry id>`` of every prompt the api enqueued."""
        return f"{self.base}:prompt_ids"

    @property
    def verifiers(self) -> str:
        """Set of verifier names the verifier replicas offer (plugins included)."""
        return f"{self.base}:verifiers"

    @property
    def serving(self) -> str:
        """JSON ``ServedModel``: what the generators serve (context, tokenizer), for the api."""
        return f"{self.base}:serving"

    @property
    def incarnation(self) -> str:
        """String: the run's incarnation token, or its tombstone (``conspo.incarnation``)."""
        return f"{self.base}:incarnation"

    @property
    def flow_leases(self) -> str:
        """Hash instance -> ``<groups>:<expiry>``: what each generator is producing now."""
        return f"{self.base}:flow:leases"

    @property
    def flow_wake(self) -> str:
        """Stream of wake-ups for generators held back by flow control (``conspo.flow``): the
        learner adds one when it consumes groups, a generator when it stages new weights."""
        return f"{self.base}:flow:wake"

    @property
    def datasets(self) -> str:
        """Hash dataset id -> JSON metadata (the index of ``services.api.datasets.store``)."""
        return f"{self.base}:datasets"

    def dataset_rows(self, dataset_id: str) -> str:
        """Hash row index -> JSON prompt row."""
        return f"{self.datasets}:{dataset_id}:rows"

    def dataset_cursor(self, dataset_id: str) -> str:
        """Hash ``epoch``, ``position``, ``fed``: how far the feeder got."""
        return f"{self.datasets}:{dataset_id}:cursor"

    def dataset_lock(self, dataset_id: str) -> str:
        """String: the api instance feeding the dataset now, with a TTL."""
        return f"{self.datasets}:{dataset_id}:lock"

    def metrics_series(self, name: str) -> str:
        """List of JSON points for the learning curves the api serves."""
        return f"{self.base}:series:{name}"

    @property
    def everything(self) -> str:
        """SCAN pattern of every key of the run (what ``conspo.testing.delete_run`` wipes)."""
        return f"{self.base}:*"
