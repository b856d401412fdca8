"""The semantic layer's pure logic: context keys, guards, the index and adaptive thresholds."""

from __future__ import annotations

import numpy as np
import pytest

from agents.semantic import AdaptiveThreshold, SemanticIndex, context_key, guards, namespace
from schemas.messages import ChatMessage, GenerationParams, LLMRequest, Role
from topology.settings import SemanticCacheSettings


def request(
    last: str = "What is the capital of France?",
    tenant: str = "a",
    model: str | None = "sim-small",
    system: str = "Be brief.",
    earlier: list[ChatMessage] | None = None,
    after: list[ChatMessage] | None = None,
    temperature: float = 0.0,
    metadata: dict[str, str] | None = None,
) -> LLMRequest:
    messages = [
        ChatMessage(role=Role.SYSTEM, content=system),
        *(earlier or []),
        ChatMessage(role=Role.USER, content=last),
        *(after or []),
    ]
    return LLMRequest(
        id="r",
        tenant=tenant,
        model=model,
        messages=messages,
        params=GenerationParams(temperature=temperature),
        metadata=metadata or {},
    )


def vector(*values: float) -> np.ndarray:
    v = np.zeros(4, dtype=np.float32)
    v[: len(values)] = values
    return v / np.linalg.norm(v)


BASE = context_key(request(), ())


@pytest.mark.parametrize(
    "changed",
    [
        request(tenant="b"),
        request(model="sim-large"),
        request(system="Be verbose."),
        request(temperature=0.7),
        request(earlier=[ChatMessage(role=Role.USER, content="hi")]),
        request(after=[ChatMessage(role=Role.TOOL, content="42", tool_call_id="call-1")]),
        request(after=[ChatMessage(role=Role.TOOL, content="42", tool_call_id="call-2")]),
    ],
)
def test_context_key_changes_with_everything_but_the_last_user_turn(changed: LLMRequest) -> None:
    assert context_key(changed, ()) != BASE


def test_context_key_ignores_the_last_user_turn() -> None:
    assert context_key(request(last="Name France's capital city."), ()) == BASE


def test_shared_namespace_only_when_configured() -> None:
    a = request(tenant="a", metadata={"cache_namespace": "public"})
    b = request(tenant="b", metadata={"cache_namespace": "public"})
    assert context_key(a, ()) != context_key(b, ())
    assert namespace(a, ()) == "a"
    assert context_key(a, ["public"]) == context_key(b, ["public"])
    assert namespace(a, ["public"]) == "public"
    # A tenant called like the shared namespace keeps its own entries.
    assert context_key(request(tenant="public"), ["public"]) != context_key(a, ["public"])


@pytest.mark.parametrize(
    ("a", "b"),
    [
        ("Which foods are high in iron?", "Which foods are not high in iron?"),
        ("How do I make bread with yeast?", "How do I make bread without yeast?"),
        ("What is 15% of 80?", "What is 20% of 80?"),
        ("Is the Louvre open on Monday?", "Is the Louvre open on Tuesday?"),
        ("Weather in Oslo in March?", "Weather in Oslo in June?"),
        ("Convert 100 USD to EUR.", "Convert 100 EUR to USD."),
        ("What is the capital of France?", "What is the capital of Spain?"),
        # antonyms
        ("How do I increase the heap size?", "How do I decrease the heap size?"),
        ("How do I encrypt a file with GPG?", "How do I decrypt a file with GPG?"),
        ("Find the minimum of a list", "Find the maximum of a list"),
        ("How do I minimize a window?", "How do I maximize a window?"),
        ("How do I upgrade pip?", "How do I downgrade pip?"),
        ("How do I deposit cash at an ATM?", "How do I withdraw cash at an ATM?"),
        # one pole is enough: "fall", "cause" and "best" carry no term
        ("Why do house prices rise?", "Why do house prices fall?"),
        ("What are the causes of inflation?", "What are the effects of inflation?"),
        ("What is the best way to store bread?", "What is the worst way to store bread?"),
        ("Am I able to vote abroad?", "Am I unable to vote abroad?"),
        # order: the unit after a number is converted; entities keep their side of "to"
        ("What is 5 kilograms in pounds?", "What is 5 pounds in kilograms?"),
        ("How many metres are in 100 feet?", "What is 100 metres in feet?"),
        ("How do I call Rust code from Python?", "How do I call Python code from Rust?"),
        # scope
        ("What are the health benefits of tea?", "What are the health benefits of green tea?"),
        # identifiers: tickets, hashes, versions
        ("Summarise ticket a41f for me", "Summarise ticket b77c for me"),
        ("warm-up 3f2ab6c1-55d9", "warm-up 9e0cd417-07aa"),
        ("What changed in Python 3.12?", "What changed in Python 3.13?"),
    ],
)
def test_guards_catch_what_cosine_misses(a: str, b: str) -> None:
    assert guards(a) != guards(b)


@pytest.mark.parametrize(
    ("a", "b"),
    [
        ("Why isn't my bread rising?", "Why does my bread not rise?"),
        ("Round to two decimal places in Python", "How do I round to 2 decimal places in Python?"),
        ("What's 1,000 USD in EUR?", "Convert 1000 USD to EUR."),
        ("Explain Docker volumes.", "What are Docker volumes?"),
        ("How do I increase the heap size?", "How can I raise the heap size?"),
        ("Which export formats exist?", "What formats can I export to?"),
        ("Why do prices rise in winter?", "Why do prices increase in winter?"),
        ("When did the Berlin Wall fall?", "When did the Berlin Wall come down?"),
        ("What causes inflation?", "Why does inflation happen?"),
        ("What are the consequences of deforestation?", "What effects does deforestation have?"),
        ("What is the best way to store bread?", "How should I store bread?"),
        ("How do I maximise the window?", "How can I maximize the window?"),
        ("When does the course start?", "When does the course begin?"),
        ("Why can't I connect to the VPN?", "Why am I unable to connect to the VPN?"),
        ("What is 5 pounds in kilograms?", "5 pounds is how many kilograms?"),
        ("How many kilograms are in 5 pounds?", "Convert 5 pounds to kilograms."),
        ("Using Python, how can I convert CSV to JSON?", "Convert CSV to JSON in Python."),
        ("Is green tea healthy?", "Is drinking green tea healthy?"),
    ],
)
def test_guards_keep_paraphrases(a: str, b: str) -> None:
    assert guards(a) == guards(b)


def index(**overrides: object) -> SemanticIndex[str]:
    settings = SemanticCacheSettings(threshold=0.9, ttl_s=100.0, max_entries=3)
    return SemanticIndex(settings.model_copy(update=overrides))


def test_hit_and_miss_on_threshold() -> None:
    semantic = index()
    semantic.add(BASE, vector(1, 0), "q", "answer", now=0.0)
    match = semantic.lookup(BASE, vector(1, 0.3), "q", now=1.0)  # cosine 0.958
    assert match is not None and match.answer == "answer"
    assert semantic.lookup(BASE, vector(1, 0.6), "q", now=1.0) is None  # cosine 0.857
    assert semantic.lookup(BASE, vector(1, 0.6), "q", now=1.0, threshold=0.85) is not None


def test_guards_must_agree() -> None:
    semantic = index()
    semantic.add(BASE, vector(1, 0), "Which foods are high in iron?", "list", now=0.0)
    assert semantic.lookup(BASE, vector(1, 0), "Which foods are not high in iron?", 1.0) is None


def test_expiry() -> None:
    semantic = index()
    semantic.add(BASE, vector(1, 0), "q", "answer", now=0.0, ttl_s=10.0)
    assert semantic.lookup(BASE, vector(1, 0), "q", now=9.0) is not None
    assert semantic.lookup(BASE, vector(1, 0), "q", now=10.0) is None
    assert len(semantic) == 0


def test_lru_2_eviction_keeps_the_bound_and_entries_seen_twice() -> None:
    semantic = index()
    for i, name in enumerate(["a", "b", "c"]):
        semantic.add(BASE, vector(1, i + 1, i * i), name, name, now=float(i))
    assert semantic.lookup(BASE, vector(1, 1, 0), "a", now=5.0) is not None  # a seen twice
    semantic.add(BASE, vector(0, 0, 0, 1), "d", "d", now=6.0)
    assert len(semantic) == 3
    assert semantic.lookup(BASE, vector(1, 1, 0), "a", now=7.0) is not None
    assert semantic.lookup(BASE, vector(1, 2, 1), "b", now=7.0) is None  # oldest seen once


def test_tenant_isolation_with_identical_prompt() -> None:
    semantic = index()
    prompt = "What is the capital of France?"
    semantic.add(context_key(request(prompt, tenant="a"), ()), vector(1), prompt, "A's", 0.0)
    other = context_key(request(prompt, tenant="b"), ())
    assert semantic.lookup(other, vector(1), prompt, now=1.0) is None


def test_adaptive_threshold_tightens_after_false_hits() -> None:
    semantic = index(adaptive=True, min_observations=5, delta=0.1)
    semantic.add(BASE, vector(1, 0), "q", "answer", now=0.0)
    match = semantic.lookup(BASE, vector(1, 0.3), "q", now=1.0)
    assert match is not None
    semantic.observe(match, correct=False)
    assert semantic.lookup(BASE, vector(1, 0.3), "q", now=2.0) is None
    assert semantic.lookup(BASE, vector(1, 0.1), "q", now=2.0) is not None


def test_adaptive_threshold_loosens_only_with_evidence() -> None:
    adaptive = AdaptiveThreshold(delta=0.1, min_observations=5)
    for _ in range(4):
        adaptive.observe(0.8, True)
    assert adaptive.threshold(0.9) == 0.9
    for _ in range(20):
        adaptive.observe(0.8, True)
    assert adaptive.threshold(0.9) == pytest.approx(0.8)
    for _ in range(5):
        adaptive.observe(0.82, False)
    assert adaptive.threshold(0.9) > 0.82
