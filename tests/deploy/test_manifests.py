"""Static checks of the deployment files: Dockerfile and k8s/ (docker-compose.yml is
checked in test_compose.py).

Nothing here runs a container or a cluster; the k8s overlays are rendered by kustomize and
validated against the Kubernetes schemas, and the files are checked against each other and
against the settings object, so that a renamed setting, a dropped service or an unlisted
manifest fails here rather than at deploy time.
"""

from __future__ import annotations

import shlex
import shutil
import subprocess
import tomllib
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import kubernetes_validate
import pytest
import yaml

from llmflow.cli import cmd_scaler, parser
from streams.forecast import group_partitions
from topology.settings import DEPLOY_GROUPS, ENTRY_STAGE, ENV_PREFIX, Settings, load_settings

ROOT = Path(__file__).resolve().parents[2]
DOCKERFILE = ROOT / "Dockerfile"
K8S = ROOT / "k8s"
OVERLAYS = K8S / "overlays"
OVERLAY_NAMES = ("cpu", "gpu", "gpu-hpa")
# The Kubernetes version whose schemas (from kubernetes-validate) the manifests must meet.
K8S_VERSION = "1.30.0"
KEDA_API = "keda.sh/v1alpha1"

METRICS_PORT = 9100
PROVIDER_PORT = 8089


# --- helpers -----------------------------------------------------------------------------


def _load_one(path: Path) -> dict[str, Any]:
    data = yaml.safe_load(path.read_text())
    assert isinstance(data, dict), f"{path} is not a YAML mapping"
    return data


def _command(value: str | list[str] | None) -> list[str]:
    if value is None:
        return []
    return shlex.split(value) if isinstance(value, str) else [str(v) for v in value]


def _bad_setting_keys(keys: list[str]) -> list[str]:
    bad = []
    for key in keys:
        if key.startswith(ENV_PREFIX):
            field = key[len(ENV_PREFIX) :].lower().split("__")[0]
            if field not in Settings.model_fields:
                bad.append(key)
    return bad


def _container(deployment: dict[str, Any]) -> dict[str, Any]:
    containers = deployment["spec"]["template"]["spec"]["containers"]
    assert len(containers) == 1
    container: dict[str, Any] = containers[0]
    return container


def _port_number(container: dict[str, Any], port: int | str) -> int:
    """Resolve a probe or Service targetPort (number or port name) to a container port."""
    if isinstance(port, int):
        return port
    for entry in container.get("ports", []):
        if entry.get("name") == port:
            return int(entry["containerPort"])
    raise AssertionError(f"container {container['name']} has no port named {port!r}")


def _selects(selector: dict[str, str], labels: dict[str, str]) -> bool:
    return bool(selector) and all(labels.get(k) == v for k, v in selector.items())


# --- Dockerfile --------------------------------------------------------------------------


def _dockerfile_instructions() -> list[tuple[str, str]]:
    text = DOCKERFILE.read_text().replace("\\\n", " ")
    out = []
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            op, _, rest = line.partition(" ")
            out.append((op.upper(), rest.strip()))
    return out


def test_dockerfile_base_install_port_and_command() -> None:
    instructions = _dockerfile_instructions()
    assert instructions[0] == ("FROM", "python:3.11-slim")
    runs = " ".join(rest for op, rest in instructions if op == "RUN")
    assert "pip install ." in runs
    exposed = {rest for op, rest in instructions if op == "EXPOSE"}
    assert str(METRICS_PORT) in exposed
    cmds = [rest for op, rest in instructions if op == "CMD"]
    assert cmds, "Dockerfile has no CMD"
    assert yaml.safe_load(cmds[-1]) == ["llmflow", "worker"]


def test_dockerfile_copies_every_installed_package() -> None:
    """`pip install .` in the image needs every package pyproject.toml installs."""
    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text())
    include = pyproject["tool"]["setuptools"]["packages"]["find"]["include"]
    packages = {pattern.rstrip("*").rstrip(".") for pattern in include}
    copied: set[str] = set()
    for op, rest in _dockerfile_instructions():
        if op == "COPY":
            sources = shlex.split(rest)[:-1]
            copied.update(src.strip("/").removeprefix("./") for src in sources)
    if "." in copied or "" in copied:
        return  # the whole context is copied
    assert "pyproject.toml" in copied
    assert packages <= copied, f"Dockerfile does not COPY {sorted(packages - copied)}"


# --- k8s ---------------------------------------------------------------------------------


def _kustomize(folder: Path) -> list[dict[str, Any]]:
    """The objects `kustomize build folder` renders, with kubectl's built-in kustomize
    where no standalone one is installed (scripts/system-deps.sh installs one)."""
    if shutil.which("kustomize"):
        command = ["kustomize", "build", str(folder)]
    elif shutil.which("kubectl"):
        command = ["kubectl", "kustomize", str(folder)]
    else:
        pytest.fail("no kustomize: run scripts/system-deps.sh")
    done = subprocess.run(command, capture_output=True, text=True, timeout=120, check=False)
    assert done.returncode == 0, f"{' '.join(command)} failed:\n{done.stderr}"
    return [doc for doc in yaml.safe_load_all(done.stdout) if doc is not None]


@pytest.fixture(scope="module")
def rendered() -> dict[str, list[dict[str, Any]]]:
    return {name: _kustomize(OVERLAYS / name) for name in OVERLAY_NAMES}


def _find(objects: list[dict[str, Any]], kind: str, name: str) -> dict[str, Any]:
    found = [o for o in objects if o["kind"] == kind and o["metadata"]["name"] == name]
    assert len(found) == 1, f"expected one {kind} {name!r}, found {len(found)}"
    return found[0]


def _kinds(objects: list[dict[str, Any]], kind: str) -> list[dict[str, Any]]:
    return [o for o in objects if o["kind"] == kind]


def _configmap(objects: list[dict[str, Any]]) -> dict[str, str]:
    data: dict[str, str] = _find(objects, "ConfigMap", "llmflow-config")["data"]
    return data


def _settings_of(objects: list[dict[str, Any]]) -> Settings:
    return load_settings(environ=_configmap(objects))


def _pod_labels(deployment: dict[str, Any]) -> dict[str, str]:
    labels: dict[str, str] = deployment["spec"]["template"]["metadata"]["labels"]
    return labels


def _group_topics(settings: Settings, group: str) -> list[str]:
    return [
        settings.topics.requests.name if stage == ENTRY_STAGE else settings.stage(stage).topic.name
        for stage in DEPLOY_GROUPS[group]
    ]


def _gpu_limit(deployment: dict[str, Any]) -> object:
    return _container(deployment)["resources"]["limits"].get("nvidia.com/gpu")


def test_every_manifest_file_is_used() -> None:
    """Each YAML file under k8s/ (but the Prometheus rules) is listed by the kustomization
    beside it, and each folder listed exists, so nothing on disk is silently left out."""
    listed: set[Path] = set()
    for kustomization in K8S.rglob("kustomization.yaml"):
        spec = _load_one(kustomization)
        for entry in [*spec.get("resources", []), *spec.get("components", [])]:
            target = (kustomization.parent / entry).resolve()
            assert target.exists(), f"{kustomization} lists missing {entry}"
            listed.add(target)
    on_disk = {
        p.resolve()
        for p in K8S.rglob("*.yaml")
        if p.name != "kustomization.yaml" and p.parent.name != "prometheus"
    }
    assert on_disk <= listed, f"not in any kustomization: {sorted(on_disk - listed)}"
    folders = {p.parent.resolve() for p in K8S.rglob("kustomization.yaml")}
    overlays = {(OVERLAYS / name).resolve() for name in OVERLAY_NAMES}
    assert folders - overlays <= listed, "a kustomization no overlay reaches"


def test_rendered_objects_validate_against_the_kubernetes_schemas(
    rendered: dict[str, list[dict[str, Any]]],
) -> None:
    """Strict validation (unknown fields fail) of every built-in kind; KEDA's ScaledObject
    is a CRD the schemas lack, so test_keda_scaled_objects checks it by structure."""
    for overlay, objects in rendered.items():
        for obj in objects:
            if obj["apiVersion"] == KEDA_API:
                continue
            try:
                kubernetes_validate.validate(obj, K8S_VERSION, strict=True)
            except kubernetes_validate.ValidationError as exc:
                pytest.fail(f"{overlay}: {obj['kind']} {obj['metadata']['name']}: {exc.message}")
        keys = [(o["kind"], o["metadata"]["name"]) for o in objects]
        assert len(keys) == len(set(keys)), f"{overlay}: two objects share a kind and name"
        assert all(
            o["metadata"]["labels"]["app.kubernetes.io/part-of"] == "llmflow" for o in objects
        )


def test_configmap_names_real_settings(rendered: dict[str, list[dict[str, Any]]]) -> None:
    data = _configmap(rendered["cpu"])
    assert not _bad_setting_keys(list(data)), "ConfigMap has unknown settings"
    settings = load_settings(environ=data)
    assert settings.bootstrap_servers == "kafka:9092"
    assert settings.redis_url == "redis://redis:6379/0"
    assert settings.metrics_port == METRICS_PORT


def test_a_deployment_service_and_pdb_per_group(rendered: dict[str, list[dict[str, Any]]]) -> None:
    objects = rendered["cpu"]
    config = _configmap(objects)
    pods = {g: _pod_labels(_find(objects, "Deployment", f"llmflow-{g}")) for g in DEPLOY_GROUPS}
    for group in DEPLOY_GROUPS:
        name = f"llmflow-{group}"
        deployment = _find(objects, "Deployment", name)
        spec = deployment["spec"]
        selector = spec["selector"]["matchLabels"]
        assert [g for g, labels in pods.items() if _selects(selector, labels)] == [group]
        container = _container(deployment)
        assert _command(container["command"]) == ["llmflow", "worker"]
        refs = [e["configMapRef"]["name"] for e in container["envFrom"]]
        assert refs == ["llmflow-config"]
        env = {e["name"]: e["value"] for e in container.get("env", [])}
        assert not _bad_setting_keys(list(env))
        settings = load_settings(environ={**config, **env})
        assert settings.worker_stages == list(DEPLOY_GROUPS[group])
        for section in ("requests", "limits"):
            assert {"cpu", "memory"} <= set(container["resources"][section]), (name, section)
        probe = container["readinessProbe"]["tcpSocket"]["port"]
        assert _port_number(container, probe) == METRICS_PORT
        mounts = [m["mountPath"] for m in container.get("volumeMounts", [])]
        assert any(settings.data_dir.startswith(m) for m in mounts), "data dir is not on a volume"

        service = _find(objects, "Service", name)
        assert [
            g for g, labels in pods.items() if _selects(service["spec"]["selector"], labels)
        ] == [group]
        (port,) = service["spec"]["ports"]
        assert port["port"] == METRICS_PORT
        assert _port_number(container, port["targetPort"]) == METRICS_PORT

        pdb = _find(objects, "PodDisruptionBudget", name)
        assert pdb["spec"]["maxUnavailable"] == 1
        assert _selects(pdb["spec"]["selector"]["matchLabels"], pods[group])


def test_worker_template_documents_scaling() -> None:
    text = (K8S / "worker" / "deployment.yaml").read_text()
    comments = " ".join(line for line in text.splitlines() if line.lstrip().startswith("#"))
    assert "kubectl scale deployment/llmflow-<group> --replicas=N" in comments
    assert "consumer group" in comments
    assert "partition" in comments and "idle" in comments


def test_gpu_only_where_asked(rendered: dict[str, list[dict[str, Any]]]) -> None:
    for overlay in ("gpu", "gpu-hpa"):
        infer = _find(rendered[overlay], "Deployment", "llmflow-infer")
        pod = infer["spec"]["template"]["spec"]
        assert _gpu_limit(infer) == 1
        assert pod["nodeSelector"] == {"nvidia.com/gpu.present": "true"}
        assert {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"} in pod[
            "tolerations"
        ]
        env = {e["name"]: e["value"] for e in _container(infer)["env"]}
        assert load_settings(environ=env).engine.device == "cuda"
        others = [d for d in _kinds(rendered[overlay], "Deployment") if d is not infer]
        assert all(_gpu_limit(d) is None for d in others)
    for deployment in _kinds(rendered["cpu"], "Deployment"):
        assert _gpu_limit(deployment) is None
        assert "nodeSelector" not in deployment["spec"]["template"]["spec"]


def test_keda_scaled_objects(rendered: dict[str, list[dict[str, Any]]]) -> None:
    """By structure, as KEDA's CRD defines it (keda.sh/v1alpha1): lag on every topic the
    group reads, in the workers' consumer group, up to the group's partitions."""
    objects = rendered["cpu"]
    settings = _settings_of(objects)
    partitions = group_partitions(settings)
    scaled = _kinds(objects, "ScaledObject")
    assert {s["metadata"]["name"] for s in scaled} == {f"llmflow-{g}" for g in DEPLOY_GROUPS}
    for obj in scaled:
        assert obj["apiVersion"] == KEDA_API
        assert set(obj) == {"apiVersion", "kind", "metadata", "spec"}
        spec = obj["spec"]
        assert set(spec) <= {"scaleTargetRef", "minReplicaCount", "maxReplicaCount", "triggers"}
        group = obj["metadata"]["name"].removeprefix("llmflow-")
        target = _find(objects, "Deployment", spec["scaleTargetRef"]["name"])
        assert target["metadata"]["name"] == f"llmflow-{group}"
        assert 1 <= spec["minReplicaCount"] <= spec["maxReplicaCount"] == partitions[group]
        kafka = [t["metadata"] for t in spec["triggers"] if t["type"] == "kafka"]
        assert sorted(t["topic"] for t in kafka) == sorted(_group_topics(settings, group))
        for trigger in kafka:
            assert trigger["bootstrapServers"] == settings.bootstrap_servers
            assert trigger["consumerGroup"] == settings.app_id
            assert int(trigger["lagThreshold"]) > 0
            assert trigger["allowIdleConsumers"] == "false"
            assert all(isinstance(v, str) for v in trigger.values()), "trigger metadata is text"
        (forecast,) = [t["metadata"] for t in spec["triggers"] if t["type"] == "prometheus"]
        assert forecast["query"] == f'max(llmflow_predicted_replicas{{group="{group}"}})'
        assert forecast["threshold"] == "1"
        assert forecast["serverAddress"].startswith("http")


def test_hpa_follows_the_forecast(rendered: dict[str, list[dict[str, Any]]]) -> None:
    objects = rendered["gpu-hpa"]
    partitions = group_partitions(_settings_of(objects))
    assert not _kinds(objects, "ScaledObject"), "KEDA and an HPA would fight over replicas"
    hpas = _kinds(objects, "HorizontalPodAutoscaler")
    assert {h["metadata"]["name"] for h in hpas} == {f"llmflow-{g}" for g in DEPLOY_GROUPS}
    for hpa in hpas:
        group = hpa["metadata"]["name"].removeprefix("llmflow-")
        spec = hpa["spec"]
        assert _find(objects, "Deployment", spec["scaleTargetRef"]["name"])
        assert spec["scaleTargetRef"]["name"] == f"llmflow-{group}"
        assert spec["maxReplicas"] == partitions[group]
        (metric,) = spec["metrics"]
        assert metric["type"] == "External"
        assert metric["external"]["metric"] == {
            "name": "llmflow_predicted_replicas",
            "selector": {"matchLabels": {"group": group}},
        }
        assert metric["external"]["target"] == {"type": "AverageValue", "averageValue": "1"}
    adapter = _find(objects, "ConfigMap", "llmflow-prometheus-adapter")
    (rule,) = yaml.safe_load(adapter["data"]["config.yaml"])["externalRules"]
    assert rule["seriesQuery"].startswith("llmflow_predicted_replicas{")
    assert rule["name"]["as"] == "llmflow_predicted_replicas"
    assert "by (group)" in rule["metricsQuery"]


def test_scaler_deployment_runs_the_scaler_command(
    rendered: dict[str, list[dict[str, Any]]],
) -> None:
    objects = rendered["cpu"]
    deployment = _find(objects, "Deployment", "llmflow-scaler")
    assert deployment["spec"]["replicas"] == 1
    container = _container(deployment)
    command = _command(container["command"])
    assert command[:2] == ["llmflow", "scaler"]
    assert parser().parse_args(command[1:]).func is cmd_scaler
    assert [e["configMapRef"]["name"] for e in container["envFrom"]] == ["llmflow-config"]
    service = _find(objects, "Service", "llmflow-scaler")
    assert _selects(service["spec"]["selector"], _pod_labels(deployment))
    (port,) = service["spec"]["ports"]
    assert _port_number(container, port["targetPort"]) == METRICS_PORT
    assert service["metadata"]["annotations"]["prometheus.io/scrape"] == "true"


def test_provider_deployment_and_service(rendered: dict[str, list[dict[str, Any]]]) -> None:
    objects = rendered["cpu"]
    deployment = _find(objects, "Deployment", "llmflow-provider")
    container = _container(deployment)
    command = _command(container["command"])
    assert command[:3] == ["python", "-m", "provider.simulated"]
    assert command[command.index("--port") + 1] == str(PROVIDER_PORT)
    url = urlsplit(_settings_of(objects).provider_url)
    service = _find(objects, "Service", url.hostname or "")
    assert _selects(service["spec"]["selector"], _pod_labels(deployment))
    ports = {p["port"]: p.get("targetPort", p["port"]) for p in service["spec"]["ports"]}
    assert url.port in ports, "the ConfigMap's provider URL names a port the Service lacks"
    assert _port_number(container, ports[url.port]) == PROVIDER_PORT


def test_k8s_readme() -> None:
    text = (K8S / "README.md").read_text()
    for overlay in OVERLAY_NAMES:
        assert f"kubectl apply -k k8s/overlays/{overlay}" in text
    assert "kubectl scale deployment/llmflow-core --replicas=" in text
    assert "kafka:9092" in text and "redis://redis:6379/0" in text
    assert "idle" in text and "partitions" in text
