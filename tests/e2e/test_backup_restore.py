"""The restore procedure of docs/operations.md, exercised on a real PostgreSQL and a real S3 server
(the project's own local stack, not the session one: this test wipes its database).

Database: `pg_dump --format=custom`, the schema dropped, `pg_restore`, and the predictions, views,
grants and migration bookkeeping come back intact. Buckets: with versioning on (as minio-setup
configures the uploads and artifacts buckets), an overwritten upload is restored from its earlier
version.
"""

from __future__ import annotations

import io
import json
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psycopg
import pytest

pytestmark = pytest.mark.e2e

PREDICTIONS = [
    ("pred-a", "slide-a", "normal", 0.12),
    ("pred-b", "slide-b", "tumour", 0.91),
    ("pred-c", "slide-c", "tumour", 0.77),
]


def postgres_tool(name: str) -> str:
    """pg_dump / pg_restore of the same major version as the server: the ones pgserver bundles."""
    from pgserver._commands import POSTGRES_BIN_PATH

    path = Path(POSTGRES_BIN_PATH) / name
    assert path.is_file(), f"{name} not found in pgserver's bundle ({POSTGRES_BIN_PATH}); reinstall pgserver"
    return str(path)


@pytest.fixture(scope="module")
def backup_stack() -> Iterator[Any]:
    from wsitk.shared.stack import LocalStack

    with LocalStack() as info:
        yield info


def predictions(url: str) -> list[tuple[Any, ...]]:
    with psycopg.connect(url, options="-c search_path=wsi,public") as conn:
        return conn.execute(
            "SELECT p.prediction_id, p.slide_id, p.label, p.probability, p.top_tiles, s.status, "
            "src.upload_key FROM predictions p JOIN slides s USING (slide_id) "
            "JOIN slide_sources src USING (slide_id) ORDER BY p.prediction_id"
        ).fetchall()


def record_predictions(app_url: str) -> None:
    """Rows as the recorder writes them, under the services' role (rows only)."""
    with psycopg.connect(app_url, options="-c search_path=wsi,public") as conn:
        for prediction_id, slide_id, label, probability in PREDICTIONS:
            conn.execute(
                "INSERT INTO slides (slide_id, status, finished_at) VALUES (%s, 'predicted', now())",
                (slide_id,),
            )
            conn.execute(
                "INSERT INTO slide_sources (bucket, upload_key, etag, slide_id) VALUES ('wsi-uploads', %s, 'e', %s)",
                (f"cases/{slide_id}.svs", slide_id),
            )
            conn.execute(
                "INSERT INTO predictions (prediction_id, slide_id, tiling_run_id, model_version, backbone_id, "
                "label, probability, threshold, tiles_scored, tiles_total, top_tiles, event_id) "
                "VALUES (%s, %s, 'run-1', 'mil-v1', 'cnn-v1', %s, %s, 0.5, 100, 120, %s, %s)",
                (
                    prediction_id,
                    slide_id,
                    label,
                    probability,
                    json.dumps([{"x": 1, "y": 2}]),
                    f"ev-{slide_id}",
                ),
            )


def test_database_dump_wipe_restore_keeps_every_prediction(backup_stack: Any, tmp_path: Path) -> None:
    from wsitk.shared.db.migrate import migrate

    admin_url, app_url = backup_stack.database_url(admin=True), backup_stack.database_url()
    record_predictions(app_url)
    before = predictions(app_url)
    assert len(before) == len(PREDICTIONS)

    dump = tmp_path / "wsi.dump"
    subprocess.run(
        [
            postgres_tool("pg_dump"),
            "--format=custom",
            "--schema=wsi",
            f"--file={dump}",
            f"--dbname={admin_url}",
        ],
        check=True,
        timeout=120,
    )
    assert dump.stat().st_size > 0

    with psycopg.connect(admin_url, autocommit=True) as conn:
        conn.execute("DROP SCHEMA wsi CASCADE")
    with pytest.raises(psycopg.errors.UndefinedTable):
        predictions(app_url)

    subprocess.run(
        [
            postgres_tool("pg_restore"),
            "--exit-on-error",
            "--single-transaction",
            f"--dbname={admin_url}",
            str(dump),
        ],
        check=True,
        timeout=120,
    )

    assert predictions(app_url) == before  # read back under the services' role: grants restored too
    with psycopg.connect(app_url, options="-c search_path=wsi,public") as conn:
        view = conn.execute(
            "SELECT prediction_id, label FROM v_predictions ORDER BY prediction_id"
        ).fetchall()
        assert view == [(p[0], p[2]) for p in PREDICTIONS]
        with pytest.raises(psycopg.errors.InsufficientPrivilege):
            conn.execute("DROP TABLE predictions")
    assert migrate(admin_url) == [], "the restored schema knows its migrations: nothing is re-applied"


def test_an_overwritten_upload_comes_back_from_its_earlier_version(backup_stack: Any) -> None:
    from minio import Minio
    from minio.commonconfig import ENABLED
    from minio.versioningconfig import VersioningConfig

    client = Minio(
        backup_stack.s3_endpoint,
        access_key=backup_stack.s3_access_key,
        secret_key=backup_stack.s3_secret_key,
        secure=False,
    )
    bucket, key = "wsi-restore-test", "cases/case-7/slide.svs"
    if not client.bucket_exists(bucket):
        client.make_bucket(bucket)
    client.set_bucket_versioning(bucket, VersioningConfig(ENABLED))

    original = b"original slide bytes"
    first = client.put_object(bucket, key, io.BytesIO(original), len(original))
    client.put_object(bucket, key, io.BytesIO(b"overwritten"), len(b"overwritten"))
    versions = [v.version_id for v in client.list_objects(bucket, prefix=key, include_version=True)]
    assert len(versions) == 2 and first.version_id in versions

    # The documented restore: read the wanted version and write it back as the current one
    # (`mc cp --version-id ID wsi/BUCKET/KEY wsi/BUCKET/KEY` does the same).
    earlier = client.get_object(bucket, key, version_id=first.version_id)
    try:
        data = earlier.read()
    finally:
        earlier.close()
        earlier.release_conn()
    client.put_object(bucket, key, io.BytesIO(data), len(data))
    response = client.get_object(bucket, key)
    try:
        assert response.read() == original
    finally:
        response.close()
        response.release_conn()

    # A deleted upload: the delete leaves a marker (the local server used to answer it with HTTP 500),
    # the key is gone from the listing, and an earlier version can still be read back.
    client.remove_object(bucket, key)
    assert key not in {entry.object_name for entry in client.list_objects(bucket, prefix=key)}
    kept = client.get_object(bucket, key, version_id=first.version_id)
    try:
        assert kept.read() == original
    finally:
        kept.close()
        kept.release_conn()
