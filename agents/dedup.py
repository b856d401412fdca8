"""Dedup: in-flight coalescing with Go's singleflight semantics.

The first request of a fingerprint leads and goes on; identical requests that arrive while
it is in flight wait as followers and get its answer when postprocess releases them. The
in-flight entries live in a Table keyed by fingerprint, co-partitioned with postprocess.
"""

from __future__ import annotations

from collections.abc import MutableMapping
from dataclasses import dataclass
from enum import StrEnum
from typing import Any

from faust.types import EventT

from schemas.messages import Envelope
from streams import metrics
from streams.app import Pipeline
from topology.settings import DedupSettings

STAGE = "dedup"
TABLE = "dedup-inflight"


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

    def to_json(self) -> dict[str, Any]:
        return {
            "leader": self.leader,
            "started_at": self.started_at,
            "followers": self.followers,
            "follower_bytes": self.follower_bytes,
        }

    @classmethod
    def from_json(cls, value: dict[str, Any]) -> InflightEntry:
        return cls(
            value["leader"],
            float(value["started_at"]),
            list(value["followers"]),
            int(value.get("follower_bytes", 0)),
        )


class InflightRegistry:
    """Which fingerprint is in flight, led by whom, and who waits for it."""

    def __init__(self, entries: MutableMapping[str, Any], settings: DedupSettings) -> None:
        self.entries = entries
        self.settings = settings

    def admit(self, envelope: Envelope, now: float) -> Admission:
        if not envelope.request.cache.read:
            return Admission.ALONE
        key = envelope.fingerprint
        stored = self.entries.get(key)
        entry = InflightEntry.from_json(stored) if stored is not None else None
        if entry is not None and entry.leader == envelope.request.id:
            return Admission.LEAD  # the leader redelivered: it must not wait for itself
        if entry is not None and now - entry.started_at < self.settings.lock_timeout_s:
            # The entry is one Table value, one changelog record: bound it by bytes too.
            size = len(envelope.model_dump_json())
            too_big = entry.follower_bytes + size > self.settings.max_follower_bytes
            if len(entry.followers) >= self.settings.max_followers or too_big:
                return Admission.ALONE
            entry.followers.append(envelope.model_dump(mode="json"))
            entry.follower_bytes += size
            self.entries[key] = entry.to_json()
            return Admission.FOLLOW
        if entry is None:
            entry = InflightEntry(envelope.request.id, now, [])
        else:
            entry.leader, entry.started_at = envelope.request.id, now
        self.entries[key] = entry.to_json()
        return Admission.LEAD

    def followers(self, fingerprint: str, leader: str) -> list[Envelope]:
        """Who waits for `leader`; the entry stays until `end`, so a crash loses nobody."""
        stored = self.entries.get(fingerprint)
        if stored is None or stored["leader"] != leader:
            return []
        return [Envelope.model_validate(f) for f in stored["followers"]]

    def end(self, fingerprint: str, leader: str) -> None:
        stored = self.entries.get(fingerprint)
        if stored is not None and stored["leader"] == leader:
            del self.entries[fingerprint]


def inflight_registry(pipeline: Pipeline) -> InflightRegistry:
    """The registry over the in-flight Table, which dedup and postprocess share."""
    return InflightRegistry(pipeline.table(TABLE), pipeline.settings.dedup)


def attach(pipeline: Pipeline) -> None:
    registry = inflight_registry(pipeline)

    async def dedup(_event: EventT[bytes], envelope: Envelope) -> None:
        admission = registry.admit(envelope, envelope.stage_entered_at)
        metrics.stage_events.labels(STAGE, admission.value).inc()
        metrics.recent_merges.add(admission is Admission.FOLLOW)
        if admission is not Admission.FOLLOW:
            await pipeline.send("cache", envelope)

    pipeline.stage_agent(STAGE, dedup)
