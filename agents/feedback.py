"""Feedback: join each feedback event with what its request asked and who routed it.

Route sends a record of every request its classifier decided (prompt features, model,
router-model version, arm) to this stage's topic, keyed by request id like `llm.feedback`
and with as many partitions, so a request's record and its feedback reach one worker.
Records wait in a bounded in-memory LRU rather than a Table: a Table would add a
changelog write for every routed request, while a record lost to a restart or a
rebalance only leaves that request's feedback unjoined (counted). The first feedback on a
request joins and uses its record up, so repeated feedback cannot weigh twice, and only
the tenant that asked can rate the answer. Joined examples go to the learn stage.
"""

from __future__ import annotations

from collections import OrderedDict

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
    """The last `max_routed` routed records, and the join of feedback with them."""

    def __init__(self, max_routed: int) -> None:
        self.max_routed = max_routed
        self.routed: OrderedDict[str, RoutedRecord] = OrderedDict()

    def remember(self, record: RoutedRecord) -> None:
        self.routed[record.request_id] = record
        self.routed.move_to_end(record.request_id)
        while len(self.routed) > self.max_routed:
            self.routed.popitem(last=False)

    def join(self, event: FeedbackEvent) -> LabelledExample | None:
        """The training example `event` makes, or None (unlabelled, or no record of the
        request from its tenant here), each counted."""
        good = good_of(event)
        outcome = "unlabelled" if good is None else "good" if good else "bad"
        record = self.routed.get(event.request_id)
        if record is None or record.tenant != event.tenant:
            metrics.router_model_feedback.labels("unjoined", outcome).inc()
            return None
        metrics.router_model_feedback.labels(
            "candidate" if record.candidate else "incumbent", outcome
        ).inc()
        if good is None:
            return None
        del self.routed[event.request_id]
        return LabelledExample(routed=record, good=good)


def attach(pipeline: Pipeline) -> None:
    settings = pipeline.settings
    join = FeedbackJoin(settings.feedback.max_routed)
    records = settings.stage(STAGE).topic.name
    channel = pipeline.app.topic(
        settings.topics.feedback.name, records, key_type=bytes, value_type=bytes
    )
    learn = pipeline.stage_topics["learn"]

    async def feedback(stream: StreamT[bytes]) -> None:
        async for event in stream.events():
            try:
                if event.message.topic == records:
                    join.remember(RoutedRecord.model_validate_json(raw_bytes(event)))
                    continue
                example = join.join(FeedbackEvent.model_validate_json(raw_bytes(event)))
            except ValidationError as exc:
                await pipeline.dead_letter(event, "bad_feedback", str(exc), None)
                continue
            if example is not None:
                key = example.routed.request_id.encode()
                await learn.send(key=key, value=dump(example))

    pipeline.app.agent(channel, name=STAGE)(feedback)
