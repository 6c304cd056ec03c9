"""A TCP proxy for outage tests: put it between the services and a server, then cut and restore it.

``cut()`` drops every open connection and stops listening (new connections are refused), as when a
server or the network goes away; ``restore()`` listens again on the same port. ``latency_s`` (0 by
default, settable at any time) makes it a slow server instead: every request, that is each burst of
client bytes after the server has answered (or on a new connection), waits that long before it is
passed on; ``delayed`` counts them.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import ssl
import threading


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as probe:
        probe.bind((host, 0))
        return int(probe.getsockname()[1])


class TcpProxy:
    """``server_ssl`` makes it a TLS terminator: clients speak TLS to it, it speaks plain TCP onwards.
    ``accepted`` counts the client connections (TLS handshakes done, when ``server_ssl`` is set)."""

    def __init__(
        self,
        target_host: str,
        target_port: int,
        listen_host: str = "127.0.0.1",
        *,
        port: int = 0,
        server_ssl: ssl.SSLContext | None = None,
    ) -> None:
        self.target = (target_host, target_port)
        self.listen_host = listen_host
        self.server_ssl = server_ssl
        self.accepted = 0
        self.latency_s = 0.0
        self.delayed = 0
        self.port = port or free_port(listen_host)
        self._loop = asyncio.new_event_loop()
        self._server: asyncio.base_events.Server | None = None
        self._writers: set[asyncio.StreamWriter] = set()
        self._thread = threading.Thread(target=self._loop.run_forever, daemon=True)
        self._thread.start()
        self.restore()

    @property
    def endpoint(self) -> str:
        return f"{self.listen_host}:{self.port}"

    def _call(self, coro: object) -> object:
        return asyncio.run_coroutine_threadsafe(coro, self._loop).result(timeout=10)  # type: ignore[arg-type]

    async def _pipe(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, turn: dict[str, str], side: str
    ) -> None:
        """Copy one direction. ``turn["last"]`` (shared by both directions of a connection) says who sent
        last: client bytes that follow the server's answer (or open the connection) are a new request,
        delayed by ``latency_s``."""
        try:
            while data := await reader.read(65536):
                if side == "client" and turn["last"] != "client" and self.latency_s > 0:
                    self.delayed += 1
                    await asyncio.sleep(self.latency_s)
                turn["last"] = side
                writer.write(data)
                await writer.drain()
        except (ConnectionError, asyncio.CancelledError):
            pass
        finally:
            with contextlib.suppress(Exception):
                writer.close()

    async def _handle(self, client_reader: asyncio.StreamReader, client_writer: asyncio.StreamWriter) -> None:
        self.accepted += 1
        try:
            server_reader, server_writer = await asyncio.open_connection(*self.target)
        except OSError:
            client_writer.close()
            return
        self._writers |= {client_writer, server_writer}
        turn = {"last": "server"}
        await asyncio.gather(
            self._pipe(client_reader, server_writer, turn, "client"),
            self._pipe(server_reader, client_writer, turn, "server"),
        )
        self._writers -= {client_writer, server_writer}

    async def _start(self) -> None:
        self._server = await asyncio.start_server(
            self._handle, self.listen_host, self.port, reuse_address=True, ssl=self.server_ssl
        )

    async def _cut(self) -> None:
        if self._server is not None:
            self._server.close()
            self._server = None
        for writer in list(self._writers):
            with contextlib.suppress(Exception):
                writer.transport.abort()
        self._writers.clear()

    def restore(self) -> None:
        self._call(self._start())

    def cut(self) -> None:
        self._call(self._cut())

    def close(self) -> None:
        self.cut()
        self._call(asyncio.sleep(0.1))  # let the aborted connections' handlers finish before the loop stops
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(timeout=5)
