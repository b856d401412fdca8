"""SemanticBucketer: stable LSH buckets and partitions for embeddings."""

from __future__ import annotations

import numpy as np
import numpy.typing as npt
import pytest

from streams.locality import (
    MAPPINGS,
    Mapping,
    SemanticBucketer,
    bucketer_for,
    gray_rank,
    kafka_partition,
    murmur2,
)
from topology.settings import LocalitySettings, Settings

DIM = 384


def unit(rows: int, seed: int, dim: int = DIM) -> npt.NDArray[np.float64]:
    vectors = np.random.default_rng(seed).standard_normal((rows, dim))
    normed: npt.NDArray[np.float64] = vectors / np.linalg.norm(vectors, axis=1, keepdims=True)
    return normed


def test_same_seed_same_buckets_across_instances() -> None:
    vectors = unit(500, 1)
    first = SemanticBucketer(DIM, 8, seed=42).buckets(vectors)
    second = SemanticBucketer(DIM, 8, seed=42).buckets(vectors)
    assert np.array_equal(first, second)
    assert [SemanticBucketer(DIM, 8, seed=42).bucket(v) for v in vectors[:20]] == list(first[:20])


def test_other_seed_other_buckets() -> None:
    vectors = unit(500, 1)
    first = SemanticBucketer(DIM, 8, seed=42).buckets(vectors)
    other = SemanticBucketer(DIM, 8, seed=43).buckets(vectors)
    assert np.mean(first != other) > 0.5


def test_identical_vectors_share_a_bucket() -> None:
    bucketer = SemanticBucketer(DIM, 8, seed=0)
    for vector in unit(50, 2):
        assert bucketer.bucket(vector) == bucketer.bucket(vector.copy())
        assert bucketer.bucket(vector.astype(np.float32)) == bucketer.bucket(vector)


def test_nearly_identical_vectors_usually_share_a_bucket() -> None:
    vectors = unit(2000, 3)
    noisy = vectors + 0.005 * unit(2000, 4)  # cosine ≈ 0.99999, angle ≈ 0.3°
    noisy /= np.linalg.norm(noisy, axis=1, keepdims=True)
    bucketer = SemanticBucketer(DIM, 8, seed=5)
    same = np.mean(bucketer.buckets(vectors) == bucketer.buckets(noisy))
    # Expected (1 - 0.3/180)**8 ≈ 0.987; the bound leaves a wide margin.
    assert same > 0.95


def test_split_probability_follows_the_angle() -> None:
    """Each bit splits a pair at angle θ with probability θ/π (SimHash)."""
    vectors = unit(4000, 6)
    other = unit(4000, 7)
    # Mix in an orthogonal component so that cos = 0.9.
    other -= np.sum(other * vectors, axis=1, keepdims=True) * vectors
    other /= np.linalg.norm(other, axis=1, keepdims=True)
    pairs = 0.9 * vectors + np.sqrt(1 - 0.81) * other
    bucketer = SemanticBucketer(DIM, 1, seed=8)
    split = np.mean(bucketer.buckets(vectors) != bucketer.buckets(pairs))
    assert split == pytest.approx(np.arccos(0.9) / np.pi, abs=0.03)


@pytest.mark.parametrize("mapping", MAPPINGS)
@pytest.mark.parametrize("partitions", [1, 3, 4, 16, 32])
def test_partition_in_range_and_every_partition_used(mapping: Mapping, partitions: int) -> None:
    vectors = unit(3000, 9)
    bucketer = SemanticBucketer(DIM, 8, seed=10, mapping=mapping)
    parts = bucketer.partitions(vectors, partitions)
    assert parts.min() >= 0 and parts.max() < partitions
    assert set(parts.tolist()) == set(range(partitions))
    assert [bucketer.partition(v, partitions) for v in vectors[:30]] == list(parts[:30])


@pytest.mark.parametrize("mapping", ["modulo", "gray"])
def test_load_roughly_balanced_for_random_unit_vectors(mapping: Mapping) -> None:
    vectors = unit(8000, 11)
    parts = SemanticBucketer(DIM, 4, seed=12, mapping=mapping).partitions(vectors, 16)
    loads = np.bincount(parts, minlength=16)
    assert loads.max() / loads.mean() < 1.3


def test_fewer_bits_than_partitions_fill_only_that_many() -> None:
    parts = SemanticBucketer(DIM, 2, seed=0).partitions(unit(1000, 13), 16)
    assert len(set(parts.tolist())) == 4


def test_center_moves_the_hyperplanes() -> None:
    # A cloud around one direction: through the origin every plane cuts it unevenly.
    direction = unit(1, 14)[0]
    cloud = 0.9 * direction + 0.1 * unit(4000, 15)
    plain = SemanticBucketer(DIM, 3, seed=16).partitions(cloud, 8)
    centered = SemanticBucketer(DIM, 3, seed=16, center=cloud.mean(axis=0)).partitions(cloud, 8)
    skew_plain = np.bincount(plain, minlength=8).max() / (len(cloud) / 8)
    skew_centered = np.bincount(centered, minlength=8).max() / (len(cloud) / 8)
    assert skew_centered < 1.5 < skew_plain


def test_gray_rank_inverts_gray_code() -> None:
    ranks = np.arange(256, dtype=np.int64)
    codes = ranks ^ (ranks >> 1)
    assert np.array_equal(gray_rank(codes), ranks)


def test_gray_mapping_keeps_one_bit_neighbours_together_more_often() -> None:
    bits, partitions = 8, 4
    bucketer = SemanticBucketer(DIM, bits, seed=0, mapping="gray")
    buckets = np.arange(1 << bits, dtype=np.int64)
    parts = bucketer.partitions_of(buckets, partitions)
    same = [parts[b] == parts[b ^ (1 << i)] for b in range(1 << bits) for i in range(bits)]
    # 6 of 8 bits never change the partition; the 2 top bits always do.
    assert np.mean(same) == pytest.approx(6 / 8)


def test_murmur2_matches_kafka_clients() -> None:
    partitioner = pytest.importorskip("aiokafka.partitioner")
    rng = np.random.default_rng(17)
    for length in range(40):
        data = rng.integers(0, 256, length, dtype=np.uint8).tobytes()
        assert murmur2(data) == partitioner.murmur2(data)
    assert kafka_partition(b"lsh:0", 7) == (partitioner.murmur2(b"lsh:0") & 0x7FFFFFFF) % 7


def test_kafka_mapping_is_what_the_default_partitioner_does_with_key() -> None:
    bucketer = SemanticBucketer(DIM, 6, seed=1, mapping="kafka")
    for vector in unit(40, 18):
        assert bucketer.partition(vector, 12) == kafka_partition(bucketer.key(vector), 12)


@pytest.mark.parametrize(
    "kwargs",
    [
        {"dimension": 0, "bits": 4, "seed": 0},
        {"dimension": 4, "bits": 0, "seed": 0},
        {"dimension": 4, "bits": 31, "seed": 0},
        {"dimension": 4, "bits": 4, "seed": 0, "mapping": "nope"},
        {"dimension": 4, "bits": 4, "seed": 0, "center": [0.0, 1.0]},
    ],
)
def test_rejects_bad_arguments(kwargs: dict[str, object]) -> None:
    with pytest.raises(ValueError):
        SemanticBucketer(**kwargs)  # type: ignore[arg-type]


def test_rejects_wrong_shapes() -> None:
    bucketer = SemanticBucketer(4, 2, seed=0)
    with pytest.raises(ValueError):
        bucketer.bucket([1.0, 2.0])
    with pytest.raises(ValueError):
        bucketer.buckets(np.zeros((3, 5)))
    with pytest.raises(ValueError):
        bucketer.partition([1.0, 0.0, 0.0, 0.0], 0)


def test_the_configured_bucketer_has_a_bucket_per_partition_and_the_committed_center() -> None:
    bucketer = bucketer_for(Settings())
    assert bucketer.bits == 2  # 4 partitions
    assert np.linalg.norm(bucketer.center) > 0.1  # sentence embeddings share a direction
    vectors = unit(200, 11)
    by_vector = [bucketer.partition(v, 4) for v in vectors]
    assert by_vector == [bucketer.partition_of(b, 4) for b in bucketer.buckets(vectors)]
    assert set(by_vector) == {0, 1, 2, 3}


def test_every_worker_of_one_configuration_computes_the_same_buckets() -> None:
    settings = Settings(locality=LocalitySettings(bits=6, center=None))
    vectors = unit(100, 12)
    first, second = bucketer_for(settings), bucketer_for(settings)
    assert first.bits == 6 and not first.center.any()
    assert list(first.buckets(vectors)) == list(second.buckets(vectors))
