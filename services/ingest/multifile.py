"""Multi-file slides: the files of a DICOM whole-slide series or a MIRAX slide become one slide.

The bucket announces files one at a time, in any order. Ingest recognises the files that belong to a
multi-file slide and records each in ``upload_group_parts`` under its group:

- a DICOM file of the VL Whole Slide Microscopy SOP class belongs to ``dicom:<prefix>:<Series Instance
  UID>`` (``prefix``: the folder of its key), whatever its name;
- a ``.mrxs`` file and the ``Slidedat.ini`` and ``.dat`` files of the folder beside it with the same name
  belong to ``mirax:<prefix>/<name>``.

Completeness is decided from what the files declare (``missing_parts``):

- DICOM: the original-resolution level (ImageType ``VOLUME`` + ``NONE``) is present; every level of a
  ``TILED_FULL`` organisation holds all the frames its total pixel matrix, tile size, focal planes and
  optical paths imply; every concatenation holds all its instances (``InConcatenationTotalNumber``). A
  series does not declare how many resampled levels (or label and overview images) it has, so a group
  that is complete by these rules is ingested once no new file of it arrived for ``WSI_MULTIFILE_SETTLE_S``
  (the quiet period; 30 s by default).
- MIRAX: the ``.mrxs``, its ``Slidedat.ini`` and every file its index names (``[HIERARCHICAL] INDEXFILE``,
  ``[DATAFILE] FILE_0..FILE_<FILE_COUNT-1>``) are present; then the same quiet period.

A group still incomplete ``WSI_MULTIFILE_TIMEOUT_S`` after its first file ends as a public
``SlideRejected`` (``incomplete-series``) saying what is missing. A complete group is assembled into one
deterministic zip (``shared/slides/bundle.py``) in the artifacts bucket under ``bundles/<upload folder>/<slide
id>.zip``, which is then the slide's source (bucket and key, as an upload is for a one-file slide):
DICOM files de-identified (``shared/slides/dicom.py``; LABEL and OVERVIEW instances left out), MIRAX files
as they are. The slide id is the SHA-256 of that zip: the same series uploaded again is the same slide.
The periodic ``check_groups`` re-announces a group's newest file once the group is ready or timed out, so
the decision is taken by the handler, with the runtime's retries and dead letters.
"""

from __future__ import annotations

import configparser
import hashlib
import shutil
import tempfile
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import TYPE_CHECKING, Any

from wsitk.shared.bus.kafka import Outgoing
from wsitk.shared.context import ServiceContext
from wsitk.shared.contracts import pb
from wsitk.shared.db import intake
from wsitk.shared.logging import get_logger
from wsitk.shared.objectstore import StoredObject, sha256_file
from wsitk.shared.slides.bundle import write_bundle
from wsitk.shared.slides.dicom import (
    WSI_SOP_CLASS,
    InstanceInfo,
    deidentified_copy,
    describe_instance,
    pseudonymise_uid,
)

if TYPE_CHECKING:
    from wsitk.services.ingest.handler import IngestHandler, UploadNotice

log = get_logger()
BUNDLE_PREFIX = "bundles"
_SKIPPED_FLAVORS = ("LABEL", "OVERVIEW")


@dataclass(frozen=True)
class Part:
    key: str
    etag: str
    size: int
    sha256: str
    detail: dict[str, Any]


def is_bundle_of(settings: Any, notice: UploadNotice) -> bool:
    """A multi-file slide's bundle this ingest made (the reconciler re-announces stalled slides by source)."""
    return bool(notice.bucket == settings.artifacts_bucket and notice.key.startswith(f"{BUNDLE_PREFIX}/"))


def mirax_group(key: str) -> str | None:
    """The MIRAX group a key belongs to by its name, or None."""
    path = PurePosixPath(key)
    if path.suffix.lower() == ".mrxs":
        return f"mirax:{path.with_suffix('')}"
    if path.name == "Slidedat.ini" or path.suffix.lower() == ".dat":
        return f"mirax:{path.parent}" if str(path.parent) != "." else None
    return None


def group_upload_key(group_key: str) -> str:
    """The upload key a group's slide is known by: the series' folder, or the ``.mrxs`` key."""
    kind, _, rest = group_key.partition(":")
    if kind == "mirax":
        return f"{rest}.mrxs"
    prefix = rest.rsplit(":", 1)[0]
    return f"{prefix}/" if prefix else "/"


def _mirax_index(path: Path) -> list[str]:
    parser = configparser.ConfigParser(interpolation=None, strict=False)
    parser.read_string(path.read_bytes().decode("utf-8-sig", errors="replace"))
    names = []
    if parser.has_option("HIERARCHICAL", "INDEXFILE"):
        names.append(parser.get("HIERARCHICAL", "INDEXFILE"))
    count = parser.getint("DATAFILE", "FILE_COUNT", fallback=0)
    names += [
        parser.get("DATAFILE", f"FILE_{i}")
        for i in range(count)
        if parser.has_option("DATAFILE", f"FILE_{i}")
    ]
    return names


def missing_parts(kind: str, group_key: str, parts: list[Part]) -> list[str]:
    """What the group still lacks by what its files declare; empty when complete (module docstring)."""
    if kind == "mirax":
        return _mirax_missing(group_key, parts)
    return _dicom_missing([InstanceInfo.from_dict(p.detail) for p in parts])


def _mirax_missing(group_key: str, parts: list[Part]) -> list[str]:
    folder = group_key.partition(":")[2]
    names = {p.key for p in parts}
    missing = []
    if f"{folder}.mrxs" not in names:
        missing.append(f"the index file {PurePosixPath(folder).name}.mrxs")
    index = next((p for p in parts if p.key == f"{folder}/Slidedat.ini"), None)
    if index is None:
        missing.append(f"{PurePosixPath(folder).name}/Slidedat.ini")
        return missing
    listed = index.detail.get("files", [])
    missing += [f"{PurePosixPath(folder).name}/{n}" for n in listed if f"{folder}/{n}" not in names]
    return missing


def _dicom_missing(instances: list[InstanceInfo]) -> list[str]:
    volumes = [i for i in instances if i.image_flavor == "VOLUME"]
    if not any(i.derived == "NONE" for i in volumes):
        return ["the original-resolution level (an instance with ImageType ...\\VOLUME\\NONE)"]
    missing = []
    levels: dict[tuple[int, int], list[InstanceInfo]] = defaultdict(list)
    for instance in volumes:
        levels[(instance.total_columns, instance.total_rows)].append(instance)
    for (width, height), members in sorted(levels.items(), reverse=True):
        concatenations: dict[str, list[InstanceInfo]] = defaultdict(list)
        for member in members:
            if member.concatenation_uid:
                concatenations[member.concatenation_uid].append(member)
        for concatenated in concatenations.values():
            have = {m.concatenation_number for m in concatenated}
            want = set(range(1, concatenated[0].concatenation_total + 1))
            if want - have:
                missing.append(
                    f"level {width}x{height}: instances {sorted(want - have)} of its concatenation of {len(want)}"
                )
        expected = max(m.expected_frames for m in members)
        frames = sum(m.frames for m in members)
        if expected and frames < expected:
            missing.append(f"level {width}x{height}: {frames} of its {expected} frames")
    return missing


class MultiFileIngest:
    """Ingest's handling of the files of multi-file slides (module docstring)."""

    def __init__(self, handler: IngestHandler) -> None:
        self.handler = handler
        self.ctx: ServiceContext = handler.ctx

    # -- routing ------------------------------------------------------------------------------------
    def route(self, notice: UploadNotice, stored: StoredObject) -> list[Outgoing] | None:
        """Outputs when ``notice`` is a file of a multi-file slide, None when it is a slide of its own."""
        known = intake.group_of_file(self.ctx.db, notice.bucket, notice.key, stored.etag)
        if known is not None:
            return self.evaluate(notice.bucket, known)
        mirax = mirax_group(notice.key)
        path, digest = self.ctx.cache.fetch(
            self.ctx.store, notice.bucket, notice.key, version_id=stored.version_id, etag=stored.etag
        )
        if mirax is not None:
            detail: dict[str, Any] = {}
            if PurePosixPath(notice.key).name == "Slidedat.ini":
                detail["files"] = _mirax_index(path)
            path.unlink(missing_ok=True)
            return self._record(notice, stored, digest, "mirax", mirax, detail)
        with path.open("rb") as handle:
            head = handle.read(132)
        if head[128:132] != b"DICM":
            return None  # the single-file path reuses the cached download
        info = describe_instance(path)
        if info is None or info.sop_class_uid != WSI_SOP_CLASS or not info.series_uid:
            return None
        path.unlink(missing_ok=True)
        prefix = str(PurePosixPath(notice.key).parent)
        group = f"dicom:{'' if prefix == '.' else prefix}:{info.series_uid}"
        return self._record(notice, stored, digest, "dicom", group, info.to_dict())

    def _record(
        self,
        notice: UploadNotice,
        stored: StoredObject,
        digest: str,
        kind: str,
        group: str,
        detail: dict[str, Any],
    ) -> list[Outgoing]:
        intake.record_group_file(
            self.ctx.db, notice.bucket, group, kind, (notice.key, stored.etag, stored.size, digest, detail)
        )
        log.info("file of a multi-file slide recorded", kind=kind, upload_key=notice.key)
        return self.evaluate(notice.bucket, group)

    # -- deciding -------------------------------------------------------------------------------------
    def _group(self, bucket: str, group: str) -> tuple[str, str, float, float, list[Part]] | None:
        found = intake.group_state(self.ctx.db, bucket, group)
        if found is None:
            return None
        kind, state, age_s, quiet_s = found
        parts = [Part(*row) for row in intake.group_files(self.ctx.db, bucket, group)]
        return kind, state, age_s, quiet_s, parts

    def evaluate(self, bucket: str, group: str) -> list[Outgoing]:
        found = self._group(bucket, group)
        if found is None:
            return []
        kind, state, age_s, quiet_s, parts = found
        if state != "pending":
            log.info("file of a multi-file slide already decided", state=state, group_files=len(parts))
            return []
        settings = self.ctx.settings
        missing = missing_parts(kind, group, parts)
        if missing and age_s >= settings.multifile_timeout_s:
            return self._reject(bucket, group, kind, parts, missing)
        if missing or quiet_s < settings.multifile_settle_s:
            log.info(
                "multi-file slide waiting",
                kind=kind,
                group_files=len(parts),
                missing=len(missing),
                quiet_s=round(quiet_s, 1),
            )
            return []
        return self._assemble(bucket, group, kind, parts)

    def _reject(
        self, bucket: str, group: str, kind: str, parts: list[Part], missing: list[str]
    ) -> list[Outgoing]:
        from wsitk.services.ingest.handler import UploadNotice

        what = "DICOM series" if kind == "dicom" else "MIRAX slide"
        upload_key = group_upload_key(group)
        reason = (
            f"the {what} under {upload_key!r} was still incomplete {self.ctx.settings.multifile_timeout_s:g} s after "
            f"its first file ({len(parts)} file(s) received); missing: {'; '.join(missing[:5])}"
            f"{' ...' if len(missing) > 5 else ''}. Upload the complete series again under a new folder, or "
            "raise WSI_MULTIFILE_TIMEOUT_S for slow transfers"
        )
        # the group key holds the Series Instance UID as uploaded: only a digest of it goes into the event
        notice = UploadNotice(bucket, upload_key, 0, hashlib.sha256(group.encode()).hexdigest()[:32], "")
        outgoing = self.handler._rejected("", notice, None, "incomplete-series", reason)
        intake.reject_group(self.ctx.db, bucket, group, reason)
        return [outgoing]

    # -- assembling -----------------------------------------------------------------------------------
    def _assemble(self, bucket: str, group: str, kind: str, parts: list[Part]) -> list[Outgoing]:
        from wsitk.services.ingest.handler import UploadNotice

        settings, store = self.ctx.settings, self.ctx.store
        uid_key = settings.dicom_uid_secret()
        work = Path(tempfile.mkdtemp(prefix="wsi-group-", dir=settings.cache_dir))
        try:
            members: list[tuple[str, Path]] = []
            base: InstanceInfo | None = None
            for part in parts:
                path, _ = self.ctx.cache.fetch(store, bucket, part.key, expected_sha256=part.sha256)
                if kind == "mirax":
                    parent = PurePosixPath(group.partition(":")[2]).parent
                    relative = (
                        part.key if str(parent) == "." else str(PurePosixPath(part.key).relative_to(parent))
                    )
                    members.append((relative, path))
                    continue
                info = InstanceInfo.from_dict(part.detail)
                if info.image_flavor in _SKIPPED_FLAVORS:
                    continue
                if info.image_flavor == "VOLUME" and info.derived == "NONE":
                    base = info
                copy = work / f"{len(members):05d}.dcm"
                deidentified_copy(path, copy, uid_key)
                path.unlink(missing_ok=True)  # the de-identified copy is what the bundle holds
                members.append((f"{pseudonymise_uid(info.sop_instance_uid, uid_key)}.dcm", copy))
            bundle = work / "bundle.zip"
            write_bundle(members, bundle)
            digest = sha256_file(bundle)
            slide_id = digest[:32]
            folder = group_upload_key(group).strip("/")
            bundle_key = (
                f"{BUNDLE_PREFIX}/{folder}/{slide_id}.zip" if folder else f"{BUNDLE_PREFIX}/{slide_id}.zip"
            )
            stored = store.put_file_if_absent(settings.artifacts_bucket, bundle_key, bundle)
            cached = self.ctx.cache.path_for(digest, ".zip")
            if not cached.is_file():
                bundle.replace(cached)
        finally:
            shutil.rmtree(work, ignore_errors=True)
        source = pb.ObjectRef(
            bucket=settings.artifacts_bucket,
            key=bundle_key,
            size=stored.size,
            sha256=digest,
            version_id=stored.version_id,
            etag=stored.etag,
        )
        dicom = None
        if base is not None:
            dicom = pb.DicomSource(
                study_instance_uid=pseudonymise_uid(base.study_uid, uid_key),
                series_instance_uid=pseudonymise_uid(base.series_uid, uid_key),
                frame_of_reference_uid=pseudonymise_uid(base.frame_of_reference_uid, uid_key),
                sop_instance_uid=pseudonymise_uid(base.sop_instance_uid, uid_key),
                sop_class_uid=base.sop_class_uid,
                uids_pseudonymised=bool(uid_key),
            )
        notice = UploadNotice(
            settings.artifacts_bucket, bundle_key, stored.size, stored.etag, stored.version_id
        )
        outputs = self.handler.ingest_file(
            notice, cached, digest, source, dicom=dicom, source_files=len(parts)
        )
        state = "rejected" if any(o.topic != "wsi.slides.ingested" for o in outputs) else "ingested"
        intake.settle_group(self.ctx.db, bucket, group, state, slide_id)
        log.info(
            "multi-file slide assembled", kind=kind, slide_id=slide_id, group_files=len(parts), state=state
        )
        return outputs


def check_groups(ctx: ServiceContext, produce: Any) -> int:
    """Re-announce the newest file of each pending group that is ready or timed out (module docstring)."""
    from wsitk.shared.announce import make_bucket_event
    from wsitk.shared.topics import BUCKET_EVENTS

    settings = ctx.settings
    rows = intake.groups_due(ctx.db, settings.multifile_settle_s)
    outputs = []
    for bucket, group, kind, age_s in rows:
        parts = [Part(*row) for row in intake.group_files(ctx.db, bucket, group, newest_first=True)]
        if not parts:
            continue
        if missing_parts(kind, group, parts) and age_s < settings.multifile_timeout_s:
            continue
        newest = parts[0]
        outputs.append(
            Outgoing(
                BUCKET_EVENTS,
                f"{bucket}/{newest.key}",
                raw=make_bucket_event(bucket, newest.key, newest.size, newest.etag),
            )
        )
    if outputs:
        produce(outputs)
        log.info("multi-file slides due for a decision re-announced", count=len(outputs))
    return len(outputs)
