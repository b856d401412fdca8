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

    def to_json(self) -> dict[str, Any]:
        return {"leader": self.leader, "started_at": self.started_at, "followers": self.followers}

    @classmethod
    def from_json(cls, value: dict[str, Any]) -> InflightEntry:
        return cls(value["leader"], float(value["started_at"]), list(value["followers"]))


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
            if len(entry.followers) >= self.settings.max_followers:
                return Admission.ALONE
            entry.followers.append(envelope.model_dump(mode="json"))
            self.entries[key] = entry.to_json()
            return Admission.FOLLOW
        inherited = entry.followers if entry is not None else []
        self.entries[key] = InflightEntry(envelope.request.id, now, inherited).to_json()
        return Admission.LEAD

    def release(self, fingerprint: str, leader: str) -> list[Envelope]:
        """End the flight of `leader`; returns the followers that waited for it."""
        stored = self.entries.get(fingerprint)
        if stored is None:
            return []
        entry = InflightEntry.from_json(stored)
        if entry.leader != leader:
            return []
        del self.entries[fingerprint]
        return [Envelope.model_validate(f) for f in entry.followers]


def inflight_registry(pipeline: Pipeline) -> InflightRegistry:
    """The registry over the in-flight Table, which dedup and postprocess share."""
    return InflightRegistry(pipeline.table(TABLE), pipeline.settings.dedup)


def attach(pipeline: Pipeline) -> None:
    registry = inflight_registry(pipeline)

    async def dedup(_event: EventT[bytes], envelope: Envelope) -> None:
        admission = registry.admit(envelope, envelope.stage_entered_at)
        metrics.stage_events.labels(STAGE, admission.value).inc()
        if admission is not Admission.FOLLOW:
            await pipeline.send("cache", envelope)

    pipeline.stage_agent(STAGE, dedup)
