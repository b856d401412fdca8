"""The replayer's pure parts: pacing, range selection, the shadow copy of a request."""

from __future__ import annotations

import math

import pytest

from llmflow.cli import parser
from llmflow.client import new_request
from llmflow.replay import REPLAYED_AT, Window, namespace_settings, pace, parse_time, shadow_copy
from topology.settings import Settings

TIMES = [100.0, 101.0, 101.5, 104.0]


def test_at_the_original_speed_sends_keep_their_gaps() -> None:
    assert pace(TIMES, 1.0) == [0.0, 1.0, 1.5, 4.0]


def test_at_speed_two_sends_come_at_half_the_gaps() -> None:
    assert pace(TIMES, 2.0) == [0.0, 0.5, 0.75, 2.0]


def test_infinite_speed_sends_at_once_unless_a_rate_caps_it() -> None:
    assert pace(TIMES, math.inf) == [0.0, 0.0, 0.0, 0.0]
    assert pace(TIMES, math.inf, max_rate=4.0) == [0.0, 0.25, 0.5, 0.75]


def test_a_rate_cap_only_stretches_gaps_shorter_than_its_interval() -> None:
    assert pace(TIMES, 1.0, max_rate=1.0) == [0.0, 1.0, 2.0, 4.0]


def test_pace_refuses_a_speed_that_is_not_positive() -> None:
    with pytest.raises(ValueError, match="speed"):
        pace(TIMES, 0.0)


def test_an_open_window_is_the_whole_partition() -> None:
    assert Window().bounds(50, None, None) == (0, None)


def test_offset_bounds_are_taken_as_given() -> None:
    assert Window(from_offset=10, to_offset=20).bounds(50, None, None) == (10, 20)
    assert Window(from_offset=10, to_offset=99).bounds(15, None, None) == (10, 99)
    assert Window(from_offset=30, to_offset=20).bounds(50, None, None) == (30, 30)


def test_time_bounds_use_the_offsets_found_for_the_times() -> None:
    window = Window(from_time=1000.0, to_time=2000.0)
    assert window.bounds(50, 12, 40) == (12, 40)
    # No record at or after to_time: up to the end; none at or after from_time: nothing.
    assert window.bounds(50, 12, None) == (12, None)
    assert window.bounds(50, None, None) == (50, None)


def test_time_and_offset_bounds_combine_to_the_narrower() -> None:
    window = Window(from_offset=20, to_offset=30, from_time=1.0, to_time=2.0)
    assert window.bounds(50, 12, 40) == (20, 30)
    assert window.bounds(50, 25, 28) == (25, 28)


def test_a_window_keeps_records_stamped_inside_its_times() -> None:
    window = Window(from_time=10.0, to_time=20.0)
    assert [window.keeps(ms) for ms in (9_999, 10_000, 19_999, 20_000)] == [
        False,
        True,
        True,
        False,
    ]
    assert Window().keeps(0)


def test_a_record_stamped_in_the_millisecond_a_window_opens_is_inside_it() -> None:
    window = Window(from_time=10.0004, to_time=20.0009)
    assert window.keeps(10_000) and not window.keeps(9_999)
    assert window.keeps(19_999) and not window.keeps(20_000)


def test_the_shadow_copy_keeps_the_id_and_answers_on_the_shadow_topic() -> None:
    request = new_request("add 2+3=", "acme", deadline=1010.0, metadata={"trace": "t1"})
    request.created_at = 1000.0
    copy = shadow_copy(request, "shadow.llm.responses", now=5000.0)
    assert copy.id == request.id and copy.messages == request.messages
    assert copy.created_at == 1000.0
    assert copy.reply_topic == "shadow.llm.responses"
    assert copy.deadline == 5010.0
    assert copy.metadata == {"trace": "t1", REPLAYED_AT: "5000.000000"}
    assert request.reply_topic is None and REPLAYED_AT not in request.metadata


def test_live_is_the_pipeline_itself_and_other_namespaces_are_prefixed() -> None:
    settings = Settings()
    assert namespace_settings(settings, "live") is settings
    shadow = namespace_settings(settings, "shadow")
    assert shadow.topics.requests.name == "shadow.llm.requests"
    assert shadow.app_id == "shadow.llmflow"


def test_times_are_unix_seconds_or_iso_8601_in_utc_by_default() -> None:
    assert parse_time("1700000000.5") == 1700000000.5
    assert parse_time("2023-11-14T22:13:20") == 1700000000.0
    assert parse_time("2023-11-14T23:13:20+01:00") == 1700000000.0


def test_the_command_line_reads_a_range_and_a_pace() -> None:
    line = "replay --namespace shadow --from-time 2023-11-14T22:13:20 --to-offset 40"
    args = parser().parse_args([*line.split(), "--speed", "inf", "--max-rate", "50"])
    assert (args.namespace, args.source) == ("shadow", "live")
    assert (args.from_time, args.to_time) == (1700000000.0, None)
    assert (args.from_offset, args.to_offset) == (None, 40)
    assert math.isinf(args.speed) and args.max_rate == 50.0
