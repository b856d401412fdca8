"""Static checks of docker-compose.yml and what it mounts from deploy/.

Nothing here runs a container: the file is validated against the Compose Specification's
JSON Schema (the copy check-jsonschema vendors), and its services, the Prometheus config,
the Grafana provisioning and the dashboard are checked against each other and against the
settings object and the metrics the workers export.
"""

from __future__ import annotations

import copy
import importlib.resources
import json
import re
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import jsonschema
import pytest
from prometheus_client import REGISTRY

import streams.metrics  # noqa: F401  (registers every metric the workers export)
from llmflow.cli import parser
from tests.deploy.test_manifests import _bad_setting_keys, _command, _load_one
from topology.settings import DEPLOY_GROUPS, ENV_PREFIX, Settings, load_settings

ROOT = Path(__file__).resolve().parents[2]
COMPOSE = ROOT / "docker-compose.yml"
DEPLOY = ROOT / "deploy"
PROMETHEUS_CONFIG = DEPLOY / "prometheus" / "prometheus.yml"
GRAFANA = DEPLOY / "grafana"
DASHBOARD = GRAFANA / "dashboards" / "llmflow.json"

WORKERS = {f"worker-{group}": stages for group, stages in DEPLOY_GROUPS.items()}
SERVICES = {"kafka", "redis", "provider", "topics", "scaler", "prometheus", "grafana", *WORKERS}
ONE_SHOT = {"topics"}
METRICS_PORT = 9100
PROVIDER_PORT = 8089
PROMETHEUS_PORT = 9090
# Metric names the team agreed on (some are exported by parts still being built).
SHARED_METRICS = {
    "llmflow_stage_latency_seconds",
    "llmflow_request_latency_seconds",
    "llmflow_responses_total",
    "llmflow_stage_events_total",
    "llmflow_dead_letters_total",
    "llmflow_upstream_calls_total",
    "llmflow_batch_size",
    "llmflow_circuit_state",
    "llmflow_fallbacks_total",
    "llmflow_cache_hit_rate_by_type",
    "llmflow_request_deduplication_rate",
    "llmflow_ratelimit_scale",
    "llmflow_batch_processing_latency_seconds",
    "llmflow_model_routing_accuracy",
    "llmflow_routing_outcomes_total",
    "llmflow_parallel_processing_efficiency",
    "llmflow_resource_utilization_rate",
    "llmflow_overhead_latency_seconds",
    "llmflow_upstream_latency_seconds",
    "llmflow_tokens_total",
    "llmflow_spend_usd_total",
    "llmflow_requests_in_flight",
    "llmflow_consumer_lag",
    "llmflow_forecast_arrival_rate",
    "llmflow_predicted_replicas",
}
# What the dashboard must show, by the metric each panel reads.
DASHBOARD_METRICS = {
    "llmflow_responses_total",
    "llmflow_request_latency_seconds",
    "llmflow_stage_latency_seconds",
    "llmflow_cache_hit_rate_by_type",
    "llmflow_request_deduplication_rate",
    "llmflow_batch_processing_latency_seconds",
    "llmflow_model_routing_accuracy",
    "llmflow_upstream_latency_seconds",
    "llmflow_spend_usd_total",
    "llmflow_circuit_state",
    "llmflow_consumer_lag",
    "llmflow_predicted_replicas",
}
METRIC_SUFFIX = re.compile(r"_(bucket|count|sum|total|created)$")


def _family(name: str) -> str:
    """A sample or counter name without its suffix: llmflow_x_bucket → llmflow_x."""
    return METRIC_SUFFIX.sub("", name)


def _env(service: dict[str, Any]) -> dict[str, str]:
    """A compose service's environment, whether written as a mapping or a list."""
    raw = service.get("environment") or {}
    if isinstance(raw, list):
        pairs = (item.split("=", 1) for item in raw)
        return {key: value for key, value in pairs}
    return {str(k): "" if v is None else str(v) for k, v in raw.items()}


def _mounts(service: dict[str, Any]) -> dict[str, Path]:
    """A service's bind mounts: container path → host path (short syntax, relative)."""
    mounts = {}
    for volume in service.get("volumes", []):
        host, container, *_ = str(volume).split(":")
        mounts[container] = (ROOT / host).resolve()
    return mounts


def compose_schema() -> dict[str, Any]:
    vendored = importlib.resources.files("check_jsonschema.builtin_schemas.vendor")
    schema: dict[str, Any] = json.loads((vendored / "compose-spec.json").read_text())
    return schema


@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    return _load_one(COMPOSE)


@pytest.fixture(scope="module")
def services(compose: dict[str, Any]) -> dict[str, dict[str, Any]]:
    found: dict[str, dict[str, Any]] = compose["services"]
    return found


# --- the file as a whole --------------------------------------------------------------


def test_compose_validates_against_the_compose_specification(compose: dict[str, Any]) -> None:
    schema = compose_schema()
    assert schema["title"] == "Compose Specification"
    validator = jsonschema.Draft7Validator(schema)
    errors = [f"{list(e.absolute_path)}: {e.message}" for e in validator.iter_errors(compose)]
    assert not errors, errors
    broken = copy.deepcopy(compose)
    broken["services"]["redis"]["image"] = 7
    broken["services"]["worker-core"]["replica"] = 2
    assert len(list(validator.iter_errors(broken))) == 2, "the schema does not check services"


def test_compose_services(compose: dict[str, Any], services: dict[str, Any]) -> None:
    assert "version" not in compose, "Compose Specification files carry no top-level version"
    assert set(services) == SERVICES


def test_long_running_services_have_healthchecks(services: dict[str, Any]) -> None:
    for name, service in services.items():
        if name in ONE_SHOT:
            assert service["restart"] == "no"
            continue
        test = _command(service["healthcheck"]["test"])
        assert test[0] in ("CMD", "CMD-SHELL") and len(test) > 1, name


def test_dependencies_wait_for_health(services: dict[str, Any]) -> None:
    """Every dependency has a condition the dependency can meet."""
    for name, service in services.items():
        depends = service.get("depends_on", {})
        assert isinstance(depends, dict), f"{name}: depends_on needs conditions (long syntax)"
        for target, rule in depends.items():
            condition = rule["condition"]
            if condition == "service_healthy":
                assert "healthcheck" in services[target], f"{name} waits on {target}'s health"
            else:
                assert (condition, target) == ("service_completed_successfully", "topics")
    assert services["topics"]["depends_on"]["kafka"]["condition"] == "service_healthy"
    assert services["grafana"]["depends_on"]["prometheus"]["condition"] == "service_healthy"


def test_compose_env_names_real_settings(services: dict[str, Any]) -> None:
    for name, service in services.items():
        env = _env(service)
        assert not _bad_setting_keys(list(env)), f"{name}: unknown settings"
        if any(key.startswith(ENV_PREFIX) for key in env):
            load_settings(environ=env)  # the values parse and validate


def test_bind_mounts_exist(services: dict[str, Any]) -> None:
    for name, service in services.items():
        for container, host in _mounts(service).items():
            assert host.exists(), f"{name} mounts {host}, which is missing, at {container}"


# --- Kafka, Redis, the provider, topics ------------------------------------------------


def test_compose_kafka_is_single_node_kraft(services: dict[str, Any]) -> None:
    kafka = services["kafka"]
    assert kafka["image"] == "apache/kafka:4.1.1"
    env = _env(kafka)
    assert set(env["KAFKA_PROCESS_ROLES"].split(",")) == {"broker", "controller"}
    assert "CONTROLLER" in env["KAFKA_CONTROLLER_LISTENER_NAMES"]
    assert "PLAINTEXT://kafka:9092" in env["KAFKA_ADVERTISED_LISTENERS"]
    node = env["KAFKA_NODE_ID"]
    assert env["KAFKA_CONTROLLER_QUORUM_VOTERS"].startswith(f"{node}@kafka:")
    assert env["KAFKA_OFFSETS_TOPIC_REPLICATION_FACTOR"] == "1"
    test = " ".join(_command(kafka["healthcheck"]["test"]))
    assert "/opt/kafka/bin/kafka-topics.sh" in test and "--list" in test


def test_compose_redis_healthcheck(services: dict[str, Any]) -> None:
    redis = services["redis"]
    assert redis["image"] == "redis:7"
    test = _command(redis["healthcheck"]["test"])
    assert "redis-cli" in test and "ping" in test


def test_llmflow_services_use_the_built_image_and_real_commands(services: dict[str, Any]) -> None:
    for name in ("provider", "topics", "scaler", *WORKERS):
        assert "build" in services[name], f"{name} is not built from the Dockerfile"
        assert services[name]["image"] == "llmflow:latest"
        command = _command(services[name]["command"])
        if command[0] == "llmflow":
            parser().parse_args(command[1:])  # a subcommand the CLI has
    provider = _command(services["provider"]["command"])
    assert provider[:3] == ["python", "-m", "provider.simulated"]
    assert provider[provider.index("--port") + 1] == str(PROVIDER_PORT)
    assert provider[provider.index("--host") + 1] == "0.0.0.0"
    check = " ".join(_command(services["provider"]["healthcheck"]["test"]))
    assert f"localhost:{PROVIDER_PORT}/health" in check
    assert _command(services["topics"]["command"]) == ["llmflow", "topics", "create"]
    settings = load_settings(environ=_env(services["topics"]))
    assert settings.bootstrap_servers == "kafka:9092"


# --- the worker groups -----------------------------------------------------------------


def test_groups_cover_every_stage_once() -> None:
    grouped = [stage for stages in DEPLOY_GROUPS.values() for stage in stages]
    assert sorted(grouped) == sorted(Settings().stage_names())
    for stages in DEPLOY_GROUPS.values():
        Settings(worker_stages=list(stages))  # no group splits the Table-sharing stages


def test_each_group_worker_runs_its_stages(services: dict[str, Any]) -> None:
    for name, stages in WORKERS.items():
        worker = services[name]
        assert _command(worker["command"]) in ([], ["llmflow", "worker"])
        settings = load_settings(environ=_env(worker))
        assert settings.worker_stages == list(stages), name
        assert settings.metrics_port == METRICS_PORT
        assert settings.bootstrap_servers == "kafka:9092"
        assert settings.redis_url == "redis://redis:6379/0"
        url = urlsplit(settings.provider_url)
        assert (url.hostname, url.port, url.path) == ("provider", PROVIDER_PORT, "/v1")
        assert str(METRICS_PORT) in [str(p) for p in worker["expose"]]


def test_group_workers_can_scale(services: dict[str, Any]) -> None:
    for name in WORKERS:
        worker = services[name]
        assert "container_name" not in worker, "a fixed container name breaks --scale"
        assert not worker.get("ports"), f"{name}: replicas would share host ports"
        check = " ".join(_command(worker["healthcheck"]["test"]))
        assert f"localhost:{METRICS_PORT}/metrics" in check and "python" in check


# --- Prometheus and Grafana ------------------------------------------------------------


def test_prometheus_scrapes_every_worker_replica_and_loads_the_rules(
    services: dict[str, Any],
) -> None:
    prometheus = services["prometheus"]
    mounts = _mounts(prometheus)
    command = _command(prometheus["command"])
    config_path = next(a.split("=", 1)[1] for a in command if a.startswith("--config.file="))
    assert mounts[config_path] == PROMETHEUS_CONFIG.resolve()
    config = _load_one(PROMETHEUS_CONFIG)
    (rules,) = config["rule_files"]
    assert mounts[rules] == (ROOT / "k8s" / "prometheus" / "llmflow-rules.yaml").resolve()
    (job,) = [j for j in config["scrape_configs"] if j["job_name"] == "llmflow-worker"]
    (discovery,) = job["dns_sd_configs"]
    assert discovery["type"] == "A" and discovery["port"] == METRICS_PORT
    assert set(discovery["names"]) == set(WORKERS)
    (scaler,) = [j for j in config["scrape_configs"] if j["job_name"] == "llmflow-scaler"]
    assert scaler["static_configs"][0]["targets"] == [f"scaler:{METRICS_PORT}"]
    assert load_settings(environ=_env(services["scaler"])).metrics_port == METRICS_PORT


def test_grafana_provisions_the_datasource_and_dashboard(services: dict[str, Any]) -> None:
    mounts = _mounts(services["grafana"])
    provisioning = mounts["/etc/grafana/provisioning"]
    assert provisioning == (GRAFANA / "provisioning").resolve()
    (datasource,) = _load_one(provisioning / "datasources" / "prometheus.yml")["datasources"]
    url = urlsplit(datasource["url"])
    assert (url.hostname, url.port) == ("prometheus", PROMETHEUS_PORT)
    (provider,) = _load_one(provisioning / "dashboards" / "llmflow.yml")["providers"]
    assert mounts[provider["options"]["path"]] == DASHBOARD.parent.resolve()
    dashboard = json.loads(DASHBOARD.read_text())
    for panel in dashboard["panels"]:
        assert panel["datasource"]["uid"] == datasource["uid"], panel["title"]
        for target in panel["targets"]:
            assert target["datasource"]["uid"] == datasource["uid"], panel["title"]


def dashboard_metrics() -> dict[str, set[str]]:
    """Every llmflow metric family the dashboard's queries read, by panel title."""
    dashboard = json.loads(DASHBOARD.read_text())
    return {
        panel["title"]: {
            _family(name)
            for target in panel["targets"]
            for name in re.findall(r"\bllmflow_[a-z0-9_]+", target["expr"])
        }
        for panel in dashboard["panels"]
    }


def test_dashboard_reads_only_metrics_that_exist() -> None:
    defined = {_family(m.name) for m in REGISTRY.collect()}
    known = defined | {_family(name) for name in SHARED_METRICS}
    for title, names in dashboard_metrics().items():
        assert names, f"panel {title!r} reads no llmflow metric"
        assert names <= known, f"panel {title!r} reads unknown {sorted(names - known)}"


def test_dashboard_shows_the_agreed_views() -> None:
    shown = set().union(*dashboard_metrics().values())
    assert {_family(name) for name in DASHBOARD_METRICS} <= shown
