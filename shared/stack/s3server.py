"""The local S3 server: moto in server mode, with its buckets and objects persisted to disk.

moto keeps S3 state in memory only. Its request recorder (``MOTO_ENABLE_RECORDING``) can replay a
log of requests, but multipart uploads do not survive a replay (the upload ids are random), and the
log holds every request, reads included. So this module wraps moto's WSGI application instead:
after every successful write (object put, multipart completion, copy, delete, bucket create/delete)
it copies the affected object from moto's backend to ``data_dir`` before the response goes out, and
on start it loads ``data_dir`` back into the backend. An acknowledged write therefore survives a
restart or a SIGKILL of the server, as DESIGN.md section 5 requires ("S3 and PostgreSQL keep their
data"). Only the latest version of a key is kept, and only path-style requests (``/bucket/key``,
what the minio client sends to an IP endpoint) are understood.

Run as ``python -m wsitk.shared.stack.s3server --host 127.0.0.1 --port 9000 --data-dir DIR``; with
``--certfile CERT --keyfile KEY`` it serves HTTPS only.
"""

from __future__ import annotations

import argparse
import datetime
import hashlib
import json
import logging
import os
import shutil
import signal
import sys
import threading
from collections.abc import Callable, Iterable
from pathlib import Path
from types import FrameType
from typing import Any
from urllib.parse import parse_qs

WsgiApp = Callable[[dict[str, Any], Callable[..., Any]], Iterable[bytes]]

_BUCKET_MARKER = ".bucket.json"


class DiskMirror:
    """One directory per bucket; per object ``<sha256(key)>.bin`` (bytes) and ``.json`` (key, etag, metadata).

    Keys are hashed into file names so that any S3 key (slashes, unicode, ``..``) maps to one safe file.
    """

    def __init__(self, data_dir: Path) -> None:
        self.data_dir = data_dir
        self.lock = threading.Lock()
        data_dir.mkdir(parents=True, exist_ok=True)

    def _backend(self) -> Any:
        from moto.core import DEFAULT_ACCOUNT_ID
        from moto.s3.models import s3_backends

        return s3_backends[DEFAULT_ACCOUNT_ID]["aws"]

    @staticmethod
    def _stem(key_name: str) -> str:
        return hashlib.sha256(key_name.encode()).hexdigest()

    # -- writes, called after moto answered a write request with 2xx ------------------------------
    def sync_bucket(self, bucket_name: str) -> None:
        """Mirror the bucket's existence and every object in it (used after multi-object deletes)."""
        bucket = self._backend().buckets.get(bucket_name)
        folder = self.data_dir / bucket_name
        with self.lock:
            if bucket is None:
                shutil.rmtree(folder, ignore_errors=True)
                return
            folder.mkdir(exist_ok=True)
            _write_atomic(folder / _BUCKET_MARKER, json.dumps({"name": bucket_name}).encode())
        live = {self._stem(name) for name in bucket.keys if _current(bucket, name) is not None}
        for sidecar in folder.glob("*.json"):
            if sidecar.name != _BUCKET_MARKER and sidecar.stem not in live:
                self._remove(folder, sidecar.stem)
        for name in list(bucket.keys):
            self.sync_key(bucket_name, name)

    def sync_key(self, bucket_name: str, key_name: str) -> None:
        bucket = self._backend().buckets.get(bucket_name)
        folder = self.data_dir / bucket_name
        stem = self._stem(key_name)
        with self.lock:
            if bucket is None:
                return
            key = _current(bucket, key_name)
            if key is None:  # deleted (in a versioned bucket: its latest version is a delete marker)
                self._remove(folder, stem)
                return
            folder.mkdir(exist_ok=True)
            record = {
                "key": key_name,
                "etag": key.etag.strip('"'),
                "metadata": dict(key.metadata),
                "last_modified": key.last_modified.isoformat(),
                "storage_class": key.storage_class,
            }
            sidecar = folder / f"{stem}.json"
            previous = json.loads(sidecar.read_text()) if sidecar.is_file() else {}
            if previous.get("etag") != record["etag"] or not (folder / f"{stem}.bin").is_file():
                _write_atomic(folder / f"{stem}.bin", key.value)
            _write_atomic(sidecar, json.dumps(record).encode())

    @staticmethod
    def _remove(folder: Path, stem: str) -> None:
        for suffix in (".json", ".bin"):
            (folder / f"{stem}{suffix}").unlink(missing_ok=True)

    # -- start: load the mirror back into moto -----------------------------------------------------
    def restore(self) -> tuple[int, int]:
        """Recreate every mirrored bucket and object in moto; returns (buckets, objects)."""
        backend = self._backend()
        buckets = objects = 0
        for folder in sorted(p for p in self.data_dir.iterdir() if (p / _BUCKET_MARKER).is_file()):
            backend.create_bucket(folder.name, "us-east-1")
            buckets += 1
            for sidecar in sorted(folder.glob("*.json")):
                if sidecar.name == _BUCKET_MARKER:
                    continue
                data_file = sidecar.with_suffix(".bin")
                if not data_file.is_file():
                    continue  # a crash between the two writes of a new object: it was never acknowledged
                record = json.loads(sidecar.read_text())
                key = backend.put_object(
                    folder.name,
                    record["key"],
                    data_file.read_bytes(),
                    storage=record.get("storage_class"),
                    disable_notification=True,
                )
                key.set_metadata(dict(record["metadata"]))
                key._etag = record["etag"]  # keep multipart ETags ("md5-N"): clients pin them
                key.last_modified = datetime.datetime.fromisoformat(record["last_modified"])
                objects += 1
        return buckets, objects


def _current(bucket: Any, key_name: str) -> Any:
    """The key's current object, or None if it has none or its latest version is a delete marker."""
    key = bucket.keys.get(key_name)
    return None if key is None or not hasattr(key, "etag") else key


def _write_atomic(path: Path, data: bytes) -> None:
    temporary = path.with_name(f".{path.name}.{threading.get_ident()}.tmp")
    with open(temporary, "wb") as handle:
        handle.write(data)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(temporary, path)


def persisting_app(app: WsgiApp, mirror: DiskMirror) -> WsgiApp:
    """WSGI middleware: after a successful write, mirror what it changed before answering."""

    def wrapped(environ: dict[str, Any], start_response: Callable[..., Any]) -> Iterable[bytes]:
        method = environ.get("REQUEST_METHOD", "GET")
        path = environ.get("PATH_INFO", "")
        if method not in ("PUT", "POST", "DELETE") or path.startswith("/moto-api"):
            return app(environ, start_response)
        statuses: list[str] = []

        def capture(status: str, headers: list[tuple[str, str]], exc_info: Any = None) -> Any:
            statuses.append(status)
            return start_response(status, headers, exc_info)

        response = app(environ, capture)
        try:
            body = b"".join(response)
        finally:
            close = getattr(response, "close", None)
            if close is not None:
                close()
        if statuses and statuses[0].startswith("2"):
            _mirror_write(mirror, method, path, environ.get("QUERY_STRING", ""))
        return [body]

    return wrapped


def _mirror_write(mirror: DiskMirror, method: str, path: str, query_string: str) -> None:
    # WSGI hands PATH_INFO over percent-decoded, as latin-1 text; S3 keys are UTF-8.
    raw = path.encode("latin-1").decode("utf-8", errors="replace")
    bucket_name, _, key_name = raw.lstrip("/").partition("/")
    if not bucket_name:
        return
    query = parse_qs(query_string, keep_blank_values=True)
    if not key_name:
        mirror.sync_bucket(bucket_name)  # bucket create/delete, multi-object delete (?delete)
        return
    if "uploads" in query or ("uploadId" in query and method != "POST"):
        return  # multipart initiate, part upload, abort: no object changes until completion
    mirror.sync_key(bucket_name, key_name)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="moto S3 server whose data survives restarts")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--data-dir", type=Path, required=True)
    parser.add_argument("--certfile", type=Path, help="serve HTTPS with this PEM certificate (chain)")
    parser.add_argument("--keyfile", type=Path, help="the private key of --certfile")
    args = parser.parse_args(argv)
    if (args.certfile is None) != (args.keyfile is None):
        parser.error("--certfile and --keyfile go together")

    from moto.moto_server.werkzeug_app import (
        DomainDispatcherApplication,
        MotoRequestHandler,
        create_backend_app,
    )
    from werkzeug.serving import make_server

    logging.getLogger("werkzeug").setLevel(logging.WARNING)  # no access-log line per request
    mirror = DiskMirror(args.data_dir.resolve())
    buckets, objects = mirror.restore()
    print(f"restored {buckets} buckets and {objects} objects from {mirror.data_dir}", flush=True)
    app = persisting_app(DomainDispatcherApplication(create_backend_app), mirror)
    tls = (str(args.certfile), str(args.keyfile)) if args.certfile else None
    server = make_server(
        args.host, args.port, app, threaded=True, request_handler=MotoRequestHandler, ssl_context=tls
    )

    def stop(signum: int, _frame: FrameType | None) -> None:
        print(f"signal {signum}: stopping", flush=True)
        threading.Thread(target=server.shutdown, daemon=True).start()

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    scheme = "https" if tls else "http"
    print(f"S3 server (moto) listening on {scheme}://{args.host}:{args.port}", flush=True)
    server.serve_forever()
    return 0


if __name__ == "__main__":
    sys.exit(main())
