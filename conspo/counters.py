"""Every counter of a run, named once.

Counters live in one Redis hash per run (``Keys.counters``) and are a contract between
processes: the generator adds ``generator.groups`` inside its commit script and flow control
reads it back inside its reserve script; the api's publish script adds
``api.prompts_accepted`` and the books read it. A name spelled twice can drift apart silently
(the writer counts one name, the reader waits on another), so every name is a constant here:
Python code uses the constants, and each Lua script receives the names it touches as
arguments instead of spelling them itself. ``tests/conspo/test_counters.py`` greps the
packages for any other spelling.

Most counters only grow (``HINCRBY``). Two are exceptions, set absolutely by the learner at
start-up from its checkpoint so that a replayed step is not counted twice:
``learner.groups_consumed`` (flow control's "done with") and the ``learner.*`` totals the
checkpoint carries (``LEARNER_CHECKPOINTED``).

Counters may over-count when a reply is lost and the command retried (see docs/reliability.md);
the run's books (``conspo.accounting``) therefore read idempotency markers, and use counters
only for what was submitted.
"""

from __future__ import annotations

from typing import Final

# -- api ------------------------------------------------------------------------------------------
API_PROMPTS_ACCEPTED: Final = "api.prompts_accepted"  # POST /v1/prompts, new prompt ids only
API_PROMPTS_FED: Final = "api.prompts_fed"  # dataset rows the feeder enqueued

# -- generator ------------------------------------------------------------------------------------
GENERATOR_GROUPS: Final = "generator.groups"  # groups committed to rollouts (flow: produced)
GENERATOR_COMPLETIONS: Final = "generator.completions"
GENERATOR_TOKENS: Final = "generator.tokens"  # completion tokens sampled

# -- verifier -------------------------------------------------------------------------------------
VERIFIER_GROUPS: Final = "verifier.groups"
VERIFIER_COMPLETIONS: Final = "verifier.completions"
VERIFIER_VERDICT_PREFIX: Final = "verifier.verdict."  # + the verdict (correct, wrong, ...)

# -- learner --------------------------------------------------------------------------------------
LEARNER_PREFIX: Final = "learner."
LEARNER_STEPS: Final = "learner.steps"
LEARNER_GROUPS_TRAINED: Final = "learner.groups_trained"
LEARNER_GROUPS_SKIPPED: Final = "learner.groups_skipped"
LEARNER_GROUPS_DROPPED: Final = "learner.groups_dropped"
LEARNER_GROUPS_DUPLICATE: Final = "learner.groups_duplicate"
LEARNER_GROUPS_CONSUMED: Final = "learner.groups_consumed"  # absolute (flow: consumed)
LEARNER_PUSH_FAILURES: Final = "learner.push_failures"

#: The learner totals its checkpoint carries, by their name in the checkpoint (the counter's
#: name without ``learner.``): restored absolutely at start-up.
LEARNER_CHECKPOINTED: Final = (
    "steps",
    "groups_trained",
    "groups_skipped",
    "groups_dropped",
    "groups_duplicate",
)

# -- every service --------------------------------------------------------------------------------
REDIS_STATE_LOST: Final = "redis.state_lost"  # times an instance found the run's state gone


def verdict(name: str) -> str:
    """The counter of one verdict (``verifier.verdict.correct``)."""
    return f"{VERIFIER_VERDICT_PREFIX}{name}"


def learner(name: str) -> str:
    """The counter of a learner total, by its checkpoint name (``steps``: ``learner.steps``)."""
    return f"{LEARNER_PREFIX}{name}"


#: Every fixed counter name (verdict counters are ``verdict(...)`` of each verdict).
ALL: Final = frozenset(
    {
        API_PROMPTS_ACCEPTED,
        API_PROMPTS_FED,
        GENERATOR_GROUPS,
        GENERATOR_COMPLETIONS,
        GENERATOR_TOKENS,
        VERIFIER_GROUPS,
        VERIFIER_COMPLETIONS,
        LEARNER_STEPS,
        LEARNER_GROUPS_TRAINED,
        LEARNER_GROUPS_SKIPPED,
        LEARNER_GROUPS_DROPPED,
        LEARNER_GROUPS_DUPLICATE,
        LEARNER_GROUPS_CONSUMED,
        LEARNER_PUSH_FAILURES,
        REDIS_STATE_LOST,
    }
)
