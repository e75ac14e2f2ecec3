"""Learner -> generator weight sync: packed broadcasts over a rebuildable, stateless group.

- ``WeightPublisher`` (learner rank 0): ``push(model_or_named_tensors, version=, step=,
  checkpoint_path=) -> PushReport``; never hangs, never raises for peer failures.
- ``WeightSubscriber`` (each generator): ``start(template)``, ``take_staged()``,
  ``report_served(version)``, ``latest_announcement()``, ``close()``; the tensor work is done
  by a ``Receiver`` (default ``LocalReceiver``; an engine whose weights live in another process
  passes its own).
- Low-level, usable inside any process (e.g. a vLLM worker extension): ``open_group``,
  ``WeightGroup.broadcast_tensors`` / ``receive_tensors`` / ``iter_receive``, ``layout_of``,
  ``bucketize`` / ``unbucketize``, ``load_checkpoint``, and the Redis helpers of ``membership``.

See the module docstrings of ``layout``, ``group``, ``publisher`` and ``subscriber`` for why the
wire format, the group lifecycle and the staging work the way they do.
"""

from conspo.weight_sync.checkpoint import checkpoint_files, load_checkpoint
from conspo.weight_sync.follower import CheckpointFollower, Follower
from conspo.weight_sync.group import (
    DEFAULT_BUCKET_BYTES,
    BroadcastResult,
    GroupError,
    Header,
    LayoutMismatchError,
    WeightGroup,
    WeightSyncError,
    open_group,
    resolve_backend,
)
from conspo.weight_sync.layout import (
    BufferPool,
    Layout,
    TensorSpec,
    bucketize,
    join_buckets,
    layout_of,
    named_tensors_of,
    unbucketize,
)
from conspo.weight_sync.membership import (
    MemberInfo,
    live_members,
    read_announcement,
    read_members,
    report_served,
    served_versions,
)
from conspo.weight_sync.publisher import PushReport, WeightPublisher
from conspo.weight_sync.subscriber import (
    CheckpointLoader,
    LocalReceiver,
    Receiver,
    StagedWeights,
    WeightSubscriber,
)

__all__ = [
    "DEFAULT_BUCKET_BYTES",
    "BroadcastResult",
    "BufferPool",
    "CheckpointFollower",
    "CheckpointLoader",
    "Follower",
    "GroupError",
    "Header",
    "Layout",
    "LayoutMismatchError",
    "LocalReceiver",
    "MemberInfo",
    "PushReport",
    "Receiver",
    "StagedWeights",
    "TensorSpec",
    "WeightGroup",
    "WeightPublisher",
    "WeightSubscriber",
    "WeightSyncError",
    "bucketize",
    "checkpoint_files",
    "join_buckets",
    "layout_of",
    "live_members",
    "load_checkpoint",
    "named_tensors_of",
    "open_group",
    "read_announcement",
    "read_members",
    "report_served",
    "resolve_backend",
    "served_versions",
    "unbucketize",
]
