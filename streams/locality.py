"""Locality-sensitive partition keys: near-duplicate prompts should meet on one partition.

Dedup/merge and the semantic cache compare a request only with what its own partition
holds, so two near-duplicates that land on different partitions are a miss that one
global index would not make. `SemanticBucketer` hashes an embedding with random
hyperplanes (SimHash): bit i is the side of hyperplane i the vector lies on, and two
vectors at angle θ disagree on each bit with probability θ/π. Every worker builds the
same hyperplanes from the same seed, so every worker computes the same bucket.

The trade-off: each bit splits a pair at cosine 0.9 with probability about 0.14 (0.10 at
0.95), so fewer bits miss fewer near-duplicates, but 2**bits buckets cannot fill more
partitions than that, and the cells of an embedding space are not equally full. See
`bench/locality.py` for the measurement on real prompts.

How buckets map to partitions (`mapping`):
- ``modulo``: ``bucket % partitions``. With a power-of-two partition count this keeps the
  low log2(partitions) bits, so bits beyond that change nothing.
- ``gray``: contiguous ranges of buckets in Gray-code order, so buckets one bit apart
  tend to share a partition. With a power-of-two count the ranges are exactly the top
  log2(partitions) bits, which behaves as ``modulo`` does (different hyperplanes, same
  statistics); it differs only for other counts.
- ``kafka``: what Kafka's default partitioner does with `key()` as the message key
  (murmur2 of the key bytes). Buckets scatter over partitions, which evens the load when
  there are more buckets than partitions and splits near-duplicates that `modulo` keeps.

`center` (optional, e.g. the mean embedding of a sample of prompts, shipped to every
worker) moves the hyperplanes through it instead of the origin: sentence embeddings
share a common direction, and hyperplanes through the origin cut that cloud unevenly.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Literal

import numpy as np
import numpy.typing as npt

from topology.settings import Settings

Mapping = Literal["modulo", "gray", "kafka"]
MAPPINGS: tuple[Mapping, ...] = ("modulo", "gray", "kafka")
MAX_BITS = 30

_MASK32 = 0xFFFFFFFF
_MURMUR_SEED = 0x9747B28C
_MURMUR_M = 0x5BD1E995


def murmur2(data: bytes) -> int:
    """Kafka's murmur2 (org.apache.kafka.common.utils.Utils.murmur2), unsigned 32-bit."""
    length = len(data)
    h = (_MURMUR_SEED ^ length) & _MASK32
    whole = length - length % 4
    for i in range(0, whole, 4):
        k = int.from_bytes(data[i : i + 4], "little")
        k = (k * _MURMUR_M) & _MASK32
        k ^= k >> 24
        k = (k * _MURMUR_M) & _MASK32
        h = ((h * _MURMUR_M) & _MASK32) ^ k
    tail = length % 4
    if tail >= 3:
        h ^= data[whole + 2] << 16
    if tail >= 2:
        h ^= data[whole + 1] << 8
    if tail >= 1:
        h ^= data[whole]
        h = (h * _MURMUR_M) & _MASK32
    h ^= h >> 13
    h = (h * _MURMUR_M) & _MASK32
    h ^= h >> 15
    return h


def kafka_partition(key: bytes, partitions: int) -> int:
    """The partition Kafka's default partitioner (Java and aiokafka) picks for `key`."""
    return (murmur2(key) & 0x7FFFFFFF) % partitions


def gray_rank(buckets: npt.NDArray[np.int64]) -> npt.NDArray[np.int64]:
    """Position of each Gray code in the Gray sequence (the inverse Gray transform)."""
    rank = buckets.copy()
    shift = buckets >> 1
    while np.any(shift):
        rank ^= shift
        shift >>= 1
    return rank


class SemanticBucketer:
    """Random-hyperplane LSH of embeddings into 2**bits buckets, and buckets to partitions."""

    def __init__(
        self,
        dimension: int,
        bits: int,
        seed: int,
        *,
        mapping: Mapping = "modulo",
        center: npt.ArrayLike | None = None,
    ) -> None:
        if dimension < 1:
            raise ValueError(f"dimension must be positive, not {dimension}")
        if not 1 <= bits <= MAX_BITS:
            raise ValueError(f"bits must be in 1..{MAX_BITS}, not {bits}")
        if mapping not in MAPPINGS:
            raise ValueError(f"mapping must be one of {MAPPINGS}, not {mapping!r}")
        self.dimension = dimension
        self.bits = bits
        self.seed = seed
        self.mapping: Mapping = mapping
        # float64 and a fixed generator: every worker draws the same planes bit for bit.
        self.planes = np.random.default_rng(seed).standard_normal((bits, dimension))
        self.center = (
            np.zeros(dimension) if center is None else np.asarray(center, dtype=np.float64)
        )
        if self.center.shape != (dimension,):
            raise ValueError(f"center must have shape ({dimension},), not {self.center.shape}")
        self._weights = np.left_shift(np.int64(1), np.arange(bits, dtype=np.int64))

    @property
    def buckets_count(self) -> int:
        return 1 << self.bits

    def buckets(self, vectors: npt.ArrayLike) -> npt.NDArray[np.int64]:
        """The bucket of each row of an (n, dimension) array."""
        matrix = np.asarray(vectors, dtype=np.float64)
        if matrix.ndim != 2 or matrix.shape[1] != self.dimension:
            raise ValueError(f"expected shape (n, {self.dimension}), got {matrix.shape}")
        sides = (matrix - self.center) @ self.planes.T >= 0.0
        return np.asarray(sides.astype(np.int64) @ self._weights, dtype=np.int64)

    def bucket(self, vector: npt.ArrayLike) -> int:
        row = np.asarray(vector, dtype=np.float64)
        if row.shape != (self.dimension,):
            raise ValueError(f"expected shape ({self.dimension},), got {row.shape}")
        return int(self.buckets(row[None, :])[0])

    @staticmethod
    def key_of(bucket: int) -> bytes:
        """Message key bytes for a bucket (what the ``kafka`` mapping hashes)."""
        return b"lsh:%d" % bucket

    def key(self, vector: npt.ArrayLike) -> bytes:
        return self.key_of(self.bucket(vector))

    def partitions_of(
        self, buckets: npt.NDArray[np.int64], partitions: int
    ) -> npt.NDArray[np.int64]:
        """Map buckets (from `buckets`) to partitions 0..partitions-1 with this mapping."""
        if partitions < 1:
            raise ValueError(f"partitions must be positive, not {partitions}")
        if self.mapping == "modulo":
            return buckets % partitions
        if self.mapping == "gray":
            return (gray_rank(buckets) * partitions) >> self.bits
        unique, inverse = np.unique(buckets, return_inverse=True)
        chosen = [kafka_partition(self.key_of(int(b)), partitions) for b in unique]
        return np.asarray(chosen, dtype=np.int64)[inverse.reshape(buckets.shape)]

    def partitions(self, vectors: npt.ArrayLike, partitions: int) -> npt.NDArray[np.int64]:
        """The partition of each row of an (n, dimension) array."""
        return self.partitions_of(self.buckets(vectors), partitions)

    def partition_of(self, bucket: int, partitions: int) -> int:
        """The partition of one bucket: stable across workers that share seed and settings."""
        return int(self.partitions_of(np.array([bucket], dtype=np.int64), partitions)[0])

    def partition(self, vector: npt.ArrayLike, partitions: int) -> int:
        return self.partition_of(self.bucket(vector), partitions)


def bucketer_for(settings: Settings) -> SemanticBucketer:
    """The bucketer every worker of these settings builds alike."""
    locality = settings.locality
    center = None
    if locality.center is not None:
        center = json.loads(Path(locality.center).read_text())["center"]
    return SemanticBucketer(
        settings.embedding.dimension,
        settings.locality_bits(),
        locality.seed,
        mapping=locality.mapping,
        center=center,
    )
