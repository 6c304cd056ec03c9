"""ingest's reading of MinIO/S3 bucket notifications (the format MinIO publishes to Kafka)."""

from __future__ import annotations

import json

import pytest
from wsitk.services.ingest.handler import parse_bucket_event
from wsitk.shared.announce import make_bucket_event
from wsitk.shared.errors import PermanentError


def minio_record(key: str, event: str = "s3:ObjectCreated:Put") -> dict:
    return {
        "eventVersion": "2.0",
        "eventSource": "minio:s3",
        "eventName": event,
        "s3": {
            "bucket": {"name": "wsi-uploads"},
            "object": {"key": key, "size": 10, "eTag": '"abc"', "versionId": "v1"},
        },
    }


def test_url_encoded_keys_are_decoded() -> None:
    body = {
        "EventName": "s3:ObjectCreated:Put",
        "Records": [minio_record("case+7%2Fn%C3%A4me+with+space.svs")],
    }
    (notice,) = parse_bucket_event(json.dumps(body).encode())
    assert notice.key == "case 7/näme with space.svs"
    assert notice.etag == "abc" and notice.version_id == "v1" and notice.bucket == "wsi-uploads"


def test_non_create_events_are_ignored() -> None:
    body = {
        "Records": [
            minio_record("a.svs", "s3:ObjectRemoved:Delete"),
            minio_record("b.svs", "s3:ObjectCreated:CompleteMultipartUpload"),
        ]
    }
    assert [n.key for n in parse_bucket_event(json.dumps(body).encode())] == ["b.svs"]


@pytest.mark.parametrize(
    "value", [b"not json", b"[]", json.dumps({"Records": [{"eventName": "s3:ObjectCreated:Put"}]}).encode()]
)
def test_malformed_notifications_are_permanent_errors(value: bytes) -> None:
    with pytest.raises(PermanentError) as caught:
        parse_bucket_event(value)
    assert caught.value.code == "malformed-event"


@pytest.mark.parametrize(
    "key", ["plain.svs", "dir/sub dir/ünï cödé.tiff", "../../etc/passwd", "/abs/path.svs", "a+b%20c.svs"]
)
def test_the_poller_format_round_trips_any_key(key: str) -> None:
    (notice,) = parse_bucket_event(make_bucket_event("wsi-uploads", key, 5, "etag1"))
    assert notice.key == key and notice.size == 5 and notice.etag == "etag1"
