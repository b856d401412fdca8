"""Feedback: join each feedback event with what its request asked and who routed it.

Route sends a record of every request its classifier decided (prompt features, model,
router-model version, arm) to this stage's topic, keyed by request id like `llm.feedback`
and with as many partitions, so a request's record and its feedback reach one worker.
Records wait in a bounded in-memory LRU rather than a Table: a Table would add a
changelog write for every routed request, while a record lost to a restart or a
rebalance only leaves that request's feedback unjoined (counted). Feedback read before its
record waits for it (`feedback.early_wait_s`). The first feedback on a request joins and
uses its record up, so repeated feedback cannot weigh twice, and only the tenant that
asked can rate the answer. Joined examples go to the learn stage.
"""

from __future__ import annotations

import time
from collections import OrderedDict
from collections.abc import Callable

from faust.types import StreamT
from pydantic import ValidationError

from schemas.messages import FeedbackEvent, LabelledExample, RoutedRecord, dump
from streams import metrics
from streams.app import Pipeline, raw_bytes

STAGE = "feedback"


def good_of(event: FeedbackEvent) -> bool | None:
    """Whether the answer was good: `correct` when given, else a positive rating."""
    if event.correct is not None:
        return event.correct
    return None if event.rating is None else event.rating > 0


class FeedbackJoin:
    """The last `max_routed` routed records, and the join of feedback with them.

    Feedback can be read before its request's record: the two come on different topics,
    and a fast grader answers within milliseconds of the answer. Such feedback waits, up to
    `max_routed` events for at most `wait_s`, for the record to come."""

    def __init__(
        self, max_routed: int, wait_s: float, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self.max_routed = max_routed
        self.wait_s = wait_s
        self.clock = clock
        self.routed: OrderedDict[str, RoutedRecord] = OrderedDict()
        self.waiting: OrderedDict[str, list[tuple[float, FeedbackEvent]]] = OrderedDict()
        self.waiting_events = 0

    def remember(self, record: RoutedRecord) -> LabelledExample | None:
        """Keep `record`; the example it makes with feedback that came before it, if any."""
        self._expire()
        self.routed[record.request_id] = record
        self.routed.move_to_end(record.request_id)
        while len(self.routed) > self.max_routed:
            self.routed.popitem(last=False)
        example = None
        for _, event in self._take_waiting(record.request_id):
            if example is None:
                example = self._join(record, event)
            else:
                count("unjoined", event)
        return example

    def join(self, event: FeedbackEvent) -> LabelledExample | None:
        """The training example `event` makes, or None: unlabelled, from another tenant
        than the one that asked, or waiting for its record. Each event is counted once."""
        self._expire()
        record = self.routed.get(event.request_id)
        if record is not None:
            return self._join(record, event)
        self.waiting.setdefault(event.request_id, []).append((self.clock(), event))
        self.waiting_events += 1
        while self.waiting_events > self.max_routed:
            self._drop_oldest()
        return None

    def _join(self, record: RoutedRecord, event: FeedbackEvent) -> LabelledExample | None:
        """The first labelled event of the tenant that asked uses the record up."""
        if record.tenant != event.tenant:
            count("unjoined", event)
            return None
        count("candidate" if record.candidate else "incumbent", event)
        good = good_of(event)
        if good is None:
            return None
        del self.routed[event.request_id]
        return LabelledExample(routed=record, good=good)

    def _take_waiting(self, request_id: str) -> list[tuple[float, FeedbackEvent]]:
        events = self.waiting.pop(request_id, [])
        self.waiting_events -= len(events)
        return events

    def _drop_oldest(self) -> None:
        for _, event in self._take_waiting(next(iter(self.waiting))):
            count("unjoined", event)

    def _expire(self) -> None:
        """Waiting feedback whose record did not come in time is counted unjoined."""
        too_old = self.clock() - self.wait_s
        while self.waiting and next(iter(self.waiting.values()))[0][0] < too_old:
            self._drop_oldest()


def count(arm: str, event: FeedbackEvent) -> None:
    good = good_of(event)
    outcome = "unlabelled" if good is None else "good" if good else "bad"
    metrics.router_model_feedback.labels(arm, outcome).inc()


def attach(pipeline: Pipeline) -> None:
    settings = pipeline.settings
    join = FeedbackJoin(settings.feedback.max_routed, settings.feedback.early_wait_s)
    records = settings.stage(STAGE).topic.name
    channel = pipeline.app.topic(
        settings.topics.feedback.name, records, key_type=bytes, value_type=bytes
    )
    learn = pipeline.stage_topics["learn"]

    async def feedback(stream: StreamT[bytes]) -> None:
        async for event in stream.events():
            try:
                if event.message.topic == records:
                    example = join.remember(RoutedRecord.model_validate_json(raw_bytes(event)))
                else:
                    example = join.join(FeedbackEvent.model_validate_json(raw_bytes(event)))
            except ValidationError as exc:
                await pipeline.dead_letter(event, "bad_feedback", str(exc), None)
                continue
            if example is not None:
                key = example.routed.request_id.encode()
                await learn.send(key=key, value=dump(example))

    pipeline.app.agent(channel, name=STAGE)(feedback)
