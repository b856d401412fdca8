"""Semantic matching shared by the cache and dedup stages: pure logic, no faust, no Redis.

Only the last user turn is matched by meaning. Everything else that changes the answer
(namespace, model, api type, system prompt, params, tools, the earlier conversation) goes
into an exact context key, so consecutive turns of an agent loop, whose whole
conversations embed ~0.99 alike, never replay each other. Cosine alone also matches a
question with its negation or with other numbers (MiniLM puts them ~0.9 apart), so exact
guard terms (negation, numbers, dates, capitalised entities) must agree as well.
"""

from __future__ import annotations

import hashlib
import json
import math
import re
from collections import deque
from collections.abc import Collection, Iterable
from dataclasses import dataclass, field
from typing import Generic, TypeVar

import numpy as np
import numpy.typing as npt

from schemas.messages import LLMRequest, Role
from topology.settings import SemanticCacheSettings

T = TypeVar("T")
Vector = npt.NDArray[np.float32]

GUARD_KINDS = ("negation", "numbers", "dates", "entities")
# LRU-K with K=2: an entry's eviction rank is its second most recent access.
LRU_K = 2
MAX_OBSERVATIONS = 256

WHITESPACE = re.compile(r"\s+")
WORD = re.compile(r"[A-Za-z][A-Za-z0-9+#]*(?:['.-][A-Za-z0-9+#]+)*|\d+(?:[.,]\d+)*")
SENTENCE_ENDS = frozenset(".!?:;\n")
NUMBER = re.compile(r"\d+(?:[.,]\d+)*")
RELATIVE_DATE = re.compile(
    r"\b(?:last|next|this)\s+(?:week|weekend|month|year|summer|winter|autumn"
    r"|monday|tuesday|wednesday|thursday|friday|saturday|sunday)\b",
    re.IGNORECASE,
)
NEGATIONS = frozenset(
    "not no never without none nothing nobody neither nor nowhere cannot dont doesnt didnt "
    "isnt arent wasnt werent cant wont shouldnt couldnt wouldnt hasnt havent hadnt".split()
)
# "one" is left out: "which one" is far more common in questions than the number.
NUMBER_WORDS = {
    word: str(value)
    for value, word in enumerate(
        "zero _ two three four five six seven eight nine ten eleven twelve thirteen fourteen "
        "fifteen sixteen seventeen eighteen nineteen twenty".split()
    )
    if word != "_"
} | {
    "thirty": "30",
    "forty": "40",
    "fifty": "50",
    "hundred": "100",
    "thousand": "1000",
    "million": "1000000",
    "billion": "1000000000",
    "dozen": "12",
}
MONTHS = frozenset(
    "january february march april june july august september october november december".split()
)
DATE_WORDS = MONTHS | frozenset(
    "monday tuesday wednesday thursday friday saturday sunday today tonight tomorrow "
    "yesterday".split()
)
# Capitalised words that name nothing (pronouns and the like) or that the dates guard
# already reads (May), wherever they stand.
NOT_ENTITIES = frozenset("i i'm i've i'd i'll ok okay may".split())


def _canonical_hash(value: object) -> str:
    encoded = json.dumps(value, sort_keys=True, ensure_ascii=False).encode()
    return hashlib.sha256(encoded).hexdigest()


def _last_user_index(request: LLMRequest) -> int | None:
    for index in range(len(request.messages) - 1, -1, -1):
        if request.messages[index].role is Role.USER:
            return index
    return None


def _shared(request: LLMRequest, shared_namespaces: Collection[str]) -> str | None:
    asked = request.metadata.get("cache_namespace")
    return asked if asked is not None and asked in shared_namespaces else None


def namespace(request: LLMRequest, shared_namespaces: Collection[str]) -> str:
    """The tenant, unless the request names a namespace the configuration marks shared."""
    return _shared(request, shared_namespaces) or request.tenant


def context_key(request: LLMRequest, shared_namespaces: Collection[str]) -> str:
    """Hash of everything that must match exactly: all but the last user turn's text.

    The last user turn stays in place as a marker, so turns before and after it (tool
    results of an agent loop) keep their positions. Tenant and shared namespaces are
    told apart, so a tenant named like a shared namespace never reads it by accident.
    """
    shared = _shared(request, shared_namespaces)
    scope = ["tenant", request.tenant] if shared is None else ["shared", shared]
    last = _last_user_index(request)
    messages = [
        [
            m.role.value,
            None if i == last else WHITESPACE.sub(" ", m.content),
            m.name,
            m.tool_call_id,
        ]
        for i, m in enumerate(request.messages)
    ]
    return _canonical_hash(
        {
            "namespace": scope,
            "model": request.model,
            "api_type": request.api_type,
            "params": request.params.model_dump(mode="json"),
            "messages": messages,
        }
    )


def _words(text: str) -> list[tuple[str, bool]]:
    """Words of `text`, each with whether it starts a sentence."""
    text = text.replace("\u2019", "'")
    words: list[tuple[str, bool]] = []
    previous_end = 0
    for match in WORD.finditer(text):
        gap = text[previous_end : match.start()]
        words.append((match.group(), not words or any(c in SENTENCE_ENDS for c in gap)))
        previous_end = match.end()
    return words


def _is_entity_word(word: str, starts_sentence: bool) -> bool:
    lower = word.lower()
    if lower in NOT_ENTITIES or lower in DATE_WORDS or lower in NUMBER_WORDS:
        return False
    if not any(c.isupper() for c in word):
        return False
    # A sentence's first word is capitalised anyway; only USD or iPhone say more there.
    return not starts_sentence or word[1:] != word[1:].lower()


def guards(text: str, kinds: Iterable[str] = GUARD_KINDS) -> tuple[str, ...]:
    """The terms two texts must share exactly to match: paraphrases keep them, while a
    negation, another number, date or named entity changes them.

    Entities keep their order, so "USD to EUR" differs from "EUR to USD" (a paraphrase
    that reorders them misses); numbers do not, as paraphrases reorder them more often
    ("a 30-year loan at 4%", "at 4% for 30 years").
    """
    wanted = set(kinds)
    words = _words(text)
    terms: list[str] = []
    if "negation" in wanted:
        lowered = [w.lower() for w, _ in words]
        if any(w in NEGATIONS or w.endswith("n't") for w in lowered):
            terms.append("negation")
    if "numbers" in wanted:
        numbers = [
            word.replace(",", "") if NUMBER.fullmatch(word) else NUMBER_WORDS[word.lower()]
            for word, _ in words
            if NUMBER.fullmatch(word) or word.lower() in NUMBER_WORDS
        ]
        terms.extend("number:" + n for n in sorted(numbers))
    if "dates" in wanted:
        for word, starts_sentence in words:
            lower = word.lower()
            if lower in DATE_WORDS or (word == "May" and not starts_sentence):
                terms.append("date:" + lower)
        terms.extend(
            "date:" + WHITESPACE.sub(" ", m.group().lower()) for m in RELATIVE_DATE.finditer(text)
        )
    if "entities" in wanted:
        runs: list[list[str]] = []
        previous_is_entity = False
        for word, starts_sentence in words:
            is_entity = _is_entity_word(word, starts_sentence)
            name = word.lower().removesuffix("'s")
            if is_entity and previous_is_entity and not starts_sentence:
                runs[-1].append(name)
            elif is_entity:
                runs.append([name])
            previous_is_entity = is_entity
        terms.extend("entity:" + " ".join(run) for run in runs)
    return tuple(terms)


def unit(vector: npt.ArrayLike) -> Vector:
    """`vector` scaled to length one (float16 transport leaves it slightly off)."""
    array = np.asarray(vector, dtype=np.float32)
    norm = float(np.linalg.norm(array))
    return array / norm if norm > 0 else array


class AdaptiveThreshold:
    """A per-entry threshold learnt from (similarity, was_correct) observations.

    vCache fits a sigmoid per entry; this is a simpler, distribution-free stand-in that
    holds the same kind of bound. With few observations the namespace threshold applies,
    raised above every similarity seen to be a false hit. With `min_observations` or more,
    the threshold may drop to the lowest observed similarity at which the hits at or
    above it have an estimated error (Laplace's rule of succession) of at most `delta`.
    """

    def __init__(self, delta: float, min_observations: int) -> None:
        self.delta = delta
        self.min_observations = min_observations
        self.observations: deque[tuple[float, bool]] = deque(maxlen=MAX_OBSERVATIONS)

    def observe(self, similarity: float, correct: bool) -> None:
        self.observations.append((similarity, correct))

    def threshold(self, fallback: float) -> float:
        wrong = [s for s, correct in self.observations if not correct]
        bar = max(fallback, math.nextafter(max(wrong), math.inf)) if wrong else fallback
        if len(self.observations) < self.min_observations:
            return bar
        seen = errors = 0
        for similarity, correct in sorted(self.observations, reverse=True):
            seen += 1
            errors += not correct
            if (errors + 1) / (seen + 2) <= self.delta:
                bar = min(bar, similarity)
        return bar


@dataclass
class Entry(Generic[T]):
    vector: Vector
    guards: tuple[str, ...]
    answer: T
    created_at: float
    expires_at: float
    accesses: deque[float] = field(default_factory=lambda: deque(maxlen=LRU_K))
    adaptive: AdaptiveThreshold | None = None

    def eviction_rank(self) -> tuple[float, float]:
        """LRU-K order: entries seen fewer than K times go first, then by K-th last access."""
        kth = self.accesses[0] if len(self.accesses) == LRU_K else -math.inf
        return kth, self.accesses[-1]


@dataclass(frozen=True)
class Match(Generic[T]):
    context: str
    entry_id: int
    answer: T
    similarity: float
    threshold: float


class SemanticIndex(Generic[T]):
    """Answers by context key, matched on the last user turn's embedding and guard terms.

    Bounded: at most `max_entries` over all contexts (expired entries go first, then LRU-2),
    and every entry expires after its TTL. A linear scan per context: contexts are narrow.
    """

    def __init__(
        self, settings: SemanticCacheSettings, guard_kinds: Iterable[str] = GUARD_KINDS
    ) -> None:
        self.settings = settings
        self.guard_kinds = tuple(guard_kinds)
        self._contexts: dict[str, dict[int, Entry[T]]] = {}
        self._size = 0
        self._next_id = 0

    def __len__(self) -> int:
        return self._size

    def lookup(
        self,
        context: str,
        vector: npt.ArrayLike,
        text: str,
        now: float,
        threshold: float | None = None,
    ) -> Match[T] | None:
        """The most similar live entry of `context` at or above its threshold (the given
        namespace threshold, or the entry's learnt one) whose guard terms equal `text`'s."""
        entries = self._contexts.get(context)
        if not entries:
            return None
        fallback = self.settings.threshold if threshold is None else threshold
        query = unit(vector)
        terms = guards(text, self.guard_kinds)
        best: Match[T] | None = None
        for entry_id, entry in list(entries.items()):
            if entry.expires_at <= now:
                self._remove(context, entry_id)
                continue
            if entry.guards != terms:
                continue
            similarity = float(entry.vector @ query)
            bar = entry.adaptive.threshold(fallback) if entry.adaptive else fallback
            if similarity >= bar and (best is None or similarity > best.similarity):
                best = Match(context, entry_id, entry.answer, similarity, bar)
        if best is not None:
            entries[best.entry_id].accesses.append(now)
        return best

    def add(
        self,
        context: str,
        vector: npt.ArrayLike,
        text: str,
        answer: T,
        now: float,
        ttl_s: float | None = None,
    ) -> int:
        """Keep `answer` for `text`; returns the entry's id (for `observe`)."""
        adaptive = (
            AdaptiveThreshold(self.settings.delta, self.settings.min_observations)
            if self.settings.adaptive
            else None
        )
        entry = Entry(
            unit(vector),
            guards(text, self.guard_kinds),
            answer,
            now,
            now + (self.settings.ttl_s if ttl_s is None else ttl_s),
            adaptive=adaptive,
        )
        entry.accesses.append(now)
        entry_id = self._next_id
        self._next_id += 1
        self._contexts.setdefault(context, {})[entry_id] = entry
        self._size += 1
        if self._size > self.settings.max_entries:
            self._evict(now)
        return entry_id

    def observe(self, match: Match[T], correct: bool) -> None:
        """Whether a served match was right: feeds the entry's adaptive threshold."""
        entry = self._contexts.get(match.context, {}).get(match.entry_id)
        if entry is not None and entry.adaptive is not None:
            entry.adaptive.observe(match.similarity, correct)

    def _evict(self, now: float) -> None:
        for context, entries in list(self._contexts.items()):
            for entry_id in [i for i, e in entries.items() if e.expires_at <= now]:
                self._remove(context, entry_id)
        while self._size > self.settings.max_entries:
            context, entry_id = min(
                ((c, i) for c, entries in self._contexts.items() for i in entries),
                key=lambda ci: self._contexts[ci[0]][ci[1]].eviction_rank(),
            )
            self._remove(context, entry_id)

    def _remove(self, context: str, entry_id: int) -> None:
        entries = self._contexts[context]
        del entries[entry_id]
        self._size -= 1
        if not entries:
            del self._contexts[context]
