"""The feedback join: a feedback event meets its request's routed record once, by request
id and only from the tenant that asked; records are bounded."""

from __future__ import annotations

from agents.feedback import FeedbackJoin, good_of
from schemas.messages import FeedbackEvent, RoutedRecord


def routed(request_id: str, tenant: str = "acme", candidate: bool = False) -> RoutedRecord:
    return RoutedRecord(
        request_id=request_id,
        tenant=tenant,
        model="zoo-small",
        version="v1",
        candidate=candidate,
        features=[0.0] * 20,
    )


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
    join = FeedbackJoin(max_routed=10)
    join.remember(routed("r1", candidate=True))
    example = join.join(feedback("r1", correct=False))
    assert example is not None
    assert (example.routed.request_id, example.routed.candidate, example.good) == (
        "r1",
        True,
        False,
    )
    assert join.join(feedback("r1", correct=True)) is None


def test_only_the_tenant_that_asked_is_joined() -> None:
    join = FeedbackJoin(max_routed=10)
    join.remember(routed("r1", tenant="acme"))
    assert join.join(feedback("r1", tenant="other", correct=False)) is None
    assert join.join(feedback("r1", tenant="acme", correct=True)) is not None


def test_unlabelled_feedback_keeps_the_record_for_a_labelled_one() -> None:
    join = FeedbackJoin(max_routed=10)
    join.remember(routed("r1"))
    assert join.join(feedback("r1")) is None
    example = join.join(feedback("r1", rating=1.0))
    assert example is not None and example.good


def test_records_are_bounded_least_recent_first() -> None:
    join = FeedbackJoin(max_routed=2)
    for name in ("a", "b", "c"):
        join.remember(routed(name))
    assert list(join.routed) == ["b", "c"]
    assert join.join(feedback("a", correct=True)) is None
    assert join.join(feedback("c", correct=True)) is not None
