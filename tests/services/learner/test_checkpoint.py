"""Checkpoint atomicity and retention, without a model: the writer is injected."""

from __future__ import annotations

import pytest
import torch

from services.learner.checkpoint import (
    CheckpointManager,
    CheckpointState,
    EntryRecord,
    capture_rng,
    restore_rng,
)


def _state(seq: int, step: int) -> CheckpointState:
    return CheckpointState(
        seq=seq,
        step=step,
        version=step,
        total_steps=100,
        consumed_total=4 * step,
        records=[EntryRecord(entry_id=f"{step}-0", group_id=f"g-{step}", marker=f"trained:{step}")],
    )


def _write_model(value: float):
    def write(path):
        path.mkdir()
        torch.save({"w": torch.full((3,), value)}, path / "weights.pt")

    return write


def test_keeps_the_newest_k(tmp_path):
    manager = CheckpointManager(tmp_path, keep=2)
    for seq in range(5):
        manager.save(_state(seq, seq * 10), _write_model(seq), {"optimizer": {"seq": seq}})
    names = [p.name for p in manager.list()]
    assert names == ["ckpt-000003-step-00000030", "ckpt-000004-step-00000040"]
    latest = manager.latest()
    assert latest is not None
    assert latest.state.step == 40
    assert latest.load_blob("optimizer") == {"seq": 4}
    assert torch.equal(torch.load(latest.model_dir / "weights.pt")["w"], torch.full((3,), 4.0))


@pytest.mark.parametrize("where", ["model", "blob"])
def test_a_crash_while_writing_leaves_the_previous_checkpoint(tmp_path, monkeypatch, where):
    manager = CheckpointManager(tmp_path, keep=3)
    manager.save(_state(0, 5), _write_model(1.0), {"optimizer": {"ok": True}})

    def broken_model(path):
        _write_model(2.0)(path)
        raise OSError("disk full")

    writer = broken_model if where == "model" else _write_model(2.0)
    if where == "blob":
        real_save = torch.save

        def save(obj, f, *a, **k):
            if str(f).endswith("optimizer.pt"):
                real_save(obj, f, *a, **k)  # half written, then the crash
                raise OSError("disk full")
            return real_save(obj, f, *a, **k)

        monkeypatch.setattr(torch, "save", save)
    with pytest.raises(OSError, match="disk full"):
        manager.save(_state(1, 10), writer, {"optimizer": {"ok": False}})
    monkeypatch.undo()

    latest = manager.latest()
    assert latest is not None and latest.state.step == 5
    assert latest.load_blob("optimizer") == {"ok": True}
    assert [p.name for p in tmp_path.iterdir()] == ["ckpt-000000-step-00000005"]


def test_half_directories_from_a_killed_writer_are_never_picked(tmp_path):
    manager = CheckpointManager(tmp_path, keep=3)
    good = manager.save(_state(0, 5), _write_model(1.0), {})
    # What SIGKILL mid-write leaves: a temp dir with everything but the rename ...
    orphan = tmp_path / ".tmp-ckpt-000001-step-00000010-999"
    orphan.mkdir()
    (orphan / "state.json").write_text(_state(1, 10).model_dump_json())
    # ... and a directory that looks final but has no state.json (never produced by save()).
    (tmp_path / "ckpt-000002-step-00000015").mkdir()
    assert manager.latest().path == good
    assert manager.cleanup_partial() == 1
    assert not orphan.exists()
    # The sequence continues after the good one; the bogus one is not counted either.
    assert [p.name for p in manager.list()] == [good.name]


def test_rng_states_round_trip():
    import random

    import numpy as np

    state = capture_rng()
    a = (torch.rand(3), np.random.rand(), random.random())
    restore_rng(state)
    b = (torch.rand(3), np.random.rand(), random.random())
    assert torch.equal(a[0], b[0]) and a[1:] == b[1:]
