"""W&B (offline) and TensorBoard get the same figures as metrics.jsonl, with the run's settings."""

from __future__ import annotations

import json
import struct
from pathlib import Path

import pytest

from conspo.protocol import LabeledGroup
from conspo.queue import StreamQueue
from conspo.redis_conn import connect
from conspo.settings import LearnerSettings
from services.learner.distributed import DistContext
from services.learner.main import build_learner
from services.learner.tracking import Trackers


@pytest.fixture(autouse=True)
def _tracking_installed() -> None:
    # Per test, not at import: `make test-vllm` (whose venv has no [tracking]) collects this
    # module only to deselect it, and must not count a module skip.
    pytest.importorskip("wandb", reason="the [tracking] extra is not installed")
    pytest.importorskip("tensorboard", reason="the [tracking] extra is not installed")


FIGURES = ("loss", "reward_mean", "accuracy", "informative_frac", "grad_norm", "lr", "margin")


def read_wandb(path: Path) -> tuple[dict[str, str], list[dict[str, str]]]:
    """(config, history rows) of an offline ``.wandb`` file: LevelDB-log framed protobufs."""
    from wandb.proto import wandb_internal_pb2 as pb

    data = path.read_bytes()
    assert data[:4] == b":W&B"
    block, pos, buf, records = 32768, 7, b"", []
    while pos + 7 <= len(data):
        left = block - pos % block
        if left < 7:
            pos += left
            continue
        _, length, kind = struct.unpack("<IHB", data[pos : pos + 7])
        pos += 7
        if kind == 0 and length == 0:
            pos += left - 7
            continue
        buf += data[pos : pos + length]
        pos += length
        if kind in (1, 4):  # FULL or LAST fragment
            records.append(buf)
            buf = b""
    config: dict[str, str] = {}
    history: list[dict[str, str]] = []
    for raw in records:
        record = pb.Record()
        record.ParseFromString(raw)
        kind = record.WhichOneof("record_type")
        if kind == "run":
            config.update({i.key: i.value_json for i in record.run.config.update})
        elif kind == "config":
            config.update({i.key: i.value_json for i in record.config.update})
        elif kind == "history":
            history.append(
                {i.key or "/".join(i.nested_key): i.value_json for i in record.history.item}
            )
    return config, history


def read_tensorboard(log_dir: Path) -> dict[str, dict[int, float]]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(log_dir))
    acc.Reload()
    return {tag: {e.step: e.value for e in acc.Scalars(tag)} for tag in acc.Tags()["scalars"]}


def test_trackers_carry_every_figure_and_the_settings(
    redis_url, run_name, keys, model_path, tmp_path, groups_factory
):
    groups = groups_factory(4, prefix="a")
    StreamQueue(connect(redis_url), keys, "labeled", LabeledGroup).publish_many(
        [(g, g.group_id) for g in groups]
    )
    settings = LearnerSettings(
        redis_url=redis_url,
        run=run_name,
        model_path=model_path,
        data_dir=tmp_path,
        lr=1e-3,
        batch_groups=2,
        total_steps=2,
        eval_every=2,
        eval_samples=4,
        eval_k=2,
        progress_bar=False,
        plot_every=0,
        block_ms=200,
        wait_timeout_s=10,
        tracking=["tensorboard", "wandb"],
        wandb_mode="offline",
    )
    learner = build_learner(settings, DistContext(), client=connect(redis_url))
    try:
        assert learner.run() == "finished"
    finally:
        learner.close()

    run_dir = tmp_path / run_name
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in records if r["kind"] == "train"]
    evals = [r for r in records if r["kind"] == "eval"]
    assert [r["step"] for r in train] == [1, 2] and [r["step"] for r in evals] == [0, 2]

    scalars = read_tensorboard(run_dir / "tensorboard")
    for name in FIGURES:
        assert scalars[f"train/{name}"] == pytest.approx({r["step"]: r[name] for r in train}), name
    for metric in ("greedy", "avg@2", "pass@2"):
        tag = f"eval/arith/{metric}"
        assert scalars[tag] == pytest.approx({r["step"]: r[metric] for r in evals}), tag

    [wandb_file] = list((run_dir / "wandb").glob("offline-run-*/run-*.wandb"))
    config, history = read_wandb(wandb_file)
    learner_config = json.loads(config["learner"])
    assert learner_config["lr"] == 1e-3 and learner_config["objective"] == "conspo"
    assert json.loads(config["run"]) == run_name
    by_step: dict[int, dict[str, float]] = {}
    for row in history:
        by_step.setdefault(int(row["_step"]), {}).update(
            {k: json.loads(v) for k, v in row.items() if not k.startswith("_")}
        )
    for r in train:
        for name in FIGURES:
            assert by_step[r["step"]][f"train/{name}"] == pytest.approx(r[name]), name
    for r in evals:
        assert by_step[r["step"]]["eval/arith/greedy"] == pytest.approx(r["greedy"])


def test_a_failing_tracker_is_switched_off_and_training_goes_on(caplog):
    class Broken:
        name = "broken"
        calls = 0

        def train(self, record):
            Broken.calls += 1
            raise OSError("disk full")

        def eval(self, record):
            raise AssertionError("never called once switched off")

        def close(self):
            raise AssertionError("never called once switched off")

    trackers = Trackers([Broken()])
    trackers.train({"step": 1, "loss": 0.5})
    trackers.train({"step": 2, "loss": 0.4})
    trackers.eval({"step": 2, "greedy": 0.1})
    trackers.close()
    assert Broken.calls == 1
    assert "broken tracker failed in train: switched off" in caplog.text
