"""ExactCache over a dict (TTL, per-partition LRU), the `cacheable` rule, and the semantic
layer: what it serves and what it never does."""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import pytest

from agents.cache import (
    ExactCache,
    Freshness,
    SemanticCache,
    SemanticRecord,
    cacheable,
    same_answer,
    semantic_query,
)
from schemas.messages import (
    CachePolicy,
    ChatMessage,
    Envelope,
    ErrorCode,
    LLMRequest,
    Result,
    Role,
    SemanticCheck,
    Status,
    Usage,
    encode_embedding,
)
from streams import metrics
from topology.settings import CacheSettings, EmbeddingSettings, SemanticCacheSettings, Settings


def result(output: str = "Paris", finish_reason: str | None = "stop") -> Result:
    return Result(
        output=output,
        finish_reason=finish_reason,
        model="sim-small",
        usage=Usage(prompt_tokens=3, completion_tokens=1, total_tokens=4),
        cost_usd=0.002,
    )


@pytest.fixture
def entries() -> dict[str, Any]:
    return {}


@pytest.fixture
def cache(entries: dict[str, Any]) -> ExactCache:
    return ExactCache(entries, CacheSettings(ttl_s=100.0, max_entries_per_partition=3))


def test_miss(cache: ExactCache) -> None:
    assert cache.lookup("k", now=0.0, partition=0) is None


def test_store_then_hit(cache: ExactCache, entries: dict[str, Any]) -> None:
    assert cache.store("k", result(), ttl_s=10.0, now=100.0, partition=0) == 0
    assert entries["k"]["expires_at"] == 110.0
    hit = cache.lookup("k", now=109.9, partition=0)
    assert hit == result()
    assert hit is not None and hit.output == "Paris" and hit.usage.total_tokens == 4


def test_expiry_removes_the_entry(cache: ExactCache, entries: dict[str, Any]) -> None:
    cache.store("k", result(), ttl_s=10.0, now=100.0, partition=0)
    assert cache.lookup("k", now=110.0, partition=0) is None
    assert "k" not in entries
    assert cache.lookup("k", now=100.0, partition=0) is None


def test_lru_eviction_at_the_partition_bound(cache: ExactCache, entries: dict[str, Any]) -> None:
    for i, key in enumerate(["a", "b", "c"]):
        assert cache.store(key, result(key), ttl_s=100.0, now=float(i), partition=0) == 0
    assert cache.store("d", result("d"), ttl_s=100.0, now=3.0, partition=0) == 1
    assert sorted(entries) == ["b", "c", "d"]
    assert cache.lookup("a", now=4.0, partition=0) is None


def test_lookup_refreshes_recency(cache: ExactCache, entries: dict[str, Any]) -> None:
    for key in ["a", "b", "c"]:
        cache.store(key, result(key), ttl_s=100.0, now=0.0, partition=0)
    assert cache.lookup("a", now=1.0, partition=0) is not None
    cache.store("d", result("d"), ttl_s=100.0, now=2.0, partition=0)
    assert sorted(entries) == ["a", "c", "d"]
    cache.store("e", result("e"), ttl_s=100.0, now=3.0, partition=0)
    assert sorted(entries) == ["a", "d", "e"]


def test_restoring_an_existing_key_does_not_evict(
    cache: ExactCache, entries: dict[str, Any]
) -> None:
    for key in ["a", "b", "c"]:
        cache.store(key, result(key), ttl_s=100.0, now=0.0, partition=0)
    assert cache.store("a", result("a2"), ttl_s=100.0, now=1.0, partition=0) == 0
    assert sorted(entries) == ["a", "b", "c"]
    hit = cache.lookup("a", now=2.0, partition=0)
    assert hit is not None and hit.output == "a2"


def test_eviction_never_touches_another_partition(
    cache: ExactCache, entries: dict[str, Any]
) -> None:
    for key in ["p1-a", "p1-b", "p1-c"]:
        cache.store(key, result(key), ttl_s=100.0, now=0.0, partition=1)
    evicted = 0
    for i in range(10):
        evicted += cache.store(f"p0-{i}", result(), ttl_s=100.0, now=1.0 + i, partition=0)
    assert evicted == 7
    assert sorted(k for k in entries if k.startswith("p1-")) == ["p1-a", "p1-b", "p1-c"]
    assert sorted(k for k in entries if k.startswith("p0-")) == ["p0-7", "p0-8", "p0-9"]
    for key in ["p1-a", "p1-b", "p1-c"]:
        assert cache.lookup(key, now=20.0, partition=1) is not None


def envelope(
    status: Status | None = Status.OK,
    res: Result | None = None,
    write: bool = True,
) -> Envelope:
    request = LLMRequest(
        id="r",
        tenant="acme",
        messages=[ChatMessage(role=Role.USER, content="hi")],
        cache=CachePolicy(write=write),
    )
    return Envelope(request=request, status=status, result=res)


def test_cacheable_ok_answer() -> None:
    assert cacheable(envelope(Status.OK, result())) is True


@pytest.mark.parametrize(
    "env",
    [
        envelope(Status.OK, result(), write=False),
        envelope(Status.OK, result(finish_reason="length")),
        envelope(Status.OK, result(output="")),
        envelope(Status.OK, Result(output=None, finish_reason="stop")),
        envelope(Status.OK, None),
        envelope(Status.CACHED, result()),
        envelope(Status.MERGED, result()),
        envelope(None, result()),
    ],
    ids=[
        "no_write",
        "length",
        "empty_output",
        "no_output",
        "no_result",
        "cached",
        "merged",
        "no_status",
    ],
)
def test_not_cacheable(env: Envelope) -> None:
    assert cacheable(env) is False


def test_errors_are_not_cacheable() -> None:
    env = envelope(Status.OK, result())
    env.fail(ErrorCode.UPSTREAM_ERROR, "http_500", "boom")
    assert cacheable(env) is False


def near(vector: np.ndarray, cosine: float, seed: int = 0) -> np.ndarray:
    """A unit vector at exactly `cosine` from unit `vector`."""
    noise = np.random.default_rng(seed).normal(size=vector.shape)
    noise -= (noise @ vector) * vector
    noise /= np.linalg.norm(noise)
    return cosine * vector + math.sqrt(1 - cosine**2) * noise


BASE = np.eye(384, dtype=np.float32)[0]


def asking(
    text: str, vector: np.ndarray | None, tenant: str = "acme", earlier: str = "hello"
) -> Envelope:
    request = LLMRequest(
        id=f"r-{tenant}-{text}",
        tenant=tenant,
        messages=[
            ChatMessage(role=Role.USER, content=earlier),
            ChatMessage(role=Role.ASSISTANT, content="hi"),
            ChatMessage(role=Role.USER, content=text),
        ],
    )
    embedding = None if vector is None else encode_embedding(vector)
    return Envelope(request=request, embedding=embedding, result=result(), status=Status.OK)


SETTINGS = SemanticCacheSettings(enabled=True, threshold=0.9, max_entries=2)


@pytest.fixture
def records() -> dict[str, Any]:
    return {}


@pytest.fixture
def semantic(records: dict[str, Any]) -> SemanticCache:
    return SemanticCache(SETTINGS, records)


def store(semantic: SemanticCache, env: Envelope, ttl_s: float = 60.0, partition: int = 0) -> str:
    """Keep `env` under a fingerprint made of its text; returns the fingerprint."""
    query = semantic_query(env, SETTINGS)
    assert query is not None and env.embedding is not None
    fingerprint = env.request.id
    semantic.store(query, fingerprint, env.embedding, ttl_s, 0.0, partition)
    return fingerprint


def match(
    semantic: SemanticCache, env: Envelope, now: float = 1.0, partition: int = 0
) -> str | None:
    query = semantic_query(env, SETTINGS)
    found = None if query is None else semantic.match(query, now, partition)
    return None if found is None else found.answer


STORED = asking("How do I reverse a list in Python?", BASE)
NEAR = asking("How can I reverse a Python list?", near(BASE, 0.95))


def test_a_near_repeat_maps_to_the_fingerprint_of_the_stored_answer(
    semantic: SemanticCache, records: dict[str, Any]
) -> None:
    fingerprint = store(semantic, STORED)
    assert match(semantic, NEAR) == fingerprint
    assert (
        SemanticRecord.model_validate(records[fingerprint]).text == STORED.request.last_user_turn()
    )


@pytest.mark.parametrize(
    "other",
    [
        asking("How can I reverse a Python list?", near(BASE, 0.85)),  # below threshold
        asking("How can I reverse a Python list?", None),  # no embedding
        asking("How can I reverse a Python list?", near(BASE, 0.99), tenant="globex"),
        asking("How can I reverse a Python list?", near(BASE, 0.99), earlier="bye"),
        asking("How do I not reverse a list in Python?", near(BASE, 0.99)),  # negation
        asking("How do I reverse 2 lists in Python?", near(BASE, 0.99)),  # a number
    ],
)
def test_what_the_semantic_layer_never_serves(semantic: SemanticCache, other: Envelope) -> None:
    store(semantic, STORED)
    assert match(semantic, other) is None


def test_entries_are_per_partition(semantic: SemanticCache) -> None:
    store(semantic, STORED, partition=1)
    assert match(semantic, NEAR, partition=2) is None


def test_semantic_entries_expire_and_leave_the_table(
    semantic: SemanticCache, records: dict[str, Any]
) -> None:
    store(semantic, STORED, ttl_s=5.0)
    assert match(semantic, NEAR, now=6.0) is None
    assert records == {}


def test_the_bound_evicts_from_the_index_and_the_table(
    semantic: SemanticCache, records: dict[str, Any]
) -> None:
    evicted = metrics.cache_evictions.labels("semantic", "evicted")
    before = evicted._value.get()
    for i, text in enumerate(["What is Kafka?", "What is Redis?", "What is Faust?"]):
        store(semantic, asking(text, near(BASE, 0.5, seed=i)))
    assert len(records) == SETTINGS.max_entries
    assert evicted._value.get() == before + 1


def test_rebuild_indexes_what_the_table_recovered(records: dict[str, Any]) -> None:
    fingerprint = store(SemanticCache(SETTINGS, records), STORED, partition=3)
    records["broken"] = {"fingerprint": "x"}
    recovered = SemanticCache(SETTINGS, records)
    assert recovered.rebuild(now=1.0) == 1
    assert match(recovered, NEAR, partition=3) == fingerprint


def test_l2_records_are_matched_under_the_same_rules(semantic: SemanticCache) -> None:
    query = semantic_query(NEAR, SETTINGS)
    assert query is not None and STORED.embedding is not None
    stored_query = semantic_query(STORED, SETTINGS)
    assert stored_query is not None

    def record(fingerprint: str, context: str, expires_at: float) -> SemanticRecord:
        text = STORED.request.last_user_turn()
        assert text is not None and STORED.embedding is not None
        return SemanticRecord(
            fingerprint=fingerprint,
            context=context,
            text=text,
            embedding=STORED.embedding,
            expires_at=expires_at,
            partition=0,
        )

    foreign = record("other-context", "another", 100.0)
    expired = record("expired", stored_query.context, 0.5)
    live = record("live", stored_query.context, 100.0)
    assert semantic.best(query, [foreign, expired], now=1.0) is None
    assert semantic.best(query, [foreign, expired, live], now=1.0) == "live"


def test_forget_drops_an_entry_whose_answer_is_gone(
    semantic: SemanticCache, records: dict[str, Any]
) -> None:
    fingerprint = store(semantic, STORED)
    semantic.forget(fingerprint)
    assert match(semantic, NEAR) is None and records == {}


@pytest.mark.parametrize(
    ("text", "ttl_s"),
    [
        ("How do I reverse a list in Python?", 3600.0),
        ("What is the weather in Oslo today?", 300.0),
        ("Latest news about Kafka", 300.0),
        ("What is the EUR to USD exchange  rate?", 300.0),
        ("Why is snow white?", 3600.0),
    ],
)
def test_questions_about_the_present_are_kept_briefly(text: str, ttl_s: float) -> None:
    request = LLMRequest(
        id="r", tenant="acme", messages=[ChatMessage(role=Role.USER, content=text)]
    )
    assert Freshness(CacheSettings()).ttl_s(request) == ttl_s


def test_the_caller_sets_the_ttl_first() -> None:
    request = LLMRequest(
        id="r",
        tenant="acme",
        messages=[ChatMessage(role=Role.USER, content="news today")],
        cache=CachePolicy(ttl_s=42.0),
    )
    assert Freshness(CacheSettings()).ttl_s(request) == 42.0


def test_the_semantic_layer_needs_embeddings() -> None:
    with pytest.raises(ValueError, match=r"needs embedding\.enabled"):
        Settings(semantic=SemanticCacheSettings(enabled=True))
    Settings(
        semantic=SemanticCacheSettings(enabled=True), embedding=EmbeddingSettings(enabled=True)
    )


def test_an_unreadable_entry_is_a_counted_miss(cache: ExactCache, entries: dict[str, Any]) -> None:
    faults = metrics.cache_faults.labels("exact", "l1_unreadable")
    before = faults._value.get()
    entries["k"] = {"result": {"output": 3, "nonsense": True}, "expires_at": 1e12, "partition": 0}
    assert cache.lookup("k", now=0.0, partition=0) is None
    assert faults._value.get() == before + 1


def test_an_expired_entry_of_another_partition_is_left_to_its_owner(
    cache: ExactCache, entries: dict[str, Any]
) -> None:
    cache.store("k", result(), ttl_s=10.0, now=0.0, partition=1)
    assert cache.lookup("k", now=20.0, partition=2) is None
    assert "k" in entries
    assert cache.lookup("k", now=20.0, partition=1) is None
    assert "k" not in entries


def test_a_held_back_hit_judged_wrong_tightens_its_entry(records: dict[str, Any]) -> None:
    adaptive = SETTINGS.model_copy(update={"adaptive": True, "min_observations": 3})
    semantic = SemanticCache(adaptive, records)
    fingerprint = store(semantic, STORED)
    query = semantic_query(NEAR, adaptive)
    assert query is not None
    found = semantic.match(query, now=1.0, partition=0)
    assert found is not None and found.answer == fingerprint
    check = SemanticCheck(
        fingerprint=found.answer,
        context=found.context,
        entry_id=found.entry_id,
        similarity=found.similarity,
        threshold=found.threshold,
        output="Paris",
    )
    semantic.observe(check, correct=False, partition=0)
    assert semantic.match(query, now=2.0, partition=0) is None
    closer = semantic_query(
        asking("How do I reverse a list in Python?", near(BASE, 0.99)), adaptive
    )
    assert closer is not None and semantic.match(closer, now=2.0, partition=0) is not None


@pytest.mark.parametrize(
    ("first", "second", "same"),
    [
        ("Paris", " paris\n", True),
        ("It is  Paris.", "it is paris.", True),
        ("Paris", "Rome", False),
    ],
)
def test_same_answer_ignores_case_and_spacing(first: str, second: str, same: bool) -> None:
    assert same_answer(first, second) is same
