"""InferenceRunner with a fake backend: success, retries, non-retryable errors, timeouts."""

from __future__ import annotations

import asyncio
import random
import time
from collections.abc import Callable
from typing import Any

import pytest

from agents.breaker import BreakerState
from agents.infer import Delta, InferenceRunner, UpstreamError, backoff_delay
from schemas.messages import (
    CancelEvent,
    Envelope,
    ErrorCode,
    LLMRequest,
    RequestClass,
    Result,
    Status,
    StreamChunk,
    Usage,
)
from streams.cancel import CancelledSet
from topology.settings import ClassTimeout, InferSettings, ModelSpec, Settings

Behaviour = Callable[[int, Envelope], Result]


class FakeBackend:
    """Answers by a script: `behaviour(call_number, envelope)` returns or raises."""

    def __init__(self, behaviour: Behaviour, delay_s: float = 0.0) -> None:
        self.behaviour = behaviour
        self.delay_s = delay_s
        self.calls: list[tuple[str, str]] = []

    async def complete(
        self, spec: ModelSpec, envelope: Envelope, on_delta: Delta | None = None
    ) -> Result:
        self.calls.append((spec.name, envelope.request.id))
        if self.delay_s:
            await asyncio.sleep(self.delay_s)
        return self.behaviour(len(self.calls), envelope)

    async def close(self) -> None:
        pass


def answer(_call: int, envelope: Envelope) -> Result:
    return Result(
        output=f"answer to {envelope.request.id}",
        finish_reason="stop",
        model=envelope.model,
        usage=Usage(prompt_tokens=2, completion_tokens=3, total_tokens=5),
        cost_usd=0.01,
    )


def every_class(total_s: float, attempt_share: float = 1.0) -> dict[RequestClass, ClassTimeout]:
    timeout = ClassTimeout(total_s=total_s, attempt_share=attempt_share)
    return dict.fromkeys(RequestClass, timeout)


def settings(**infer: Any) -> Settings:
    """One model, no fallbacks, nothing degraded: what a model's own retries do."""
    values = {
        "backoff_base_s": 0.001,
        "backoff_max_s": 0.002,
        "retries": 2,
        "fallbacks": {},
        "degrade": False,
        **infer,
    }
    return Settings(infer=InferSettings(**values))


def envelope(request_id: str = "r1", model: str | None = "sim-small", **extra: object) -> Envelope:
    request = LLMRequest.model_validate(
        {
            "id": request_id,
            "tenant": "acme",
            "messages": [{"role": "user", "content": "hi"}],
            **extra,
        }
    )
    return Envelope(request=request, model=model, prompt_tokens=1)


async def test_success_sets_ok_and_the_result() -> None:
    backend = FakeBackend(answer)
    runner = InferenceRunner(settings(), backend, seed=1)
    batch = [envelope("a"), envelope("b", model="sim-large")]
    out = await runner.run(batch)
    assert out is batch
    assert [e.status for e in out] == [Status.OK, Status.OK]
    assert out[0].result is not None and out[0].result.output == "answer to a"
    assert out[1].result is not None and out[1].result.model == "sim-large"
    assert out[0].result.usage.total_tokens == 5
    assert sorted(backend.calls) == [("sim-large", "b"), ("sim-small", "a")]


async def test_retryable_error_is_retried_then_succeeds() -> None:
    def flaky(call: int, env: Envelope) -> Result:
        if call < 3:
            raise UpstreamError("http_503", "busy", retryable=True)
        return answer(call, env)

    backend = FakeBackend(flaky)
    (env,) = await InferenceRunner(settings(), backend, seed=1).run([envelope()])
    assert len(backend.calls) == 3
    assert env.status == Status.OK
    assert env.result is not None and env.result.output == "answer to r1"


async def test_retryable_error_exhausts_retries_then_upstream_error() -> None:
    def failing(_call: int, _env: Envelope) -> Result:
        raise UpstreamError("http_503", "busy", retryable=True, retry_after_s=0.001)

    backend = FakeBackend(failing)
    s = settings()
    (env,) = await InferenceRunner(s, backend, seed=1).run([envelope()])
    assert len(backend.calls) == s.infer.retries + 1 == 3
    assert env.status == Status.ERROR
    assert env.result is not None and env.result.error is not None
    assert env.result.error.code == ErrorCode.UPSTREAM_ERROR
    assert env.result.error.reason == "http_503"
    assert env.result.error.message == "busy"
    assert env.result.error.retry_after_s == 0.001
    assert env.result.output is None


async def test_retries_setting_is_honoured() -> None:
    def failing(_call: int, _env: Envelope) -> Result:
        raise UpstreamError("connection", "reset", retryable=True)

    backend = FakeBackend(failing)
    await InferenceRunner(settings(retries=0), backend).run([envelope()])
    assert len(backend.calls) == 1


async def test_non_retryable_error_is_not_retried() -> None:
    def bad_request(_call: int, _env: Envelope) -> Result:
        raise UpstreamError("http_400", "bad request", retryable=False)

    backend = FakeBackend(bad_request)
    (env,) = await InferenceRunner(settings(), backend).run([envelope()])
    assert len(backend.calls) == 1
    assert env.status == Status.ERROR
    assert env.result is not None and env.result.error is not None
    assert env.result.error.code == ErrorCode.UPSTREAM_ERROR
    assert env.result.error.reason == "http_400"


async def test_retry_waits_at_least_retry_after(monkeypatch: pytest.MonkeyPatch) -> None:
    slept: list[float] = []
    real_sleep = asyncio.sleep

    async def recording_sleep(delay: float, result: object = None) -> object:
        slept.append(delay)
        return await real_sleep(0, result)

    def throttled(call: int, env: Envelope) -> Result:
        if call == 1:
            raise UpstreamError("http_429", "slow down", retryable=True, retry_after_s=7.5)
        return answer(call, env)

    monkeypatch.setattr(asyncio, "sleep", recording_sleep)
    (env,) = await InferenceRunner(settings(), FakeBackend(throttled)).run([envelope()])
    assert env.status == Status.OK
    assert slept == [7.5]


async def test_slow_backend_beyond_the_deadline_times_out() -> None:
    backend = FakeBackend(answer, delay_s=5.0)
    env = envelope(deadline=time.time() + 0.05)
    (env,) = await InferenceRunner(settings(), backend).run([env])
    assert env.status == Status.ERROR
    assert env.result is not None and env.result.error is not None
    assert env.result.error.code == ErrorCode.TIMEOUT
    assert env.result.error.reason == "upstream_timeout"
    assert env.result.output is None


async def test_slow_backend_beyond_timeout_s_times_out() -> None:
    backend = FakeBackend(answer, delay_s=5.0)
    runner = InferenceRunner(settings(timeouts=every_class(0.05)), backend)
    (env,) = await runner.run([envelope()])
    assert env.result is not None and env.result.error is not None
    assert env.result.error.code == ErrorCode.TIMEOUT
    assert "0.050s" in env.result.error.message


async def test_past_deadline_times_out_without_an_answer() -> None:
    backend = FakeBackend(answer, delay_s=5.0)
    (env,) = await InferenceRunner(settings(), backend).run([envelope(deadline=time.time() - 1)])
    assert env.status == Status.ERROR
    assert env.result is not None and env.result.error is not None
    assert env.result.error.code == ErrorCode.TIMEOUT
    assert "0.000s" in env.result.error.message


async def test_one_slow_request_does_not_fail_the_batch() -> None:
    class Mixed(FakeBackend):
        async def complete(
            self, spec: ModelSpec, envelope: Envelope, on_delta: Delta | None = None
        ) -> Result:
            if envelope.request.id == "slow":
                await asyncio.sleep(5.0)
            return await super().complete(spec, envelope, on_delta)

    batch = [envelope("slow", deadline=time.time() + 0.05), envelope("fast")]
    out = await InferenceRunner(settings(), Mixed(answer)).run(batch)
    assert [e.status for e in out] == [Status.ERROR, Status.OK]


async def test_unknown_model_fails_invalid_without_a_call() -> None:
    backend = FakeBackend(answer)
    out = await InferenceRunner(settings(), backend).run(
        [envelope("a", model=None), envelope("b", model="nope")]
    )
    assert backend.calls == []
    for env in out:
        assert env.status == Status.ERROR
        assert env.result is not None and env.result.error is not None
        assert env.result.error.code == ErrorCode.INVALID
        assert env.result.error.reason == "unknown_model"


async def test_waiting_for_a_slot_counts_against_the_deadline() -> None:
    class SlowForA(FakeBackend):
        async def complete(
            self, spec: ModelSpec, envelope: Envelope, on_delta: Delta | None = None
        ) -> Result:
            if envelope.request.id == "a":
                await asyncio.sleep(0.3)
            return await super().complete(spec, envelope, on_delta)

    runner = InferenceRunner(settings(max_concurrency=1), SlowForA(answer))
    batch = [envelope("a"), envelope("b", deadline=time.time() + 0.05)]
    out = await runner.run(batch)
    assert out[1].status == Status.ERROR
    assert out[1].result is not None and out[1].result.error is not None
    assert out[1].result.error.code == ErrorCode.TIMEOUT


async def test_an_unexpected_backend_exception_still_answers_every_request() -> None:
    def explode(call: int, env: Envelope) -> Result:
        if env.request.id == "bad":
            raise RuntimeError("driver bug")
        return answer(call, env)

    out = await InferenceRunner(settings(), FakeBackend(explode)).run(
        [envelope("bad"), envelope("good")]
    )
    assert out[0].status == Status.ERROR
    assert out[1].status == Status.OK


@pytest.mark.parametrize("attempt", [0, 1, 2, 3, 5, 10, 30])
def test_backoff_delay_within_full_jitter_bounds(attempt: int) -> None:
    s = InferSettings(backoff_base_s=0.05, backoff_max_s=2.0)
    ceiling = min(2.0, 0.05 * 2**attempt)
    delays = [backoff_delay(attempt, s, random.Random(seed)) for seed in range(20)]
    assert all(0.0 <= d <= ceiling for d in delays)
    assert max(delays) > ceiling / 2  # full jitter spreads over the range
    assert len(set(delays)) > 1


def test_backoff_delay_is_reproducible_with_a_seed() -> None:
    s = InferSettings()
    a = [backoff_delay(i, s, random.Random(7)) for i in range(5)]
    b = [backoff_delay(i, s, random.Random(7)) for i in range(5)]
    assert a == b


class StreamingBackend(FakeBackend):
    """Streams its answer word by word, then fails if `fail_after` words were sent."""

    def __init__(self, fail_after: int | None = None) -> None:
        super().__init__(answer)
        self.fail_after = fail_after

    async def complete(
        self, spec: ModelSpec, envelope: Envelope, on_delta: Delta | None = None
    ) -> Result:
        self.calls.append((spec.name, envelope.request.id))
        assert on_delta is not None
        for index, word in enumerate(["one", " two", " three"]):
            if index == self.fail_after:
                raise UpstreamError("connection", "cut mid-stream", retryable=True)
            await on_delta(word)
        return answer(len(self.calls), envelope)


async def test_a_streamed_answer_goes_out_as_numbered_chunks() -> None:
    sent: list[StreamChunk] = []

    async def sink(chunk: StreamChunk) -> None:
        sent.append(chunk)

    runner = InferenceRunner(settings(), StreamingBackend(), sink)
    (env,) = await runner.run([envelope(stream=True)])
    assert env.status is Status.OK and env.result is not None
    assert [(c.index, c.delta) for c in sent] == [(0, "one"), (1, " two"), (2, " three")]
    assert env.result.streamed_chunks == 3


async def test_a_stream_cut_midway_is_not_retried_and_counts_what_was_sent() -> None:
    sent: list[StreamChunk] = []

    async def sink(chunk: StreamChunk) -> None:
        sent.append(chunk)

    backend = StreamingBackend(fail_after=2)
    (env,) = await InferenceRunner(settings(), backend, sink).run([envelope(stream=True)])
    assert len(backend.calls) == 1
    assert env.status is Status.ERROR and env.result is not None and env.result.error
    assert env.result.error.code is ErrorCode.UPSTREAM_ERROR
    assert env.result.streamed_chunks == 2 == len(sent)


def chained(**infer: Any) -> Settings:
    """The default chain: sim-small falls back to sim-large; sim-large degrades to sim-small."""
    return settings(**{"fallbacks": {"sim-small": ["sim-large"]}, "degrade": True, **infer})


def failing_for(*models: str, retryable: bool = True) -> Behaviour:
    def behaviour(call: int, env: Envelope) -> Result:
        if env.model in models:
            raise UpstreamError("http_500", "down", retryable=retryable)
        return answer(call, env)

    return behaviour


class ByModel(FakeBackend):
    """Fails every call to the models in `down`; the others answer as the model called."""

    def __init__(self, down: set[str]) -> None:
        super().__init__(answer)
        self.down = down

    async def complete(
        self, spec: ModelSpec, envelope: Envelope, on_delta: Delta | None = None
    ) -> Result:
        self.calls.append((spec.name, envelope.request.id))
        if spec.name in self.down:
            raise UpstreamError("http_500", f"{spec.name} is down", retryable=True)
        return answer(len(self.calls), envelope).model_copy(update={"model": spec.name})


async def test_a_failing_model_falls_back_to_the_next_of_its_chain() -> None:
    backend = ByModel(down={"sim-small"})
    (env,) = await InferenceRunner(chained(), backend).run([envelope(model="sim-small")])
    assert env.status is Status.OK and env.result is not None
    assert env.result.model == "sim-large" and env.result.degraded is None
    assert [m for m, _ in backend.calls] == ["sim-small"] * 3 + ["sim-large"]


async def test_when_the_chain_fails_a_cached_answer_is_given_marked() -> None:
    async def cached(env: Envelope) -> Result | None:
        return Result(output="from before", model="sim-large", cache_tier="l2", cache_kind="exact")

    backend = ByModel(down={"sim-small", "sim-large"})
    runner = InferenceRunner(chained(), backend, cached=cached)
    (env,) = await runner.run([envelope(model="sim-large")])
    assert env.status is Status.CACHED and env.result is not None
    assert env.result.output == "from before" and env.result.degraded == "cache"


async def test_a_request_that_may_not_read_the_cache_gets_no_cached_answer() -> None:
    async def cached(env: Envelope) -> Result | None:
        return Result(output="from before")

    backend = ByModel(down={"sim-small", "sim-large"})
    env = envelope(model="sim-large", cache={"read": False})
    (env,) = await InferenceRunner(chained(), backend, cached=cached).run([env])
    assert env.status is Status.ERROR and env.result is not None and env.result.error
    assert env.result.error.reason == "http_500"


async def test_without_a_cached_answer_a_cheaper_model_answers_marked() -> None:
    backend = ByModel(down={"sim-large"})
    (env,) = await InferenceRunner(chained(), backend).run([envelope(model="sim-large")])
    assert env.status is Status.OK and env.result is not None
    assert env.result.model == "sim-small" and env.result.degraded == "cheaper_model"


async def test_when_everything_fails_the_last_error_is_the_answer() -> None:
    backend = ByModel(down={"sim-small", "sim-large"})
    (env,) = await InferenceRunner(chained(), backend).run([envelope(model="sim-small")])
    assert env.status is Status.ERROR and env.result is not None and env.result.error
    assert env.result.error.message == "sim-large is down"
    assert len(backend.calls) == 6  # three calls each, and nothing cheaper than sim-small


async def test_degrade_off_answers_the_failure() -> None:
    backend = ByModel(down={"sim-large"})
    runner = InferenceRunner(chained(degrade=False), backend)
    (env,) = await runner.run([envelope(model="sim-large")])
    assert env.status is Status.ERROR


async def test_an_open_breaker_skips_its_model_without_calling_it() -> None:
    breaker = {"min_calls": 3, "failure_rate": 0.5, "cooldown_s": 60.0}
    backend = ByModel(down={"sim-small"})
    runner = InferenceRunner(chained(retries=0, breaker=breaker), backend)
    await runner.run([envelope(f"warm-{i}", model="sim-small") for i in range(3)])
    assert runner.breakers.of("sim-small").state is BreakerState.OPEN
    backend.calls.clear()
    (env,) = await runner.run([envelope("next", model="sim-small")])
    assert env.status is Status.OK and env.result is not None
    assert env.result.model == "sim-large"
    assert backend.calls == [("sim-large", "next")]


async def test_refused_requests_do_not_open_the_breaker() -> None:
    breaker = {"min_calls": 2, "failure_rate": 0.5}
    backend = FakeBackend(failing_for("sim-small", retryable=False))
    runner = InferenceRunner(settings(breaker=breaker), backend)
    await runner.run([envelope(f"r{i}") for i in range(5)])
    assert runner.breakers.of("sim-small").state is BreakerState.CLOSED


async def test_a_hung_call_times_out_alone_and_the_retry_answers() -> None:
    cancelled: list[str] = []

    class HangsOnce(FakeBackend):
        async def complete(
            self, spec: ModelSpec, envelope: Envelope, on_delta: Delta | None = None
        ) -> Result:
            self.calls.append((spec.name, envelope.request.id))
            if len(self.calls) == 1:
                try:
                    await asyncio.sleep(10)
                except asyncio.CancelledError:
                    cancelled.append("first call")  # its connection would be released here
                    raise
            return answer(len(self.calls), envelope)

    backend = HangsOnce(answer)
    runner = InferenceRunner(settings(timeouts=every_class(0.6, attempt_share=0.25)), backend)
    (env,) = await runner.run([envelope()])
    assert env.status is Status.OK
    assert len(backend.calls) == 2
    assert cancelled == ["first call"]


async def test_a_call_cut_by_the_requests_own_deadline_is_not_held_against_the_model() -> None:
    backend = FakeBackend(answer, delay_s=5.0)
    whole = every_class(30.0, attempt_share=1.0)
    runner = InferenceRunner(settings(timeouts=whole, breaker={"min_calls": 1}), backend)
    (env,) = await runner.run([envelope(deadline=time.time() + 0.05)])
    assert env.result is not None and env.result.error is not None
    assert env.result.error.code is ErrorCode.TIMEOUT
    assert runner.breakers.of("sim-small").window.counts(time.monotonic()) == (0, 0)


async def test_a_retry_after_beyond_the_deadline_moves_on_to_the_next_model() -> None:
    def throttled(call: int, env: Envelope) -> Result:
        raise UpstreamError("http_429", "slow down", retryable=True, retry_after_s=30.0)

    class Throttled(ByModel):
        async def complete(
            self, spec: ModelSpec, envelope: Envelope, on_delta: Delta | None = None
        ) -> Result:
            if spec.name == "sim-small":
                self.calls.append((spec.name, envelope.request.id))
                return throttled(len(self.calls), envelope)
            return await super().complete(spec, envelope, on_delta)

    backend = Throttled(down=set())
    env = envelope(model="sim-small", deadline=time.time() + 2.0)
    (env,) = await InferenceRunner(chained(), backend).run([env])
    assert env.status is Status.OK and env.result is not None
    assert env.result.model == "sim-large"
    assert [m for m, _ in backend.calls] == ["sim-small", "sim-large"]


async def test_a_stream_cut_midway_does_not_fall_back() -> None:
    async def sink(chunk: StreamChunk) -> None:
        pass

    backend = StreamingBackend(fail_after=1)
    (env,) = await InferenceRunner(chained(), backend, sink).run(
        [envelope(model="sim-small", stream=True)]
    )
    assert env.status is Status.ERROR
    assert backend.calls == [("sim-small", "r1")]


async def test_a_cancel_stops_the_call_in_flight_and_answers_cancelled() -> None:
    cancelled = CancelledSet(remember_s=60.0, max_entries=10)
    backend = FakeBackend(answer, delay_s=30.0)
    runner = InferenceRunner(settings(), backend, cancelled=cancelled)
    running = asyncio.ensure_future(runner.run([envelope("slow")]))
    await asyncio.sleep(0.05)
    assert backend.calls == [("sim-small", "slow")]
    cancelled.add(CancelEvent(request_id="slow", reason="user left"), time.time())
    (slow,) = await asyncio.wait_for(running, 1.0)
    assert slow.result is not None and slow.result.error is not None
    assert slow.result.error.code is ErrorCode.CANCELLED
    assert "user left" in slow.result.error.message


async def test_a_request_cancelled_before_its_batch_runs_is_not_called() -> None:
    cancelled = CancelledSet(remember_s=60.0, max_entries=10)
    cancelled.add(CancelEvent(request_id="gone"), time.time())
    backend = FakeBackend(answer)
    (env,) = await InferenceRunner(settings(), backend, cancelled=cancelled).run([envelope("gone")])
    assert backend.calls == []
    assert env.result is not None and env.result.error is not None
    assert env.result.error.code is ErrorCode.CANCELLED
