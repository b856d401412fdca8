"""Which replayed answers warm the cache: model answers only, each with its own request."""

from __future__ import annotations

from agents.cache import cacheable
from agents.warm import answered_pairs, warm_envelope
from llmflow.client import new_request
from schemas.messages import Envelope, LLMResponse, Status, dump


def response(request_id: str, status: Status = Status.OK, output: str | None = "4") -> bytes:
    return dump(LLMResponse(id=request_id, status=status, output=output, model="sim-small"))


def test_each_request_is_paired_with_its_model_answer() -> None:
    asked = [new_request(f"What is {i} + {i}?", "acme") for i in range(6)]
    requests = [dump(r) for r in asked] + [b"not json"]
    responses = [
        response(asked[0].id),
        response(asked[1].id, Status.CACHED),  # a copy of another answer
        response(asked[2].id, Status.MERGED),
        response(asked[3].id, Status.ERROR, None),
        response(asked[4].id, output=""),
        b"{garbled",
        response("never-asked"),
    ]
    pairs = list(answered_pairs(requests, responses))
    assert [(raw, answer.id) for raw, answer in pairs] == [(dump(asked[0]), asked[0].id)]


def test_a_warm_envelope_is_stored_like_a_model_answer() -> None:
    request = new_request("What is 2 + 2?", "acme")
    answer = LLMResponse.model_validate_json(response(request.id))
    envelope = warm_envelope(Envelope(request=request, fingerprint="f"), answer)
    assert envelope.status is Status.OK and envelope.result is not None
    assert envelope.result.output == "4" and envelope.model == "sim-small"
    assert cacheable(envelope)
