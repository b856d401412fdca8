"""Semantic matching shared by the cache and dedup stages: pure logic, no faust, no Redis.

Only the last user turn is matched by meaning. Everything else that changes the answer
(namespace, model, api type, system prompt, params, tools, the earlier conversation) goes
into an exact context key, so consecutive turns of an agent loop, whose whole
conversations embed ~0.99 alike, never replay each other. Cosine alone also matches a
question with its negation or with other numbers (MiniLM puts them ~0.9 apart), so exact
guard terms (negation, numbers, dates, capitalised entities, antonyms, the order of
converted units and related entities, scope modifiers) must agree as well.
"""

from __future__ import annotations

import hashlib
import json
import math
import re
from collections import deque
from collections.abc import Callable, Collection, Iterable
from dataclasses import dataclass, field
from typing import Generic, Literal, TypeVar

import numpy as np
import numpy.typing as npt

from schemas.messages import LLMRequest
from topology.settings import SemanticCacheSettings

T = TypeVar("T")
Vector = npt.NDArray[np.float32]
Drop = Literal["expired", "evicted"]

GUARD_KINDS = (
    "negation",
    "numbers",
    "identifiers",
    "dates",
    "entities",
    "antonyms",
    "order",
    "scope",
)
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
    "isnt arent wasnt werent cant wont shouldnt couldnt wouldnt hasnt havent hadnt unable "
    "impossible".split()
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
# Opposite poles: a text's pole of each row must match. A pole holds a few synonyms, so
# "raise" and "increase" agree; words are compared by `_stem` ("thinner", "thin"). A word
# that paraphrases often drop or that has other senses is left out of its row, as the
# opposite word alone tells the two apart: "rates rise" carries a term, "rates fall" none.
# So fall, drop and decline (autumn, DROP TABLE, decline an offer) are missing; "cause"
# too, as "what causes X" asks "why X", and "best"/"better" ("the best way to").
ANTONYMS: tuple[tuple[str, ...], ...] = (
    ("increase raise boost enlarge expand rise", "decrease reduce shrink"),
    ("gain profit", "lose loss"),
    ("min minimum minimal minimize minimise", "max maximum maximal maximize maximise"),
    ("high", "low"),
    ("more", "less fewer"),
    ("worse worst worsen",),
    ("effect consequence",),
    ("before prior", "after"),
    ("import", "export"),
    ("buy purchase", "sell"),
    ("encrypt", "decrypt"),
    ("encode", "decode"),
    ("serialize serialise", "deserialize deserialise"),
    ("compress zip", "decompress unzip"),
    ("upload", "download"),
    ("upgrade", "downgrade"),
    ("upstream", "downstream"),
    ("inbound incoming", "outbound outgoing"),
    ("internal", "external"),
    ("indoor", "outdoor"),
    ("enable activate", "disable deactivate"),
    ("install", "uninstall"),
    ("connect", "disconnect"),
    ("attach", "detach"),
    ("lock", "unlock"),
    ("mount", "unmount"),
    ("subscribe", "unsubscribe"),
    ("include", "exclude"),
    ("add insert", "remove delete"),
    ("start begin", "stop halt"),
    ("push", "pull"),
    ("send", "receive"),
    ("read", "write"),
    ("input", "output"),
    ("deposit", "withdraw"),
    ("credit", "debit"),
    ("inflation", "deflation"),
    ("surplus", "deficit"),
    ("uppercase", "lowercase"),
    ("ascending", "descending"),
    ("horizontal", "vertical"),
    ("clockwise", "counterclockwise anticlockwise"),
    ("thick", "thin"),
    ("wet moist", "dry"),
    ("hot warm heat", "cold cool chill"),
    ("advantage pro", "disadvantage con drawback"),
    ("cheap inexpensive", "expensive costly pricey"),
    ("float", "sink"),
    ("fast quick", "slow"),
    ("overactive", "underactive"),
    ("overweight", "underweight"),
    ("overestimate", "underestimate"),
    ("positive", "negative"),
    ("appear", "disappear"),
    ("agree", "disagree"),
    ("accept approve", "reject disapprove"),
    ("allow permit", "deny forbid prohibit"),
    ("legal", "illegal"),
    ("healthy", "unhealthy"),
    ("inhale", "exhale"),
    ("sunrise", "sunset"),
    ("arrive arrival", "depart departure"),
)
# Relation words with an order: "X to Y", "X than Y", "X against Y", "from X".
RELATIONS = frozenset("to into than from against".split())
# Units of measure (and currency names) by stem; "100 feet" makes feet what is converted.
UNITS = {
    alias: name
    for name, aliases in {
        "metre": "metre meter m",
        "kilometre": "kilometre kilometer km",
        "centimetre": "centimetre centimeter cm",
        "millimetre": "millimetre millimeter mm",
        "mile": "mile mi",
        "foot": "foot feet ft",
        "inch": "inch inches in",
        "yard": "yard yd",
        "kilogram": "kilogram kilo kg",
        "gram": "gram g",
        "milligram": "milligram mg",
        "pound": "pound lb lbs",
        "ounce": "ounce oz",
        "stone": "stone",
        "ton": "ton tonne",
        "litre": "litre liter l",
        "millilitre": "millilitre milliliter ml",
        "gallon": "gallon gal",
        "quart": "quart",
        "pint": "pint",
        "cup": "cup",
        "tablespoon": "tablespoon tbsp",
        "teaspoon": "teaspoon tsp",
        "celsius": "celsius centigrade",
        "fahrenheit": "fahrenheit",
        "kelvin": "kelvin",
        "second": "second sec",
        "minute": "minute min",
        "hour": "hour hr",
        "byte": "byte",
        "kilobyte": "kilobyte kb",
        "megabyte": "megabyte mb",
        "gigabyte": "gigabyte gb",
        "terabyte": "terabyte tb",
        "dollar": "dollar buck",
        "euro": "euro",
        "yen": "yen",
        "acre": "acre",
        "hectare": "hectare",
        "calorie": "calorie kcal",
        "joule": "joule",
        "watt": "watt",
        "mph": "mph",
    }.items()
    for alias in aliases.split()
}
# Words before a unit that make it the quantity converted ("a mile in feet").
QUANTITY_WORDS = frozenset("a an one per".split())
# Qualifiers that narrow what a question is about ("green tea", "whole wheat flour"): the
# scope guard makes them agree. Comparing every content word instead costs most recall.
MODIFIERS = frozenset(
    """green black white red brown yellow blue purple whole raw organic vegan vegetarian
    gluten-free dairy-free decaf decaffeinated frozen fresh dried canned wild sparkling
    skimmed unsalted salted wireless electric manual remote local private public static
    dynamic nested async asynchronous recursive multithreaded concurrent""".split()
)
# Unit aliases too short or too common to read as a unit unless a number comes first.
AFTER_NUMBERS_ONLY = frozenset(
    "m in l g min sec mi ft yd oz lb lbs mg ml km cm mm kb mb gb tb".split()
)


def _canonical_hash(value: object) -> str:
    encoded = json.dumps(value, sort_keys=True, ensure_ascii=False).encode()
    return hashlib.sha256(encoded).hexdigest()


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
    last = request.last_user_index()
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


def _stem(word: str) -> str:
    """A crude stem, the same for "increase", "increases", "increased" and "increasing"."""
    stem = word.lower().removesuffix("'s")
    for suffix in ("ing", "ed", "est", "er", "es", "s", "ly"):
        if stem.endswith(suffix) and len(stem) - len(suffix) >= 3:
            stem = stem[: -len(suffix)]
            break
    if len(stem) > 3 and stem[-1] == stem[-2] and stem[-1] not in "aeiousl":
        stem = stem[:-1]
    if stem.endswith("i") and len(stem) > 3:
        stem = stem[:-1] + "y"
    return stem.removesuffix("e") if len(stem) > 3 else stem


POLES = {
    _stem(word): f"{row[0].split()[0]}:{side}"
    for row in ANTONYMS
    for side, pole in enumerate(row)
    for word in pole.split()
}
UNIT_STEMS = {_stem(alias): name for alias, name in UNITS.items()}


def _is_number(word: str) -> bool:
    return bool(NUMBER.fullmatch(word)) or word.lower() in NUMBER_WORDS


def _unit(word: str, after_number: bool) -> str | None:
    lower = word.lower()
    if lower in AFTER_NUMBERS_ONLY and not after_number:
        return None
    if after_number and len(word) == 3 and word.isupper():
        return lower  # a currency code: 100 USD
    return UNITS.get(lower) or UNIT_STEMS.get(_stem(lower))


def _order_terms(words: list[tuple[str, bool]]) -> list[str]:
    """What is converted into what: the unit right after a number (or "a") is the source,
    other units are targets, so "5 pounds in kilograms" and "how many kilograms are 5
    pounds" agree while "5 kilograms in pounds" differs. Around a relation word, the
    nearest entities before and after keep their order ("from Rust to Python")."""
    sources: list[str] = []
    targets: list[str] = []
    for index, (word, _) in enumerate(words):
        previous = words[index - 1][0] if index else ""
        after_number = _is_number(previous) or previous.lower() in QUANTITY_WORDS
        unit = _unit(word, after_number)
        if unit is not None:
            (sources if after_number else targets).append(unit)
    terms: set[str] = set()
    if sources:
        terms.update("from:" + unit for unit in sources)
        terms.update("to:" + unit for unit in targets if unit not in sources)
    elif len(set(targets)) > 1:  # no quantity: "Celsius to Fahrenheit" keeps its order
        terms.add(">".join(dict.fromkeys(targets)))
    entities = [_is_entity_word(w, s) for w, s in words]
    for index, (word, _) in enumerate(words):
        if word.lower() not in RELATIONS:
            continue
        before = next((i for i in range(index - 1, -1, -1) if entities[i] or words[i + 1][1]), None)
        after = next((i for i in range(index + 1, len(words)) if entities[i]), None)
        if before is None or after is None or not entities[before] or words[after][1]:
            continue
        if any(words[i][1] for i in range(index + 1, after + 1)):
            continue
        first, second = _name_run(words, entities, before), _name_run(words, entities, after)
        if first not in sources:  # "100 USD to EUR": the quantity rule ordered it
            terms.add(f"{first}>{second}")
    return ["order:" + term for term in sorted(terms)]


def _name_run(words: list[tuple[str, bool]], entities: list[bool], index: int) -> str:
    """The whole capitalised run `index` belongs to ("Real Madrid"), lower case."""
    start = index
    while start > 0 and entities[start - 1] and not words[start][1]:
        start -= 1
    end = index
    while end + 1 < len(words) and entities[end + 1] and not words[end + 1][1]:
        end += 1
    return " ".join(w.lower().removesuffix("'s") for w, _ in words[start : end + 1])


def guards(text: str, kinds: Iterable[str] = GUARD_KINDS) -> tuple[str, ...]:
    """The terms two texts must share exactly to match: paraphrases keep them, while a
    negation, another number, identifier, date or named entity changes them.

    Entities and numbers are sets, as paraphrases reorder them ("Using Python, convert
    CSV to JSON"); the order guard keeps the order that changes the answer: the unit after
    a number is what is converted ("5 pounds in kilograms"), and entities around a
    relation word keep their sides ("USD to EUR", "Rust from Python", "Spain than France").
    The antonym guard needs the same pole of each opposing pair (increase/decrease), the
    scope guard the same qualifiers ("green tea"). Comparing every content word for scope
    was measured and dropped: paraphrases reword too much (recall fell to about 0.2).
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
    if "identifiers" in wanted:
        # Ticket numbers, hashes, versions: "summarise ticket a41f" is not "ticket b77c".
        identifiers = {
            word.lower()
            for word, _ in words
            if any(c.isdigit() for c in word) and any(c.isalpha() for c in word)
        }
        terms.extend("id:" + word for word in sorted(identifiers))
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
        # A set: the order guard keeps the order that matters ("USD to EUR").
        terms.extend(sorted({"entity:" + " ".join(run) for run in runs}))
    if "antonyms" in wanted:
        poles = {POLES[stem] for stem in (_stem(w) for w, _ in words) if stem in POLES}
        terms.extend("antonym:" + pole for pole in sorted(poles))
    if "order" in wanted:
        terms.extend(_order_terms(words))
    if "scope" in wanted:
        modifiers = {w.lower() for w, _ in words if w.lower() in MODIFIERS}
        terms.extend("scope:" + word for word in sorted(modifiers))
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
        self,
        settings: SemanticCacheSettings,
        guard_kinds: Iterable[str] = GUARD_KINDS,
        on_drop: Callable[[T, Drop], None] | None = None,
    ) -> None:
        self.settings = settings
        self.guard_kinds = tuple(guard_kinds)
        self.on_drop = on_drop
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
                self._drop(context, entry_id, "expired")
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
                self._drop(context, entry_id, "expired")
        while self._size > self.settings.max_entries:
            context, entry_id = min(
                ((c, i) for c, entries in self._contexts.items() for i in entries),
                key=lambda ci: self._contexts[ci[0]][ci[1]].eviction_rank(),
            )
            self._drop(context, entry_id, "evicted")

    def remove(self, context: str, entry_id: int) -> T | None:
        """Take an entry out (its answer is gone or done); None if it already left."""
        entries = self._contexts.get(context)
        if entries is None or entry_id not in entries:
            return None
        entry = entries.pop(entry_id)
        self._size -= 1
        if not entries:
            del self._contexts[context]
        return entry.answer

    def _drop(self, context: str, entry_id: int, why: Drop) -> None:
        """Remove an entry the bounds push out, and tell `on_drop` which and why."""
        answer = self.remove(context, entry_id)
        if answer is not None and self.on_drop is not None:
            self.on_drop(answer, why)
