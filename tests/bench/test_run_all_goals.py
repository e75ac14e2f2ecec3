"""``bench/run_all.py``'s goal table: what the scripts report, against issue 18's goals."""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "bench"))

import run_all
from _common import goal


def test_reported_goals_are_judged_and_missing_ones_are_misses(capsys):
    vs_trl = {
        "goals": [
            goal("vs TRL samples/s, max_staleness 1", 1.05, 1.0, "x"),
            goal("vs TRL samples/s, synchronous (max_staleness 0)", 0.7, 0.8, "x"),
            {"name": "broken"},  # no value: dropped, not fatal
        ]
    }
    reported = run_all.goals_of("vs_trl", vs_trl)
    assert [(g["name"], g["met"]) for g in reported] == [
        ("vs TRL samples/s, max_staleness 1", True),
        ("vs TRL samples/s, synchronous (max_staleness 0)", False),
    ]
    # A script without a goals list yet: built from its own keys.
    queue = run_all.goals_of(
        "queue_throughput", {"ratio_vs_raw_cycle": {"conspo publish/read/ack": 0.23}}
    )
    assert [(g["value"], g["met"]) for g in queue] == [(0.23, False)]
    # Lower is better: a latency under its bound passes.
    p99 = goal("API single prompt p99, idle", 20.0, 50.0, "ms", higher_is_better=False)
    rows = run_all.goal_rows([*reported, *queue, {**p99, "source": "api_load", "met": True}],
                             {"vs_trl", "queue_throughput", "api_load"})  # fmt: skip
    by_name = {r["name"]: r for r in rows}
    assert set(run_all.ISSUE_GOALS) <= set(by_name)  # every issue goal has a row
    assert by_name["API single prompt p99, idle"]["met"]
    assert by_name["held-out accuracy vs TRL, max_staleness 1"]["value"] is None
    assert by_name["API single prompt p99, while training"]["missing"] == "not run"
    run_all.print_goals(rows)
    out = capsys.readouterr().out
    assert "PASS" in out and "MISS (not reported)" in out and "MISS (not run)" in out


def test_every_issue_goal_has_a_benchmark_that_runs():
    assert {source for source, *_ in run_all.ISSUE_GOALS.values()} <= set(run_all.NAMES)
