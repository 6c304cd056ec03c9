"""ingest: a new object in the uploads bucket becomes a validated, de-identified, pinned slide.

Input: MinIO-format S3 notifications (``s3:ObjectCreated:*``, URL-encoded keys) on
``wsi.bucket-events``, from MinIO itself or from this service's own bucket poller. Output: one
``SlideIngested`` (metadata, the source pinned by ETag/version and checksum, the pipeline profile)
or one ``SlideRejected`` with a reason a person can act on.

Slide identity is the file's content: the SHA-256 of its bytes (first 32 hex digits). The same scan
uploaded under two keys is one slide with two sources; a different file uploaded under an existing
key is a new slide. Decoding runs in a memory-limited child process (shared/isolation.py), so a
malicious file cannot take the service down.

A lab can correct a slide's physical resolution (``wsi mpp set``, shared/corrections.py): ingest looks a
new slide up by its content slide id and its upload key, and a registered MPP is pinned in the profile
(``slide_mpp_override``) and used instead of whatever the file says, also for a file with no MPP at all.
``shared/announce.py: build_slide_ingested`` is the one way a ``SlideIngested`` is made, here and by ``wsi reprocess``.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING
from urllib.parse import unquote_plus

from wsitk.services.ingest.multifile import MultiFileIngest, is_bundle_of
from wsitk.shared.announce import build_slide_ingested
from wsitk.shared.bus.delivery import Incoming
from wsitk.shared.bus.kafka import Outgoing
from wsitk.shared.context import ServiceContext
from wsitk.shared.contracts import deterministic_id, new_meta, pb
from wsitk.shared.corrections import lookup_override
from wsitk.shared.db import intake
from wsitk.shared.errors import PermanentError, scrub_local_paths
from wsitk.shared.isolation import IsolatedRunner, warm_up_decoder
from wsitk.shared.logging import get_logger
from wsitk.shared.slides.bundle import remove_unpacked
from wsitk.shared.slides.dicom import dicom_identity, pseudonymised_dicom_source
from wsitk.shared.topics import SLIDES_REJECTED

if TYPE_CHECKING:
    from wsitk.shared.slides.reader import SlideInfo

SERVICE = "ingest"
MAX_KEY_BYTES = 1024
log = get_logger()


@dataclass(frozen=True)
class UploadNotice:
    bucket: str
    key: str
    size: int
    etag: str
    version_id: str


def parse_bucket_event(value: bytes) -> list[UploadNotice]:
    """MinIO/S3 notification JSON -> the created objects it announces (other event kinds ignored)."""
    try:
        body = json.loads(value)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise PermanentError("malformed-event", f"bucket event is not JSON: {exc}") from exc
    if not isinstance(body, dict) or not isinstance(body.get("Records"), list):
        raise PermanentError("malformed-event", "bucket event has no Records list (not an S3 notification)")
    notices = []
    for record in body["Records"]:
        try:
            name = str(record.get("eventName", ""))
            if not name.startswith(("s3:ObjectCreated:", "ObjectCreated:")):
                continue
            s3 = record["s3"]
            key = unquote_plus(str(s3["object"]["key"]))
            notices.append(
                UploadNotice(
                    bucket=str(s3["bucket"]["name"]),
                    key=key,
                    size=int(s3["object"].get("size", 0) or 0),
                    etag=str(s3["object"].get("eTag", "") or "").strip('"'),
                    version_id=str(s3["object"].get("versionId", "") or ""),
                )
            )
        except (KeyError, TypeError, ValueError) as exc:
            raise PermanentError(
                "malformed-event", f"bucket event record lacks s3.bucket/object: {exc}"
            ) from exc
    return notices


@dataclass(frozen=True)
class Inspected:
    """What the isolated child found in a slide that passed every check (it crosses the process boundary)."""

    info: SlideInfo
    dicom: dict[str, str] | None  # the DICOM UIDs (``DicomSource``'s fields), None for other formats


@dataclass(frozen=True)
class Rejected:
    """Why the isolated child refused the slide: a reason code and a sentence a person can act on."""

    code: str
    reason: str


def _inspect_in_child(
    path: str, max_pixels: int, mpp_override: float, slide_mpp_override: float = 0.0
) -> Inspected | Rejected:
    """Runs in the isolated child: open + validate with OpenSlide 4; returns metadata or a rejection."""
    from wsitk.shared.slides.bundle import BundleRejected, openable
    from wsitk.shared.slides.reader import SlideRejected, inspect_slide

    try:
        slide_path = openable(Path(path))
        info = inspect_slide(
            slide_path,
            max_pixels=max_pixels,
            mpp_override=mpp_override,
            slide_mpp_override=slide_mpp_override,
        )
    except (SlideRejected, BundleRejected) as exc:
        return Rejected(exc.code, exc.reason)
    return Inspected(info, dicom_identity(slide_path))


def slide_metadata(info: SlideInfo, source_files: int = 0) -> pb.SlideMetadata:
    """The event's ``SlideMetadata`` from what the reader found (``source_files``: 0 for one file)."""
    return pb.SlideMetadata(
        vendor=info.vendor,
        width=info.width,
        height=info.height,
        levels=[
            pb.SlideLevel(
                width=lv.width,
                height=lv.height,
                downsample=lv.downsample,
                tile_width=lv.tile_width,
                tile_height=lv.tile_height,
            )
            for lv in info.levels
        ],
        mpp_x=info.mpp_x,
        mpp_y=info.mpp_y,
        mpp_source=info.mpp_source,
        objective_power=info.objective_power or 0.0,
        has_icc_profile=info.has_icc_profile,
        associated_images=list(info.associated_images),
        file_size=info.file_size,
        source_files=source_files,
    )


class IngestHandler:
    def __init__(self, ctx: ServiceContext) -> None:
        self.ctx = ctx
        self.isolated = IsolatedRunner(
            ctx.settings.isolation_memory_bytes, timeout_s=600, preload=(_inspect_in_child.__module__,)
        )
        self.multifile = MultiFileIngest(self)

    def warm_up(self) -> None:
        """At start, on the handler's thread (which keeps the decoder process): the object store's client
        and the decoder process with OpenSlide loaded (``shared/isolation.py: warm_up_decoder``)."""
        warm_up_decoder([lambda: self.ctx.store, self.isolated.start], "upload")

    def handle(self, message: Incoming) -> list[Outgoing]:
        outputs: list[Outgoing] = []
        for notice in parse_bucket_event(message.value):
            settings = self.ctx.settings
            if notice.bucket != settings.uploads_bucket and not is_bundle_of(settings, notice):
                log.info("ignoring object outside the uploads bucket", bucket=notice.bucket)
                continue
            outputs += self.ingest(notice)
        return outputs

    def ingest(self, notice: UploadNotice) -> list[Outgoing]:
        if len(notice.key.encode()) > MAX_KEY_BYTES:
            return [
                self._rejected(
                    "", notice, None, "bad-object-key", f"object key longer than {MAX_KEY_BYTES} bytes"
                )
            ]
        if {".", ".."} & set(notice.key.split("/")) or notice.key.startswith("/") or "//" in notice.key:
            reason = (
                f"upload {notice.key!r} has a '.', '..' or empty path segment (or a leading '/'); such keys are "
                "refused because tools read them as directory traversal or absolute paths: upload the slide again "
                "under a plain key such as 'case-123/slide-1.svs'"
            )
            return [self._rejected("", notice, None, "unsupported-object-key", reason)]
        stored = self.ctx.store.stat(notice.bucket, notice.key)
        if stored is None:
            log.warning("uploaded object is gone; nothing to ingest", upload_key=notice.key)
            return []
        grouped = self.multifile.route(notice, stored)  # a file of a DICOM series or a MIRAX slide
        if grouped is not None:
            return grouped
        path, digest = self.ctx.cache.fetch(
            self.ctx.store, notice.bucket, notice.key, version_id=stored.version_id, etag=stored.etag
        )
        source = pb.ObjectRef(
            bucket=notice.bucket,
            key=notice.key,
            size=stored.size,
            sha256=digest,
            version_id=stored.version_id,
            etag=stored.etag,
        )
        return self.ingest_file(notice, path, digest, source)

    def ingest_file(
        self,
        notice: UploadNotice,
        path: Path,
        digest: str,
        source: pb.ObjectRef,
        *,
        dicom: pb.DicomSource | None = None,
        source_files: int = 0,
    ) -> list[Outgoing]:
        """Validate the downloaded slide ``path`` (one file, or a multi-file slide's zip) and announce it."""
        settings = self.ctx.settings
        slide_id = digest[:32]
        slide_mpp = lookup_override(self.ctx.db, slide_id, [notice.key])
        try:
            result = self.isolated.run(
                f"opening {notice.key}",
                _inspect_in_child,
                str(path),
                settings.max_slide_pixels,
                settings.mpp_override,
                slide_mpp.mpp if slide_mpp is not None else 0.0,
            )
        except PermanentError as exc:  # the decoder crashed or ran out of memory: reject, don't crash-loop
            return [self._rejected(slide_id, notice, source, exc.code, exc.reason)]
        finally:
            path.unlink(missing_ok=True)  # tiler fetches by checksum; ingest keeps no copy
            remove_unpacked(path)
        if isinstance(result, Rejected):
            reason = scrub_local_paths(result.reason, {str(path): notice.key, path.name: notice.key})
            return [self._rejected(slide_id, notice, source, result.code, reason)]
        profile = self.ctx.current_profile(slide_mpp_override=slide_mpp.mpp if slide_mpp is not None else 0.0)
        metadata = slide_metadata(result.info, source_files)
        if dicom is None and result.dicom:  # a zip of a DICOM series uploaded as one object
            # (or, re-announced by the reconciler, a bundle ingest made: its UIDs are pseudonymised already)
            uid_key = "" if is_bundle_of(settings, notice) else settings.dicom_uid_secret()
            dicom = pseudonymised_dicom_source(result.dicom, uid_key)
        if dicom is not None:
            metadata.dicom.CopyFrom(dicom)
        ingested = build_slide_ingested(
            slide_id=slide_id,
            source=source,
            upload_key=notice.key,
            metadata=metadata,
            profile=profile,
            event_parts=["ingested", notice.bucket, notice.key, source.etag, profile.profile_id],
            additional_source=self._known_under_other_key(slide_id, notice.key),
        )
        log.info(
            "slide ingested",
            slide_id=slide_id,
            vendor=metadata.vendor,
            width=metadata.width,
            height=metadata.height,
            mpp=metadata.mpp_x,
            mpp_source=metadata.mpp_source,
            **({"slide_mpp_override_ref": slide_mpp.slide_ref} if slide_mpp is not None else {}),
        )
        return [ingested]

    def _known_under_other_key(self, slide_id: str, key: str) -> bool:
        return intake.known_under_other_key(self.ctx.db, slide_id, key)

    def _rejected(
        self, slide_id: str, notice: UploadNotice, source: pb.ObjectRef | None, code: str, reason: str
    ) -> Outgoing:
        slide_id = slide_id or deterministic_id("upload", notice.bucket, notice.key, notice.etag).replace(
            "-", ""
        )
        event = pb.SlideRejected(
            meta=new_meta(
                service=SERVICE,
                slide_id=slide_id,
                event_parts=["rejected", notice.bucket, notice.key, notice.etag],
            ),
            upload_key=notice.key,
            reason_code=code,
            reason=scrub_local_paths(reason),  # a public event: no paths of this machine
        )
        # Even when the content was never read, the upload is named so the rejection can be found by its key.
        event.source.CopyFrom(source or pb.ObjectRef(bucket=notice.bucket, key=notice.key, etag=notice.etag))
        log.warning("slide rejected", slide_id=slide_id, reason_code=code, reason=reason)
        return Outgoing(SLIDES_REJECTED, slide_id, event)

    def on_dead_letter(self, message: Incoming, error: BaseException) -> list[Outgoing]:
        """A bucket event that failed every attempt still ends as a public, readable rejection."""
        try:
            notices = parse_bucket_event(message.value)
        except PermanentError:
            return []
        reason = (
            f"ingest could not process this upload after repeated attempts ({type(error).__name__}: {error}); "
            "it was dead-lettered and can be replayed with `wsi redrive` once fixed"
        )
        return [self._rejected("", n, None, "ingest-failed", reason) for n in notices]
