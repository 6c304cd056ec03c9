"""Shared fixtures: the third-party slide fixtures, a real local stack, tiny default models, and the
six services running as separate processes against that stack.

Nothing here relies on a stack left running: each session starts its own servers on free loopback
ports in a temporary directory and stops them afterwards.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]
FIXTURES = REPO_ROOT.parent / "shared" / "fixtures" / "openslide-python"


_PARTS = ("unit", "integration", "e2e")


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """The folder a test lives in is its part of the suite: ``-m unit``, ``-m integration``, ``-m e2e``."""
    for item in items:
        part = next((p for p in _PARTS if p in item.path.relative_to(REPO_ROOT).parts[:2]), None)
        if part is not None and item.get_closest_marker(part) is None:
            item.add_marker(getattr(pytest.mark, part))


@pytest.fixture(scope="session")
def fixtures_dir() -> Path:
    assert FIXTURES.is_dir(), (
        f"third-party fixtures expected at {FIXTURES} (../shared/fixtures beside the repo)"
    )
    return FIXTURES


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Default backbone + a MIL model trained on a tiny synthetic recipe (seconds, not minutes)."""
    from wsitk.shared.models.defaults import DefaultModelRecipe, init_default_models

    model_dir = tmp_path_factory.mktemp("models")
    recipe = DefaultModelRecipe(
        train_bags=16,
        val_bags=8,
        min_tiles_per_bag=6,
        max_tiles_per_bag=12,
        train_pool=(40, 20, 8),
        val_pool=(20, 10, 4),
        epochs=8,
    )
    init_default_models(model_dir, seed=0, recipe=recipe, progress=lambda _msg: None)
    return model_dir


@pytest.fixture(scope="session")
def stack() -> Iterator[Any]:
    from wsitk.shared.stack import LocalStack

    with LocalStack() as info:
        yield info


@dataclass
class Pipeline:
    """The six services as processes against a test stack, with helpers to drive and inspect it."""

    stack: Any
    home: Path
    env: dict[str, str]
    s3_proxy: Any = None  # a tests.tcpproxy.TcpProxy between the services and S3, for outage tests

    def settings(self) -> Any:
        from wsitk.shared.config import Settings

        return Settings(
            **{
                k.removeprefix("WSI_").lower(): v
                for k, v in self.env.items()
                if k.startswith("WSI_") and k != "WSI_HOME"
            }
        )

    def start(
        self, names: tuple[str, ...] | None = None, replicas: dict[str, int] | None = None
    ) -> dict[str, int]:
        from wsitk.shared.ops import SERVICE_NAMES, services_up

        os.environ["WSI_HOME"] = str(self.home)
        return services_up(names or SERVICE_NAMES, env=self.env, replicas=replicas)

    def stop(self, names: tuple[str, ...] | None = None) -> None:
        from wsitk.shared.ops import SERVICE_NAMES, services_down

        os.environ["WSI_HOME"] = str(self.home)
        services_down(names or SERVICE_NAMES, timeout_s=20)

    def pids(self) -> dict[str, int | None]:
        from wsitk.shared.ops import services_status

        os.environ["WSI_HOME"] = str(self.home)
        return services_status()

    def query(self, sql: str, params: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
        import psycopg

        with psycopg.connect(self.stack.database_url(), options="-c search_path=wsi,public") as conn:
            return conn.execute(sql, params).fetchall()

    def upload(self, path: Path, key: str) -> None:
        from wsitk.shared.objectstore import S3ObjectStore

        S3ObjectStore(self.settings()).client.fput_object(self.settings().uploads_bucket, key, str(path))

    def cli(self, *args: str, timeout_s: float = 300) -> subprocess.CompletedProcess[str]:
        """``wsi ARGS`` as a separate process against this pipeline's servers."""
        return subprocess.run(
            [sys.executable, "-m", "wsitk.shared.cli", *args],
            check=False,
            env={**self.env, "PATH": "/usr/bin:/bin"},
            capture_output=True,
            text=True,
            timeout=timeout_s,
        )

    def wait_for(self, predicate: Callable[[], bool], timeout_s: float, what: str) -> None:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if predicate():
                return
            time.sleep(1.0)
        logs = "\n".join(
            f"--- {p.name}\n{p.read_text()[-3000:]}" for p in sorted((self.home / "logs").glob("*.log"))
        )
        raise AssertionError(f"timed out after {timeout_s:.0f} s waiting for {what}\n{logs}")

    def metrics_port(self, service: str) -> int:
        """The port the service's current process serves /metrics and /readyz on (from its first log line)."""
        port = 0
        for line in (self.home / "logs" / f"{service}.log").read_text().splitlines():
            if '"service starting"' in line:  # Faust may prefix the line with a terminal escape
                port = int(json.loads(line[line.index("{") :])["metrics_port"])
        if not port:
            raise AssertionError(f"{service} has not logged its metrics port yet")
        return port

    def ready(self, service: str) -> bool:
        import urllib.error
        import urllib.request

        try:
            with urllib.request.urlopen(
                f"http://127.0.0.1:{self.metrics_port(service)}/readyz", timeout=3
            ) as r:
                return bool(r.status == 200)
        except urllib.error.HTTPError:
            return False

    def statuses(self, keys: list[str]) -> dict[str, str]:
        rows = self.query(
            "SELECT src.upload_key, s.status FROM slide_sources src JOIN slides s USING (slide_id) "
            "WHERE src.upload_key = ANY(%s)",
            (keys,),
        )
        return dict(rows)


def pipeline_env(stack: Any, models: Path, home: Path, **extra: str) -> dict[str, str]:
    """Environment of services run against ``stack`` for a test."""
    return {
        **stack.env(),
        "WSI_HOME": str(home),
        "WSI_MODEL_DIR": str(models),
        "WSI_CACHE_DIR": str(home / "cache"),
        # Short session timeouts so a killed member's partitions move quickly.
        "WSI_KAFKA_SESSION_TIMEOUT_MS": "6000",
        "WSI_KAFKA_HEARTBEAT_INTERVAL_MS": "1000",
        "WSI_POLL_INTERVAL_S": "1",
        "WSI_TILES_PER_SHARD": "48",
        "WSI_ISOLATION_MEMORY_BYTES": str(3 * 1024**3),
        "WSI_VIEWER_PORT": "0",  # the viewer picks a free port and logs it (Pipeline.metrics_port)
        "WSI_LAG_INTERVAL_S": "2",
        # Multi-file slides (DICOM series): decided within seconds, not the production quiet period
        "WSI_MULTIFILE_SETTLE_S": "2",
        "WSI_MULTIFILE_CHECK_INTERVAL_S": "1",
        "WSI_MULTIFILE_TIMEOUT_S": "20",
        # Outages in the tests last seconds: retry at least every 5 s so recovery is measured, not slept.
        "WSI_INFRA_BACKOFF_MAX_S": "5",
        # The crash harness's hook between producing outputs and committing (shared/bus/runtime.py
        # pause_before_commit): inert until tests/chaos.py arms it with a file in this folder.
        "WSI_TEST_COMMIT_PAUSE_DIR": str(home / "commit-pause"),
        **extra,
    }


@pytest.fixture(scope="session")
def pipeline(stack: Any, tiny_models: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Pipeline]:
    """The six services against the session stack; their S3 traffic goes through a cuttable proxy."""
    from tests.tcpproxy import TcpProxy

    home = tmp_path_factory.mktemp("wsi-home")
    host, port = stack.s3_endpoint.rsplit(":", 1)
    proxy = TcpProxy(host, int(port))
    p = Pipeline(
        stack=stack,
        home=home,
        env=pipeline_env(stack, tiny_models, home, WSI_S3_ENDPOINT=proxy.endpoint),
        s3_proxy=proxy,
    )
    p.start()
    try:
        yield p
    finally:
        p.stop()
        proxy.close()
