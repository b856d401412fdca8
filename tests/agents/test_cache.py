"""ExactCache over a dict (TTL, per-partition LRU), the `cacheable` rule, and the semantic
layer: what it serves and what it never does."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest

from agents.cache import ExactCache, SemanticCache, cacheable
from schemas.messages import (
    Envelope,
    ErrorCode,
    LLMRequest,
    Result,
    Status,
    Usage,
    encode_embedding,
)
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
        id="r", tenant="acme", messages=[{"role": "user", "content": "hi"}], cache={"write": write}
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
    return cosine * vector + np.sqrt(1 - cosine**2) * noise


BASE = np.eye(384, dtype=np.float32)[0]


def asking(
    text: str, vector: np.ndarray | None, tenant: str = "acme", earlier: str = "hello"
) -> Envelope:
    request = LLMRequest(
        id=f"r-{tenant}-{text}",
        tenant=tenant,
        messages=[
            {"role": "user", "content": earlier},
            {"role": "assistant", "content": "hi"},
            {"role": "user", "content": text},
        ],
    )
    embedding = None if vector is None else encode_embedding(vector)
    return Envelope(request=request, embedding=embedding, result=result(), status=Status.OK)


@pytest.fixture
def semantic() -> SemanticCache:
    return SemanticCache(SemanticCacheSettings(enabled=True, threshold=0.9))


def test_a_near_repeat_is_served_as_a_semantic_copy(semantic: SemanticCache) -> None:
    stored = asking("How do I reverse a list in Python?", BASE)
    semantic.store(stored, ttl_s=60.0, now=0.0)
    hit = semantic.lookup(asking("How can I reverse a Python list?", near(BASE, 0.95)), 1.0)
    assert hit is not None and hit.cache_kind == "semantic" and hit.output == "Paris"
    hit.output = "changed"
    again = semantic.lookup(asking("How can I reverse a Python list?", near(BASE, 0.95)), 1.0)
    assert again is not None and again.output == "Paris"


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
    semantic.store(asking("How do I reverse a list in Python?", BASE), ttl_s=60.0, now=0.0)
    assert semantic.lookup(other, 1.0) is None


def test_semantic_entries_expire(semantic: SemanticCache) -> None:
    semantic.store(asking("How do I reverse a list in Python?", BASE), ttl_s=5.0, now=0.0)
    assert semantic.lookup(asking("How do I reverse a list in Python?", BASE), 6.0) is None


def test_the_semantic_layer_needs_embeddings() -> None:
    with pytest.raises(ValueError, match=r"needs embedding\.enabled"):
        Settings(semantic=SemanticCacheSettings(enabled=True))
    Settings(
        semantic=SemanticCacheSettings(enabled=True), embedding=EmbeddingSettings(enabled=True)
    )
