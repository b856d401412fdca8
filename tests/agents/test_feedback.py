"""The feedback join: a feedback event meets its request's routed record once, by request
id and only from the tenant that asked, whichever of the two is read first; records and
waiting feedback are bounded."""

from __future__ import annotations

from agents.feedback import FeedbackJoin, good_of
from schemas.messages import FeedbackEvent, RoutedRecord
from streams import metrics
from tests.clock import FakeClock


def routed(request_id: str, tenant: str = "acme", candidate: bool = False) -> RoutedRecord:
    return RoutedRecord(
        request_id=request_id,
        tenant=tenant,
        model="zoo-small",
        version="v1",
        candidate=candidate,
        features=[0.0] * 20,
    )


def new_join(
    max_routed: int = 10, wait_s: float = 60.0, clock: FakeClock | None = None
) -> FeedbackJoin:
    return FeedbackJoin(max_routed, wait_s, clock or FakeClock())


def unjoined(outcome: str) -> float:
    return float(metrics.router_model_feedback.labels("unjoined", outcome)._value.get())


def feedback(
    request_id: str, tenant: str = "acme", correct: bool | None = None, rating: float | None = None
) -> FeedbackEvent:
    return FeedbackEvent(request_id=request_id, tenant=tenant, correct=correct, rating=rating)


def test_correct_wins_over_rating_and_a_positive_rating_is_good() -> None:
    assert good_of(feedback("r", correct=False, rating=1.0)) is False
    assert good_of(feedback("r", rating=0.5)) is True
    assert good_of(feedback("r", rating=-0.5)) is False
    assert good_of(feedback("r", rating=0.0)) is False
    assert good_of(feedback("r")) is None


def test_feedback_joins_its_record_once() -> None:
    join = new_join()
    join.remember(routed("r1", candidate=True))
    example = join.join(feedback("r1", correct=False))
    assert example is not None
    assert (example.routed.request_id, example.routed.candidate, example.good) == (
        "r1",
        True,
        False,
    )
    assert join.join(feedback("r1", correct=True)) is None
    assert "r1" not in join.routed


def test_feedback_read_before_its_record_joins_when_the_record_comes() -> None:
    join = new_join()
    assert join.join(feedback("r1", tenant="other", correct=True)) is None
    assert join.join(feedback("r1", correct=False)) is None
    assert join.join(feedback("r1", correct=True)) is None
    before = unjoined("good")
    example = join.remember(routed("r1", candidate=True))
    assert example is not None and example.good is False, "the asking tenant's first label"
    assert unjoined("good") == before + 2, "the other tenant's and the repeated label"
    assert (join.waiting, join.waiting_events) == ({}, 0)


def test_waiting_feedback_is_counted_unjoined_after_wait_s_or_past_the_bound() -> None:
    clock = FakeClock(0.0)
    join = new_join(max_routed=2, wait_s=5.0, clock=clock)
    before = unjoined("bad")
    join.join(feedback("a", correct=False))
    clock.now = 3.0
    join.join(feedback("b", correct=False))
    clock.now = 5.5
    assert join.remember(routed("a")) is None, "a waited too long"
    assert unjoined("bad") == before + 1
    join.join(feedback("c", correct=False))
    join.join(feedback("d", correct=False))
    assert list(join.waiting) == ["c", "d"], "b went first: the oldest past the bound"
    assert unjoined("bad") == before + 2
    assert join.remember(routed("d")) is not None


def test_only_the_tenant_that_asked_is_joined() -> None:
    join = new_join()
    join.remember(routed("r1", tenant="acme"))
    assert join.join(feedback("r1", tenant="other", correct=False)) is None
    assert join.join(feedback("r1", tenant="acme", correct=True)) is not None


def test_unlabelled_feedback_keeps_the_record_for_a_labelled_one() -> None:
    join = new_join()
    join.remember(routed("r1"))
    assert join.join(feedback("r1")) is None
    example = join.join(feedback("r1", rating=1.0))
    assert example is not None and example.good


def test_records_are_bounded_least_recent_first() -> None:
    join = new_join(max_routed=2)
    for name in ("a", "b", "c"):
        join.remember(routed(name))
    assert list(join.routed) == ["b", "c"]
    assert join.join(feedback("a", correct=True)) is None
    assert join.join(feedback("c", correct=True)) is not None
