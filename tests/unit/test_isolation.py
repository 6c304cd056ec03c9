"""Risky decoding in a child process: a crash or an out-of-memory is a readable error, not a dead
service, and a killed service leaves no decoder process behind."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time

import pytest
from wsitk.shared.errors import PermanentError
from wsitk.shared.isolation import IsolatedRunner, warm_up_decoder


def _crash() -> None:
    os.kill(os.getpid(), signal.SIGSEGV)


def _allocate(gigabytes: int) -> int:
    return len(bytearray(gigabytes * 1024**3))


def _child_pid() -> int:
    return os.getpid()


def test_a_crashing_decoder_is_a_permanent_error_and_the_next_call_works() -> None:
    runner = IsolatedRunner(memory_limit_bytes=1024**3, timeout_s=30)
    try:
        with pytest.raises(PermanentError) as caught:
            runner.run("decoding bad.svs", _crash)
        assert caught.value.code == "decoder-crashed" and "bad.svs" in caught.value.reason
        assert runner.run("decoding good.svs", _child_pid) != os.getpid()
    finally:
        runner.close()


def _loaded(module: str) -> tuple[int, bool]:
    return os.getpid(), module in sys.modules


def test_start_readies_the_decoder_with_its_modules_before_the_first_call() -> None:
    """``start`` spawns the worker and imports ``preload`` in it; the first ``run`` uses that worker."""
    runner = IsolatedRunner(memory_limit_bytes=0, timeout_s=60, preload=("wsitk.shared.slides.fastread",))
    cold = IsolatedRunner(memory_limit_bytes=0, timeout_s=60)
    try:
        runner.start()
        worker = next(iter(runner._pool._processes.values()))
        assert worker.is_alive()
        pid, loaded = runner.run("checking", _loaded, "wsitk.shared.slides.fastread")
        assert pid == worker.pid and loaded
        assert cold.run("checking", _loaded, "wsitk.shared.slides.fastread")[1] is False
    finally:
        runner.close()
        cold.close()


def test_a_failed_warm_up_is_logged_and_start_up_goes_on() -> None:
    """The services' start-up steps run in order; one that fails stops the rest but not the service."""
    ran: list[str] = []

    def broken() -> None:
        ran.append("broken")
        raise ConnectionRefusedError("object store not there yet")

    warm_up_decoder([lambda: ran.append("store"), broken, lambda: ran.append("decoder")], "slide")
    assert ran == ["store", "broken"]
    warm_up_decoder([lambda: ran.append("store"), lambda: ran.append("decoder")], "slide")
    assert ran[-2:] == ["store", "decoder"]


def test_an_allocation_beyond_the_limit_is_refused_not_fatal() -> None:
    runner = IsolatedRunner(memory_limit_bytes=512 * 1024**2, timeout_s=30)
    try:
        with pytest.raises(PermanentError) as caught:
            runner.run("decoding bomb.tiff", _allocate, 2)
        assert caught.value.code in {"out-of-memory", "decoder-crashed"}
    finally:
        runner.close()


def test_decoder_children_die_with_a_killed_parent() -> None:
    script = textwrap.dedent(
        """
        import os, sys, time
        from wsitk.shared.isolation import IsolatedRunner
        runner = IsolatedRunner(memory_limit_bytes=0, timeout_s=30)
        print(runner.run("probe", os.getpid), flush=True)
        time.sleep(60)
        """
    )
    parent = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
    try:
        child = int(parent.stdout.readline())  # type: ignore[union-attr]
        os.kill(child, 0)  # alive while the parent lives
        parent.send_signal(signal.SIGKILL)
        parent.wait(timeout=10)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            try:
                os.kill(child, 0)
            except ProcessLookupError:
                return
            time.sleep(0.2)
        pytest.fail(f"decoder process {child} outlived its SIGKILLed parent")
    finally:
        if parent.poll() is None:
            parent.kill()
