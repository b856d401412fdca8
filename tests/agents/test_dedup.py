"""InflightRegistry over a plain dict: lead, follow, alone, stale locks, release."""

from __future__ import annotations

from typing import Any

import pytest

from agents.dedup import Admission, InflightRegistry
from schemas.messages import (
    CachePolicy,
    ChatMessage,
    Envelope,
    LLMRequest,
    Role,
    encode_embedding,
)
from tests.agents.test_cache import BASE, near
from topology.settings import DedupSettings, SemanticCacheSettings

FP = "f" * 64


def envelope(request_id: str, read: bool = True, fingerprint: str = FP) -> Envelope:
    request = LLMRequest(
        id=request_id,
        tenant="acme",
        messages=[ChatMessage(role=Role.USER, content="hello")],
        cache=CachePolicy(read=read),
    )
    return Envelope(request=request, fingerprint=fingerprint, prompt_tokens=1)


@pytest.fixture
def entries() -> dict[str, Any]:
    return {}


@pytest.fixture
def registry(entries: dict[str, Any]) -> InflightRegistry:
    return InflightRegistry(entries, DedupSettings(lock_timeout_s=60.0, max_followers=2))


def test_first_leads(registry: InflightRegistry, entries: dict[str, Any]) -> None:
    assert registry.admit(envelope("a"), now=10.0) is Admission.LEAD
    assert entries == {
        FP: {
            "leader": "a",
            "started_at": 10.0,
            "followers": [],
            "follower_bytes": 0,
            "partition": 0,
        }
    }


def test_identical_second_follows(registry: InflightRegistry, entries: dict[str, Any]) -> None:
    registry.admit(envelope("a"), now=10.0)
    assert registry.admit(envelope("b"), now=11.0) is Admission.FOLLOW
    stored = entries[FP]
    assert stored["leader"] == "a"
    assert stored["started_at"] == 10.0
    assert [f["request"]["id"] for f in stored["followers"]] == ["b"]
    assert [f.merge_kind for f in registry.followers(FP, "a")] == ["exact"]


def test_a_duplicate_on_another_partition_goes_alone(
    registry: InflightRegistry, entries: dict[str, Any]
) -> None:
    registry.admit(envelope("a"), now=10.0, partition=1)
    assert registry.admit(envelope("b"), now=11.0, partition=2) is Admission.ALONE
    assert entries[FP]["followers"] == []


def test_different_fingerprints_both_lead(registry: InflightRegistry) -> None:
    assert registry.admit(envelope("a"), now=10.0) is Admission.LEAD
    assert registry.admit(envelope("b", fingerprint="0" * 64), now=10.0) is Admission.LEAD


def test_no_cache_read_goes_alone_and_is_not_registered(
    registry: InflightRegistry, entries: dict[str, Any]
) -> None:
    assert registry.admit(envelope("a", read=False), now=10.0) is Admission.ALONE
    assert entries == {}
    registry.admit(envelope("b"), now=10.0)
    assert registry.admit(envelope("c", read=False), now=10.0) is Admission.ALONE
    assert entries[FP]["followers"] == []


def test_stale_lock_is_taken_over_and_followers_inherited(
    registry: InflightRegistry, entries: dict[str, Any]
) -> None:
    registry.admit(envelope("a"), now=10.0)
    registry.admit(envelope("b"), now=20.0)
    assert registry.admit(envelope("c"), now=69.9) is Admission.FOLLOW
    assert registry.admit(envelope("d"), now=70.0) is Admission.LEAD
    stored = entries[FP]
    assert stored["leader"] == "d"
    assert stored["started_at"] == 70.0
    assert [f["request"]["id"] for f in stored["followers"]] == ["b", "c"]
    # the old leader no longer owns the flight; the new one does
    assert registry.followers(FP, "a") == []
    registry.end(FP, "a")
    assert [f.request.id for f in registry.followers(FP, "d")] == ["b", "c"]


def test_max_followers_bound_sends_the_rest_alone(
    registry: InflightRegistry, entries: dict[str, Any]
) -> None:
    registry.admit(envelope("a"), now=10.0)
    assert registry.admit(envelope("b"), now=10.0) is Admission.FOLLOW
    assert registry.admit(envelope("c"), now=10.0) is Admission.FOLLOW
    assert registry.admit(envelope("d"), now=10.0) is Admission.ALONE
    assert len(entries[FP]["followers"]) == 2


def test_release_by_the_leader_returns_followers(
    registry: InflightRegistry, entries: dict[str, Any]
) -> None:
    registry.admit(envelope("a"), now=10.0)
    registry.admit(envelope("b"), now=10.0)
    registry.admit(envelope("c"), now=10.0)
    followers = registry.followers(FP, "a")
    assert all(isinstance(f, Envelope) for f in followers)
    assert [f.request.id for f in followers] == ["b", "c"]
    assert followers[0].fingerprint == FP
    assert followers[0].request.tenant == "acme"
    assert FP in entries, "the entry stays until its answers are out"
    registry.end(FP, "a")
    assert entries == {}
    assert registry.followers(FP, "a") == []


def test_release_by_a_wrong_leader_keeps_the_entry(
    registry: InflightRegistry, entries: dict[str, Any]
) -> None:
    registry.admit(envelope("a"), now=10.0)
    registry.admit(envelope("b"), now=10.0)
    before = dict(entries)
    assert registry.followers(FP, "b") == []
    registry.end(FP, "b")
    assert entries == before
    assert [f.request.id for f in registry.followers(FP, "a")] == ["b"]


def test_release_of_unknown_fingerprint_is_empty(registry: InflightRegistry) -> None:
    assert registry.followers("0" * 64, "a") == []
    registry.end("0" * 64, "a")


def test_redelivered_leader_leads_again_and_keeps_followers(
    registry: InflightRegistry, entries: dict[str, Any]
) -> None:
    assert registry.admit(envelope("a"), now=10.0) is Admission.LEAD
    assert registry.admit(envelope("b"), now=11.0) is Admission.FOLLOW
    assert registry.admit(envelope("a"), now=12.0) is Admission.LEAD
    assert [f["request"]["id"] for f in entries[FP]["followers"]] == ["b"]
    assert [f.request.id for f in registry.followers(FP, "a")] == ["b"]


def test_followers_are_bounded_by_bytes_too(entries: dict[str, Any]) -> None:
    one = len(envelope("b").model_dump_json())
    registry = InflightRegistry(
        entries, DedupSettings(max_followers=1000, max_follower_bytes=2 * one + one // 2)
    )
    registry.admit(envelope("a"), now=10.0)
    assert registry.admit(envelope("b"), now=10.0) is Admission.FOLLOW
    assert registry.admit(envelope("c"), now=10.0) is Admission.FOLLOW
    assert registry.admit(envelope("d"), now=10.0) is Admission.ALONE
    assert 2 * one - 10 <= entries[FP]["follower_bytes"] <= 2 * one + one // 2


def asking(
    request_id: str,
    text: str,
    vector: Any,
    tenant: str = "acme",
    fingerprint: str | None = None,
) -> Envelope:
    request = LLMRequest(
        id=request_id, tenant=tenant, messages=[ChatMessage(role=Role.USER, content=text)]
    )
    return Envelope(
        request=request,
        fingerprint=fingerprint or request_id * 64,
        embedding=encode_embedding(vector),
    )


ASKED = "How do I reverse a list in Python?"
PARAPHRASE = "How can I reverse a Python list?"


@pytest.fixture
def merging(entries: dict[str, Any]) -> InflightRegistry:
    semantic = SemanticCacheSettings(enabled=True, threshold=0.9)
    return InflightRegistry(entries, DedupSettings(lock_timeout_s=60.0), semantic)


def test_a_near_identical_request_follows_the_leader_in_flight(
    merging: InflightRegistry, entries: dict[str, Any]
) -> None:
    assert merging.admit(asking("a", ASKED, BASE), now=10.0) is Admission.LEAD
    assert merging.admit(asking("b", PARAPHRASE, near(BASE, 0.95)), now=11.0) is Admission.FOLLOW
    assert list(entries) == ["a" * 64], "the follower waits in the leader's entry"
    (follower,) = merging.followers("a" * 64, "a")
    assert follower.request.id == "b" and follower.merge_kind == "semantic"


@pytest.mark.parametrize(
    "other",
    [
        asking("b", PARAPHRASE, near(BASE, 0.85)),  # below the threshold
        asking("b", PARAPHRASE, near(BASE, 0.99), tenant="globex"),  # another tenant
        asking("b", "How do I not reverse a list in Python?", near(BASE, 0.99)),  # negation
        asking("b", "How do I reverse 2 lists in Python?", near(BASE, 0.99)),  # a number
    ],
)
def test_what_never_merges_by_meaning(merging: InflightRegistry, other: Envelope) -> None:
    merging.admit(asking("a", ASKED, BASE), now=10.0)
    assert merging.admit(other, now=11.0) is Admission.LEAD


def test_a_finished_or_stale_leader_is_not_followed(merging: InflightRegistry) -> None:
    merging.admit(asking("a", ASKED, BASE), now=10.0)
    merging.end("a" * 64, "a")
    assert merging.admit(asking("b", PARAPHRASE, near(BASE, 0.95)), now=11.0) is Admission.LEAD
    assert merging.admit(asking("c", PARAPHRASE, near(BASE, 0.95)), now=80.0) is Admission.LEAD


def test_near_duplicates_merge_only_within_a_partition(merging: InflightRegistry) -> None:
    merging.admit(asking("a", ASKED, BASE), now=10.0, partition=1)
    other = asking("b", PARAPHRASE, near(BASE, 0.95))
    assert merging.admit(other, now=11.0, partition=2) is Admission.LEAD


def test_without_the_semantic_layer_only_identical_requests_merge(
    registry: InflightRegistry,
) -> None:
    registry.admit(asking("a", ASKED, BASE), now=10.0)
    assert registry.admit(asking("b", PARAPHRASE, near(BASE, 0.99)), now=11.0) is Admission.LEAD


def waiting(request_id: str, since: float) -> Envelope:
    """A follower that entered dedup at `since`."""
    follower = envelope(request_id)
    follower.stage_entered_at = since
    return follower


def test_followers_past_the_lock_timeout_are_found_and_go_on_alone(
    registry: InflightRegistry, entries: dict[str, Any]
) -> None:
    registry.admit(waiting("a", 0.0), now=0.0, partition=3)
    registry.admit(waiting("b", 10.0), now=10.0, partition=3)
    registry.admit(waiting("c", 50.0), now=50.0, partition=3)
    assert registry.overdue(now=69.0) == []
    ((key, partition, oldest),) = registry.overdue(now=70.0)
    assert (key, partition, oldest.request.id) == (FP, 3, "b")
    leaving = registry.take_overdue(FP, now=70.0)
    assert [f.request.id for f in leaving] == ["b"]
    # While they are sent on, the leader's release does not answer them too.
    assert [f.request.id for f in registry.followers(FP, "a")] == ["c"]
    assert registry.overdue(now=70.0) == []
    registry.let_go(FP, leaving)
    assert [f["request"]["id"] for f in entries[FP]["followers"]] == ["c"]
    assert entries[FP]["leader"] == "a"


def test_letting_go_after_the_leader_ended_is_harmless(
    registry: InflightRegistry, entries: dict[str, Any]
) -> None:
    registry.admit(waiting("a", 0.0), now=0.0)
    registry.admit(waiting("b", 0.0), now=0.0)
    leaving = registry.take_overdue(FP, now=60.0)
    registry.end(FP, "a")
    registry.let_go(FP, leaving)
    assert entries == {}
    assert registry.take_overdue(FP, now=60.0) == []
