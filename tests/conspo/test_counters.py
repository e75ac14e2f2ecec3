"""Counter names are spelled once, in conspo/counters.py: a grep over the code that writes and
reads them (Python and the Lua inside it) finds no other spelling."""

from __future__ import annotations

import re

from conspo import counters
from conspo.testing import REPO_ROOT

SCANNED = ("conspo", "services", "bench", "deploy")
# A quoted string that starts like a counter: a service prefix, a dot, a lower-case word (not a
# file name such as "redis.log").
COUNTER_LIKE = re.compile(
    r"""["'](api|generator|verifier|learner|redis)\.(?!(log|py|json|md|toml|yaml)\b)[a-z_]+"""
)


def test_no_counter_name_is_spelled_outside_counters_py():
    offenders = []
    for folder in SCANNED:
        for path in sorted((REPO_ROOT / folder).rglob("*.py")):
            if path == REPO_ROOT / "conspo" / "counters.py":
                continue
            for n, line in enumerate(path.read_text().splitlines(), 1):
                if COUNTER_LIKE.search(line):
                    offenders.append(f"{path.relative_to(REPO_ROOT)}:{n}: {line.strip()}")
    assert not offenders, "counter names outside conspo/counters.py:\n" + "\n".join(offenders)


def test_the_grep_would_catch_a_literal():
    assert COUNTER_LIKE.search("store.incr({'learner.steps': 1})")
    assert COUNTER_LIKE.search("redis.call('HGET', KEYS[1], 'generator.groups')")
    assert COUNTER_LIKE.search('f"verifier.verdict.{verdict}"')
    assert not COUNTER_LIKE.search('"services.generator.loop"')
    assert not COUNTER_LIKE.search('workdir / "redis.log"')


def test_every_checkpointed_learner_total_is_a_counter():
    assert {counters.learner(n) for n in counters.LEARNER_CHECKPOINTED} <= counters.ALL
    assert counters.verdict("correct") == "verifier.verdict.correct"
    assert all(name.count(".") == 1 for name in counters.ALL)
