"""Run risky decoding where a crash or an out-of-memory kill cannot take the service down.

Slide decoders are C code reading untrusted files: a malformed slide can segfault or allocate
without bound. Such work runs in a child process with an address-space limit and a timeout. If the
child dies, the caller gets a ``PermanentError`` naming what happened (and the runtime's durable
attempt count recognises the slide as poison after a restart, too); the next call gets a fresh
child.
"""

from __future__ import annotations

import ctypes
import importlib
import multiprocessing
import os
import resource
import signal
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures import TimeoutError as FutureTimeout
from concurrent.futures.process import BrokenProcessPool
from typing import Any, TypeVar

from wsitk.shared.errors import PermanentError
from wsitk.shared.logging import get_logger

T = TypeVar("T")
log = get_logger()


PR_SET_PDEATHSIG = 1


def _init_child(max_bytes: int, parent_pid: int | None = None, preload: tuple[str, ...] = ()) -> None:
    """In the child: die with the parent (a SIGKILLed service must not leave decoders behind), cap memory,
    import ``preload`` (the modules of the work it will run: a fresh child does that before its first task).

    ``parent_pid`` is the service's pid as the parent saw it. The parent died before prctl took
    effect if the child now has another parent; "the parent is pid 1" would be wrong in a container,
    where the service itself is pid 1.
    """
    try:
        libc = ctypes.CDLL("libc.so.6", use_errno=True)
        libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
        if os.getppid() != (parent_pid if parent_pid is not None else os.getppid()) or os.getppid() == 0:
            os._exit(1)
    except OSError:  # not Linux/glibc: the pool's own shutdown still reaps children on a clean exit
        pass
    if max_bytes > 0:
        resource.setrlimit(resource.RLIMIT_AS, (max_bytes, max_bytes))
    from wsitk.shared.heap import configure  # the decoder frees large tile buffers all day

    configure()  # its work releases free memory as it goes (services/tiler/handler.py, per shard)
    for name in preload:
        importlib.import_module(name)


def _ready() -> bool:
    return True


class IsolatedRunner:
    """A single-worker process pool that is replaced whenever its worker dies or hangs.

    ``preload``: modules each new worker imports as it starts (those of the functions it will run), so
    that ``start`` can have the first one ready, decoders loaded, before the first slide arrives: a cold
    worker costs the first slide about half a second of CPU (interpreter, numpy, OpenSlide, the tiling
    code), on the cores the other stages need (docs/throughput.md). The worker dies with the thread that
    started it (``PR_SET_PDEATHSIG``): call ``start`` and ``run`` from one long-lived thread.
    """

    def __init__(
        self,
        memory_limit_bytes: int,
        timeout_s: float,
        max_tasks_per_child: int = 25,
        preload: tuple[str, ...] = (),
    ) -> None:
        self.memory_limit_bytes = memory_limit_bytes
        self.timeout_s = timeout_s
        self.max_tasks_per_child = max_tasks_per_child
        self.preload = preload
        self._pool: ProcessPoolExecutor | None = None
        self._lock = threading.Lock()

    def _get_pool(self) -> ProcessPoolExecutor:
        if self._pool is None:
            self._pool = ProcessPoolExecutor(
                max_workers=1,
                mp_context=multiprocessing.get_context("spawn"),
                initializer=_init_child,
                initargs=(self.memory_limit_bytes, os.getpid(), self.preload),
                max_tasks_per_child=self.max_tasks_per_child,
            )
        return self._pool

    def _discard_pool(self) -> None:
        pool, self._pool = self._pool, None
        if pool is not None:
            for process in list(getattr(pool, "_processes", {}).values()):
                if process.is_alive():
                    process.kill()
            pool.shutdown(wait=False, cancel_futures=True)

    def start(self) -> None:
        """Start the worker now (importing ``preload``) and wait until it is ready, instead of on the first
        ``run``. A worker that cannot start is left for ``run`` to report."""
        self.run("starting the decoder process", _ready)

    def run(self, what: str, fn: Callable[..., T], *args: Any) -> T:
        with self._lock:
            future = self._get_pool().submit(fn, *args)
            try:
                return future.result(timeout=self.timeout_s)
            except BrokenProcessPool as exc:
                self._discard_pool()
                raise PermanentError(
                    "decoder-crashed",
                    f"{what}: the decoding process died, from a crash or an allocation past the decoder's limit "
                    f"of {self._limit_text()}; the file is probably corrupt or malicious, or needs a higher limit",
                ) from exc
            except FutureTimeout as exc:
                self._discard_pool()
                raise PermanentError(
                    "decode-timeout", f"{what}: decoding took longer than {self.timeout_s:.0f} s"
                ) from exc
            except MemoryError as exc:
                self._discard_pool()
                raise PermanentError(
                    "out-of-memory",
                    f"{what}: decoding needed more memory than the decoder's limit of {self._limit_text()}; "
                    "the file is a decompression bomb, or a genuine slide that needs a higher limit",
                ) from exc

    def _limit_text(self) -> str:
        if self.memory_limit_bytes <= 0:
            return "none (WSI_ISOLATION_MEMORY_BYTES is 0)"
        return f"{self.memory_limit_bytes // 2**20} MiB (WSI_ISOLATION_MEMORY_BYTES)"

    def close(self) -> None:
        with self._lock:
            self._discard_pool()


def warm_up_decoder(steps: Sequence[Callable[[], object]], first_work: str) -> None:
    """A service's start-up (``ServiceSpec.on_start``): run ``steps`` (making the object store's client,
    ``IsolatedRunner.start`` on the thread that keeps the decoder), so that the first ``first_work``
    ("slide", "upload") pays for none of them. Best effort: what fails here fails again, classified, on
    that first piece of work, so it is logged and start-up goes on."""
    started = time.perf_counter()
    try:
        for step in steps:
            step()
    except Exception as exc:  # noqa: BLE001 - see the docstring
        log.warning("warm-up failed; the decoder starts with the first work", work=first_work, error=f"{exc}")
        return
    log.info("decoder process ready", seconds=round(time.perf_counter() - started, 2))
