"""Ensemble/postprocess: escalate unsure cascade and ensemble answers, format the answer,
write the cache, release followers.

Every request that passed dedup ends here, answered, cached or failed, so no follower is
left waiting. A cascade's answer whose confidence is low, or an ensemble's whose samples
agree too little (infer voted on them, `agents.ensemble`), goes back to batch for the next
model up (the router decides); only the answer that stands is cached and shared.
"""

from __future__ import annotations

from faust.types import EventT

from agents.cache import cacheable, caches
from agents.dedup import inflight_registry
from agents.route import router_of
from schemas.messages import Envelope, ErrorCode, Status
from streams import metrics
from streams.app import Pipeline

STAGE = "postprocess"


def finish(envelope: Envelope) -> None:
    """Tidy the leader's answer (trailing whitespace is an artefact of generation) and bill
    it for the answers a cascade set aside on the way."""
    result = envelope.result
    if result is not None and result.output is not None:
        result.output = result.output.strip()
    if result is not None:
        result.cost_usd += envelope.prior_cost_usd
    if envelope.status is None:
        envelope.status = Status.ERROR if result is None or result.error else Status.OK


def release(follower: Envelope, leader: Envelope, cancelled: str | None = None) -> str:
    """Where a follower goes once its leader is done, as the stage it is sent to.

    It is answered with the leader's answer, `cancelled` if it was cancelled while it
    waited (`cancelled` is why), or with a timeout if its own deadline passed meanwhile.
    A leader that ran out of its own time says nothing about its followers' requests:
    they go back to dedup, where the first leads anew. A leader that failed otherwise
    (cancelled included) does not fail them: each goes on alone (nginx's
    proxy_cache_lock), so one bad call is not multiplied.
    """
    if cancelled is not None:
        follower.fail(ErrorCode.CANCELLED, "cancelled", f"{cancelled} (while merged)")
        return "respond"
    if follower.expired():
        follower.fail(
            ErrorCode.TIMEOUT,
            "deadline_exceeded",
            "deadline passed while waiting for an identical request",
        )
        return "respond"
    error = leader.result.error if leader.result else None
    if leader.status is Status.ERROR or error is not None:
        follower.merge_kind = None
        if error is not None and error.code is ErrorCode.TIMEOUT:
            return "dedup"
        return "cache"
    follower.result = leader.result.model_copy(deep=True) if leader.result else None
    follower.model = leader.model
    follower.merged_with = leader.request.id
    follower.status = Status.MERGED
    return "respond"


def attach(pipeline: Pipeline) -> None:
    layers = caches(pipeline)
    inflight = inflight_registry(pipeline)
    router = router_of(pipeline)

    async def postprocess(event: EventT[bytes], envelope: Envelope) -> None:
        router.observe(envelope)
        if router.escalate(envelope):
            metrics.stage_events.labels(STAGE, "escalated").inc()
            await pipeline.send("batch", envelope)
            return
        finish(envelope)
        layers.observe(envelope, event.message.partition)
        if cacheable(envelope):
            await layers.store(envelope, event.message.partition)
        await pipeline.send("respond", envelope)
        released: set[str] = set()
        # Dedup may park more followers while these are sent; the last look and `end` run
        # with no await between them, so nobody is left waiting on an ended entry.
        while followers := [
            f
            for f in inflight.followers(envelope.fingerprint, envelope.request.id)
            if f.request.id not in released
        ]:
            metrics.stage_events.labels(STAGE, "released").inc(len(followers))
            for follower in followers:
                released.add(follower.request.id)
                pipeline.mark(follower, "merge_wait")
                stage = release(follower, envelope, pipeline.cancelled.reason(follower.request.id))
                metrics.stage_events.labels(STAGE, f"follower_to_{stage}").inc()
                # Back in dedup before `end`, a follower would follow this entry again.
                await pipeline.send(stage, follower, fuse=stage != "dedup")
        # Only now: a crash before this point redelivers the event and answers them again.
        inflight.end(envelope.fingerprint, envelope.request.id)

    pipeline.stage_agent(STAGE, postprocess, screen=False)
