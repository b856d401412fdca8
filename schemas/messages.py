"""Wire messages of llmflow: what agents publish, what they get back, and what stages pass on.

Every wire message carries `schema_version` so consumers in other languages can tell
formats apart; JSON is the wire format (see `schemas.export` for the JSON Schemas).
"""

from __future__ import annotations

import base64
import time
from enum import StrEnum
from typing import Literal

import numpy as np
import numpy.typing as npt
from pydantic import BaseModel, ConfigDict, Field

SCHEMA_VERSION = 1
# Half precision halves the envelope's size; cosine similarity barely notices it.
EMBEDDING_DTYPE = np.dtype("<f2")


class WireModel(BaseModel):
    """Base of every wire message: unknown fields are refused so typos surface as errors."""

    model_config = ConfigDict(extra="forbid")

    schema_version: int = SCHEMA_VERSION


class Priority(StrEnum):
    HIGH = "high"
    NORMAL = "normal"
    LOW = "low"


class RequestClass(StrEnum):
    SIMPLE = "simple"
    COMPLEX = "complex"
    BATCH = "batch"


Degraded = Literal["cache", "cheaper_model"]


class Role(StrEnum):
    SYSTEM = "system"
    USER = "user"
    ASSISTANT = "assistant"
    TOOL = "tool"


class ChatMessage(BaseModel):
    """One chat turn in the OpenAI format."""

    model_config = ConfigDict(extra="forbid")

    role: Role
    content: str
    name: str | None = None
    tool_call_id: str | None = None


class GenerationParams(BaseModel):
    model_config = ConfigDict(extra="forbid")

    max_tokens: int = 256
    temperature: float = Field(default=0.0, ge=0.0, le=2.0)
    top_p: float = Field(default=1.0, gt=0.0, le=1.0)
    stop: list[str] = Field(default_factory=list, max_length=8)
    seed: int | None = None


class CachePolicy(BaseModel):
    """What the caller allows the cache and the merger to do with this request."""

    model_config = ConfigDict(extra="forbid")

    read: bool = True
    write: bool = True
    ttl_s: float | None = Field(default=None, gt=0)


class LLMRequest(WireModel):
    id: str = Field(min_length=1, max_length=128)
    tenant: str = Field(min_length=1, max_length=128)
    user: str = Field(default="anonymous", max_length=128)
    api_type: str = Field(default="chat", max_length=64)
    priority: Priority = Priority.NORMAL
    request_class: RequestClass | None = Field(
        default=None,
        description="simple, complex or batch: picks infer's timeout; unset, low priority "
        "is batch and the rest simple",
    )
    messages: list[ChatMessage] = Field(min_length=1, max_length=256)
    model: str | None = Field(default=None, description="model hint; the router decides if unset")
    params: GenerationParams = Field(default_factory=GenerationParams)
    deadline: float | None = Field(default=None, description="absolute deadline, unix seconds")
    cache: CachePolicy = Field(default_factory=CachePolicy)
    stream: bool = False
    reply_topic: str | None = Field(default=None, max_length=249)
    metadata: dict[str, str] = Field(default_factory=dict)
    created_at: float = Field(default_factory=time.time)

    def last_user_index(self) -> int | None:
        """Where the turn that asks what the request asks now stands, if there is one."""
        for index in range(len(self.messages) - 1, -1, -1):
            if self.messages[index].role is Role.USER:
                return index
        return None

    def last_user_turn(self) -> str | None:
        """What the request asks now: the text that near-duplicate requests share."""
        index = self.last_user_index()
        return None if index is None else self.messages[index].content


class Status(StrEnum):
    OK = "ok"
    CACHED = "cached"
    MERGED = "merged"
    ERROR = "error"


class ErrorCode(StrEnum):
    INVALID = "invalid"
    RATE_LIMITED = "rate_limited"
    TIMEOUT = "timeout"
    UPSTREAM_ERROR = "upstream_error"
    OVERLOADED = "overloaded"
    INTERNAL = "internal"
    CANCELLED = "cancelled"


class ErrorInfo(BaseModel):
    """Why a request failed: `code` is the class, `reason` the precise cause."""

    model_config = ConfigDict(extra="forbid")

    code: ErrorCode
    reason: str
    message: str
    retry_after_s: float | None = None


class Usage(BaseModel):
    model_config = ConfigDict(extra="forbid")

    prompt_tokens: int = 0
    completion_tokens: int = 0
    total_tokens: int = 0


class LLMResponse(WireModel):
    id: str
    tenant: str | None = None
    status: Status
    output: str | None = None
    finish_reason: str | None = None
    model: str | None = None
    cache_kind: Literal["exact", "semantic"] | None = None
    cache_tier: Literal["l1", "l2"] | None = None
    merged_with: str | None = None
    merge_kind: Literal["exact", "semantic"] | None = Field(
        default=None, description="merged: an identical request led, or a near-identical one"
    )
    degraded: Degraded | None = Field(
        default=None,
        description="every model of the chain failed: a cached answer, or a cheaper model's",
    )
    usage: Usage = Field(default_factory=Usage)
    cost_usd: float = 0.0
    latency_ms: float = 0.0
    upstream_ms: float = Field(
        default=0.0,
        description="of latency_ms, the time in model calls: the pipeline's own overhead is "
        "the rest (0 for a cache hit; a merged follower waited on its leader's calls)",
    )
    stage_latency_ms: dict[str, float] = Field(default_factory=dict)
    error: ErrorInfo | None = None
    created_at: float = Field(default_factory=time.time)


class StreamChunk(WireModel):
    id: str
    index: int
    delta: str
    done: bool = False
    error: ErrorInfo | None = None


class DeadLetter(WireModel):
    """A message the pipeline could not process, kept whole so nothing is lost."""

    raw_b64: str
    reason: str
    message: str
    request_id: str | None = None
    source_topic: str
    source_partition: int | None = None
    source_offset: int | None = None
    at: float = Field(default_factory=time.time)


class FeedbackEvent(WireModel):
    request_id: str
    tenant: str
    rating: float | None = Field(default=None, ge=-1.0, le=1.0)
    correct: bool | None = None
    comment: str | None = Field(default=None, max_length=4096)
    at: float = Field(default_factory=time.time)


class CancelEvent(WireModel):
    """Stop a request wherever it is; it is answered `cancelled`. Keyed by request id."""

    request_id: str = Field(min_length=1, max_length=128)
    reason: str = Field(default="cancelled by the caller", max_length=1024)
    at: float = Field(default_factory=time.time)


class StatusEvent(WireModel):
    """A point a request reached, for its status record (`agents.status`)."""

    request_id: str
    stage: str
    at: float = Field(default_factory=time.time)
    model: str | None = None
    retries: int = 0
    status: Status | None = Field(default=None, description="set once the request is answered")
    error: ErrorCode | None = None
    stage_latency_ms: dict[str, float] = Field(default_factory=dict)


class RoutedRecord(WireModel):
    """A request the router's classifier decided, sent to the feedback stage keyed by request
    id, so feedback on its answer can be joined with what was asked and who decided."""

    request_id: str
    tenant: str
    model: str = Field(description="the logical model it was sent to")
    version: str = Field(description="the router-model version that decided")
    candidate: bool = Field(description="whether the request was in the candidate's share")
    features: list[float]
    at: float = Field(default_factory=time.time)


class LabelledExample(WireModel):
    """A routed request whose answer feedback called good or bad: one training example."""

    routed: RoutedRecord
    good: bool


class RouterModel(BaseModel):
    """One version of the router's classifier: its ONNX graph (a few KB), base64."""

    model_config = ConfigDict(extra="forbid")

    version: str
    onnx_b64: str


class RouterModelsState(WireModel):
    """The router models every worker uses, on the compacted router-models topic: the
    incumbent, and a candidate taking `candidate_share` of requests while it rolls out."""

    incumbent: RouterModel
    candidate: RouterModel | None = None
    candidate_share: float = Field(default=0.0, ge=0.0, le=1.0)
    event: str = Field(description="what made this state: published, promoted, adopted, ...")
    at: float = Field(default_factory=time.time)


class RequestStatus(BaseModel):
    """What is known of one request: the points it reached and, once answered, how it
    ended. `llmflow status ID` shows it."""

    model_config = ConfigDict(extra="forbid")

    request_id: str
    reached: dict[str, float] = Field(default_factory=dict, description="stage → unix time")
    model: str | None = None
    retries: int = 0
    status: Status | None = None
    error: ErrorCode | None = None
    stage_latency_ms: dict[str, float] = Field(default_factory=dict)
    updated_at: float = 0.0
    finished_at: float | None = None


class Result(BaseModel):
    """What a model call produced for the leader of a fingerprint."""

    model_config = ConfigDict(extra="forbid")

    output: str | None = None
    finish_reason: str | None = None
    model: str | None = None
    usage: Usage = Field(default_factory=Usage)
    cost_usd: float = 0.0
    cache_kind: Literal["exact", "semantic"] | None = None
    cache_tier: Literal["l1", "l2"] | None = None
    error: ErrorInfo | None = None
    streamed_chunks: int = Field(
        default=0, description="chunks infer already sent on the stream topic, as generated"
    )
    degraded: Degraded | None = None
    confidence: float | None = Field(
        default=None,
        ge=0.0,
        le=1.0,
        description="the probability of the answer's least likely token, where the model says",
    )


class SemanticCheck(BaseModel):
    """A semantic hit held back so the model's own answer can say whether it was right."""

    model_config = ConfigDict(extra="forbid")

    fingerprint: str
    context: str
    entry_id: int
    similarity: float
    threshold: float
    output: str


class Envelope(WireModel):
    """The internal message between stages: the request plus what stages learnt about it."""

    request: LLMRequest
    fingerprint: str = ""
    prompt_tokens: int = 0
    model: str | None = None
    route_reason: str | None = None
    retries: int = Field(default=0, description="model calls infer repeated for this request")
    prior_cost_usd: float = Field(
        default=0.0, description="what answers a cascade set aside for a stronger model's cost"
    )
    received_at: float = Field(default_factory=time.time)
    origin_partition: int | None = Field(
        default=None, description="the request's partition of llm.requests, set by preprocess"
    )
    origin_offset: int | None = Field(
        default=None,
        description="its offset there: the same when a crash has preprocess handle it again",
    )
    upstream_ms: float = Field(
        default=0.0, description="time in infer's model calls, retries and backoff included"
    )
    stage_entered_at: float = Field(default_factory=time.time)
    stage_latency_ms: dict[str, float] = Field(default_factory=dict)
    result: Result | None = None
    status: Status | None = None
    merged_with: str | None = None
    merge_kind: Literal["exact", "semantic"] | None = None
    embedding: str | None = Field(
        default=None,
        description="sentence embedding of the last user turn: base64 of little-endian float16",
    )
    semantic_bucket: int | None = Field(
        default=None,
        description="LSH bucket of the embedding: near-duplicates share it, and so a partition",
    )
    semantic_check: SemanticCheck | None = None
    waiting_on: str | None = Field(
        default=None,
        description="a control copy for dedup: the in-flight entry whose lock has expired",
    )

    def mark(self, stage: str, now: float | None = None) -> float:
        """Charge the time since the previous stage handed over (queue + work) to `stage`;
        returns that time in ms (a stage entered twice keeps the sum of both)."""
        now = time.time() if now is None else now
        spent = (now - self.stage_entered_at) * 1000.0
        self.stage_latency_ms[stage] = self.stage_latency_ms.get(stage, 0.0) + spent
        self.stage_entered_at = now
        return spent

    def expired(self, now: float | None = None) -> bool:
        deadline = self.request.deadline
        return deadline is not None and (time.time() if now is None else now) >= deadline

    def fail(
        self, code: ErrorCode, reason: str, message: str, retry_after_s: float | None = None
    ) -> None:
        self.status = Status.ERROR
        error = ErrorInfo(code=code, reason=reason, message=message, retry_after_s=retry_after_s)
        self.result = Result(error=error)


def encode_embedding(vector: npt.NDArray[np.floating]) -> str:
    """The compact text form of an embedding that `Envelope.embedding` holds."""
    return base64.b64encode(np.asarray(vector, dtype=EMBEDDING_DTYPE).tobytes()).decode()


def decode_embedding(text: str) -> npt.NDArray[np.float32]:
    """The embedding written by `encode_embedding`, as float32 for arithmetic."""
    return np.frombuffer(base64.b64decode(text), dtype=EMBEDDING_DTYPE).astype(np.float32)


def dump(message: BaseModel) -> bytes:
    return message.model_dump_json(exclude_none=False).encode()


def wire_models() -> dict[str, type[BaseModel]]:
    """The messages users publish or consume, by file stem, for the JSON Schema export."""
    return {
        "request": LLMRequest,
        "response": LLMResponse,
        "stream_chunk": StreamChunk,
        "dead_letter": DeadLetter,
        "feedback": FeedbackEvent,
        "cancel": CancelEvent,
        "status": StatusEvent,
        "envelope": Envelope,
    }
