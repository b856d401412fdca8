"""load_settings: defaults, a JSON file, env overrides, to_env round trip, graph checks."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from pydantic import ValidationError

from topology.settings import (
    CacheSettings,
    Quota,
    RateLimit,
    RateLimits,
    Rates,
    RouteSettings,
    Settings,
    StageSpec,
    TopicSpec,
    load_settings,
    to_env,
)


def test_defaults_from_an_empty_environment() -> None:
    s = load_settings(environ={})
    assert s == Settings()
    assert s.bootstrap_servers == "127.0.0.1:9092"
    assert [st.name for st in s.stages][:2] == ["ratelimit", "dedup"]
    assert s.stage("batch").key_by == "model"
    assert s.model("sim-small") is not None and s.model("nope") is None


def test_file_then_env_overrides(tmp_path: Path) -> None:
    file = tmp_path / "llmflow.json"
    file.write_text(
        json.dumps(
            {
                "app_id": "from-file",
                "bootstrap_servers": "file:9092",
                "cache": {"ttl_s": 60, "max_entries_per_partition": 7},
            }
        )
    )
    env = {
        "LLMFLOW_BOOTSTRAP_SERVERS": "kafka-1:9093,kafka-2:9093",
        "LLMFLOW_CACHE__TTL_S": "5",
        "LLMFLOW_RATELIMIT": '{"tenants": {"Acme": {"burst": 10, "per_second": 2.5}}}',
        "OTHER_VAR": "ignored",
        "LLMFLOW_NOT_A_FIELD": "ignored",
    }
    s = load_settings(file, environ=env)
    assert s.app_id == "from-file"
    assert s.bootstrap_servers == "kafka-1:9093,kafka-2:9093"
    assert s.cache.ttl_s == 5.0
    assert s.cache.max_entries_per_partition == 7  # the file's, merged not replaced
    assert s.ratelimit.for_tenant("Acme").tenant.requests == RateLimit(burst=10, per_second=2.5)
    assert s.ratelimit.for_tenant("other") == Quota()


def test_config_file_named_by_env(tmp_path: Path) -> None:
    file = tmp_path / "c.json"
    file.write_text(json.dumps({"redis_url": "redis://127.0.0.1:6390/0"}))
    s = load_settings(environ={"LLMFLOW_CONFIG": str(file)})
    assert s.redis_url == "redis://127.0.0.1:6390/0"


def test_nested_env_values_are_parsed_as_json() -> None:
    s = load_settings(
        environ={
            "LLMFLOW_BATCH__MAX_SIZE": "4",
            "LLMFLOW_INFER__RETRIES": "0",
            "LLMFLOW_METRICS_PORT": "9464",
            "LLMFLOW_REDIS_URL": "null",
        }
    )
    assert s.batch.max_size == 4
    assert s.infer.retries == 0
    assert s.metrics_port == 9464
    assert s.redis_url is None


def test_bad_env_value_is_refused() -> None:
    with pytest.raises(ValidationError):
        load_settings(environ={"LLMFLOW_BATCH__MAX_SIZE": "0"})
    with pytest.raises(ValidationError):
        load_settings(environ={"LLMFLOW_CACHE__TTL": "5"})


def test_numeric_looking_string_from_env_stays_a_string() -> None:
    s = load_settings(environ={"LLMFLOW_PROVIDER_API_KEY": "12345"})
    assert s.provider_api_key == "12345"


def test_to_env_round_trips() -> None:
    custom = Settings(
        app_id="123",
        provider_api_key="true",
        bootstrap_servers="b:1",
        redis_url="redis://h:1/2",
        metrics_port=9000,
        cache=CacheSettings(ttl_s=5.0, max_entries_per_partition=3),
        ratelimit=RateLimits(
            tenants={"Acme": Quota(tenant=Rates(requests=RateLimit(burst=10, per_second=2.5)))}
        ),
        route=RouteSettings(small_max_prompt_tokens=100),
    )
    env = to_env(custom)
    assert env["LLMFLOW_APP_ID"] == '"123"'
    assert all(k.startswith("LLMFLOW_") for k in env)
    loaded = load_settings(environ=env)
    assert loaded == custom
    assert loaded.ratelimit.for_tenant("Acme") == Quota(
        tenant=Rates(requests=RateLimit(burst=10, per_second=2.5))
    )


def test_to_env_round_trips_defaults() -> None:
    assert load_settings(environ=to_env(Settings())) == Settings()


def test_route_model_not_in_registry_is_refused() -> None:
    with pytest.raises(ValidationError, match="not in the model registry"):
        Settings(route=RouteSettings(small_model="ghost"))
    with pytest.raises(ValidationError, match="not in the model registry"):
        load_settings(environ={"LLMFLOW_ROUTE__LARGE_MODEL": "ghost"})


def test_repeated_stage_names_are_refused() -> None:
    stage = StageSpec(name="dedup", topic=TopicSpec(name="t"), key_by="fingerprint")
    with pytest.raises(ValidationError, match="stage names repeat"):
        Settings(stages=[stage, stage])


def test_unknown_stage_is_a_key_error() -> None:
    with pytest.raises(KeyError):
        Settings().stage("nope")


def test_all_topics_lists_wire_and_stage_topics() -> None:
    names = [t.name for t in Settings().all_topics()]
    assert names[:6] == [
        "llm.requests",
        "llm.responses",
        "llm.responses.stream",
        "llm.dlq",
        "llm.feedback",
        "llm.cancel",
    ]
    assert "llm.stage.postprocess" in names
    assert "llm.status" in names
    assert "llm.router-models" in names
    assert len(names) == len(set(names)) == 23


def test_changelog_topics_are_compacted_and_co_partitioned_with_their_stage() -> None:
    settings = Settings()
    changelogs = {t.name: t for t in settings.changelog_topics()}
    assert set(changelogs) == {
        "llmflow-ratelimit-buckets-changelog",
        "llmflow-dedup-inflight-changelog",
        "llmflow-cache-exact-changelog",
        "llmflow-cache-semantic-changelog",
        "llmflow-request-status-changelog",
    }
    assert all(t.compacted for t in changelogs.values())
    cache = changelogs["llmflow-cache-exact-changelog"]
    assert cache.partitions == settings.stage("cache").topic.partitions


def test_namespaced_settings_share_no_topic_or_group() -> None:
    settings = Settings()
    other = settings.namespaced("probe-")
    assert other.app_id == "probe-llmflow"
    assert other.topics.requests.name == "probe-llm.requests"
    assert other.stage("ratelimit").topic.name == "probe-llm.stage.ratelimit"
    names = {t.name for t in settings.all_topics()}
    other_names = {t.name for t in other.all_topics()}
    assert len(other_names) == len(names) and not names & other_names
    assert all(name.startswith("probe-") for name in other_names)
    assert settings.topics.requests.name == "llm.requests"  # the original is untouched


def test_a_table_on_an_unknown_stage_is_refused() -> None:
    with pytest.raises(ValueError, match="not in the graph"):
        Settings(tables={"t": "nowhere"})


def test_stages_sharing_tables_must_share_a_partition_count() -> None:
    stages = [
        s.model_copy(update={"topic": s.topic.model_copy(update={"partitions": 8})})
        if s.name == "postprocess"
        else s
        for s in Settings().stages
    ]
    with pytest.raises(ValueError, match="one partition count"):
        Settings(stages=stages)


def test_the_zoo_models_are_in_the_registry_as_their_cards_say() -> None:
    settings = Settings()
    for name in ("zoo-small", "zoo-large"):
        spec = settings.model(name)
        assert spec is not None and spec.backend == "onnx" and spec.path is not None
        card = json.loads((Path(spec.path) / "card.json").read_text())
        assert spec.input_per_1k == spec.output_per_1k == card["price_per_1k_tokens_usd"]
        assert spec.flops_per_token == card["flops_per_token"]
        assert spec.accuracy == card["accuracy"]
        assert spec.batch_limit(settings.batch.max_size) == settings.batch.max_size
    small, large = settings.model("zoo-small"), settings.model("zoo-large")
    assert small is not None and large is not None
    assert small.input_per_1k < large.input_per_1k


def test_worker_stages_read_from_the_env_comma_separated_or_as_json() -> None:
    assert Settings().worker_stages == [] and Settings().runs("batch")
    split = load_settings(environ={"LLMFLOW_WORKER_STAGES": "preprocess, ratelimit"})
    assert split.worker_stages == ["preprocess", "ratelimit"]
    assert split.runs("ratelimit") and not split.runs("batch")
    listed = load_settings(environ={"LLMFLOW_WORKER_STAGES": '["batch"]'})
    assert listed.worker_stages == ["batch"]
    assert load_settings(environ=to_env(listed)).worker_stages == ["batch"]


def test_worker_stages_naming_an_unknown_stage_is_refused() -> None:
    with pytest.raises(ValueError, match=r"unknown stages \['bacth'\]"):
        Settings(worker_stages=["preprocess", "bacth"])


def test_worker_stages_splitting_the_table_sharing_stages_is_refused() -> None:
    sharing = Settings().table_sharing_stages()
    assert sharing == ["dedup", "cache", "route", "postprocess", "warm"]
    with pytest.raises(ValueError, match=r"splits .* \(add \['route', 'postprocess', 'warm'\]\)"):
        Settings(worker_stages=["dedup", "cache"])
    assert Settings(worker_stages=[*sharing, "batch"]).runs("warm")


def test_fusion_joins_stages_of_one_key_and_partition_count_that_this_worker_runs() -> None:
    assert not Settings(fusion="off").fuses("dedup", "cache")
    fused = Settings(fusion="key")
    assert fused.fuses("dedup", "cache") and fused.fuses("cache", "route")
    assert fused.fuses("route", "postprocess")
    assert not fused.fuses("ratelimit", "dedup")  # tenant, then locality
    assert not fused.fuses("route", "batch")  # locality, then model
    assert not fused.fuses("dedup", "dedup") and not fused.fuses("preprocess", "ratelimit")
    assert fused.fuses("respond", "feedback")
    assert not Settings(fusion="key", worker_stages=["respond"]).fuses("respond", "feedback")
    stages = [s.model_copy() for s in fused.stages]
    cache = next(s for s in stages if s.name == "cache")
    cache.topic = cache.topic.model_copy(update={"partitions": 12})
    assert not fused.model_copy(update={"stages": stages}).fuses("dedup", "cache")


def test_local_fusion_joins_any_two_stages_this_worker_runs() -> None:
    local = Settings()
    assert local.fuses("preprocess", "ratelimit") and local.fuses("ratelimit", "dedup")
    assert local.fuses("route", "batch") and local.fuses("batch", "postprocess")
    assert not local.fuses("dedup", "dedup") and not local.fuses("dedup", "preprocess")
    assert not local.fuses("nowhere", "cache")
    edge = Settings(fusion="local", worker_stages=["preprocess", "ratelimit"])
    assert edge.fuses("preprocess", "ratelimit") and not edge.fuses("ratelimit", "dedup")


def test_fusion_true_reads_as_by_key_and_local_fusion_goes_by_key_under_exactly_once() -> None:
    assert Settings(fusion=True).fusion == "key"  # type: ignore[arg-type]
    assert Settings(fusion="false").fusion == "off"  # type: ignore[arg-type]
    exactly_once = Settings(processing_guarantee="exactly_once")
    assert exactly_once.fusion == "local" and exactly_once.fuses("dedup", "cache")
    assert not exactly_once.fuses("ratelimit", "dedup")
    assert not exactly_once.fuses("preprocess", "ratelimit")
