"""The fuzz generator: reproducible, every kind of bad input, and nothing a worker accepts."""

from __future__ import annotations

import pytest

from agents.preprocess import InvalidRequest, Preprocessor
from bench.fuzz import MAKERS, FuzzCase, malformed
from topology.settings import Settings

COUNT = 2000


@pytest.fixture(scope="module")
def cases() -> list[FuzzCase]:
    return list(malformed(Settings(), COUNT, seed=3))


def test_the_same_seed_gives_the_same_cases(cases: list[FuzzCase]) -> None:
    again = list(malformed(Settings(), COUNT, seed=3))
    assert [c.raw for c in again] == [c.raw for c in cases]
    other = list(malformed(Settings(), COUNT, seed=4))
    assert [c.raw for c in other] != [c.raw for c in cases]


def test_every_kind_and_every_rejection_reason_occurs(cases: list[FuzzCase]) -> None:
    assert len(cases) == COUNT
    assert {c.kind for c in cases} == set(MAKERS)
    reasons = {c.reason for c in cases}
    wanted = {"schema", "invalid_unicode", "not_json", "oversized"}
    assert wanted | {"unknown_model", "bad_max_tokens"} <= reasons


def test_each_case_is_rejected_with_the_id_it_records(cases: list[FuzzCase]) -> None:
    preprocessor = Preprocessor(Settings())
    for case in cases:
        with pytest.raises(InvalidRequest) as raised:
            preprocessor.parse(case.raw)
        assert raised.value.request_id == case.request_id
        assert raised.value.reply_topic is None
    readable = [c.request_id for c in cases if c.request_id]
    assert 0 < len(readable) < len(cases)  # some answerable, some only dead-lettered
