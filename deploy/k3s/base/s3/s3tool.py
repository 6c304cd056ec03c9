"""The object-store side of the deployment, through the S3 API only (any S3 server: SeaweedFS here,
or an external endpoint), with the same client and WSI_S3_* settings as the services:

    python s3tool.py setup DIR      buckets (uploads, artifacts, backups), versioning, and the lifecycle
                                    rules DIR/lifecycle-<uploads|artifacts|backups>.json
    python s3tool.py upload DIR PREFIX   every file under DIR to s3://<artifacts>/PREFIX
    python s3tool.py fetch PREFIX DIR    s3://<artifacts>/PREFIX to DIR, waiting until PREFIX/models.json exists

Run by the Job s3-setup (admin identity), the Job wsi-models (upload) and the init containers
fetch-models (each service's own read identity), with the project's images: no other client image.
Idempotent; waits up to WAIT_S (default 600) seconds for the server and for the models.
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path
from typing import Any

from minio.commonconfig import ENABLED, Filter
from minio.lifecycleconfig import (
    AbortIncompleteMultipartUpload,
    Expiration,
    LifecycleConfig,
    NoncurrentVersionExpiration,
    Rule,
)
from minio.versioningconfig import VersioningConfig
from wsitk.shared.config import load_settings
from wsitk.shared.objectstore import S3ObjectStore

WAIT_S = float(os.environ.get("WAIT_S", "600"))


def client() -> Any:
    return S3ObjectStore(load_settings()).client


def wait(what: str, check: Any) -> Any:
    deadline = time.monotonic() + WAIT_S
    while True:
        try:
            result = check()
            if result:
                return result
            reason = "not there yet"
        except Exception as exc:  # the server is starting, or the object does not exist yet
            reason = f"{type(exc).__name__}: {exc}"
        if time.monotonic() > deadline:
            sys.exit(f"gave up waiting for {what} after {WAIT_S:.0f} s ({reason})")
        print(f"waiting for {what}: {reason}", flush=True)
        time.sleep(5)


def lifecycle(path: Path) -> LifecycleConfig:
    """The S3 JSON form of a lifecycle configuration (as `aws s3api` and `mc ilm import` read it)."""
    rules = []
    for rule in json.loads(path.read_text())["Rules"]:
        expiration = rule.get("Expiration", {})
        noncurrent = rule.get("NoncurrentVersionExpiration", {})
        abort = rule.get("AbortIncompleteMultipartUpload", {})
        rules.append(
            Rule(
                ENABLED if rule["Status"] == "Enabled" else "Disabled",
                rule_filter=Filter(prefix=rule.get("Filter", {}).get("Prefix", "")),
                rule_id=rule["ID"],
                expiration=Expiration(
                    days=expiration.get("Days"),
                    expired_object_delete_marker=expiration.get("ExpiredObjectDeleteMarker"),
                )
                if expiration
                else None,
                noncurrent_version_expiration=NoncurrentVersionExpiration(noncurrent["NoncurrentDays"])
                if noncurrent
                else None,
                abort_incomplete_multipart_upload=AbortIncompleteMultipartUpload(abort["DaysAfterInitiation"])
                if abort
                else None,
            )
        )
    return LifecycleConfig(rules)


def setup(folder: Path) -> None:
    settings = load_settings()
    s3 = client()
    wait(f"the S3 server at {settings.s3_endpoint}", lambda: s3.list_buckets() is not None)
    buckets = {
        "uploads": settings.uploads_bucket,
        "artifacts": settings.artifacts_bucket,
        "backups": os.environ.get("WSI_BACKUPS_BUCKET", "wsi-backups"),
    }
    for role, bucket in buckets.items():
        if not s3.bucket_exists(bucket):
            s3.make_bucket(bucket)
        # Versioned, so an overwritten or deleted object can be restored; every versioned bucket has
        # a lifecycle file that expires old versions, or they would accumulate for ever.
        s3.set_bucket_versioning(bucket, VersioningConfig(ENABLED))
        rules = folder / f"lifecycle-{role}.json"
        s3.set_bucket_lifecycle(bucket, lifecycle(rules))
        print(f"bucket {bucket}: versioned, lifecycle {rules.name}", flush=True)


def upload(folder: Path, prefix: str) -> None:
    settings = load_settings()
    s3 = client()
    wait(f"the bucket {settings.artifacts_bucket}", lambda: s3.bucket_exists(settings.artifacts_bucket))
    for path in sorted(p for p in folder.rglob("*") if p.is_file()):
        key = f"{prefix.rstrip('/')}/{path.relative_to(folder).as_posix()}"
        s3.fput_object(settings.artifacts_bucket, key, str(path))
        print(f"uploaded s3://{settings.artifacts_bucket}/{key}", flush=True)


def fetch(prefix: str, folder: Path) -> None:
    settings = load_settings()
    s3 = client()
    bucket, prefix = settings.artifacts_bucket, prefix.rstrip("/") + "/"
    wait(
        f"s3://{bucket}/{prefix}models.json (the Job wsi-models)",
        lambda: s3.stat_object(bucket, prefix + "models.json"),
    )
    for item in s3.list_objects(bucket, prefix=prefix, recursive=True):
        target = folder / item.object_name[len(prefix) :]
        target.parent.mkdir(parents=True, exist_ok=True)
        s3.fget_object(bucket, item.object_name, str(target))
    print(f"fetched s3://{bucket}/{prefix} to {folder}", flush=True)


def main(argv: list[str]) -> int:
    if len(argv) >= 2 and argv[0] == "setup":
        setup(Path(argv[1]))
    elif len(argv) >= 3 and argv[0] == "upload":
        upload(Path(argv[1]), argv[2])
    elif len(argv) >= 3 and argv[0] == "fetch":
        fetch(argv[1], Path(argv[2]))
    else:
        print(__doc__, file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
