"""Fault injection for the reliability tests and ``tests/chaos.py``: what each service is doing (read
from its own ``/metrics``), and the faults production sees beyond a dead process.

- ``ServiceProbe``: a service's in-flight gauge, redelivery and produced-event counters, read live;
- ``cut_tcp``: abort one process's TCP connections to a port (``ss -K``), as when the network drops
  them, without touching anyone else's;
- ``SmallDisk``: a small tmpfs mounted over a folder (the services' slide cache), filled to a chosen
  number of free bytes and emptied again;
- ``lock_predictions``: a session holding a lock that stops the recorder inside its open transaction.

The slow object store is ``tests.tcpproxy.TcpProxy.latency_s``. Mounting and ``ss -K`` need root
(``CAP_SYS_ADMIN`` and ``CAP_NET_ADMIN``), as the tests run here.
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import subprocess
import time
import urllib.request
from collections import Counter, defaultdict
from collections.abc import Iterator
from pathlib import Path
from typing import Any

_SAMPLE = re.compile(r"^(wsi_[a-z_]+?)(?:\{[^}]*\})? ([0-9.eE+-]+|NaN)$", re.MULTILINE)
IN_FLIGHT = "wsi_in_flight_messages"
REDELIVERIES = "wsi_redeliveries_total"
PRODUCED = "wsi_events_produced_total"
TERMINAL = {"predicted", "rejected", "failed", "no_tissue"}


class ServiceProbe:
    """Reads one service's ``/metrics`` (summed over labels), following it across restarts."""

    def __init__(self, pipeline: Any, service: str) -> None:
        self.pipeline = pipeline
        self.service = service
        self._port: tuple[int, int] | None = None  # (pid, port)

    def pid(self) -> int | None:
        pid = self.pipeline.pids().get(self.service)
        return int(pid) if pid else None

    def read(self, pid: int | None = None) -> dict[str, float] | None:
        """The service's metrics now, or None while it is not serving them (starting, dead)."""
        pid = pid or self.pid()
        if pid is None:
            return None
        try:
            if self._port is None or self._port[0] != pid:
                self._port = (pid, self.pipeline.metrics_port(self.service))
            with urllib.request.urlopen(f"http://127.0.0.1:{self._port[1]}/metrics", timeout=2) as reply:
                text = reply.read().decode()
        except (OSError, AssertionError, ValueError):
            self._port = None  # a restarted process logs a new port
            return None
        sums: dict[str, float] = defaultdict(float)
        for name, value in _SAMPLE.findall(text):
            if value != "NaN":
                sums[name] += float(value)
        return dict(sums)


def socket_inodes(pid: int) -> set[int]:
    inodes = set()
    with contextlib.suppress(OSError):
        for fd in os.listdir(f"/proc/{pid}/fd"):
            with contextlib.suppress(OSError):
                target = os.readlink(f"/proc/{pid}/fd/{fd}")
                if target.startswith("socket:["):
                    inodes.add(int(target[8:-1]))
    return inodes


def cut_tcp(pid: int, remote_port: int) -> int:
    """Abort every established TCP connection of ``pid`` to ``remote_port``; returns how many."""
    inodes = socket_inodes(pid)
    local_ports = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        with contextlib.suppress(OSError), open(table) as handle:
            for line in handle.readlines()[1:]:
                fields = line.split()
                local, remote, state, inode = fields[1], fields[2], fields[3], int(fields[9])
                if inode in inodes and state == "01" and int(remote.rsplit(":", 1)[1], 16) == remote_port:
                    local_ports.add(int(local.rsplit(":", 1)[1], 16))
    for port in local_ports:
        subprocess.run(
            ["ss", "-K", "-t", "state", "established", f"( sport = :{port} and dport = :{remote_port} )"],
            check=False,
            capture_output=True,
        )
    return len(local_ports)


class SmallDisk:
    """A tmpfs of ``size_bytes`` mounted over ``folder`` (hiding what was there until ``unmount``).

    ``fill(free_bytes)`` writes a filler file until only about ``free_bytes`` remain (``free_bytes``
    grows the free space again when the filler is already larger); ``empty()`` removes it.
    """

    def __init__(self, folder: Path, size_bytes: int) -> None:
        self.folder = folder
        self.size_bytes = size_bytes
        self.filler = folder / "filler.bin"
        self.mounted = False

    def mount(self, subfolders: tuple[str, ...] = ()) -> None:
        self.folder.mkdir(parents=True, exist_ok=True)
        subprocess.run(
            ["mount", "-t", "tmpfs", "-o", f"size={self.size_bytes}", "tmpfs", str(self.folder)],
            check=True,
            capture_output=True,
        )
        self.mounted = True
        for name in subfolders:  # the folders the services created at start, now hidden by the mount
            (self.folder / name).mkdir(parents=True, exist_ok=True)

    def free_bytes(self) -> int:
        return shutil.disk_usage(self.folder).free

    def fill(self, free_bytes: int) -> None:
        current = self.filler.stat().st_size if self.filler.exists() else 0
        target = max(current + self.free_bytes() - free_bytes, 0)
        if target < current:
            os.truncate(self.filler, target)
            return
        chunk = b"\xa5" * 65536
        # ENOSPC: it is full, which is the point
        with open(self.filler, "ab") as handle, contextlib.suppress(OSError):
            while handle.tell() < target:
                handle.write(chunk[: min(len(chunk), target - handle.tell())])
                handle.flush()

    def empty(self) -> None:
        self.filler.unlink(missing_ok=True)

    def unmount(self) -> None:
        if self.mounted:
            # Lazy: a service may still hold a file open in it; the folder underneath is back at once.
            subprocess.run(["umount", "-l", str(self.folder)], check=False, capture_output=True)
            self.mounted = False


@contextlib.contextmanager
def small_disk(folder: Path, size_bytes: int, subfolders: tuple[str, ...] = ()) -> Iterator[SmallDisk]:
    disk = SmallDisk(folder, size_bytes)
    disk.mount(subfolders)
    try:
        yield disk
    finally:
        disk.unmount()


@contextlib.contextmanager
def lock_predictions(database_url: str) -> Iterator[Any]:
    """Hold a lock on ``predictions`` that lets readers through but stops writers: the recorder then
    waits inside its open transaction (its audit rows already written) until the lock goes."""
    import psycopg

    conn = psycopg.connect(database_url, options="-c search_path=wsi,public")
    try:
        conn.execute("LOCK TABLE predictions IN EXCLUSIVE MODE")
        yield conn
    finally:
        with contextlib.suppress(psycopg.Error):  # closing a connection the test may have broken
            conn.close()


def recorder_waiting_in_transaction(pipeline: Any) -> bool:
    """True while a session of the services' role waits on a lock inside a transaction that has
    already written (it holds a transaction id): the recorder, stopped mid-batch."""
    rows = pipeline.query(
        "SELECT count(*) FROM pg_stat_activity WHERE wait_event_type = 'Lock' "
        "AND backend_xid IS NOT NULL AND query ILIKE '%%INSERT INTO predictions%%'"
    )
    return bool(rows[0][0])


def wait_until(predicate: Any, timeout_s: float, step_s: float = 0.2) -> bool:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(step_s)
    return False


# -- the faults as scenarios: short forms in tests/e2e/test_faults.py, long forms by python -m tests.chaos --fault


def _finish(pipeline: Any, keys: list[str], timeout_s: float, what: str) -> None:
    from tests.chaos import _all_terminal

    pipeline.wait_for(lambda: _all_terminal(pipeline, keys), timeout_s, f"every slide to finish {what}")


def _log_count(pipeline: Any, service: str, needle: str) -> int:
    path = pipeline.home / "logs" / f"{service}.log"
    return path.read_text(errors="replace").count(needle) if path.exists() else 0


def _report_for(
    pipeline: Any, keys: list[str], started: float, sampler: Any, extra: list[tuple[str, str]]
) -> Any:
    from tests.chaos import SERVICES, RedeliveryTally, _report, settled_in_flight

    tally = RedeliveryTally()
    left = settled_in_flight({s: ServiceProbe(pipeline, s) for s in SERVICES}, tally)
    sampler.stop()
    report = _report(pipeline, keys, Counter(), dict(sampler.peak), time.monotonic() - started)
    report.runtime_redeliveries = tally.totals()
    report.left_in_flight = left
    report.extra = extra
    return report


def slow_object_store(
    pipeline: Any, slides: list[Path], *, latency_s: float, seconds: float, timeout_s: float = 600
) -> Any:
    """Every S3 request through the services' proxy waits ``latency_s`` for ``seconds``, slides in flight."""
    from tests.chaos import MemorySampler, upload_all

    proxy = pipeline.s3_proxy
    started = time.monotonic()
    sampler = MemorySampler(pipeline)
    sampler.start()
    keys = upload_all(pipeline, slides, f"fault-slow-s3-{int(time.time())}")
    delayed_before = proxy.delayed
    proxy.latency_s = latency_s
    try:
        time.sleep(seconds)
    finally:
        proxy.latency_s = 0.0
    delayed = proxy.delayed - delayed_before
    done_in_window = sum(1 for v in pipeline.statuses(keys).values() if v in TERMINAL)
    _finish(pipeline, keys, timeout_s, "after the slow object store")
    return _report_for(
        pipeline,
        keys,
        started,
        sampler,
        [
            ("S3 requests delayed", f"{delayed} by {latency_s:g} s each, for {seconds:g} s"),
            ("slides finished while slow", str(done_in_window)),
        ],
    )


def full_cache_disk(pipeline: Any, slides: list[Path], *, hold_s: float = 8, timeout_s: float = 600) -> Any:
    """The slide cache (ingest's and the tiler's) on a small tmpfs: full at upload, then with room for
    ingest's copy only, then free again. Returns the report; ``extra`` says what each service did."""
    from tests.chaos import MemorySampler, upload_all

    needle = "local disk full"
    size = max(p.stat().st_size for p in slides)
    cache = Path(pipeline.env["WSI_CACHE_DIR"])
    started = time.monotonic()
    sampler = MemorySampler(pipeline)
    sampler.start()
    waited = {"ingest": 0, "tiler": 0}
    unready = {"ingest": False, "tiler": False}
    before = {s: _log_count(pipeline, s, needle) for s in waited}
    with small_disk(cache, 4 * size * len(slides) + 8 * 2**20, ("ingest", "tiler")) as disk:
        disk.fill(free_bytes=64 * 1024)
        keys = upload_all(pipeline, slides, f"fault-disk-{int(time.time())}")
        for service, room in (("ingest", sum(p.stat().st_size for p in slides) + 256 * 1024), ("tiler", 0)):
            wait_until(lambda s=service: _log_count(pipeline, s, needle) > before[s], 120)
            waited[service] = _log_count(pipeline, service, needle) - before[service]
            unready[service] = not pipeline.ready(service)
            time.sleep(hold_s)  # it keeps waiting: nothing is dead-lettered meanwhile
            if room:
                disk.fill(free_bytes=room)  # room for ingest's copies only: the tiler's copy is next
        disk.empty()
        _finish(pipeline, keys, timeout_s, "after the disk had room again")
    ready_after = all(pipeline.ready(s) for s in waited)
    return _report_for(
        pipeline,
        keys,
        started,
        sampler,
        [
            (f"waits logged ({needle!r})", ", ".join(f"{s} {n}" for s, n in waited.items())),
            ("not ready while full", ", ".join(f"{s} {v}" for s, v in unready.items())),
            ("ready once space returned", str(ready_after)),
        ],
    )


def broker_cut_mid_produce(
    pipeline: Any, slides: list[Path], *, cuts: int = 3, timeout_s: float = 600
) -> Any:
    """Abort the tiler's broker connections while it is producing a slide's shard events."""
    from tests.chaos import MemorySampler, upload_all

    broker_port = int(pipeline.env["WSI_KAFKA_BOOTSTRAP"].split(",")[0].rsplit(":", 1)[1])
    probe = ServiceProbe(pipeline, "tiler")
    started = time.monotonic()
    sampler = MemorySampler(pipeline)
    sampler.start()
    keys = upload_all(pipeline, slides, f"fault-broker-cut-{int(time.time())}")
    landed = 0
    connections = 0
    deadline = time.monotonic() + timeout_s
    produced_at_start: float | None = None
    from tests.chaos import _all_terminal

    while landed < cuts and time.monotonic() < deadline and not _all_terminal(pipeline, keys):
        pid = probe.pid()
        metrics = probe.read(pid) if pid else None
        if not pid or metrics is None:
            time.sleep(0.3)
            continue
        if metrics.get(IN_FLIGHT, 0) <= 0:
            produced_at_start = None
            time.sleep(0.05)
            continue
        produced = metrics.get(PRODUCED, 0.0)
        if produced_at_start is None:
            produced_at_start = produced  # a slide in hand: wait for its first outputs to go out
        elif produced > produced_at_start:  # outputs of this slide are going out: cut now
            cut = cut_tcp(pid, broker_port)
            if cut:
                landed += 1
                connections += cut
                produced_at_start = None
                time.sleep(1.5)  # let it reconnect and resume producing before the next cut
                continue
        time.sleep(0.05)
    _finish(pipeline, keys, timeout_s, "after the broker connections were cut")
    report = _report_for(
        pipeline,
        keys,
        started,
        sampler,
        [("cuts mid-produce (tiler)", f"{landed} ({connections} connections aborted)")],
    )
    report.extra.append(("shard events recorded", str(_shards_recorded(pipeline, keys))))
    return report


def _shards_recorded(pipeline: Any, keys: list[str]) -> str:
    """Shards planned against shard events the recorder saw, and how often it saw them delivered."""
    ids = [
        sid
        for (sid,) in pipeline.query("SELECT slide_id FROM slide_sources WHERE upload_key = ANY(%s)", (keys,))
    ]
    planned = pipeline.query(
        "SELECT coalesce(sum(shards_planned), 0) FROM slides WHERE slide_id = ANY(%s)", (ids,)
    )[0][0]
    shards = pipeline.query(
        "SELECT count(*) FROM stage_progress WHERE slide_id = ANY(%s) AND stage = 'tiler'", (ids,)
    )[0][0]
    deliveries = pipeline.query(
        "SELECT coalesce(sum(deliveries), 0) FROM audit_log WHERE slide_id = ANY(%s) "
        "AND event_type = 'TileShard'",
        (ids,),
    )[0][0]
    return f"{shards} of {planned} planned, delivered to the recorder {deliveries} times"


def database_restart_mid_transaction(pipeline: Any, slides: list[Path], *, timeout_s: float = 600) -> Any:
    """Restart PostgreSQL while the recorder is inside a transaction that has written rows."""
    from wsitk.shared.stack import start_component, stop_component

    from tests.chaos import MemorySampler, upload_all

    started = time.monotonic()
    sampler = MemorySampler(pipeline)
    sampler.start()
    state_dir = pipeline.stack.state_dir
    with lock_predictions(pipeline.stack.database_url()):
        keys = upload_all(pipeline, slides, f"fault-db-restart-{int(time.time())}")
        caught = wait_until(lambda: recorder_waiting_in_transaction(pipeline), timeout_s, 0.5)
        stop_component(state_dir, "postgres")
    start_component(state_dir, "postgres")
    restarted_at = time.monotonic()
    _finish(pipeline, keys, timeout_s, "after the database restart")
    pipeline.wait_for(lambda: pipeline.ready("recorder"), 60, "the recorder to report ready")
    return _report_for(
        pipeline,
        keys,
        started,
        sampler,
        [
            ("recorder transaction open at the restart", "yes" if caught else "NO (missed)"),
            ("slides finished after the restart", f"in {time.monotonic() - restarted_at:.0f} s"),
        ],
    )
