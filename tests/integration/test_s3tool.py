"""deploy/k3s/base/s3/s3tool.py (the cluster's and compose's bucket setup, model upload and model fetch,
which replaced the withdrawn `minio/mc` image) against a real S3 server: the project's local one."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[2]
TOOL = REPO_ROOT / "deploy" / "k3s" / "base" / "s3" / "s3tool.py"


@pytest.fixture
def s3_env(tmp_path: Path) -> Iterator[dict[str, str]]:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    server = subprocess.Popen(
        [
            *(sys.executable, "-m", "wsitk.shared.stack.s3server"),
            *("--host", "127.0.0.1", "--port", str(port), "--data-dir", str(tmp_path / "s3")),
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    env = {
        **{k: v for k, v in os.environ.items() if not k.startswith("WSI_")},
        "WSI_HOME": str(tmp_path / "home"),
        "WSI_S3_ENDPOINT": f"127.0.0.1:{port}",
        "WSI_S3_ACCESS_KEY": "setup",
        "WSI_S3_SECRET_KEY": "setup-secret",
        "WAIT_S": "30",
    }
    try:
        yield env
    finally:
        server.terminate()
        server.wait(timeout=30)


def run(env: dict[str, str], *args: str) -> str:
    result = subprocess.run(
        [sys.executable, str(TOOL), *args], env=env, capture_output=True, text=True, timeout=120, check=False
    )
    assert result.returncode == 0, result.stdout + result.stderr
    return result.stdout


def test_setup_upload_and_fetch_through_the_s3_api(s3_env: dict[str, str], tmp_path: Path) -> None:
    from minio import Minio

    lifecycle_dir = TOOL.parent
    run(s3_env, "setup", str(lifecycle_dir))
    run(s3_env, "setup", str(lifecycle_dir))  # idempotent
    client = Minio(s3_env["WSI_S3_ENDPOINT"], "setup", "setup-secret", secure=False, region="us-east-1")
    for role, bucket in (
        ("uploads", "wsi-uploads"),
        ("artifacts", "wsi-artifacts"),
        ("backups", "wsi-backups"),
    ):
        assert client.get_bucket_versioning(bucket).status == "Enabled"
        lifecycle = client.get_bucket_lifecycle(bucket)
        assert lifecycle is not None, f"{bucket} has no lifecycle policy"
        rules = lifecycle.rules
        expected = json.loads((lifecycle_dir / f"lifecycle-{role}.json").read_text())["Rules"]
        assert {r.rule_id for r in rules} == {r["ID"] for r in expected}
        # every versioned bucket expires its old versions
        assert any(r.noncurrent_version_expiration is not None for r in rules), bucket

    models = tmp_path / "built"
    (models / "sub").mkdir(parents=True)
    (models / "models.json").write_text('{"mil": {}}')
    (models / "sub" / "mil.onnx").write_bytes(b"\x00" * 1000)
    run(s3_env, "upload", str(models), "models")
    fetched = tmp_path / "fetched"
    fetched.mkdir()
    started = time.monotonic()
    run(s3_env, "fetch", "models", str(fetched))
    assert time.monotonic() - started < 30
    assert (fetched / "models.json").read_text() == '{"mil": {}}'
    assert (fetched / "sub" / "mil.onnx").read_bytes() == b"\x00" * 1000
