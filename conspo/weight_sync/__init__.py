"""Learner -> generator weight sync: packed broadcasts over a rebuildable, stateless group.

- ``WeightPublisher`` (learner rank 0): ``push(model_or_named_tensors, version=, step=,
  checkpoint_path=) -> PushReport``; never hangs, never raises for peer failures.
- ``WeightSubscriber`` (each generator): ``start(template)``, ``take_staged()``,
  ``report_served(version)``, ``latest_announcement()``, ``close()``; the tensor work is done
  by a ``Receiver`` (default ``LocalReceiver``; an engine whose weights live in another process
  passes its own).
- Low-level, usable inside any process (e.g. a vLLM worker extension): ``open_group``,
  ``WeightGroup.broadcast_tensors`` / ``receive_tensors`` / ``iter_receive``, ``layout_of``,
  ``bucketize`` / ``unbucketize``, ``load_checkpoint``, and the Redis helpers of ``membership``
  (``read_sync_state``: the whole weights hash in one read).

- ``Follower``: what the generator loop sees of either transport; ``CheckpointFollower``
  follows checkpoints on disk for engines that cannot join the group (``follower``).

See the module docstrings of ``layout``, ``group``, ``publisher`` and ``subscriber`` for why the
wire format, the group lifecycle and the staging work the way they do.

Names are imported on first use (PEP 562): ``membership`` needs no torch, and the api reads the
weights hash through it without loading torch for the rest of the package.
"""

from __future__ import annotations

import importlib
from typing import Any

#: Where each public name lives (``conspo.weight_sync.<module>``).
_HOMES = {
    "checkpoint_files": "checkpoint",
    "load_checkpoint": "checkpoint",
    "CheckpointFollower": "follower",
    "Follower": "follower",
    "DEFAULT_BUCKET_BYTES": "group",
    "BroadcastResult": "group",
    "GroupError": "group",
    "Header": "group",
    "LayoutMismatchError": "group",
    "WeightGroup": "group",
    "WeightSyncError": "group",
    "open_group": "group",
    "resolve_backend": "group",
    "BufferPool": "layout",
    "Layout": "layout",
    "TensorSpec": "layout",
    "bucketize": "layout",
    "join_buckets": "layout",
    "layout_of": "layout",
    "named_tensors_of": "layout",
    "unbucketize": "layout",
    "MemberInfo": "membership",
    "live_members": "membership",
    "read_announcement": "membership",
    "read_members": "membership",
    "report_served": "membership",
    "served_versions": "membership",
    "SyncState": "membership",
    "read_sync_state": "membership",
    "PushReport": "publisher",
    "WeightPublisher": "publisher",
    "CheckpointLoader": "subscriber",
    "LocalReceiver": "subscriber",
    "Receiver": "subscriber",
    "StagedWeights": "subscriber",
    "WeightSubscriber": "subscriber",
}
__all__ = sorted(_HOMES)


def __getattr__(name: str) -> Any:
    home = _HOMES.get(name)
    if home is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f"{__name__}.{home}"), name)
    globals()[name] = value  # once: later lookups do not come here
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
