"""The events that announce a slide: the bucket notification (MinIO's format) and ``SlideIngested``.

Ingest makes them for uploads (the poller announces objects of buckets without notifications), and
the operators' commands make the same ones: `wsi submit`, `wsi reprocess` and the reconciler. One
definition each, so an announcement from any of them is the event ingest and the tiler expect.
"""

from __future__ import annotations

import json

from wsitk.shared.bus.kafka import Outgoing
from wsitk.shared.contracts import new_meta, pb
from wsitk.shared.topics import SLIDES_INGESTED

#: ``SlideIngested`` is ingest's event, whichever process announces it.
INGEST = "ingest"


def make_bucket_event(bucket: str, key: str, size: int, etag: str, version_id: str = "") -> bytes:
    """The MinIO notification format, as the poller and `wsi submit` emit it."""
    from urllib.parse import quote_plus

    record = {
        "eventVersion": "2.0",
        "eventSource": "minio:s3",
        "eventName": "s3:ObjectCreated:Put",
        "s3": {
            "bucket": {"name": bucket},
            "object": {"key": quote_plus(key, safe="/"), "size": size, "eTag": etag, "versionId": version_id},
        },
    }
    return json.dumps(
        {"EventName": "s3:ObjectCreated:Put", "Key": f"{bucket}/{key}", "Records": [record]}
    ).encode()


def build_slide_ingested(
    *,
    slide_id: str,
    source: pb.ObjectRef,
    upload_key: str,
    metadata: pb.SlideMetadata,
    profile: pb.PipelineProfile,
    event_parts: list[str],
    additional_source: bool = False,
    origin: str = "upload",
    reason: str = "",
) -> Outgoing:
    """The ``SlideIngested`` event (keyed by slide id) that announces a slide to the tiler.

    Ingest makes it for a new upload; ``wsi reprocess`` for a stored slide with another profile
    (``origin="reprocess"``). ``event_parts`` name the event deterministically.
    """
    event = pb.SlideIngested(
        meta=new_meta(service=INGEST, slide_id=slide_id, event_parts=event_parts),
        source=source,
        upload_key=upload_key,
        metadata=metadata,
        profile=profile,
        additional_source=additional_source,
        origin=origin,
        reason=reason,
    )
    return Outgoing(SLIDES_INGESTED, slide_id, event)
