"""The fault tools themselves, without the stack: the chaos harness's kill plan, the proxy's latency
mode, cutting one process's connections, and the small disk that fills to a chosen free size."""

from __future__ import annotations

import contextlib
import os
import socket
import threading
import time
from pathlib import Path

import pytest

from tests.chaos import SERVICES, kill_plan
from tests.faults import SmallDisk, cut_tcp
from tests.tcpproxy import TcpProxy


def echo_server() -> tuple[socket.socket, int]:
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen()

    def serve() -> None:
        while True:
            try:
                conn, _ = server.accept()
            except OSError:
                return

            def echo(c: socket.socket = conn) -> None:
                with c, contextlib.suppress(OSError):  # a cut connection ends the echo
                    while data := c.recv(4096):
                        c.sendall(data)

            threading.Thread(target=echo, daemon=True).start()

    threading.Thread(target=serve, daemon=True).start()
    return server, int(server.getsockname()[1])


def round_trip(sock: socket.socket, payload: bytes) -> float:
    started = time.monotonic()
    sock.sendall(payload)
    received = b""
    while len(received) < len(payload):
        received += sock.recv(4096)
    assert received == payload
    return time.monotonic() - started


def test_proxy_latency_delays_each_request_once() -> None:
    server, port = echo_server()
    proxy = TcpProxy("127.0.0.1", port)
    try:
        with socket.create_connection(("127.0.0.1", proxy.port)) as sock:
            assert round_trip(sock, b"fast") < 0.2
            proxy.latency_s = 0.4
            slow = [round_trip(sock, f"request {i}".encode()) for i in range(3)]
            assert all(t >= 0.4 for t in slow), slow
            assert proxy.delayed == 3
            proxy.latency_s = 0.0
            assert round_trip(sock, b"fast again") < 0.2
    finally:
        proxy.close()
        server.close()


@pytest.mark.skipif(os.geteuid() != 0, reason="ss -K needs CAP_NET_ADMIN")
def test_cut_tcp_aborts_only_this_process_connections_to_the_port() -> None:
    server, port = echo_server()
    _other, other_port = echo_server()
    try:
        with (
            socket.create_connection(("127.0.0.1", port)) as cut_sock,
            socket.create_connection(("127.0.0.1", other_port)) as kept,
        ):
            round_trip(cut_sock, b"up")
            assert cut_tcp(os.getpid(), port) == 1
            with pytest.raises(OSError):
                round_trip(cut_sock, b"after the cut")
            assert round_trip(kept, b"still up") < 1
    finally:
        server.close()
        _other.close()


@pytest.mark.skipif(os.geteuid() != 0, reason="mounting a tmpfs needs CAP_SYS_ADMIN")
def test_small_disk_fills_to_the_free_space_asked_and_hides_nothing_after(tmp_path: Path) -> None:
    folder = tmp_path / "cache"
    folder.mkdir()
    (folder / "underneath").write_text("kept")
    disk = SmallDisk(folder, 8 * 2**20)
    disk.mount(("ingest",))
    try:
        assert (folder / "ingest").is_dir() and not (folder / "underneath").exists()
        disk.fill(free_bytes=256 * 1024)
        assert abs(disk.free_bytes() - 256 * 1024) <= 64 * 1024
        with pytest.raises(OSError), open(folder / "ingest" / "big", "wb") as handle:
            handle.write(b"x" * 2**20)
            handle.flush()
        disk.fill(free_bytes=4 * 2**20)
        assert disk.free_bytes() >= 4 * 2**20 - 64 * 1024
    finally:
        disk.unmount()
    assert (folder / "underneath").read_text() == "kept"


def test_the_kill_plan_goes_down_the_pipeline_and_mixes_the_moments() -> None:
    plan = kill_plan(12)
    assert [[s for s, _ in round_] for round_ in plan] == [list(SERVICES), list(SERVICES)]
    moments = [m for round_ in plan for _, m in round_]
    assert moments.count("before-commit") == 3
    assert ("mil-scorer", "before-commit") not in [k for round_ in plan for k in round_]
