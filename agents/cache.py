"""Cache lookup: exact answers by fingerprint, L1 in a faust Table, L2 in a shared store;
then, when `semantic.enabled`, near-repeats from the worker's semantic index.

The fingerprint includes the tenant, so one tenant's answer never serves another; the
semantic index matches only within one context key (tenant or shared namespace, model,
system prompt, params, tools and the earlier conversation), on the last user turn's
embedding and its exact guard terms. A hit goes to postprocess like a model's answer
would, so followers waiting on it are released.
"""

from __future__ import annotations

import logging
from collections import OrderedDict
from collections.abc import MutableMapping
from typing import Any

import numpy as np
import numpy.typing as npt
from faust.types import EventT
from pydantic import ValidationError
from redis.exceptions import RedisError

from agents.semantic import SemanticIndex, context_key, namespace
from schemas.messages import Envelope, Result, Status, decode_embedding
from streams import metrics
from streams.app import Pipeline
from topology.settings import CacheSettings, SemanticCacheSettings

STAGE = "cache"
TABLE = "cache-exact"
SEMANTIC = "cache-semantic"
log = logging.getLogger(__name__)


class ExactCache:
    """TTL and LRU bounds over a Table; eviction runs per partition, in that partition's events.

    A Table writes its changelog to the partition of the event being processed, so a key may
    only be deleted while handling an event of the partition that owns it.
    """

    def __init__(self, entries: MutableMapping[str, Any], settings: CacheSettings) -> None:
        self.entries = entries
        self.settings = settings
        self._recency: dict[int, OrderedDict[str, None]] = {}

    def lookup(self, key: str, now: float, partition: int) -> Result | None:
        stored = self.entries.get(key)
        if stored is None:
            return None
        recency = self._recency.setdefault(partition, OrderedDict())
        if float(stored["expires_at"]) <= now:
            del self.entries[key]
            recency.pop(key, None)
            return None
        recency[key] = None
        recency.move_to_end(key)
        return Result.model_validate(stored["result"])

    def store(self, key: str, result: Result, ttl_s: float, now: float, partition: int) -> int:
        """Keep `result` for `ttl_s`; returns how many entries were evicted to make room."""
        self.entries[key] = {"result": result.model_dump(mode="json"), "expires_at": now + ttl_s}
        recency = self._recency.setdefault(partition, OrderedDict())
        recency[key] = None
        recency.move_to_end(key)
        evicted = 0
        while len(recency) > self.settings.max_entries_per_partition:
            oldest, _ = recency.popitem(last=False)
            if oldest in self.entries:
                del self.entries[oldest]
            evicted += 1
        return evicted


def cacheable(envelope: Envelope) -> bool:
    """Only complete answers are kept: never errors, never answers cut off by max_tokens."""
    result = envelope.result
    return (
        envelope.request.cache.write
        and envelope.status == Status.OK
        and result is not None
        and result.error is None
        and bool(result.output)
        and result.finish_reason != "length"
    )


def exact_cache(pipeline: Pipeline) -> ExactCache:
    """The cache over the L1 Table: one per worker, shared by cache and postprocess, so
    lookups and stores keep one recency order."""
    return pipeline.shared(
        TABLE, lambda: ExactCache(pipeline.table(TABLE), pipeline.settings.cache)
    )


class SemanticCache:
    """The semantic layer over `SemanticIndex`: which requests it can match, and how.

    The index lives in the worker's memory, so it holds what this worker's partitions
    answered; a request without an embedding or a user turn is only matched exactly.
    """

    def __init__(self, settings: SemanticCacheSettings) -> None:
        self.settings = settings
        self.index: SemanticIndex[Result] = SemanticIndex(settings)

    def _query(self, envelope: Envelope) -> tuple[str, npt.NDArray[np.float32], str] | None:
        """The context key, embedding and text to match on, if the request has them."""
        text = envelope.request.last_user_turn()
        if envelope.embedding is None or text is None:
            return None
        context = context_key(envelope.request, self.settings.shared_namespaces)
        return context, decode_embedding(envelope.embedding), text

    def lookup(self, envelope: Envelope, now: float) -> Result | None:
        query = self._query(envelope)
        if query is None:
            return None
        context, vector, text = query
        space = namespace(envelope.request, self.settings.shared_namespaces)
        match = self.index.lookup(context, vector, text, now, self.settings.threshold_for(space))
        if match is None:
            return None
        result = match.answer.model_copy(deep=True)
        result.cache_kind = "semantic"
        return result

    def store(self, envelope: Envelope, ttl_s: float, now: float) -> None:
        query = self._query(envelope)
        if query is None or envelope.result is None:
            return
        context, vector, text = query
        self.index.add(context, vector, text, envelope.result.model_copy(deep=True), now, ttl_s)


def semantic_cache(pipeline: Pipeline) -> SemanticCache | None:
    """The worker's one semantic layer, shared by cache and postprocess; None when off."""
    settings = pipeline.settings.semantic
    if not settings.enabled:
        return None
    return pipeline.shared(SEMANTIC, lambda: SemanticCache(settings))


async def read_l2(pipeline: Pipeline, key: str) -> Result | None:
    try:
        raw = await pipeline.cache_store.get(key)
    except (RedisError, OSError) as exc:
        log.warning("L2 cache read failed, treating as a miss: %s", exc)
        metrics.stage_events.labels(STAGE, "l2_error").inc()
        return None
    if raw is None:
        return None
    try:
        return Result.model_validate_json(raw)
    except ValidationError:
        log.warning("L2 cache value for %s is unreadable, treating as a miss", key)
        return None


async def write_l2(pipeline: Pipeline, key: str, result: Result, ttl_s: float) -> None:
    try:
        await pipeline.cache_store.set(key, result.model_dump_json().encode(), ttl_s)
    except (RedisError, OSError) as exc:
        log.warning("L2 cache write failed: %s", exc)
        metrics.stage_events.labels(STAGE, "l2_error").inc()


def attach(pipeline: Pipeline) -> None:
    cache = exact_cache(pipeline)
    semantic = semantic_cache(pipeline)
    ttl_s = pipeline.settings.cache.ttl_s

    async def cache_lookup(event: EventT[bytes], envelope: Envelope) -> None:
        if not envelope.request.cache.read:
            await pipeline.send("route", envelope)
            return
        key, now, partition = (
            envelope.fingerprint,
            envelope.stage_entered_at,
            event.message.partition,
        )
        result = cache.lookup(key, now, partition)
        if result is not None:
            result.cache_tier = "l1"
        else:
            result = await read_l2(pipeline, key)
            if result is not None:
                result.cache_tier = "l2"
                cache.store(key, result, envelope.request.cache.ttl_s or ttl_s, now, partition)
        metrics.count_cache_lookup("exact", result is not None)
        if result is None and semantic is not None:
            result = semantic.lookup(envelope, now)
            metrics.count_cache_lookup("semantic", result is not None)
            if result is not None:
                result.cache_tier = "l1"
        if result is None:
            metrics.stage_events.labels(STAGE, "miss").inc()
            await pipeline.send("route", envelope)
            return
        kind = result.cache_kind or "exact"
        metrics.stage_events.labels(STAGE, f"hit_{kind}_{result.cache_tier}").inc()
        envelope.result = result
        envelope.status = Status.CACHED
        await pipeline.send("postprocess", envelope)

    pipeline.stage_agent(STAGE, cache_lookup)
