"""Static checks of the deployment files: Dockerfile and k8s/base (docker-compose.yml:
test_compose.py).

Nothing here runs a container or a cluster; the files are parsed and their structure is
checked against each other and against the settings object, so that a renamed setting,
a dropped service or an unlisted manifest fails here rather than at deploy time.
"""

from __future__ import annotations

import shlex
import tomllib
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest
import yaml

from topology.settings import ENV_PREFIX, Settings, load_settings

ROOT = Path(__file__).resolve().parents[2]
DOCKERFILE = ROOT / "Dockerfile"
K8S = ROOT / "k8s"
BASE = K8S / "base"
KUSTOMIZATION = BASE / "kustomization.yaml"

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


def _k8s_docs() -> dict[str, list[dict[str, Any]]]:
    """Every k8s/base manifest except the kustomization, by file name."""
    docs: dict[str, list[dict[str, Any]]] = {}
    for path in sorted(BASE.glob("*.yaml")):
        if path == KUSTOMIZATION:
            continue
        docs[path.name] = [d for d in yaml.safe_load_all(path.read_text()) if d is not None]
    return docs


def _objects() -> list[dict[str, Any]]:
    return [doc for docs in _k8s_docs().values() for doc in docs]


def _find(kind: str, name: str) -> dict[str, Any]:
    found = [o for o in _objects() if o.get("kind") == kind and o["metadata"]["name"] == name]
    assert len(found) == 1, f"expected one {kind} {name!r} in k8s/base, found {len(found)}"
    return found[0]


def _only_configmap() -> dict[str, Any]:
    maps = [o for o in _objects() if o.get("kind") == "ConfigMap"]
    assert len(maps) == 1, f"expected one ConfigMap in k8s/base, found {len(maps)}"
    return maps[0]


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


# --- k8s/base ----------------------------------------------------------------------------


def test_kustomization_lists_every_manifest() -> None:
    kustomization = _load_one(KUSTOMIZATION)
    assert kustomization["kind"] == "Kustomization"
    resources = kustomization["resources"]
    assert len(resources) == len(set(resources)), "a resource is listed twice"
    on_disk = {
        p.name
        for p in BASE.iterdir()
        if p.is_file() and p != KUSTOMIZATION and not p.name.lower().startswith("readme")
    }
    assert set(resources) == on_disk


def test_every_object_is_named() -> None:
    objects = _objects()
    assert objects
    for obj in objects:
        assert obj.get("apiVersion"), obj
        assert obj.get("kind"), obj
        assert obj.get("metadata", {}).get("name"), obj
    keys = [(o["kind"], o["metadata"]["name"]) for o in objects]
    assert len(keys) == len(set(keys)), "two objects share a kind and name"


def test_configmap_names_real_settings() -> None:
    data = _only_configmap()["data"]
    assert not _bad_setting_keys(list(data)), "ConfigMap has unknown settings"
    for key, value in data.items():
        assert isinstance(value, str), f"ConfigMap value of {key} must be a string"
    settings = load_settings(environ=data)
    assert settings.bootstrap_servers == "kafka:9092"
    assert settings.redis_url == "redis://redis:6379/0"
    assert settings.metrics_port == METRICS_PORT


def test_worker_deployment() -> None:
    deployment = _find("Deployment", "llmflow-worker")
    spec = deployment["spec"]
    assert spec["replicas"] == 2
    pod_labels = spec["template"]["metadata"]["labels"]
    assert _selects(spec["selector"]["matchLabels"], pod_labels)
    container = _container(deployment)
    assert _command(container.get("command")) in ([], ["llmflow", "worker"])
    refs = [e["configMapRef"]["name"] for e in container["envFrom"] if "configMapRef" in e]
    assert refs == [_only_configmap()["metadata"]["name"]]
    for section in ("requests", "limits"):
        assert {"cpu", "memory"} <= set(container["resources"][section]), section
    probe = container["readinessProbe"]["tcpSocket"]["port"]
    assert _port_number(container, probe) == METRICS_PORT
    data_dir = _only_configmap()["data"].get("LLMFLOW_DATA_DIR")
    if data_dir:
        mounts = [m["mountPath"] for m in container.get("volumeMounts", [])]
        assert any(data_dir.startswith(m) for m in mounts), "data dir is not on a volume"


def test_worker_deployment_documents_scaling() -> None:
    text = (BASE / "worker-deployment.yaml").read_text()
    comments = " ".join(line for line in text.splitlines() if line.lstrip().startswith("#"))
    assert "kubectl scale deployment/llmflow-worker --replicas=N" in comments
    assert "consumer group" in comments
    assert "partition" in comments and "idle" in comments


def test_worker_service_exposes_metrics() -> None:
    deployment = _find("Deployment", "llmflow-worker")
    service = _find("Service", "llmflow-worker")
    pod_labels = deployment["spec"]["template"]["metadata"]["labels"]
    assert _selects(service["spec"]["selector"], pod_labels)
    (port,) = service["spec"]["ports"]
    assert port["port"] == METRICS_PORT
    target = port.get("targetPort", port["port"])
    assert _port_number(_container(deployment), target) == METRICS_PORT


def test_pdb_keeps_one_worker() -> None:
    deployment = _find("Deployment", "llmflow-worker")
    pdbs = [o for o in _objects() if o["kind"] == "PodDisruptionBudget"]
    assert len(pdbs) == 1
    spec = pdbs[0]["spec"]
    assert spec["minAvailable"] == 1
    pod_labels = deployment["spec"]["template"]["metadata"]["labels"]
    assert _selects(spec["selector"]["matchLabels"], pod_labels)


def test_provider_deployment_and_service() -> None:
    deployment = _find("Deployment", "llmflow-provider")
    container = _container(deployment)
    command = _command(container["command"])
    assert command[:3] == ["python", "-m", "provider.simulated"]
    assert command[command.index("--port") + 1] == str(PROVIDER_PORT)
    pod_labels = deployment["spec"]["template"]["metadata"]["labels"]
    assert _selects(deployment["spec"]["selector"]["matchLabels"], pod_labels)

    url = urlsplit(load_settings(environ=_only_configmap()["data"]).provider_url)
    service = _find("Service", url.hostname or "")
    assert _selects(service["spec"]["selector"], pod_labels)
    ports = {p["port"]: p.get("targetPort", p["port"]) for p in service["spec"]["ports"]}
    assert url.port in ports, "the ConfigMap's provider URL names a port the Service lacks"
    assert _port_number(container, ports[url.port]) == PROVIDER_PORT


def test_k8s_readme() -> None:
    text = (K8S / "README.md").read_text()
    assert "kubectl apply -k k8s/base" in text
    assert "kubectl scale deployment/llmflow-worker" in text
    assert "kafka:9092" in text and "redis://redis:6379/0" in text
