"""Atomic, self-describing learner checkpoints.

A checkpoint is a directory ``ckpt-<seq>-step-<step>`` under ``run_dir/checkpoints``:

- ``model/``: ``save_pretrained`` output (safetensors, config, tokenizer), loadable on its own by
  a late-joining generator from the path in the weight announcement;
- ``optimizer.pt``, ``scheduler.pt``, ``rng.pt`` (torch, CUDA, numpy and python RNG states);
- ``state.json``: ``CheckpointState``: step, version, margin-schedule position, the consumed
  total for ``FlowControl.set_consumed``, metric counters, and the stream entries decided since
  the previous acknowledged checkpoint (``records``), so a restart acks those without training
  them again.

Between checkpoints, ``released.json`` (a ``Ledger``) lets the learner ack the groups it decided
not to train (skipped, dropped) without writing a whole checkpoint: it names the checkpoint it
extends (``base_seq``), what those groups add to its counters and consumed total, and the entries
of the release in flight. The learner writes it before the ack, so a crash between the two
leaves entries that the restart acks as covered, exactly like a checkpoint's ``records``. The
next checkpoint absorbs it (its counters are cumulative) and removes it; a ledger whose
``base_seq`` is not the newest checkpoint's is ignored. Releasing such groups early cannot
change what a restart trains: they never train, and no other entry's decision depends on them.

Atomicity: everything is written into ``.tmp-<name>-<pid>`` beside the final name, every file
and the directory are fsynced, then one ``rename`` publishes it and the parent is fsynced. A
crash (or an exception) at any earlier point leaves at most a ``.tmp-`` directory, which
``latest`` never considers and the next ``cleanup_partial`` removes. ``seq`` grows by one per
checkpoint, so two checkpoints at the same step (a SIGTERM right after a periodic one) never
collide, and "newest" is simply the highest ``seq``.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import re
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from pydantic import BaseModel, ConfigDict, Field

log = logging.getLogger(__name__)

_NAME = re.compile(r"^ckpt-(\d{6,})-step-(\d{8,})$")
STATE_FILE = "state.json"
MODEL_DIR = "model"
LEDGER_FILE = "released.json"


class EntryRecord(BaseModel):
    """One stream entry the learner decided on, and the LEARN marker it gets when acked."""

    model_config = ConfigDict(frozen=True)
    entry_id: str
    group_id: str
    marker: str


class CheckpointState(BaseModel):
    model_config = ConfigDict(frozen=True)

    seq: int = Field(ge=0)
    step: int = Field(ge=0)
    version: int = Field(ge=0)
    total_steps: int = Field(ge=1, description="Margin-schedule horizon at this step.")
    consumed_total: int = Field(ge=0)
    counters: dict[str, int] = Field(default_factory=dict)
    records: list[EntryRecord] = Field(default_factory=list)
    world_size: int = 1
    objective: str = ""
    created_at: float = Field(default_factory=time.time)


class Ledger(BaseModel):
    """Groups released (acked) since checkpoint ``base_seq`` without a checkpoint of their own."""

    model_config = ConfigDict(frozen=True)

    base_seq: int = Field(ge=-1, description="The checkpoint this extends; -1: none yet.")
    consumed: int = Field(default=0, ge=0)
    counters: dict[str, int] = Field(default_factory=dict)
    records: list[EntryRecord] = Field(
        default_factory=list, description="The release in flight (acked right after)."
    )


@dataclass(frozen=True)
class Checkpoint:
    path: Path
    state: CheckpointState

    @property
    def model_dir(self) -> Path:
        return self.path / MODEL_DIR

    def load_blob(self, name: str) -> Any:
        """``optimizer``, ``scheduler`` or ``rng`` (our own files: full unpickling is fine)."""
        return torch.load(self.path / f"{name}.pt", map_location="cpu", weights_only=False)


def _fsync_file(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_tree(root: Path) -> None:
    for dirpath, _, files in os.walk(root):
        for name in files:
            _fsync_file(Path(dirpath) / name)
        _fsync_file(Path(dirpath))


class CheckpointManager:
    def __init__(self, root: Path, keep: int) -> None:
        self.root = Path(root)
        self.keep = max(1, keep)

    def list(self) -> list[Path]:
        """Committed checkpoints, oldest first."""
        if not self.root.is_dir():
            return []
        found = []
        for p in self.root.iterdir():
            m = _NAME.match(p.name)
            if m and p.is_dir() and (p / STATE_FILE).is_file():
                found.append((int(m.group(1)), p))
        return [p for _, p in sorted(found)]

    def latest(self) -> Checkpoint | None:
        """The newest readable checkpoint (an unreadable one is skipped with a warning)."""
        for path in reversed(self.list()):
            try:
                state = CheckpointState.model_validate_json((path / STATE_FILE).read_text())
            except (OSError, ValueError) as exc:
                log.warning("ignoring unreadable checkpoint %s: %s", path, exc)
                continue
            return Checkpoint(path, state)
        return None

    def cleanup_partial(self) -> int:
        """Remove ``.tmp-`` directories (and ledger files) left by a crash during a write."""
        if not self.root.is_dir():
            return 0
        removed = 0
        for p in self.root.iterdir():
            if p.name.startswith(".tmp-"):
                if p.is_dir():
                    shutil.rmtree(p, ignore_errors=True)
                else:
                    p.unlink(missing_ok=True)
                removed += 1
        if removed:
            log.info("removed %d partial checkpoint(s) under %s", removed, self.root)
        return removed

    def save(
        self,
        state: CheckpointState,
        write_model: Callable[[Path], None],
        blobs: dict[str, Any],
    ) -> Path:
        """Write a checkpoint atomically, then prune to the newest ``keep``. Returns its path."""
        self.root.mkdir(parents=True, exist_ok=True)
        name = f"ckpt-{state.seq:06d}-step-{state.step:08d}"
        final = self.root / name
        tmp = self.root / f".tmp-{name}-{os.getpid()}"
        shutil.rmtree(tmp, ignore_errors=True)
        try:
            tmp.mkdir()
            write_model(tmp / MODEL_DIR)
            for key, value in blobs.items():
                torch.save(value, tmp / f"{key}.pt")
            # state.json last: a directory without it is never a checkpoint.
            (tmp / STATE_FILE).write_text(json.dumps(state.model_dump(mode="json"), indent=1))
            _fsync_tree(tmp)
            if final.exists():
                raise FileExistsError(f"checkpoint {final} already exists")
            os.rename(tmp, final)
            _fsync_file(self.root)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        self.prune()
        return final

    # -- the release ledger ------------------------------------------------------------------------
    @property
    def ledger_path(self) -> Path:
        return self.root / LEDGER_FILE

    def write_ledger(self, ledger: Ledger) -> None:
        """Atomically replace the ledger (tmp file, fsync, rename, fsync the directory)."""
        self.root.mkdir(parents=True, exist_ok=True)
        tmp = self.root / f".tmp-{LEDGER_FILE}-{os.getpid()}"
        tmp.write_text(ledger.model_dump_json())
        _fsync_file(tmp)
        os.replace(tmp, self.ledger_path)
        _fsync_file(self.root)

    def read_ledger(self, base_seq: int) -> Ledger | None:
        """The ledger if it extends checkpoint ``base_seq`` (-1: none), else None."""
        try:
            ledger = Ledger.model_validate_json(self.ledger_path.read_text())
        except FileNotFoundError:
            return None
        except (OSError, ValueError) as exc:
            log.warning("ignoring unreadable release ledger %s: %s", self.ledger_path, exc)
            return None
        if ledger.base_seq != base_seq:
            return None  # a newer checkpoint absorbed it
        return ledger

    def drop_ledger(self) -> None:
        with contextlib.suppress(FileNotFoundError):
            self.ledger_path.unlink()

    def prune(self) -> list[Path]:
        paths = self.list()
        doomed = paths[: max(0, len(paths) - self.keep)]
        for p in doomed:
            shutil.rmtree(p, ignore_errors=True)
        return doomed


def capture_rng() -> dict[str, Any]:
    """Every RNG a step could draw from (the update itself draws from none today)."""
    import random

    import numpy as np

    state: dict[str, Any] = {
        "torch": torch.get_rng_state(),
        "numpy": np.random.get_state(),
        "python": random.getstate(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng(state: dict[str, Any]) -> None:
    import random

    import numpy as np

    torch.set_rng_state(state["torch"])
    np.random.set_state(state["numpy"])
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        cuda = state["cuda"]
        if len(cuda) == torch.cuda.device_count():
            torch.cuda.set_rng_state_all(cuda)
