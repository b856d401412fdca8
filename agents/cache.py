"""Cache lookup: exact answers by fingerprint, then near-repeats by meaning, in two tiers.

Exact: L1 in a faust Table, L2 in a store all workers share (Redis). The fingerprint
includes the tenant, so one tenant's answer never serves another.

Semantic (when `semantic.enabled`): a near-repeat maps to the fingerprint of an earlier
request in the same context key (tenant or shared namespace, model, system prompt,
params, tools and the earlier conversation) whose last user turn embeds close enough and
has the same guard terms; the answer itself is that fingerprint's exact entry. L1 keeps
the semantic records in a Table too, indexed in memory per partition and rebuilt when the
Table recovers; L2 keeps the newest records of each context and LSH bucket in the shared
store, so a worker that just took a partition over still finds them.

A hit goes to postprocess like a model's answer would, so followers waiting on it are
released. Every fault of the cache (an unreadable entry, an L2 outage) is a miss, counted.
"""

from __future__ import annotations

import logging
import random
import re
import time
from collections import OrderedDict
from collections.abc import Iterable, MutableMapping
from dataclasses import dataclass
from typing import Any

import numpy as np
import numpy.typing as npt
from faust.types import EventT
from pydantic import BaseModel, ValidationError
from redis.exceptions import RedisError

from agents.semantic import WHITESPACE, Drop, Match, SemanticIndex, context_key, namespace
from schemas.messages import (
    Envelope,
    LLMRequest,
    Result,
    SemanticCheck,
    Status,
    decode_embedding,
)
from streams import metrics
from streams.app import Pipeline
from topology.settings import CacheSettings, SemanticCacheSettings

STAGE = "cache"
TABLE = "cache-exact"
SEMANTIC_TABLE = "cache-semantic"
log = logging.getLogger(__name__)


class ExactCache:
    """TTL and LRU bounds over a Table; eviction runs per partition, in that partition's events.

    A Table writes its changelog to the partition of the event being processed, so a key may
    only be deleted while handling an event of the partition that owns it; each value notes
    its partition for that.
    """

    def __init__(self, entries: MutableMapping[str, Any], settings: CacheSettings) -> None:
        self.entries = entries
        self.settings = settings
        self._recency: dict[int, OrderedDict[str, None]] = {}

    def lookup(self, key: str, now: float, partition: int) -> Result | None:
        stored = self.entries.get(key)
        if stored is None:
            return None
        owned = stored.get("partition", partition) == partition
        recency = self._recency.setdefault(partition, OrderedDict())
        if float(stored["expires_at"]) <= now:
            if owned:
                del self.entries[key]
                recency.pop(key, None)
                metrics.cache_evictions.labels("exact", "expired").inc()
            return None
        try:
            result = Result.model_validate(stored["result"])
        except ValidationError:
            log.warning("L1 cache entry %s is unreadable, treating it as a miss", key)
            metrics.cache_faults.labels("exact", "l1_unreadable").inc()
            return None
        if owned:
            recency[key] = None
            recency.move_to_end(key)
        return result

    def store(self, key: str, result: Result, ttl_s: float, now: float, partition: int) -> int:
        """Keep `result` for `ttl_s`; returns how many of this partition's least recently
        used entries were evicted to make room."""
        self.entries[key] = {
            "result": result.model_dump(mode="json"),
            "expires_at": now + ttl_s,
            "partition": partition,
        }
        recency = self._recency.setdefault(partition, OrderedDict())
        recency[key] = None
        recency.move_to_end(key)
        evicted = 0
        while len(recency) > self.settings.max_entries_per_partition:
            oldest, _ = recency.popitem(last=False)
            if oldest in self.entries:
                del self.entries[oldest]
            evicted += 1
        metrics.cache_evictions.labels("exact", "evicted").inc(evicted)
        return evicted


def cacheable(envelope: Envelope) -> bool:
    """Only complete answers are kept: never errors, never answers cut off by max_tokens,
    never a cheaper model's answer given when the chosen one failed."""
    result = envelope.result
    return (
        envelope.request.cache.write
        and envelope.status == Status.OK
        and result is not None
        and result.error is None
        and result.degraded is None
        and bool(result.output)
        and result.finish_reason != "length"
    )


def volatile_pattern(terms: Iterable[str]) -> re.Pattern[str]:
    words = sorted((re.escape(t.lower()).replace(r"\ ", r"\s+") for t in terms), key=len)
    return re.compile(r"\b(?:" + "|".join(reversed(words)) + r")\b")


class Freshness:
    """How long an answer stays true: what the caller asked for, else short for questions
    about the present (news, prices, weather, "today"), else the configured TTL."""

    def __init__(self, settings: CacheSettings) -> None:
        self.settings = settings
        self._volatile = volatile_pattern(settings.volatile_terms)

    def ttl_s(self, request: LLMRequest) -> float:
        if request.cache.ttl_s is not None:
            return request.cache.ttl_s
        text = (request.last_user_turn() or "").lower()
        if self._volatile.search(text):
            return min(self.settings.volatile_ttl_s, self.settings.ttl_s)
        return self.settings.ttl_s


@dataclass(frozen=True)
class SemanticQuery:
    """What the semantic layer matches a request on."""

    context: str
    namespace: str
    vector: npt.NDArray[np.float32]
    text: str
    group: str  # the L2 group: context and LSH bucket


def semantic_query(envelope: Envelope, settings: SemanticCacheSettings) -> SemanticQuery | None:
    """The query of a request with an embedding and a user turn; None for any other."""
    text = envelope.request.last_user_turn()
    if envelope.embedding is None or text is None:
        return None
    try:
        vector = decode_embedding(envelope.embedding)
    except ValueError:
        metrics.cache_faults.labels("semantic", "bad_embedding").inc()
        return None
    context = context_key(envelope.request, settings.shared_namespaces)
    bucket = "-" if envelope.semantic_bucket is None else str(envelope.semantic_bucket)
    space = namespace(envelope.request, settings.shared_namespaces)
    return SemanticQuery(context, space, vector, text, f"{context}:{bucket}")


class SemanticRecord(BaseModel):
    """One semantic entry as the Table and L2 keep it."""

    fingerprint: str
    context: str
    text: str
    embedding: str
    expires_at: float
    partition: int

    def index_in(self, index: SemanticIndex[str], now: float) -> int:
        """Add this record to `index` for the rest of its life; returns its entry id."""
        vector = decode_embedding(self.embedding)
        return index.add(
            self.context, vector, self.text, self.fingerprint, now, self.expires_at - now
        )


class SemanticCache:
    """The semantic layer: near-repeats to fingerprints, per partition.

    Records live in a Table (`records`, keyed by fingerprint) and in an in-memory index per
    partition; an entry the index's bounds drop is deleted from the Table in the same
    partition's event. `rebuild` refills the indexes from the Table after recovery.
    """

    def __init__(self, settings: SemanticCacheSettings, records: MutableMapping[str, Any]) -> None:
        self.settings = settings
        self.records = records
        self.indexes: dict[int, SemanticIndex[str]] = {}
        self._ids: dict[str, tuple[int, str, int]] = {}  # fingerprint → partition, context, id
        self._rebuilding = False
        self._adding: str | None = None

    def _index(self, partition: int) -> SemanticIndex[str]:
        index = self.indexes.get(partition)
        if index is None:
            index = self.indexes[partition] = SemanticIndex(self.settings, on_drop=self._dropped)
        return index

    def _dropped(self, fingerprint: str, why: Drop) -> None:
        if fingerprint == self._adding:  # LRU-2 may push out the entry just added
            self._adding = None
        self._ids.pop(fingerprint, None)
        metrics.cache_evictions.labels("semantic", why).inc()
        if not self._rebuilding:  # a Table is written in an event of its partition only
            self.records.pop(fingerprint, None)

    def match(self, query: SemanticQuery, now: float, partition: int) -> Match[str] | None:
        """The entry (its answer: a fingerprint) that serves `query`, from this partition."""
        threshold = self.settings.threshold_for(query.namespace)
        return self._index(partition).lookup(
            query.context, query.vector, query.text, now, threshold
        )

    def observe(self, check: SemanticCheck, correct: bool, partition: int) -> None:
        """Whether a held-back hit was right: the entry's adaptive threshold learns from it."""
        match = Match(
            check.context, check.entry_id, check.fingerprint, check.similarity, check.threshold
        )
        self._index(partition).observe(match, correct)

    def best(self, query: SemanticQuery, records: list[SemanticRecord], now: float) -> str | None:
        """The fingerprint of the record (from L2) that serves `query`, under the same rules."""
        scratch: SemanticIndex[str] = SemanticIndex(self.settings)
        for record in records:
            if record.context == query.context and record.expires_at > now:
                record.index_in(scratch, now)
        found = scratch.lookup(
            query.context,
            query.vector,
            query.text,
            now,
            self.settings.threshold_for(query.namespace),
        )
        return None if found is None else found.answer

    def store(
        self,
        query: SemanticQuery,
        fingerprint: str,
        embedding: str,
        expires_at: float,
        now: float,
        partition: int,
    ) -> SemanticRecord:
        record = SemanticRecord(
            fingerprint=fingerprint,
            context=query.context,
            text=query.text,
            embedding=embedding,
            expires_at=expires_at,
            partition=partition,
        )
        self.records[fingerprint] = record.model_dump(mode="json")
        self._add(record, now)
        return record

    def forget(self, fingerprint: str) -> None:
        """Drop the entry of a fingerprint whose answer is gone from every tier."""
        self._remove(fingerprint)
        self.records.pop(fingerprint, None)

    def rebuild(self, now: float) -> int:
        """Index every record the Table holds now (after recovery); returns how many."""
        self.indexes.clear()
        self._ids.clear()
        self._rebuilding = True
        try:
            for value in list(self.records.values()):
                try:
                    self._add(SemanticRecord.model_validate(value), now)
                except (ValidationError, ValueError):
                    metrics.cache_faults.labels("semantic", "l1_unreadable").inc()
        finally:
            self._rebuilding = False
        return len(self._ids)

    def _add(self, record: SemanticRecord, now: float) -> None:
        self._remove(record.fingerprint)
        self._adding = record.fingerprint
        entry_id = record.index_in(self._index(record.partition), now)
        if self._adding is not None:
            self._ids[record.fingerprint] = (record.partition, record.context, entry_id)
        self._adding = None

    def _remove(self, fingerprint: str) -> None:
        where = self._ids.pop(fingerprint, None)
        if where is not None:
            partition, context, entry_id = where
            self._index(partition).remove(context, entry_id)


def same_answer(first: str, second: str) -> bool:
    """Answers equal but for case and spacing: what a deterministic model repeats."""
    return WHITESPACE.sub(" ", first).strip().lower() == WHITESPACE.sub(" ", second).strip().lower()


class Caches:
    """The exact and semantic layers of one worker, shared by cache and postprocess so both
    see one recency order and one index."""

    def __init__(self, pipeline: Pipeline) -> None:
        self.pipeline = pipeline
        self.exact = ExactCache(pipeline.table(TABLE), pipeline.settings.cache)
        self.freshness = Freshness(pipeline.settings.cache)
        self.semantic: SemanticCache | None = None
        self._random = random.Random()
        settings = pipeline.settings.semantic
        if settings.enabled:
            table = pipeline.table(SEMANTIC_TABLE)
            semantic = self.semantic = SemanticCache(settings, table)

            async def rebuild() -> None:
                count = semantic.rebuild(now=time.time())
                log.info("semantic cache: %d entries indexed after recovery", count)

            table.on_recover(rebuild)

    def query(self, envelope: Envelope) -> SemanticQuery | None:
        if self.semantic is None:
            return None
        return semantic_query(envelope, self.semantic.settings)

    async def lookup(self, envelope: Envelope, partition: int) -> Result | None:
        """Exact L1, exact L2, then semantic L1 and L2; the result says which served it."""
        key, now = envelope.fingerprint, envelope.stage_entered_at
        result = await self._answer(key, now, partition)
        metrics.count_cache_lookup("exact", result is not None)
        if result is not None:
            result.cache_kind = "exact"
            return result
        query = self.query(envelope)
        if query is None or self.semantic is None:
            return None
        result = await self._near(envelope, query, now, partition)
        metrics.count_cache_lookup("semantic", result is not None)
        return result

    async def _answer(self, key: str, now: float, partition: int) -> Result | None:
        result = self.exact.lookup(key, now, partition)
        if result is not None:
            result.cache_tier = "l1"
            return result
        stored = await read_l2(self.pipeline, key)
        if stored is None:
            return None
        result, ttl_s = stored
        self.exact.store(key, result, ttl_s, now, partition)  # promoted to this partition
        result.cache_tier = "l2"
        return result

    async def _near(
        self, envelope: Envelope, query: SemanticQuery, now: float, partition: int
    ) -> Result | None:
        assert self.semantic is not None
        found = self.semantic.match(query, now, partition)
        if found is not None:
            result = await self._answer(found.answer, now, partition)
            if result is None:
                self.semantic.forget(found.answer)
                return None
            if self._verify():
                envelope.semantic_check = SemanticCheck(
                    fingerprint=found.answer,
                    context=found.context,
                    entry_id=found.entry_id,
                    similarity=found.similarity,
                    threshold=found.threshold,
                    output=result.output or "",
                )
                metrics.stage_events.labels(STAGE, "semantic_verify").inc()
                return None
        else:
            records = await read_group(self.pipeline, query.group)
            fingerprint = self.semantic.best(query, records, now)
            record = next((r for r in records if r.fingerprint == fingerprint), None)
            if record is None:
                return None
            result = await self._answer(record.fingerprint, now, partition)
            if result is None:
                return None
            self.semantic.store(
                query, record.fingerprint, record.embedding, record.expires_at, now, partition
            )
            result.cache_tier = "l2"
        result.cache_kind = "semantic"
        return result

    def _verify(self) -> bool:
        """Whether to hold this hit back for the model to check (adaptive thresholds)."""
        assert self.semantic is not None
        settings = self.semantic.settings
        return settings.adaptive and self._random.random() < settings.verify_share

    def observe(self, envelope: Envelope, partition: int) -> None:
        """Judge a held-back hit by the model's answer: the same text, or a false hit."""
        check, result = envelope.semantic_check, envelope.result
        if check is None or self.semantic is None or result is None or not result.output:
            return
        if result.degraded is not None:
            return
        correct = same_answer(result.output, check.output)
        metrics.stage_events.labels(STAGE, f"semantic_verified_{correct}".lower()).inc()
        self.semantic.observe(check, correct, partition)

    async def store(self, envelope: Envelope, partition: int) -> None:
        """Keep a finished answer in both layers and both tiers."""
        assert envelope.result is not None
        now, ttl_s = envelope.stage_entered_at, self.freshness.ttl_s(envelope.request)
        self.exact.store(envelope.fingerprint, envelope.result, ttl_s, now, partition)
        await write_l2(self.pipeline, envelope.fingerprint, envelope.result, now + ttl_s)
        query = self.query(envelope)
        if query is None or self.semantic is None or envelope.embedding is None:
            return
        record = self.semantic.store(
            query, envelope.fingerprint, envelope.embedding, now + ttl_s, now, partition
        )
        await push_group(self.pipeline, query.group, record, ttl_s)


def caches(pipeline: Pipeline) -> Caches:
    """The worker's one `Caches`."""
    return pipeline.shared("caches", lambda: Caches(pipeline))


class StoredAnswer(BaseModel):
    """An L2 answer: the result and when it stops being true."""

    result: Result
    expires_at: float


async def read_l2(pipeline: Pipeline, key: str) -> tuple[Result, float] | None:
    """The shared tier's answer for `key` and its remaining TTL; a fault is a miss."""
    try:
        raw = await pipeline.cache_store.get(key)
    except (RedisError, OSError) as exc:
        log.warning("L2 cache read failed, treating as a miss: %s", exc)
        metrics.cache_faults.labels("exact", "l2_read").inc()
        return None
    if raw is None:
        return None
    try:
        stored = StoredAnswer.model_validate_json(raw)
    except ValidationError:
        log.warning("L2 cache value for %s is unreadable, treating as a miss", key)
        metrics.cache_faults.labels("exact", "l2_unreadable").inc()
        return None
    remaining = stored.expires_at - time.time()
    return (stored.result, remaining) if remaining > 0 else None


async def cached_answer(pipeline: Pipeline, envelope: Envelope) -> Result | None:
    """The shared tier's answer to this very request: infer's degraded answer when every
    model failed (the cache stage missed it, but an identical request may have been
    answered since)."""
    stored = await read_l2(pipeline, envelope.fingerprint)
    if stored is None:
        return None
    result, _ttl_s = stored
    result.cache_kind, result.cache_tier = "exact", "l2"
    return result


async def write_l2(pipeline: Pipeline, key: str, result: Result, expires_at: float) -> None:
    value = StoredAnswer(result=result, expires_at=expires_at).model_dump_json().encode()
    try:
        await pipeline.cache_store.set(key, value, max(expires_at - time.time(), 0.001))
    except (RedisError, OSError) as exc:
        log.warning("L2 cache write failed: %s", exc)
        metrics.cache_faults.labels("exact", "l2_write").inc()


async def read_group(pipeline: Pipeline, group: str) -> list[SemanticRecord]:
    try:
        raw = await pipeline.cache_store.newest(group)
    except (RedisError, OSError) as exc:
        log.warning("L2 semantic read failed, treating as a miss: %s", exc)
        metrics.cache_faults.labels("semantic", "l2_read").inc()
        return []
    records = []
    for value in raw:
        try:
            records.append(SemanticRecord.model_validate_json(value))
        except ValidationError:
            metrics.cache_faults.labels("semantic", "l2_unreadable").inc()
    return records


async def push_group(pipeline: Pipeline, group: str, record: SemanticRecord, ttl_s: float) -> None:
    keep = pipeline.settings.semantic.l2_group_size
    try:
        await pipeline.cache_store.push(group, record.model_dump_json().encode(), ttl_s, keep)
    except (RedisError, OSError) as exc:
        log.warning("L2 semantic write failed: %s", exc)
        metrics.cache_faults.labels("semantic", "l2_write").inc()


def attach(pipeline: Pipeline) -> None:
    layers = caches(pipeline)

    async def cache_lookup(event: EventT[bytes], envelope: Envelope) -> None:
        result = None
        if envelope.request.cache.read:
            result = await layers.lookup(envelope, event.message.partition)
        if result is None:
            metrics.stage_events.labels(STAGE, "miss").inc()
            await pipeline.send("route", envelope)
            return
        metrics.stage_events.labels(STAGE, f"hit_{result.cache_kind}_{result.cache_tier}").inc()
        envelope.result = result
        envelope.status = Status.CACHED
        await pipeline.send("postprocess", envelope)

    pipeline.stage_agent(STAGE, cache_lookup)
