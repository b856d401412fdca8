"""faust's aiokafka transport, tuned for low per-hop latency, with transactions that hold
for stages that re-key.

Two changes to faust 0.15's driver: the consumer's `fetch_max_wait_ms` (hard-coded there
to 1500) comes from `Settings.consumer_fetch_max_wait_ms`, since a broker that holds an
empty fetch that long delays every hop (on Tansu, 100 ms of wait already gave a 26 ms p50
hop); and partitions faust pauses are paused in aiokafka too (see ShortWaitConsumer).

With `processing_guarantee="exactly_once"`, faust 0.15 puts a send into the transaction of
the partition it goes *to* and an offset into the transaction of the partition it was
read from. Stages that re-key send to partitions the other worker owns ("No transaction
producer found"), and an event's output and its offset commit in different transactions.
Here (EventTransactions) a send waits in the transaction of the partition its event was
read from until the commit that covers the event's offset: each commit sends the outputs
of exactly the events below the offset it commits, so output and offset become visible
together or not at all. A send made for no event (a timer's) belongs to no transaction and
goes out at once.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Iterator, Mapping
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass
from functools import partial
from typing import Any, cast

import aiokafka
from aiokafka import TopicPartition
from faust.exceptions import ProducerSendError
from faust.streams import current_event
from faust.transport.consumer import TransactionManager
from faust.transport.drivers import TRANSPORTS
from faust.transport.drivers import aiokafka as faust_aiokafka
from faust.types import TP, EventT, FutureMessage, Message, RecordMetadata
from faust.types.core import HeadersArg
from faust.types.tuples import ack_lock

SCHEME = "llmflow-kafka"
# A partition read again from an offset passed over is read again once more if it still
# lacks it this much later.
REREAD_AFTER_S = 10.0
fetch_max_wait_ms = 5
PREFETCH_BACKOFF_S = 0.005
log = logging.getLogger(__name__)
# The event whose transaction sends join, where it is not faust's current event.
acting_for: ContextVar[EventT[Any] | None] = ContextVar("acting_for", default=None)
# While a commit sends the outputs it covers: their transactional id.
releasing: ContextVar[str | None] = ContextVar("releasing", default=None)


class ShortWaitConsumerThread(faust_aiokafka.AIOKafkaConsumerThread):
    def _create_worker_consumer(self, transport: Any) -> aiokafka.AIOKafkaConsumer:
        consumer = super()._create_worker_consumer(transport)
        consumer._fetch_max_wait_ms = fetch_max_wait_ms
        return consumer

    async def on_start(self) -> None:
        """aiokafka holds back every fetch to a broker for up to 100 ms (its prefetch
        backoff) while records it fetched for any partition wait to be taken; under load
        there nearly always are some, so each hop waited about 55 ms at 100 req/s. It now
        waits 5 ms, whatever the fetch wait: Apache Kafka answers a waiting fetch as soon
        as a record arrives, so there the fetch wait may be long without holding a hop."""
        await super().on_start()
        self._ensure_consumer()._fetcher._prefetch_backoff = PREFETCH_BACKOFF_S

    async def seek_to_committed(self) -> Mapping[TP, int]:
        return cast(Mapping[TP, int], await self.call_thread(self._seek_to_committed))

    async def _seek_to_committed(self) -> dict[TP, int]:
        """A stream partition with no commit, or a commit of 0, goes back to its start, as
        one with a later commit goes back to it: aiokafka seeks only to commits above 0, so
        what faust passed over around a rebalance before a partition's first commit was
        never read again (offset 0 is before the log's start once retention has trimmed
        it, and aiokafka then resets to the earliest).

        Under exactly-once, never back past what this worker delivered since the
        partition's assignment (see ShortWaitConsumer), nor past its own last commit: a
        transactional commit is read back only once the coordinator has written its
        markers, which it does after the commit returns (Java asks for stable offsets,
        KIP-447; aiokafka cannot), so right after a rebalance a kept partition read an
        older offset and its last events were handled twice. A partition new to this worker
        is stable: its transactional producer's start waited for the last owner's
        transaction to end."""
        consumer = self._ensure_consumer()
        committed: dict[TP, int] = await consumer.seek_to_committed()
        owner = cast(ShortWaitConsumer, self.consumer)
        for tp in never_committed(committed, owner._is_changelog_tp):
            consumer.seek(tp, 0)
        if not owner.in_transaction:
            return committed
        own_commits = cast(EventTransactions, owner.transactions).committed
        for tp, offset in committed.items():
            key = TP(tp.topic, tp.partition)
            delivered = owner.delivered.get(key)
            floors = [own_commits.get(key), None if delivered is None else delivered + 1]
            floor = max((f for f in floors if f is not None), default=None)
            if floor is not None and (offset is None or floor > offset):
                consumer.seek(tp, floor)
                committed[tp] = floor
        return committed


def never_committed(
    committed: Mapping[TopicPartition, int | None], is_changelog: Callable[[TP], bool]
) -> list[TopicPartition]:
    """The stream partitions whose commit is missing or 0, where aiokafka's seek to the
    committed offsets leaves the position as it stands."""
    return [
        tp
        for tp, offset in committed.items()
        if not offset and not is_changelog(TP(tp.topic, tp.partition))
    ]


@dataclass(frozen=True)
class CommitPlan:
    """What one partition's commit may do: `position` is the offset to commit (None: nothing
    new), `lost_from` the first offset that was passed over unhandled (None: none was)."""

    position: int | None
    lost_from: int | None = None


def plan_commit(
    acked: Iterable[int], held: Iterable[int], committed: int | None, contiguous: bool
) -> CommitPlan:
    """The offset to commit for one partition: past acked messages, but never past one
    delivered and not yet acked (`held`).

    With `contiguous` (a topic with no offsets that are never delivered: no transaction
    markers, no compaction), nor past an offset that was neither acked nor held while a
    later one was acked: faust passed it over around a rebalance, and it is `lost_from`
    until read again. Without, offsets never delivered (markers) are stepped over.
    """
    done = set(acked)
    if not done:
        return CommitPlan(None)
    pending = [offset for offset in held if committed is None or offset >= committed]
    limit = min(pending, default=None)
    lost_from = None
    if contiguous and committed is not None:
        position = committed
        while position in done:
            position += 1
        if max(done) > position and position != limit:
            lost_from = position
    else:
        position = max(done) + 1
    if limit is not None:
        position = min(position, limit)
    if committed is not None and position <= committed:
        return CommitPlan(None, lost_from)
    return CommitPlan(position, lost_from)


class ShortWaitConsumer(faust_aiokafka.Consumer):
    """Pauses and resumes partitions in aiokafka too, not only in faust's bookkeeping, and
    commits no offset past a message still being handled.

    faust pauses its Tables' changelog partitions after recovery only in its own lists:
    aiokafka kept fetching them and nothing took the records, and aiokafka holds back every
    fetch to a broker for 100 ms while any fetched records wait untaken. So the first
    changelog write to each partition stalled every topic for 100 ms.

    faust 0.15 commits the first run of consecutive acked offsets, checking only that it
    starts no more than one past the last commit, and not at all before the first: a message
    acked out of order (the batch stage acks each request when its batch is done) let it
    commit past an earlier message still in a batch, and a worker killed then lost that
    request, since no one reads it again.

    faust's stream also passes over messages near a rebalance: one stamped with an older
    generation, or taken while flow is stopped, is skipped after its read offset has
    moved on (in one worker-kill run the survivor passed over 12 requests of a partition
    it took over). Without transactions every offset of a topic is delivered, so one
    neither acked nor held below an acked one (and not jumped over by a fetch: a
    transaction marker) was skipped: the commit stops before it, and the partition is
    read again from there.

    After a rebalance faust resumes the stream partitions before it seeks them back to their
    commits, and may seek twice: aiokafka delivered records from where it stood, the seek
    rewound, and faust delivered them again (or, taken while flow was stopped, skipped
    them). A partition stays paused in aiokafka from its assignment until it has been
    seeked; under exactly-once, where an offset must be handled once, no later seek rewinds
    past what was delivered since (`delivered`).
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._unseeked: set[TP] = set()
        self._rereads: dict[TP, tuple[int, float]] = {}
        self._seeks: set[asyncio.Future[None]] = set()
        self.delivered: dict[TP, int] = {}

    def _filter_committable_offsets(self, tps: Iterable[TP]) -> dict[TP, int]:
        """The offset to commit for each of `tps`: one pass over the messages in flight for
        all of them (faust's `_new_offset` is asked per partition)."""
        held: dict[TP, list[int]] = {}
        for message in self._unacked_messages:
            if not message.acked:
                held.setdefault(message.tp, []).append(message.offset)
        offsets = {}
        for tp in tps:
            offset = self._offset_to_commit(tp, held.get(tp, []))
            if offset is not None and self._should_commit(tp, offset):
                offsets[tp] = offset
        return offsets

    def _offset_to_commit(self, tp: TP, held: list[int]) -> int | None:
        acked = self._acked[tp]
        # Offsets faust saw the fetch jump over (transaction markers, compaction).
        jumped = (o for gap in self._gap[tp] for o in range(gap.begin, gap.end))
        done = [*acked, *jumped]
        plan = plan_commit(done, held, self._committed_offset[tp], not self.in_transaction)
        if plan.lost_from is not None:
            self._read_again(tp, plan.lost_from)
        position = plan.position
        if position is None:
            return None
        finished = [offset for offset in acked if offset < position]
        acked[:] = [offset for offset in acked if offset >= position]
        self._acked_index[tp].difference_update(finished)
        self._gap[tp].chop(0, position)
        return position

    def _read_again(self, tp: TP, offset: int) -> None:
        """Seek back to `offset`, passed over unhandled. Still missing `REREAD_AFTER_S`
        after that, it is a record no fetch delivers (a transaction marker of a producer
        that writes the topic, right where a seek began): step over it."""
        now = time.monotonic()
        last = self._rereads.get(tp)
        if last is not None and last[0] == offset:
            if now - last[1] >= REREAD_AFTER_S:
                log.warning("%s: offset %d still not delivered; stepping over it", tp, offset)
                self._gap[tp].addi(offset, offset + 1)
                del self._rereads[tp]
            return
        self._rereads[tp] = (offset, now)
        log.warning("%s: offset %d was passed over unhandled; reading from it again", tp, offset)
        task = asyncio.ensure_future(self.seek(tp, offset))
        self._seeks.add(task)
        task.add_done_callback(self._seeks.discard)

    def ack(self, message: Message) -> bool:
        """Under exactly-once, an event read before the last rebalance counts for no commit:
        its outputs were dropped or refused then, and the seek back to the commit reads it
        again."""
        if self.in_transaction and message.generation_id != self.app.consumer_generation_id:
            with ack_lock:
                message.acked = True
                self._unacked_messages.discard(message)
            return False
        return bool(super().ack(message))

    def forget_acks(self) -> None:
        """Drop every ack not yet committed, with the offsets seen jumped over: under
        exactly-once a rebalance drops the outputs of those events, and the first commit
        after the seek back to the last commit could pass them before they were read
        again, their answers lost. The revocation's last commit usually leaves none."""
        with ack_lock:
            for tp, acked in self._acked.items():
                if acked:
                    log.info("forgot %d acks of %s, uncommitted at a rebalance", len(acked), tp)
            self._acked.clear()
            self._acked_index.clear()
            self._gap.clear()
            self._n_acked = 0

    def _new_consumer_thread(self) -> faust_aiokafka.AIOKafkaConsumerThread:
        return ShortWaitConsumerThread(self, loop=self.loop, beacon=self.beacon)

    async def on_partitions_revoked(self, revoked: set[TP]) -> None:
        """Under exactly-once, commit what was handled before faust forgets it: it drops
        every revoked partition's acks (all of them, as aiokafka's rebalances revoke all)
        before it waits for the events in flight and commits, so the events acked since the
        last commit were handled again after the rebalance, their outputs sent twice."""
        if self.in_transaction:
            await self.commit_now()
        await super().on_partitions_revoked(revoked)

    async def commit_now(self, start_new_transaction: bool = True) -> bool:
        """Commit what is acked now. faust's `commit`, asked while another commit runs,
        waits for that one and returns without committing; under exactly-once the periodic
        commit nearly always runs (every 100 ms, each taking about as long)."""
        while await self.maybe_wait_for_commit_to_finish():
            pass
        return bool(await self.commit(start_new_transaction=start_new_transaction))

    async def commit_and_end_transactions(self) -> None:
        """The revocation's last commit, once the streams are empty: a real one, so what
        they finished meanwhile goes out now, not dropped at the rebalance and done again."""
        await self.commit_now(start_new_transaction=False)

    async def on_partitions_assigned(self, assigned: set[TP], generation_id: int = 0) -> None:
        """Changelogs are read only while recovering, which resumes them; pause them first,
        and the stream partitions too, until they are seeked."""
        self._unseeked = {tp for tp in assigned if not self._is_changelog_tp(tp)}
        if self.in_transaction:
            self.delivered = {}
        paused = [tp for tp in assigned if self._is_changelog_tp(tp) or tp in self._unseeked]
        self._in_consumer_thread("pause", paused)
        await super().on_partitions_assigned(assigned, generation_id)

    async def getmany(self, timeout: float) -> AsyncIterator[tuple[TP, Message]]:
        """Notes what was delivered since the assignment: no later seek rewinds past it."""
        async for tp, message in super().getmany(timeout):
            if self.in_transaction and not self._is_changelog_tp(tp):
                self.delivered[tp] = message.offset
            yield tp, message

    async def perform_seek(self) -> None:
        await super().perform_seek()
        seeked, self._unseeked = self._unseeked, set()
        self._in_consumer_thread(
            "resume", [tp for tp in seeked if tp not in self._paused_partitions]
        )

    def pause_partitions(self, tps: Iterable[TP]) -> None:
        tps = list(tps)
        super().pause_partitions(tps)
        self._in_consumer_thread("pause", tps)

    def resume_partitions(self, tps: Iterable[TP]) -> None:
        tps = list(tps)
        super().resume_partitions(tps)
        self._in_consumer_thread("resume", [tp for tp in tps if tp not in self._unseeked])

    def _in_consumer_thread(self, action: str, tps: list[TP]) -> None:
        """aiokafka's consumer belongs to the consumer thread's loop: change it there."""
        consumer = self._thread._consumer
        if consumer is None or not tps:
            return

        def apply() -> None:
            assigned = consumer.assignment()
            owned = [TopicPartition(tp.topic, tp.partition) for tp in tps]
            getattr(consumer, action)(*(tp for tp in owned if tp in assigned))

        self._thread.thread_loop.call_soon_threadsafe(apply)


@contextmanager
def on_behalf_of(event: EventT[Any]) -> Iterator[None]:
    """Sends made inside join `event`'s transaction. For tasks that finish events their own
    stream did not just yield (the batch stage's batches): faust's current event is the
    one a stream last yielded to the task, and a task that was started apart has none."""
    token = acting_for.set(event)
    try:
        yield
    finally:
        acting_for.reset(token)


def source_of_sends() -> Message | None:
    """The consumed message whose transaction a send made here and now joins."""
    event = acting_for.get() or current_event()
    return None if event is None else event.message


class PartitionRevoked(ProducerSendError):
    """A send for an event of a partition this worker no longer owns: its new owner handles
    the event again from the last commit, so this output must never go out."""


@dataclass
class Deferred:
    offset: int
    release: Callable[[], Awaitable[Any]]


def settle_from(delivery: asyncio.Future[RecordMetadata], sent: asyncio.Future[Any]) -> None:
    """Resolve `sent` as `delivery` resolves."""

    def copy(done: asyncio.Future[RecordMetadata]) -> None:
        if sent.done():
            return
        if done.cancelled():
            sent.cancel()
        elif done.exception() is not None:
            sent.set_exception(cast(BaseException, done.exception()))
        else:
            sent.set_result(done.result())

    delivery.add_done_callback(copy)


class EventTransactions(TransactionManager):
    """Transactions per consumed partition, holding each event's sends until the commit
    that covers it (see the module's docstring)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._deferred: dict[TP, list[Deferred]] = {}
        # This worker's last commit of each partition it has: faust forgets its own at
        # every rebalance, and the broker may not show it yet (ShortWaitConsumerThread).
        self.committed: dict[TP, int] = {}

    def transactional_id(self, tp: TP) -> str:
        """faust's id for the transaction that commits `tp`'s offsets."""
        return f"{self.app.conf.id}-{self.app.assignor.group_for_topic(tp.topic)}-{tp.partition}"

    def defer(self, source: Message, release: Callable[[], Awaitable[Any]]) -> None:
        """Run `release` in the commit of `source`'s partition that passes its offset."""
        producer = cast(TransactionalProducer, self.producer)
        if not producer.holds(self.transactional_id(source.tp)):
            raise PartitionRevoked(f"{source.tp} is no longer assigned to this worker")
        generation = self.app.consumer_generation_id
        if source.generation_id is not None and source.generation_id != generation:
            raise PartitionRevoked(
                f"{source.tp}@{source.offset} was read in generation {source.generation_id}, "
                f"before the rebalance to {generation}: it is read again from its commit"
            )
        self._deferred.setdefault(source.tp, []).append(Deferred(source.offset, release))

    async def send(
        self,
        topic: str,
        key: bytes | None,
        value: bytes | None,
        partition: int | None,
        timestamp: float | None,
        headers: HeadersArg | None,
        *,
        transactional_id: str | None = None,
    ) -> Awaitable[RecordMetadata]:
        releasing_into = releasing.get()
        source = None if releasing_into is not None else source_of_sends()
        if source is None:
            return await self.producer.send(
                topic, key, value, partition, timestamp, headers, transactional_id=releasing_into
            )
        sent: asyncio.Future[RecordMetadata] = asyncio.get_running_loop().create_future()

        async def release() -> None:
            delivery = await self.send(topic, key, value, partition, timestamp, headers)
            settle_from(cast(asyncio.Future[RecordMetadata], delivery), sent)

        self.defer(source, release)
        return sent

    async def commit(self, offsets: Mapping[TP, int], start_new_transaction: bool = True) -> bool:
        for tp, offset in offsets.items():
            await self._release(tp, offset)
        committed: bool = await super().commit(offsets, start_new_transaction)
        self.committed.update(offsets)
        return committed

    async def _release(self, tp: TP, offset: int) -> None:
        """Send the held outputs of `tp`'s events below `offset` into its transaction."""
        held = self._deferred.get(tp, [])
        self._deferred[tp] = [d for d in held if d.offset >= offset]
        token = releasing.set(self.transactional_id(tp))
        try:
            for deferred in held:
                if deferred.offset < offset:
                    await deferred.release()
        finally:
            releasing.reset(token)

    async def on_rebalance(
        self, assigned: set[TP], revoked: set[TP], newly_assigned: set[TP]
    ) -> None:
        """Every held output goes, and every ack not committed with it: a revoked
        partition's new owner redoes its events, and a kept partition is seeked back to its
        commit, below every held output's event, so this worker redoes them (keeping them
        answered those requests twice, in one committed transaction). A revoked
        partition's producer stops too: faust stops only those of partitions that are not
        now standbys, and its assignor makes a partition another worker took a standby
        here, so the producer lived on, fenced by the new owner, and was taken up again,
        fenced, when the partition came back (the survivor of a kill crashed on it)."""
        for tp in revoked:
            self.committed.pop(tp, None)
        for tp, dropped in self._deferred.items():
            if dropped:
                log.info("dropped %d outputs of %s, uncommitted at a rebalance", len(dropped), tp)
        self._deferred.clear()
        cast(ShortWaitConsumer, self.consumer).forget_acks()
        producer = cast(TransactionalProducer, self.producer)
        kept = self._tps_to_transactional_ids(assigned)
        await self._stop_transactions(sorted(producer.transactional_ids() - kept))
        await super().on_rebalance(assigned, revoked, newly_assigned)


class TransactionalProducer(faust_aiokafka.Producer):
    def holds(self, transactional_id: str) -> bool:
        return transactional_id in self._transaction_producers

    def transactional_ids(self) -> set[str]:
        return set(self._transaction_producers)

    async def commit_transactions(
        self,
        tid_to_offset_map: Mapping[str, Mapping[TP, int]],
        group_id: str,
        start_new_transaction: bool = True,
    ) -> None:
        """All at once: faust commits one transaction after another, several round trips
        each, and every hop under exactly-once waits for its sender's commit."""
        commit = super().commit_transactions
        await asyncio.gather(
            *(
                commit({tid: offsets}, group_id, start_new_transaction)
                for tid, offsets in tid_to_offset_map.items()
            )
        )

    async def maybe_begin_transaction(self, transactional_id: str) -> None:
        """Begin only where no transaction is open: faust begins on every assigned
        partition after a rebalance, and one that kept its partition and had nothing to
        commit is still in its transaction (`Invalid state transition
        TransactionState.IN_TRANSACTION -> IN_TRANSACTION`)."""
        producer = self._transaction_producers.get(transactional_id)
        if producer is None or not producer._txn_manager.is_in_transaction():
            await self.begin_transaction(transactional_id)

    def send_soon(self, fut: FutureMessage) -> None:
        """A Table's changelog write joins the transaction of the event that made it; faust
        buffers it and sends it from a task that knows no event."""
        source = source_of_sends()
        if not self.app.in_transaction or source is None:
            super().send_soon(fut)
            return
        transactions = cast(EventTransactions, self.app.consumer.transactions)
        transactions.defer(source, partial(fut.message.channel.publish_message, fut))


class Transport(faust_aiokafka.Transport):
    Consumer = ShortWaitConsumer
    Producer = TransactionalProducer
    TransactionManager = EventTransactions


def register(wait_ms: int) -> str:
    """Make `llmflow-kafka://` URLs resolve to this transport; returns the URL scheme."""
    global fetch_max_wait_ms
    fetch_max_wait_ms = wait_ms
    TRANSPORTS.aliases[SCHEME] = f"{__name__}:Transport"
    return SCHEME
