"""The object store: slides, tile shards, QC metrics, embeddings and models live here.

One interface, two backends: S3 (any S3-API server through the ``minio`` client: MinIO, AWS S3,
the local moto server) and the local filesystem (same semantics, for running a stage's core with
no servers at all). Writes are *put-if-absent*: a stage that is redelivered an event must not
replace bytes that an earlier event's checksum describes, so when the object exists the caller gets
back a reference to what is stored, not to what it just computed.
"""

from __future__ import annotations

import io
import os
import shutil
import tempfile
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Protocol

from wsitk.shared.config import Settings
from wsitk.shared.errors import PermanentError
from wsitk.shared.hashing import sha256_bytes, sha256_file

SHA_META = "sha256"  # stored as x-amz-meta-sha256 on S3, in a sidecar on the filesystem


@dataclass(frozen=True)
class StoredObject:
    bucket: str
    key: str
    size: int
    sha256: str
    etag: str = ""
    version_id: str = ""


def check_key(key: str) -> str:
    """Refuse keys that could escape a prefix or a directory: absolute, ``..``, empty parts, NUL."""
    if not key or key.startswith("/") or "\x00" in key or "\\" in key:
        raise PermanentError(
            "bad-object-key", f"object key {key!r} is empty, absolute or contains NUL/backslash"
        )
    parts = PurePosixPath(key).parts
    if any(part in {"..", "."} for part in parts) or "//" in key:
        raise PermanentError(
            "bad-object-key", f"object key {key!r} contains '..', '.' or empty path segments"
        )
    return key


class ObjectStore(Protocol):
    def put_if_absent(self, bucket: str, key: str, data: bytes, content_type: str = ...) -> StoredObject: ...
    def put_file_if_absent(self, bucket: str, key: str, path: Path) -> StoredObject: ...
    def get_bytes(self, bucket: str, key: str, version_id: str = "") -> bytes: ...
    def download(self, bucket: str, key: str, dest: Path, version_id: str = "") -> None: ...
    def stat(self, bucket: str, key: str) -> StoredObject | None: ...
    def list_keys(self, bucket: str, prefix: str = "") -> Iterator[StoredObject]: ...
    def ensure_bucket(self, bucket: str) -> None: ...


class S3ObjectStore:
    """S3 API through the minio client, with bounded timeouts so outages surface as retries."""

    def __init__(self, settings: Settings) -> None:
        import urllib3
        from minio import Minio

        http = urllib3.PoolManager(
            timeout=urllib3.Timeout(connect=5.0, read=120.0),
            retries=urllib3.Retry(total=2, backoff_factor=0.3, status_forcelist=[500, 502, 503, 504]),
            maxsize=16,
            cert_reqs="CERT_REQUIRED" if settings.s3_secure else "CERT_NONE",
            ca_certs=settings.s3_ca_file or None,
        )
        self.client = Minio(
            settings.s3_endpoint,
            access_key=settings.s3_access_key,
            secret_key=settings.s3_secret(),
            secure=settings.s3_secure,
            region=settings.s3_region,
            http_client=http,
        )

    def stat(self, bucket: str, key: str) -> StoredObject | None:
        from minio.error import S3Error

        try:
            info = self.client.stat_object(bucket, check_key(key))
        except S3Error as exc:
            if exc.code in {"NoSuchKey", "NoSuchObject", "ResourceNotFound"}:
                return None
            raise
        metadata = {k.lower(): v for k, v in (info.metadata or {}).items()}
        return StoredObject(
            bucket=bucket,
            key=key,
            size=int(info.size or 0),
            sha256=str(metadata.get(f"x-amz-meta-{SHA_META}", "")),
            etag=str(info.etag or ""),
            version_id=str(info.version_id or ""),
        )

    def put_if_absent(
        self, bucket: str, key: str, data: bytes, content_type: str = "application/octet-stream"
    ) -> StoredObject:
        existing = self.stat(bucket, key)
        if existing is not None:
            return existing
        digest = sha256_bytes(data)
        result = self.client.put_object(
            bucket, key, io.BytesIO(data), len(data), content_type=content_type, metadata={SHA_META: digest}
        )
        return StoredObject(bucket, key, len(data), digest, result.etag or "", result.version_id or "")

    def put_file_if_absent(self, bucket: str, key: str, path: Path) -> StoredObject:
        existing = self.stat(bucket, key)
        if existing is not None:
            return existing
        digest = sha256_file(path)
        result = self.client.fput_object(bucket, key, str(path), metadata={SHA_META: digest})
        return StoredObject(
            bucket, key, path.stat().st_size, digest, result.etag or "", result.version_id or ""
        )

    def get_bytes(self, bucket: str, key: str, version_id: str = "") -> bytes:
        response = self.client.get_object(bucket, check_key(key), version_id=version_id or None)
        try:
            return response.read()
        finally:
            response.close()
            response.release_conn()

    def download(self, bucket: str, key: str, dest: Path, version_id: str = "") -> None:
        dest.parent.mkdir(parents=True, exist_ok=True)
        # A name of its own per download: two processes fetching one object never write one file.
        partial = dest.with_name(f"{dest.name}.{os.getpid()}-{threading.get_ident()}.partial")
        try:
            self.client.fget_object(
                bucket,
                check_key(key),
                str(partial),
                version_id=version_id or None,
                tmp_file_path=f"{partial}.part",
            )
            os.replace(partial, dest)
        except BaseException:  # a failed download (a full disk, a cut connection) leaves no debris
            for leftover in (partial, Path(f"{partial}.part")):
                leftover.unlink(missing_ok=True)
            raise

    def list_keys(self, bucket: str, prefix: str = "") -> Iterator[StoredObject]:
        for item in self.client.list_objects(bucket, prefix=prefix or None, recursive=True):
            if item.is_dir or item.object_name is None:
                continue
            yield StoredObject(
                bucket, item.object_name, int(item.size or 0), "", str(item.etag or "").strip('"')
            )

    def ensure_bucket(self, bucket: str) -> None:
        if not self.client.bucket_exists(bucket):
            self.client.make_bucket(bucket)


class FilesystemObjectStore:
    """The same interface on a local directory: ``root/bucket/key``, with a ``.sha256`` sidecar."""

    def __init__(self, root: Path) -> None:
        self.root = root

    def _path(self, bucket: str, key: str) -> Path:
        check_key(bucket)
        path = (self.root / bucket / check_key(key)).resolve()
        if not path.is_relative_to(self.root.resolve()):
            raise PermanentError("bad-object-key", f"object key {key!r} resolves outside the store")
        return path

    def stat(self, bucket: str, key: str) -> StoredObject | None:
        path = self._path(bucket, key)
        if not path.is_file():
            return None
        sidecar = path.with_name(path.name + ".sha256")
        digest = sidecar.read_text().strip() if sidecar.is_file() else sha256_file(path)
        return StoredObject(bucket, key, path.stat().st_size, digest)

    def _commit(self, path: Path, writer_path: Path, digest: str) -> None:
        path.with_name(path.name + ".sha256").write_text(digest)
        os.replace(writer_path, path)

    def put_if_absent(
        self, bucket: str, key: str, data: bytes, content_type: str = "application/octet-stream"
    ) -> StoredObject:
        existing = self.stat(bucket, key)
        if existing is not None:
            return existing
        path = self._path(bucket, key)
        path.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=path.parent, delete=False, prefix=".tmp-") as handle:
            handle.write(data)
        digest = sha256_bytes(data)
        self._commit(path, Path(handle.name), digest)
        return StoredObject(bucket, key, len(data), digest)

    def put_file_if_absent(self, bucket: str, key: str, path: Path) -> StoredObject:
        existing = self.stat(bucket, key)
        if existing is not None:
            return existing
        target = self._path(bucket, key)
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = target.with_name(f".tmp-{os.getpid()}-{target.name}")
        shutil.copyfile(path, tmp)
        digest = sha256_file(tmp)
        self._commit(target, tmp, digest)
        return StoredObject(bucket, key, target.stat().st_size, digest)

    def get_bytes(self, bucket: str, key: str, version_id: str = "") -> bytes:
        path = self._path(bucket, key)
        if not path.is_file():
            raise PermanentError("object-missing", f"object {bucket}/{key} does not exist")
        return path.read_bytes()

    def download(self, bucket: str, key: str, dest: Path, version_id: str = "") -> None:
        dest.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(self._path(bucket, key), dest)

    def list_keys(self, bucket: str, prefix: str = "") -> Iterator[StoredObject]:
        base = self.root / bucket
        for path in sorted(base.rglob("*")):
            if path.is_file() and not path.name.endswith(".sha256") and not path.name.startswith(".tmp-"):
                key = path.relative_to(base).as_posix()
                if key.startswith(prefix):
                    yield StoredObject(bucket, key, path.stat().st_size, "")

    def ensure_bucket(self, bucket: str) -> None:
        (self.root / check_key(bucket)).mkdir(parents=True, exist_ok=True)


def open_store(settings: Settings) -> ObjectStore:
    """The configured backend: ``WSI_S3_ENDPOINT=file:///path`` selects the filesystem backend."""
    if settings.s3_endpoint.startswith("file://"):
        return FilesystemObjectStore(Path(settings.s3_endpoint.removeprefix("file://")))
    return S3ObjectStore(settings)
