"""The live display of `conspo train` / `demo`, its end condition and its closing report."""

from __future__ import annotations

import pytest

from conspo.train import Progress, drained, report

WAITING = {
    "service": "learner",
    "code": "all_equal_rewards",
    "reason": "last 12 groups had equal rewards (all 0): no contrast to train on",
    "since": 1.0,
}


def status(step=0, waiting=None, prompts=(0, 0), rollouts=(0, 0), labeled_lag=0, pending=12):
    return {
        "step": step,
        "policy_version": step,
        "waiting": waiting,
        "curves": {"train": [], "eval": [{"step": 0, "greedy": 0.25}]},
        "queues": {
            "prompts": {"pending": prompts[0], "lag": prompts[1]},
            "rollouts": {"pending": rollouts[0], "lag": rollouts[1]},
            "labeled": {"pending": pending, "lag": labeled_lag},
        },
    }


def test_the_waiting_reason_is_shown_once_per_change(capsys):
    progress = Progress(total=3, quiet=False)
    progress(status())
    progress(status(waiting=WAITING))
    progress(status(waiting=WAITING))
    progress(status(waiting=None))
    progress(status(waiting=WAITING))
    err = capsys.readouterr().err
    line = f"waiting (learner, all_equal_rewards): {WAITING['reason']}"
    assert err.count(line) == 2  # set, cleared, set again
    assert "held-out 25.0%" in err and "waiting: all_equal_rewards" in err


def test_quiet_shows_nothing(capsys):
    Progress(total=3, quiet=True)(status(waiting=WAITING))
    assert capsys.readouterr().err == ""


@pytest.mark.parametrize(
    ("state", "queues", "expected"),
    [
        ("finished", {}, True),  # held by the learner (pending) is not a backlog
        ("ready", {}, False),  # more epochs to feed
        ("finished", {"prompts": (1, 0)}, False),  # a generator holds a prompt
        ("finished", {"rollouts": (0, 2)}, False),  # groups not yet graded
        ("finished", {"labeled_lag": 1}, False),  # a labelled group the learner has not read
    ],
)
def test_drained_means_nothing_more_can_reach_the_learner(state, queues, expected):
    assert drained(status(**queues), [{"state": state}]) is expected
    assert drained(status(), []) is False


def summary(ended="finished", waiting=None, lost=0):
    return {
        "accuracy_before": 0.1,
        "accuracy_after": 0.2,
        "backend": "hf",
        "objective": "conspo",
        "steps": 3,
        "wall_seconds": 12.0,
        "ended": ended,
        "waiting": waiting,
        "final_train": {},
        "curves_png": "out/r/curves.png",
        "accounting": {
            "submitted": 12,
            "generated": 12,
            "labelled": 12,
            "trained": 0,
            "skipped": 12,
            "dropped": 0,
            "dead": 0,
            "queued_prompts": 0,
            "queued_rollouts": 0,
            "queued_labeled": 0,
            "lost": lost,
            "duplicated": 0,
        },
        "where": {"checkpoints": "out/r/checkpoints", "logs": "out/logs"},
    }


def test_report_says_why_the_run_ended_early_and_where_things_are(capsys):
    assert report(summary(ended="data_exhausted", waiting=WAITING)) == 3
    out = capsys.readouterr().out
    assert f"the run ended at step 0 of 3 (data_exhausted): {WAITING['reason']}" in out
    assert "held-out greedy accuracy: 10.0% -> 20.0%" in out
    assert "checkpoints: out/r/checkpoints" in out and "logs: out/logs" in out


def test_without_a_published_reason_the_books_say_it(capsys):
    assert report(summary(ended="data_exhausted")) == 3
    assert "12 skipped (equal rewards: no contrast)" in capsys.readouterr().out


def test_unbalanced_books_fail_even_a_finished_run(capsys):
    assert report(summary(lost=1)) == 1
    assert report(summary()) == 0
