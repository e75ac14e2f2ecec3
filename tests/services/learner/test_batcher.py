"""The batcher's duplicate check on real Redis: one marker read per buffer, never a stale one."""

from __future__ import annotations

from conspo.lineage import LEARN, learn_marker
from conspo.protocol import LabeledGroup
from conspo.queue import StreamQueue
from services.learner.batcher import Batcher


def test_a_copy_of_a_group_marked_after_the_buffer_was_checked_is_still_a_duplicate(
    redis_client, keys, groups_factory
):
    a, x = groups_factory(2, prefix="a")
    queue = StreamQueue(redis_client, keys, "labeled", LabeledGroup)
    queue.publish_many([(g, g.group_id) for g in (a, x, a)])  # the third entry copies the first
    batcher = Batcher(
        queue, "learner-test", batch_groups=1, max_staleness=0, skip_uninformative=False
    )
    never = lambda: False  # noqa: E731

    first = batcher.next_batch(0, should_stop=never, wait_timeout_s=5)
    assert [d.message.group_id for d in first.train] == [a.group_id]
    # The learner's checkpoint covers step 1: mark and ack, then forget the held group.
    queue.mark_and_ack([(first.train[0], a.group_id, learn_marker("trained", 1))], stage=LEARN)
    batcher.release_held([first.train[0].entry_id], [a.group_id])

    second = batcher.next_batch(0, should_stop=never, wait_timeout_s=5)
    assert [d.message.group_id for d in second.train] == [x.group_id]
    assert batcher.duplicates_total == 0  # the copy is behind x in the buffer
    third = batcher.next_batch(0, should_stop=never, wait_timeout_s=0.5)
    assert not third.complete
    assert third.duplicates == 1 and batcher.duplicates_total == 1  # not trained again
