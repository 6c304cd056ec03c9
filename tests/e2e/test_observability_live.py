"""Observability, for real: a real Prometheus (Debian's `prometheus`) scrapes the six services of the
session pipeline every 2 s while slides run through, then every Grafana panel query and every alert
expression is evaluated against it. Each panel must return data, except panels that declare
(`wsiRequires` + description) that they need a GPU or a cluster-only exporter; every metric a panel
or an alert names must be one the services export; Prometheus must evaluate every alert rule
without error.
"""

from __future__ import annotations

import json
import os
import random
import re
import shutil
import socket
import subprocess
import time
import urllib.error
import urllib.parse
import urllib.request
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from wsitk.shared.ops import SERVICE_NAMES
from wsitk.shared.slides.synth import SynthSpec, generate_slide

from tests.conftest import Pipeline

pytestmark = pytest.mark.e2e

REPO_ROOT = Path(__file__).resolve().parents[2]
DASHBOARDS = REPO_ROOT / "deploy" / "grafana" / "dashboards"
ALERT_RULES = REPO_ROOT / "deploy" / "prometheus" / "alerts.yml"
TERMINAL = {"predicted", "rejected", "failed", "no_tissue"}
# Grafana's variables, as Grafana would expand them for a dashboard showing the last 10 minutes.
GRAFANA_VARIABLES = {"$__rate_interval": "1m", "$__range": "10m", "$service": ".*"}
METRIC_NAME = re.compile(r"\b((?:wsi|process|python|kafka)_[a-z0-9_]+|DCGM_[A-Z0-9_]+|up)\b(?=\s*[{\[)])")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def http_get(url: str, timeout: float = 10.0) -> bytes:
    with urllib.request.urlopen(url, timeout=timeout) as response:  # loopback only
        return bytes(response.read())


def metrics_ports(home: Path, timeout_s: float = 120.0) -> dict[str, int]:
    """Each service's metrics port, from the last "service starting" line of its log (waits for it)."""
    deadline = time.monotonic() + timeout_s
    while True:
        ports = {}
        for name in SERVICE_NAMES:
            log = home / "logs" / f"{name}.log"
            for line in log.read_text().splitlines() if log.is_file() else []:
                if '"service starting"' in line:  # a JSON object, maybe after terminal control bytes
                    ports[name] = int(json.loads(line[line.index("{") :])["metrics_port"])
        missing = set(SERVICE_NAMES) - set(ports)
        if not missing:
            return ports
        assert time.monotonic() < deadline, f"no 'service starting' log line from {sorted(missing)}"
        time.sleep(1.0)


class Prometheus:
    def __init__(self, port: int) -> None:
        self.base = f"http://127.0.0.1:{port}"

    def get(self, path: str, **params: str) -> Any:
        query = f"?{urllib.parse.urlencode(params)}" if params else ""
        return json.loads(http_get(f"{self.base}{path}{query}"))

    def query(self, expr: str) -> dict[str, Any]:
        try:
            return dict(self.get("/api/v1/query", query=expr))
        except urllib.error.HTTPError as exc:  # 400 with the parse error in the body
            return dict(json.loads(exc.read()))

    def wait_for(self, predicate: Any, timeout_s: float, what: str) -> None:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            try:
                if predicate():
                    return
            except OSError:
                pass
            time.sleep(1.0)
        raise AssertionError(f"timed out after {timeout_s:.0f} s waiting for {what}")


@pytest.fixture
def prometheus(pipeline: Pipeline, tmp_path: Path) -> Iterator[Prometheus]:
    binary = shutil.which("prometheus")
    if not binary:
        pytest.fail("Prometheus is not installed: apt-get install prometheus (Debian's package)")
    scrape_configs = [
        {
            "job_name": f"wsi-{name}",
            "honor_labels": True,
            "static_configs": [
                {"targets": [f"127.0.0.1:{port}"], "labels": {"service": name, "pipeline": "wsi-toolkit"}}
            ],
        }
        for name, port in metrics_ports(pipeline.home).items()
    ]
    config = {
        "global": {"scrape_interval": "2s", "evaluation_interval": "2s"},
        "rule_files": [str(ALERT_RULES)],
        "scrape_configs": scrape_configs,
    }
    (tmp_path / "prometheus.yml").write_text(yaml.safe_dump(config))
    port = free_port()
    log = (tmp_path / "prometheus.log").open("w")
    process = subprocess.Popen(
        [
            binary,
            f"--config.file={tmp_path / 'prometheus.yml'}",
            f"--storage.tsdb.path={tmp_path / 'data'}",
            f"--web.listen-address=127.0.0.1:{port}",
            "--log.level=warn",
        ],
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    prom = Prometheus(port)
    try:
        prom.wait_for(lambda: http_get(f"{prom.base}/-/ready") is not None, 60, "Prometheus to be ready")
        prom.wait_for(
            lambda: (
                sum(t["health"] == "up" for t in prom.get("/api/v1/targets")["data"]["activeTargets"])
                == len(SERVICE_NAMES)
            ),
            60,
            "every service to be scraped",
        )
        yield prom
    finally:
        process.terminate()
        try:
            process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            process.kill()
        log.close()


def panel_queries() -> list[tuple[str, dict[str, Any], str]]:
    queries = []
    for path in sorted(DASHBOARDS.glob("*.json")):
        for panel in json.loads(path.read_text())["panels"]:
            for target in panel.get("targets", []):
                expr = target["expr"]
                for variable, value in GRAFANA_VARIABLES.items():
                    expr = expr.replace(variable, value)
                assert "$" not in expr, f"{path.name} / {panel['title']}: unexpanded variable in {expr}"
                queries.append((f"{path.name} / {panel['title']}", panel, expr))
    return queries


def exported_metric_names(ports: dict[str, int]) -> set[str]:
    names = {"up"}
    for port in ports.values():
        for line in http_get(f"http://127.0.0.1:{port}/metrics").decode().splitlines():
            if line.startswith("# TYPE "):
                _, _, name, kind = line.split(maxsplit=3)
                suffixes = ["_bucket", "_sum", "_count"] if kind == "histogram" else [""]
                names |= {name + s for s in suffixes}
    return names


def test_every_dashboard_panel_and_alert_rule_works_on_a_real_prometheus(
    pipeline: Pipeline, prometheus: Prometheus, tmp_path: Path
) -> None:
    # A run the dashboards can show: two new slides (one with tumour) and a file that is no slide.
    run = uuid.uuid4().hex[:8]
    keys = []
    for index in range(2):
        path = tmp_path / f"observed-{run}-{index}.svs"
        seed = random.randrange(1_000_000)
        generate_slide(
            path, SynthSpec(width=3000, height=2400, mpp=0.5, seed=seed, tumour_fraction=0.3 * index)
        )
        keys.append(f"observability/{run}/{path.name}")
        pipeline.upload(path, keys[-1])
    not_a_slide = tmp_path / "not-a-slide.svs"
    not_a_slide.write_bytes(b"this is not a slide " + run.encode() + os.urandom(64))
    keys.append(f"observability/{run}/not-a-slide.svs")
    pipeline.upload(not_a_slide, keys[-1])

    def finished() -> bool:
        statuses = pipeline.statuses(keys)
        return len(statuses) == len(keys) and set(statuses.values()) <= TERMINAL

    pipeline.wait_for(finished, 300, "every observed slide to reach an outcome")
    statuses = pipeline.statuses(keys)
    assert [statuses[k] for k in keys] == ["predicted", "predicted", "rejected"], statuses

    # Let Prometheus see the last increments and the services refresh their lag gauges (every 10 s).
    prometheus.wait_for(
        lambda: len(prometheus.query("wsi_consumer_lag_messages")["data"]["result"]) > 0,
        60,
        "the services' consumer-lag gauges",
    )
    prometheus.wait_for(  # the Faust-based scorer exports it too, from its own consumer
        lambda: (
            len(prometheus.query('wsi_consumer_lag_messages{service="mil-scorer"}')["data"]["result"]) > 0
        ),
        60,
        "the mil-scorer's consumer-lag gauge",
    )
    time.sleep(6)

    exported = exported_metric_names(metrics_ports(pipeline.home))
    problems = []
    exempt = 0
    for where, panel, expr in panel_queries():
        answer = prometheus.query(expr)
        if answer["status"] != "success":
            problems.append(f"{where}: Prometheus refused {expr}: {answer.get('error')}")
            continue
        if panel.get("wsiRequires"):
            exempt += 1
            continue
        unknown = set(METRIC_NAME.findall(expr)) - exported
        if unknown:
            problems.append(f"{where}: no service exports {sorted(unknown)}")
        if not answer["data"]["result"]:
            problems.append(f"{where}: no data for {expr}")
    assert not problems, "\n".join(problems)
    assert 0 < exempt <= 3, "only the GPU and Kafka-exporter panels may go without data"

    rules = yaml.safe_load(ALERT_RULES.read_text())
    for group in rules["groups"]:
        for rule in group["rules"]:
            answer = prometheus.query(rule["expr"])
            assert answer["status"] == "success", f"{rule['alert']}: {answer.get('error')}"
            unknown = set(METRIC_NAME.findall(rule["expr"])) - exported
            assert not unknown, f"{rule['alert']}: no service exports {sorted(unknown)}"
    loaded = prometheus.get("/api/v1/rules")["data"]["groups"]
    evaluated = [r for g in loaded for r in g["rules"]]
    assert len(evaluated) == sum(len(g["rules"]) for g in rules["groups"])
    assert all(r["health"] == "ok" for r in evaluated), [(r["name"], r.get("lastError")) for r in evaluated]
