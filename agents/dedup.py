"""Dedup: in-flight coalescing with Go's singleflight semantics, exact and semantic.

The first request of a fingerprint leads and goes on; identical requests that arrive while
it is in flight wait as followers and get its answer when postprocess releases them. With
the semantic layer on, a request near-identical to an in-flight leader (same context key,
same guard terms, cosine at the namespace's threshold: the semantic cache's rules) follows
it too. The in-flight entries live in a Table keyed by fingerprint, co-partitioned with
postprocess; the leaders' embeddings are indexed per partition in memory.

A follower that has waited `lock_timeout_s` goes on alone (nginx's
proxy_cache_lock_timeout): a timer finds it and sends dedup a control copy, so the entry
is changed in an event of its own partition.
"""

from __future__ import annotations

import json
import time
from collections.abc import MutableMapping
from dataclasses import dataclass
from enum import StrEnum
from typing import Any, Literal

from faust.types import EventT

from agents.cache import SemanticQuery, semantic_query
from agents.semantic import SemanticIndex
from schemas.messages import Envelope, dump
from streams import metrics
from streams.app import Pipeline
from topology.settings import DedupSettings, SemanticCacheSettings

STAGE = "dedup"
TABLE = "dedup-inflight"
MIN_SWEEP_S = 0.5


class Admission(StrEnum):
    LEAD = "lead"
    FOLLOW = "follow"
    ALONE = "alone"


@dataclass
class InflightEntry:
    leader: str
    started_at: float
    followers: list[dict[str, Any]]
    follower_bytes: int = 0
    partition: int | None = None

    def to_json(self) -> dict[str, Any]:
        return {
            "leader": self.leader,
            "started_at": self.started_at,
            "followers": self.followers,
            "follower_bytes": self.follower_bytes,
            "partition": self.partition,
        }

    @classmethod
    def from_json(cls, value: dict[str, Any]) -> InflightEntry:
        return cls(
            value["leader"],
            float(value["started_at"]),
            list(value["followers"]),
            int(value.get("follower_bytes", 0)),
            value.get("partition"),
        )


class InflightRegistry:
    """Which fingerprint is in flight, led by whom, and who waits for it.

    An entry is written only in events of its own partition (a Table's changelog goes to
    the partition of the event at hand); a duplicate that lands elsewhere goes alone.
    """

    def __init__(
        self,
        entries: MutableMapping[str, Any],
        settings: DedupSettings,
        semantic: SemanticCacheSettings | None = None,
    ) -> None:
        self.entries = entries
        self.settings = settings
        self.semantic = semantic
        self._leaders: dict[int, SemanticIndex[str]] = {}
        self._leader_ids: dict[str, tuple[int, str, int]] = {}
        self._leaving: dict[str, set[str]] = {}  # entry → followers being sent on alone

    def admit(self, envelope: Envelope, now: float, partition: int = 0) -> Admission:
        if not envelope.request.cache.read:
            return Admission.ALONE
        key = envelope.fingerprint
        entry = self._entry(key)
        if entry is not None and entry.leader == envelope.request.id:
            return Admission.LEAD  # the leader redelivered: it must not wait for itself
        if entry is not None and entry.partition not in (None, partition):
            return Admission.ALONE
        if entry is not None and self._live(entry, now):
            return self._follow(key, entry, envelope, "exact")
        query = semantic_query(envelope, self.semantic) if self.semantic else None
        if entry is None and query is not None:
            near = self._near_leader(query, now, partition)
            if near is not None:
                return self._follow(near[0], near[1], envelope, "semantic")
        if entry is None:
            entry = InflightEntry(envelope.request.id, now, [], partition=partition)
        else:
            entry.leader, entry.started_at = envelope.request.id, now
        self.entries[key] = entry.to_json()
        if query is not None:
            self._index_leader(key, query, now, partition)
        return Admission.LEAD

    def _entry(self, key: str) -> InflightEntry | None:
        stored = self.entries.get(key)
        return InflightEntry.from_json(stored) if stored is not None else None

    def _live(self, entry: InflightEntry, now: float) -> bool:
        return now - entry.started_at < self.settings.lock_timeout_s

    def _follow(
        self,
        key: str,
        entry: InflightEntry,
        envelope: Envelope,
        kind: Literal["exact", "semantic"],
    ) -> Admission:
        # The entry is one Table value, one changelog record: bound it by bytes too.
        envelope.merge_kind = kind
        follower = envelope.model_dump(mode="json")
        size = len(envelope.model_dump_json())
        too_big = entry.follower_bytes + size > self.settings.max_follower_bytes
        if len(entry.followers) >= self.settings.max_followers or too_big:
            envelope.merge_kind = None
            return Admission.ALONE
        entry.followers.append(follower)
        entry.follower_bytes += size
        self.entries[key] = entry.to_json()
        return Admission.FOLLOW

    def _near_leader(
        self, query: SemanticQuery, now: float, partition: int
    ) -> tuple[str, InflightEntry] | None:
        """A live leader of this partition whose request is near-identical to `query`."""
        assert self.semantic is not None
        index = self._leaders.get(partition)
        if index is None:
            return None
        threshold = self.semantic.threshold_for(query.namespace)
        found = index.lookup(query.context, query.vector, query.text, now, threshold)
        if found is None:
            return None
        entry = self._entry(found.answer)
        if entry is None or entry.partition != partition or not self._live(entry, now):
            return None
        return found.answer, entry

    def _index_leader(self, key: str, query: SemanticQuery, now: float, partition: int) -> None:
        assert self.semantic is not None
        self._unindex_leader(key)
        index = self._leaders.get(partition)
        if index is None:
            index = self._leaders[partition] = SemanticIndex(
                self.semantic.model_copy(update={"adaptive": False})
            )
        entry_id = index.add(
            query.context, query.vector, query.text, key, now, self.settings.lock_timeout_s
        )
        self._leader_ids[key] = (partition, query.context, entry_id)

    def _unindex_leader(self, key: str) -> None:
        where = self._leader_ids.pop(key, None)
        if where is not None:
            partition, context, entry_id = where
            self._leaders[partition].remove(context, entry_id)

    def followers(self, fingerprint: str, leader: str) -> list[Envelope]:
        """Who waits for `leader`; the entry stays until `end`, so a crash loses nobody."""
        stored = self.entries.get(fingerprint)
        if stored is None or stored["leader"] != leader:
            return []
        leaving = self._leaving.get(fingerprint, set())
        return [
            Envelope.model_validate(f)
            for f in stored["followers"]
            if f["request"]["id"] not in leaving
        ]

    def overdue(self, now: float) -> list[tuple[str, int, Envelope]]:
        """Entries with a follower waiting past the lock timeout: key, partition, and the
        longest waiting follower."""
        found = []
        for key, stored in list(self.entries.items()):
            waiting = self._overdue(key, stored, now)
            if waiting and stored.get("partition") is not None:
                found.append((key, int(stored["partition"]), Envelope.model_validate(waiting[0])))
        return found

    def take_overdue(self, key: str, now: float) -> list[Envelope]:
        """The followers of `key` past the lock timeout, held apart until `let_go`."""
        stored = self.entries.get(key)
        if stored is None:
            return []
        waiting = self._overdue(key, stored, now)
        self._leaving.setdefault(key, set()).update(f["request"]["id"] for f in waiting)
        return [Envelope.model_validate(f) for f in waiting]

    def let_go(self, key: str, followers: list[Envelope]) -> None:
        """Take followers that went on alone out of the entry, once they are sent."""
        gone = {f.request.id for f in followers}
        leaving = self._leaving.get(key, set())
        leaving -= gone
        if not leaving:
            self._leaving.pop(key, None)
        entry = self._entry(key)
        if entry is None:
            return
        kept = [f for f in entry.followers if f["request"]["id"] not in gone]
        if len(kept) != len(entry.followers):
            entry.followers = kept
            entry.follower_bytes = sum(len(json.dumps(f, separators=(",", ":"))) for f in kept)
            self.entries[key] = entry.to_json()

    def _overdue(self, key: str, stored: dict[str, Any], now: float) -> list[dict[str, Any]]:
        leaving = self._leaving.get(key, set())
        timeout = self.settings.lock_timeout_s
        return [
            f
            for f in stored["followers"]
            if f["request"]["id"] not in leaving and now - f["stage_entered_at"] >= timeout
        ]

    def end(self, fingerprint: str, leader: str) -> None:
        stored = self.entries.get(fingerprint)
        if stored is not None and stored["leader"] == leader:
            del self.entries[fingerprint]
            self._unindex_leader(fingerprint)


def inflight_registry(pipeline: Pipeline) -> InflightRegistry:
    """The worker's one registry over the in-flight Table, shared by dedup and postprocess."""
    semantic = pipeline.settings.semantic

    def make() -> InflightRegistry:
        return InflightRegistry(
            pipeline.table(TABLE), pipeline.settings.dedup, semantic if semantic.enabled else None
        )

    return pipeline.shared(TABLE, make)


def attach(pipeline: Pipeline) -> None:
    registry = inflight_registry(pipeline)

    async def go_on_alone(key: str, now: float) -> None:
        overdue = registry.take_overdue(key, now)
        for follower in overdue:
            follower.merge_kind = None
            await pipeline.send("cache", follower)
        registry.let_go(key, overdue)
        metrics.stage_events.labels(STAGE, "lock_expired").inc(len(overdue))

    async def dedup(event: EventT[bytes], envelope: Envelope) -> None:
        if envelope.waiting_on is not None:
            await go_on_alone(envelope.waiting_on, envelope.stage_entered_at)
            return
        admission = registry.admit(envelope, envelope.stage_entered_at, event.message.partition)
        outcome = admission.value
        if admission is Admission.FOLLOW:
            outcome = f"follow_{envelope.merge_kind}"
        metrics.stage_events.labels(STAGE, outcome).inc()
        metrics.recent_merges.add(admission is Admission.FOLLOW)
        if admission is not Admission.FOLLOW:
            await pipeline.send("cache", envelope)

    pipeline.stage_agent(STAGE, dedup)

    async def expire_locks() -> None:
        """Signal each entry with overdue followers to its own partition's dedup events."""
        for key, partition, follower in registry.overdue(time.time()):
            control = follower.model_copy(deep=True)
            control.waiting_on = key
            control.request.deadline = None  # a signal, never answered itself
            await pipeline.stage_topics[STAGE].send(
                key=key.encode(), value=dump(control), partition=partition
            )

    pipeline.app.timer(max(MIN_SWEEP_S, pipeline.settings.dedup.lock_timeout_s / 4))(expire_locks)
