"""deploy/kubernetes is valid Kubernetes and runs the shape tests/cluster runs.

Every manifest is checked against the Kubernetes API's own JSON schemas (strict: an
unknown or misspelt field fails), for the oldest and the newest minor version we
support, with the schemas the ``kubernetes-validate`` package ships (no cluster and
no download needed). Then the shape: the same parts and replica counts as the
cluster test, the shared settings, probes on the ports the parts serve, and a NATS
node configuration that says what ``deploy/nats/`` says.
"""

import os
import subprocess
from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
import yaml

from delivery.embedded import find_nats_server
from tests.cluster.harness import NODES, ROOT
from tests.cluster.test_production_shape import SHAPE, SHARED_ENV

K8S = ROOT / "deploy" / "kubernetes"
# Oldest supported minor first: fields newer than it must not creep in unnoticed.
VERSIONS = ("1.29.0", "1.34.0")


def _documents(path: Path) -> list[dict[str, Any]]:
    return [doc for doc in yaml.safe_load_all(path.read_text()) if doc]


def _manifests() -> dict[str, list[dict[str, Any]]]:
    return {path.name: _documents(path) for path in sorted(K8S.glob("*.yaml"))}


def _resources() -> list[dict[str, Any]]:
    return [
        doc for name, docs in _manifests().items() if name != "kustomization.yaml" for doc in docs
    ]


def _find(kind: str, name: str) -> dict[str, Any]:
    found = [r for r in _resources() if r["kind"] == kind and r["metadata"]["name"] == name]
    assert len(found) == 1, f"{kind}/{name}: {len(found)} found"
    return found[0]


@pytest.mark.parametrize("version", VERSIONS)
def test_every_manifest_is_valid_kubernetes(version: str) -> None:
    resources = _resources()
    assert len(resources) >= 12
    for resource in resources:
        where = f"{resource['kind']}/{resource['metadata']['name']}"
        try:
            kubernetes_validate.validate(resource, version, strict=True)
        except kubernetes_validate.ValidationError as exc:
            pytest.fail(f"{where} is not valid Kubernetes {version}: {exc.message}")


def test_the_kustomization_lists_every_manifest() -> None:
    (kustomization,) = _manifests()["kustomization.yaml"]
    listed = set(kustomization["resources"])
    on_disk = {p.name for p in K8S.glob("*.yaml")} - {"kustomization.yaml"}
    assert listed == on_disk
    # Its image name is what every delivery container asks for.
    images = {image["name"] for image in kustomization["images"]}
    containers = [
        container
        for r in _resources()
        if r["kind"] in {"Deployment", "Job"}
        for container in _pod(r)["containers"]
    ]
    assert {c["image"] for c in containers} == images


def _pod(resource: dict[str, Any]) -> dict[str, Any]:
    spec: dict[str, Any] = resource["spec"]["template"]["spec"]
    return spec


def _env_names(container: dict[str, Any]) -> set[str]:
    names = {item["name"] for item in container.get("env", [])}
    for source in container.get("envFrom", []):
        if "configMapRef" in source:
            config = _find("ConfigMap", source["configMapRef"]["name"])
            names |= set(config["data"])
        if "secretRef" in source:
            # The Secret is the operator's (deploy/README.md names its two keys).
            assert source["secretRef"]["name"] == "delivery"
            names |= {"DELIVERY_SECRET_KEY", "DELIVERY_DATABASE_URL"}
    return names


def test_every_part_runs_with_its_replicas_command_settings_and_probes() -> None:
    for part, replicas in SHAPE.items():
        deployment = _find("Deployment", f"delivery-{part}")
        assert deployment["spec"]["replicas"] == replicas, part
        (container,) = _pod(deployment)["containers"]
        assert container["args"] == [part]
        assert set(SHARED_ENV) <= _env_names(container), part
        port = 8080 if part == "web" else 9464
        assert [p["containerPort"] for p in container["ports"]] == [port]
        if part != "web":
            config = _find("ConfigMap", "delivery")
            assert config["data"]["DELIVERY_OPS_PORT"] == str(port)
        assert container["readinessProbe"]["httpGet"]["path"] == "/ready"
        assert container["livenessProbe"]["httpGet"]["path"] == "/health"
        # The image's service user cannot write over the code; its data folder is mounted.
        mounts = {m["mountPath"] for m in container["volumeMounts"]}
        assert "/var/lib/delivery" in mounts
        assert _pod(deployment)["terminationGracePeriodSeconds"] >= 30
    (migrate,) = _pod(_find("Job", "delivery-migrate"))["containers"]
    assert migrate["args"] == ["migrate"]
    assert set(SHARED_ENV) <= _env_names(migrate)


def test_the_nats_cluster_is_three_seeded_nodes_with_the_shared_settings() -> None:
    nats = _find("StatefulSet", "nats")
    assert nats["spec"]["replicas"] == len(NODES)
    pods = [f"nats-{n}" for n in range(len(NODES))]
    seeds = _find("ConfigMap", "delivery")["data"]["DELIVERY_NATS_URL"].split(",")
    assert seeds == [f"nats://{pod}.nats:4222" for pod in pods]
    conf = _find("ConfigMap", "nats")["data"]["nats.conf"]
    for pod in pods:
        assert f"nats-route://{pod}.nats:6222" in conf
    # The node settings besides names and routes are deploy/nats's, line for line.
    compose_conf = (ROOT / "deploy" / "nats" / f"{NODES[0]}.conf").read_text()

    def settings(text: str) -> list[str]:
        kept = []
        for raw in text.splitlines():
            line = raw.strip()
            named = line.startswith("server_name") or "nats-" in line
            if line and not line.startswith("#") and not named:
                kept.append(line)
        return kept

    assert settings(conf) == settings(compose_conf)


def test_the_nats_configuration_is_one_nats_server_accepts(tmp_path: Path) -> None:
    conf = _find("ConfigMap", "nats")["data"]["nats.conf"]
    path = tmp_path / "nats.conf"
    path.write_text(conf.replace("/data/jetstream", str(tmp_path / "jetstream")))
    # The pod name comes from the environment, as the StatefulSet gives it.
    checked = subprocess.run(
        [str(find_nats_server()), "-t", "-c", str(path)],
        env={**os.environ, "POD_NAME": "nats-0"},
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    assert checked.returncode == 0, checked.stderr + checked.stdout
