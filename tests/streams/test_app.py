"""Message keys of the stage graph: which requests meet on one partition."""

from __future__ import annotations

from schemas.messages import ChatMessage, Envelope, LLMRequest, Role
from streams.app import key_of
from streams.locality import SemanticBucketer


def envelope(bucket: int | None) -> Envelope:
    request = LLMRequest(
        id="r1", tenant="acme", messages=[ChatMessage(role=Role.USER, content="hi")]
    )
    return Envelope(request=request, fingerprint="f" * 64, semantic_bucket=bucket)


def test_locality_keys_by_the_lsh_bucket_when_there_is_one() -> None:
    assert key_of(envelope(3), "locality") == SemanticBucketer.key_of(3)
    assert key_of(envelope(3), "fingerprint") == b"f" * 64


def test_without_an_embedding_locality_falls_back_to_the_fingerprint() -> None:
    assert key_of(envelope(None), "locality") == b"f" * 64


def test_other_keys() -> None:
    assert key_of(envelope(3), "tenant") == b"acme"
    assert key_of(envelope(3), "request_id") == b"r1"
