"""Status records: folding reports in any order, and dropping old records."""

from __future__ import annotations

from agents.status import StatusBook, fold
from schemas.messages import ErrorCode, RequestStatus, Status, StatusEvent
from streams.locality import kafka_partition
from topology.settings import StatusSettings


def test_reports_fold_into_stages_model_retries_and_outcome() -> None:
    record = fold(None, StatusEvent(request_id="r", stage="preprocess", at=1.0))
    record = fold(record, StatusEvent(request_id="r", stage="infer", at=2.0, model="m", retries=1))
    record = fold(
        record,
        StatusEvent(
            request_id="r",
            stage="respond",
            at=3.0,
            model="m",
            retries=1,
            status=Status.OK,
            stage_latency_ms={"infer": 5.0},
        ),
    )
    assert record.reached == {"preprocess": 1.0, "infer": 2.0, "respond": 3.0}
    assert (record.model, record.retries, record.status) == ("m", 1, Status.OK)
    assert record.finished_at == 3.0 and record.stage_latency_ms == {"infer": 5.0}


def test_a_late_report_does_not_undo_the_answer() -> None:
    done = StatusEvent(
        request_id="r", stage="respond", at=3.0, status=Status.ERROR, error=ErrorCode.CANCELLED
    )
    record = fold(fold(None, done), StatusEvent(request_id="r", stage="infer", at=2.0, model="m"))
    assert record.status is Status.ERROR and record.error is ErrorCode.CANCELLED
    assert record.finished_at == 3.0 and record.updated_at == 3.0
    assert set(record.reached) == {"respond", "infer"}


def ids_of_partition(partition: int, count: int, partitions: int = 4) -> list[str]:
    ids = (f"r{i}" for i in range(10_000))
    return [i for i in ids if kafka_partition(i.encode(), partitions) == partition][:count]


def test_finished_records_are_dropped_after_keep_finished_s() -> None:
    records: dict[str, bytes] = {}
    book = StatusBook(records, StatusSettings(keep_finished_s=10.0, max_age_s=100.0), 4)
    first, second, third = ids_of_partition(0, 3)
    book.record(StatusEvent(request_id=first, stage="respond", status=Status.OK, at=0.0), 0, 0.0)
    book.record(StatusEvent(request_id=second, stage="preprocess", at=1.0), 0, 1.0)
    book.record(StatusEvent(request_id=third, stage="preprocess", at=20.0), 0, 20.0)
    assert set(records) == {second, third}


def test_at_most_max_entries_per_partition_oldest_first_out() -> None:
    records: dict[str, bytes] = {}
    book = StatusBook(records, StatusSettings(max_entries=2), 4)
    ids = ids_of_partition(1, 3)
    for index, request_id in enumerate(ids):
        book.record(StatusEvent(request_id=request_id, stage="preprocess"), 1, float(index))
    assert set(records) == set(ids[1:])


def test_a_partition_seen_first_is_indexed_from_the_table() -> None:
    settings = StatusSettings(keep_finished_s=10.0)
    old, new = ids_of_partition(2, 2)
    records: dict[str, bytes] = {}
    StatusBook(records, settings, 4).record(
        StatusEvent(request_id=old, stage="respond", status=Status.OK, at=0.0), 2, 0.0
    )
    restarted = StatusBook(records, settings, 4)
    restarted.record(StatusEvent(request_id=new, stage="preprocess", at=50.0), 2, 50.0)
    assert set(records) == {new}


def test_a_record_is_kept_as_its_json_the_changelog_carries() -> None:
    records: dict[str, bytes] = {}
    book = StatusBook(records, StatusSettings(), 4)
    (request_id,) = ids_of_partition(3, 1)
    record = book.record(StatusEvent(request_id=request_id, stage="preprocess", at=5.0), 3, 5.0)
    assert records[request_id] == record.model_dump_json().encode()
    assert RequestStatus.model_validate_json(records[request_id]) == book.get(request_id)
