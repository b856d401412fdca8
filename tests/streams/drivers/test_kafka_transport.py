"""The offset a partition commits: never past a message still being handled, nor one
passed over unhandled; under exactly-once, the transaction each send joins and when it goes
out."""

from __future__ import annotations

import asyncio
from collections.abc import Mapping
from types import SimpleNamespace
from typing import Any, cast

import faust
import pytest
from aiokafka import TopicPartition
from faust.assignor import PartitionAssignor
from faust.transport.conductor import Conductor
from faust.types import TP, EventT, Message
from faust.types.transports import ProducerT

from streams.drivers import kafka_transport
from streams.drivers.kafka_transport import CommitPlan, never_committed, plan_commit


def test_in_order_acks_commit_past_the_last() -> None:
    assert plan_commit([10, 11, 12], [], committed=10, contiguous=True) == CommitPlan(13)


def test_a_held_message_one_past_the_last_commit_holds_the_commit() -> None:
    # faust 0.15 committed 13 here: the head was only one past the committed offset.
    assert plan_commit([11, 12], [10], committed=10, contiguous=True) == CommitPlan(None)


def test_before_any_commit_a_held_first_message_holds_the_commit() -> None:
    # faust 0.15 checked nothing before a partition's first commit and committed 3.
    assert plan_commit([1, 2], [0], committed=None, contiguous=True) == CommitPlan(0)


def test_the_commit_stops_at_the_lowest_held_message() -> None:
    plan = plan_commit([10, 11, 13, 14], [12, 15], committed=10, contiguous=True)
    assert plan == CommitPlan(12)


def test_an_offset_passed_over_unhandled_holds_the_commit_and_is_read_again() -> None:
    # 12 was neither acked nor is it being handled, yet 13 was: faust skipped it.
    plan = plan_commit([10, 11, 13], [], committed=10, contiguous=True)
    assert plan == CommitPlan(12, lost_from=12)
    assert plan_commit([13], [], committed=12, contiguous=True) == CommitPlan(None, lost_from=12)


def test_under_transactions_offsets_never_delivered_do_not_hold_the_commit() -> None:
    # 12 is a transaction marker: nothing delivers it, so nothing waits for it.
    assert plan_commit([10, 11, 13], [], committed=10, contiguous=False) == CommitPlan(14)


def test_held_messages_below_the_commit_are_from_before_a_rebalance() -> None:
    assert plan_commit([20, 21], [5], committed=20, contiguous=True) == CommitPlan(22)


def test_nothing_acked_commits_nothing() -> None:
    assert plan_commit([], [10], committed=10, contiguous=True) == CommitPlan(None)


TP0 = TP("t", 0)


def worker_consumer(delivered: list[int], committed: int) -> tuple[Any, list[Message]]:
    """The worker's consumer with `delivered` offsets of TP0 tracked (no broker is reached),
    and the messages."""
    app = faust.App("test-commit", broker=f"{kafka_transport.register(5)}://localhost:1")
    cast(Conductor, app.topics)._acking_topics.add("t")  # as once agents subscribe
    consumer: Any = app.consumer
    messages = [Message("t", 0, offset, 0.0, 0, {}, None, b"", None) for offset in delivered]
    for message in messages:
        consumer.track_message(message)
    consumer._committed_offset[TP0] = committed
    return consumer, messages


def test_the_worker_consumer_holds_its_commit_for_a_message_acked_late() -> None:
    consumer, messages = worker_consumer([10, 11, 12], committed=10)
    consumer.ack(messages[1])
    consumer.ack(messages[2])
    assert consumer._filter_committable_offsets([TP0]) == {}  # faust 0.15: {TP0: 13}
    consumer.ack(messages[0])
    assert consumer._filter_committable_offsets([TP0]) == {TP0: 13}


def test_the_worker_consumer_reads_a_passed_over_offset_again() -> None:
    async def scenario() -> list[tuple[TP, int]]:
        consumer, messages = worker_consumer([11], committed=10)  # 10 never reached a stream
        sought: list[tuple[TP, int]] = []

        async def seek(tp: TP, offset: int) -> None:
            sought.append((tp, offset))

        consumer.seek = seek
        consumer.ack(messages[0])
        assert consumer._filter_committable_offsets([TP0]) == {}  # faust 0.15: {TP0: 12}
        await asyncio.sleep(0)
        return sought

    assert asyncio.run(scenario()) == [(TP0, 10)]


class Producer:
    """Stands in for the worker's TransactionalProducer: what was sent, in which
    transaction, and which transactions committed which offsets."""

    def __init__(self, transactional_ids: set[str]) -> None:
        self._transaction_producers = dict.fromkeys(transactional_ids)
        self.sent: list[tuple[bytes | None, str | None]] = []
        self.committed: list[dict[str, dict[TP, int]]] = []
        self.stopped: list[str] = []
        self.begun: list[str] = []

    holds = kafka_transport.TransactionalProducer.holds
    transactional_ids = kafka_transport.TransactionalProducer.transactional_ids

    async def send(self, *args: Any, transactional_id: str | None = None) -> asyncio.Future[Any]:
        self.sent.append((args[2], transactional_id))
        delivered: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        delivered.set_result(None)
        return delivered

    async def commit_transactions(
        self,
        offsets: Mapping[str, Mapping[TP, int]],
        group_id: str,
        start_new_transaction: bool,
    ) -> None:
        self.committed.append({tid: dict(o) for tid, o in offsets.items()})

    async def stop_transaction(self, transactional_id: str) -> None:
        self.stopped.append(transactional_id)
        self._transaction_producers.pop(transactional_id)

    async def maybe_begin_transaction(self, transactional_id: str) -> None:
        self.begun.append(transactional_id)


def transactions(held: set[str]) -> tuple[kafka_transport.EventTransactions, Producer]:
    app = faust.App(
        "eos",
        broker=f"{kafka_transport.register(5)}://localhost:1",
        processing_guarantee="exactly_once",
    )
    cast(PartitionAssignor, app.assignor)._topic_groups = {"in": 0, "out": 0}
    producer = Producer(held)
    app.consumer.in_transaction = True  # as in a worker
    manager = cast(kafka_transport.EventTransactions, app.consumer.transactions)
    manager.producer = cast(ProducerT, producer)
    return manager, producer


def event(partition: int, offset: int, generation: int | None = None) -> EventT[bytes]:
    message = Message("in", partition, offset, 0.0, 0, {}, None, b"", None)
    message.generation_id = generation
    return cast(EventT[bytes], SimpleNamespace(message=message))


async def test_an_event_s_sends_wait_for_the_commit_past_its_offset() -> None:
    """faust 0.15 sent at once, in the transaction of the partition sent to."""
    manager, producer = transactions({"eos-0-1"})
    with kafka_transport.on_behalf_of(event(1, 10)):
        await manager.send("out", b"k", b"answer", 3, None, None)
    assert producer.sent == []
    await manager.commit({TP("in", 1): 10})
    assert producer.sent == []
    await manager.commit({TP("in", 1): 11})
    assert producer.sent == [(b"answer", "eos-0-1")]
    assert producer.committed[-1] == {"eos-0-1": {TP("in", 1): 11}}


async def test_a_send_for_no_event_goes_out_at_once_outside_any_transaction() -> None:
    manager, producer = transactions({"eos-0-1"})
    await manager.send("in", b"k", b"signal", 1, None, None)
    assert producer.sent == [(b"signal", None)]


async def test_a_send_for_an_event_of_a_partition_gone_is_refused() -> None:
    manager, _producer = transactions({"eos-0-1"})
    with (
        kafka_transport.on_behalf_of(event(2, 10)),
        pytest.raises(kafka_transport.PartitionRevoked),
    ):
        await manager.send("out", b"k", b"answer", 3, None, None)


async def test_a_rebalance_stops_the_producers_of_partitions_not_kept() -> None:
    """faust 0.15 kept those of partitions that became standbys here, as the other
    worker's partitions do."""
    manager, producer = transactions({"eos-0-0", "eos-0-1"})
    cast(PartitionAssignor, manager.app.assignor)._standby_tps = {TP("in", 1)}
    with kafka_transport.on_behalf_of(event(1, 10)):
        await manager.send("out", b"k", b"answer", 3, None, None)
    await manager.on_rebalance({TP("in", 0)}, {TP("in", 1)}, set())
    assert producer.stopped == ["eos-0-1"]
    assert producer.begun == ["eos-0-0"]
    await manager.commit({TP("in", 1): 11})
    assert producer.sent == []


async def test_a_rebalance_drops_the_held_outputs_of_kept_partitions_too() -> None:
    """A kept partition is seeked back to its commit and its events done again: kept, the
    first outputs went out beside the second ones, two answers in one transaction."""
    manager, producer = transactions({"eos-0-1"})
    with kafka_transport.on_behalf_of(event(1, 10)):
        await manager.send("out", b"k", b"first", 3, None, None)
    await manager.on_rebalance({TP("in", 1)}, set(), set())
    with kafka_transport.on_behalf_of(event(1, 10)):
        await manager.send("out", b"k", b"again", 3, None, None)
    await manager.commit({TP("in", 1): 11})
    assert producer.sent == [(b"again", "eos-0-1")]


async def test_a_send_for_an_event_read_before_the_last_rebalance_is_refused() -> None:
    manager, producer = transactions({"eos-0-1"})
    manager.app.consumer_generation_id = 4
    with (
        kafka_transport.on_behalf_of(event(1, 10, generation=3)),
        pytest.raises(kafka_transport.PartitionRevoked),
    ):
        await manager.send("out", b"k", b"late", 3, None, None)
    with kafka_transport.on_behalf_of(event(1, 10, generation=4)):
        await manager.send("out", b"k", b"current", 3, None, None)
    await manager.commit({TP("in", 1): 11})
    assert producer.sent == [(b"current", "eos-0-1")]


async def handled(
    manager: kafka_transport.EventTransactions, offsets: range, generation: int
) -> Any:
    """The worker's consumer after reading `offsets` of partition 1 of "in" in
    `generation`, sending an output for each and acking it."""
    consumer: Any = manager.app.consumer
    cast(Conductor, manager.app.topics)._acking_topics.add("in")
    manager.app.consumer_generation_id = generation
    for offset in offsets:
        read = event(1, offset, generation)
        consumer.track_message(read.message)
        with kafka_transport.on_behalf_of(read):
            await manager.send("out", b"k", str(generation).encode(), 3, None, None)
        consumer.ack(read.message)
    return consumer


async def test_a_rebalance_forgets_the_acks_of_the_outputs_it_drops() -> None:
    """The acks made while faust's revocation waited for the streams stayed uncommitted
    when a periodic commit was running: after the seek back to the commit, the next commit
    went past those events before they were read again, and their answers never came."""
    manager, producer = transactions({"eos-0-1"})
    consumer = await handled(manager, range(10, 12), generation=1)
    await manager.on_rebalance({TP("in", 1)}, set(), set())
    consumer._committed_offset[TP("in", 1)] = 10  # the seek back to the commit
    assert consumer._filter_committable_offsets([TP("in", 1)]) == {}
    await handled(manager, range(10, 12), generation=2)
    offsets = consumer._filter_committable_offsets([TP("in", 1)])
    assert offsets == {TP("in", 1): 12}
    await manager.commit(offsets)
    assert producer.sent == [(b"2", "eos-0-1"), (b"2", "eos-0-1")]


async def test_the_revocation_s_last_commit_waits_out_a_commit_in_flight_then_commits() -> None:
    """faust's waited for the commit in flight and returned: the events the streams
    finished meanwhile were neither committed nor kept past the rebalance."""
    manager, producer = transactions({"eos-0-1"})
    consumer = await handled(manager, range(10, 12), generation=1)
    consumer._committed_offset[TP("in", 1)] = 10
    consumer.assignment = lambda: {TP("in", 1)}
    in_flight: asyncio.Future[None] = asyncio.get_running_loop().create_future()
    consumer._commit_fut = in_flight
    ending = asyncio.ensure_future(consumer.commit_and_end_transactions())
    await asyncio.sleep(0)
    assert producer.committed == []
    consumer._commit_fut = None
    in_flight.set_result(None)
    await ending
    assert producer.committed == [{"eos-0-1": {TP("in", 1): 12}}]
    assert producer.sent == [(b"1", "eos-0-1"), (b"1", "eos-0-1")]


async def test_an_ack_of_an_event_read_before_the_last_rebalance_commits_nothing() -> None:
    manager, _producer = transactions({"eos-0-1"})
    consumer: Any = manager.app.consumer
    cast(Conductor, manager.app.topics)._acking_topics.add("in")
    manager.app.consumer_generation_id = 2
    late = event(1, 10, generation=1).message
    consumer.track_message(late)
    consumer._committed_offset[TP("in", 1)] = 10
    assert not consumer.ack(late)
    assert late.acked
    assert consumer._filter_committable_offsets([TP("in", 1)]) == {}


def test_stream_partitions_without_a_commit_above_zero_go_back_to_their_start() -> None:
    committed: dict[TopicPartition, int | None] = {
        TopicPartition("llm.stage.ratelimit", 0): None,
        TopicPartition("llm.stage.ratelimit", 1): 0,
        TopicPartition("llm.stage.ratelimit", 2): 5,
        TopicPartition("app-ratelimit-buckets-changelog", 0): None,
    }
    rewound = never_committed(committed, lambda tp: tp.topic.endswith("-changelog"))
    assert rewound == [
        TopicPartition("llm.stage.ratelimit", 0),
        TopicPartition("llm.stage.ratelimit", 1),
    ]
