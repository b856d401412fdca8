"""The offset a partition commits: never past a message still being handled."""

from __future__ import annotations

from typing import cast

import faust
from faust.transport.conductor import Conductor
from faust.types import TP, Message

from streams.drivers import kafka_transport
from streams.drivers.kafka_transport import commit_position


def test_in_order_acks_commit_past_the_last() -> None:
    assert commit_position([10, 11, 12], [], committed=10) == 13


def test_a_held_message_one_past_the_last_commit_holds_the_commit() -> None:
    # faust 0.15 committed 13 here: the head was only one past the committed offset.
    assert commit_position([11, 12], [10], committed=10) is None


def test_before_any_commit_a_held_first_message_holds_the_commit() -> None:
    # faust 0.15 checked nothing before a partition's first commit and committed 3.
    assert commit_position([1, 2], [0], committed=None) == 0


def test_the_commit_stops_at_the_lowest_held_message() -> None:
    assert commit_position([10, 11, 13, 14], [12, 15], committed=10) == 12


def test_offsets_never_delivered_do_not_hold_the_commit() -> None:
    # 12 is a transaction marker: nothing delivers it, so nothing waits for it.
    assert commit_position([10, 11, 13], [], committed=10) == 14


def test_held_messages_below_the_commit_are_from_before_a_rebalance() -> None:
    assert commit_position([20, 21], [5], committed=20) == 22


def test_nothing_acked_commits_nothing() -> None:
    assert commit_position([], [10], committed=10) is None


def test_the_worker_consumer_holds_its_commit_for_a_message_acked_late() -> None:
    """faust's own bookkeeping around `commit_position`: no broker is reached."""
    app = faust.App("test-commit", broker=f"{kafka_transport.register(5)}://localhost:1")
    cast(Conductor, app.topics)._acking_topics.add("t")  # as once agents subscribe
    consumer = cast(kafka_transport.ShortWaitConsumer, app.consumer)
    tp = TP("t", 0)
    messages = [Message("t", 0, offset, 0.0, 0, {}, None, b"", None) for offset in (10, 11, 12)]
    for message in messages:
        consumer.track_message(message)
    consumer._committed_offset[tp] = 10
    consumer.ack(messages[1])
    consumer.ack(messages[2])
    assert consumer._filter_committable_offsets([tp]) == {}  # faust 0.15: {tp: 13}
    consumer.ack(messages[0])
    assert consumer._filter_committable_offsets([tp]) == {tp: 13}
