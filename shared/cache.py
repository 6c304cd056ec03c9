"""A bounded, evicting local cache of slide files (OpenSlide reads files, not streams).

Files are named by content digest, never by the object key, so a key like ``../../etc/passwd`` or
``/abs/x.svs`` can never make the cache write outside its directory. The extension is kept (some
formats are detected by it) only when it is a short alphanumeric suffix. A multi-file slide's zip is
unpacked beside itself (``<digest>.zip.d/``) by whoever opens it, and evicted with it.
"""

from __future__ import annotations

import hashlib
import os
import re
import threading
from pathlib import Path, PurePosixPath

from wsitk.shared.errors import DISK_FULL_ERRNOS, PermanentError, local_disk_full
from wsitk.shared.logging import get_logger
from wsitk.shared.objectstore import ObjectStore, sha256_file
from wsitk.shared.slides.bundle import remove_unpacked, unpack_dir

log = get_logger()
_SAFE_SUFFIX = re.compile(r"^\.[A-Za-z0-9]{1,8}$")


def _tree_size(directory: Path) -> int:
    """Bytes under a multi-file slide's unpacked folder (``shared/slides/bundle.py``); 0 when absent."""
    if not directory.is_dir():
        return 0
    return sum(p.stat().st_size for p in directory.rglob("*") if p.is_file())


def safe_suffix(key: str) -> str:
    suffix = PurePosixPath(key).suffix.lower()
    return suffix if _SAFE_SUFFIX.match(suffix) else ".bin"


class SlideCache:
    def __init__(self, directory: Path, max_bytes: int) -> None:
        self.directory = directory.resolve()
        self.max_bytes = max_bytes
        self._lock = threading.Lock()
        self.directory.mkdir(parents=True, exist_ok=True)

    def path_for(self, name: str, suffix: str) -> Path:
        if not re.fullmatch(r"[0-9a-f]{8,64}", name):
            raise PermanentError("bad-cache-name", f"cache entry name {name!r} is not a hex digest")
        path = (self.directory / f"{name}{suffix}").resolve()
        if path.parent != self.directory:
            raise PermanentError("bad-cache-name", f"cache entry {name!r} resolves outside the cache")
        return path

    def fetch(
        self,
        store: ObjectStore,
        bucket: str,
        key: str,
        *,
        version_id: str = "",
        expected_sha256: str = "",
        etag: str = "",
    ) -> tuple[Path, str]:
        """Download (or reuse) an object; returns (path, sha256). Verifies the digest when given."""
        if expected_sha256:
            name = expected_sha256
        else:  # unknown content yet: name by the object identity, rename after hashing
            name = hashlib.sha256(f"{bucket}\x00{key}\x00{version_id}\x00{etag}".encode()).hexdigest()
        path = self.path_for(name, safe_suffix(key))
        if path.is_file():
            os.utime(path)
            return path, expected_sha256 or sha256_file(path)
        with self._lock:
            self._evict(incoming=0)
        try:
            store.download(bucket, key, path, version_id=version_id)
        except OSError as exc:
            if exc.errno not in DISK_FULL_ERRNOS:
                raise
            raise local_disk_full("the slide cache", self.directory, f"{bucket}/{key}") from exc
        digest = sha256_file(path)
        if expected_sha256 and digest != expected_sha256:
            path.unlink(missing_ok=True)
            raise PermanentError(
                "source-changed",
                f"object {bucket}/{key} no longer has the content that was ingested "
                f"(sha256 {expected_sha256[:12]}..., now {digest[:12]}...): it was overwritten; "
                "the new content is ingested as a new slide",
            )
        with self._lock:
            self._evict(incoming=0)
        return path, digest

    def _evict(self, incoming: int) -> None:
        # The folder can vanish under a running service (a cache volume replaced or wiped): recreate it.
        self.directory.mkdir(parents=True, exist_ok=True)
        entries = [p for p in self.directory.iterdir() if p.is_file()]
        total = sum(p.stat().st_size + _tree_size(unpack_dir(p)) for p in entries) + incoming
        for path in sorted(entries, key=lambda p: p.stat().st_atime):
            if total <= self.max_bytes:
                break
            size = path.stat().st_size + _tree_size(unpack_dir(path))
            path.unlink(missing_ok=True)
            remove_unpacked(path)
            total -= size
            log.info("cache evicted", file=path.name, bytes=size)
