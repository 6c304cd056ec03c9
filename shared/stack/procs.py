"""Detached server processes: start, find again from pid files, check, and stop.

The local stack's servers must outlive the command that started them (``wsi stack up`` returns
while the broker keeps running), so each one runs in its own session with its output in a log file,
and its pid is written to a file. A later command finds it through that file, and checks the
process's command line as well, so a recycled pid of an unrelated process is never taken for (or
killed as) a stack server.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

# Popen objects of the processes this Python process started: kept so that they can be reaped
# (a dead child that is never waited for stays a zombie and still answers ``kill(pid, 0)``).
_CHILDREN: dict[int, subprocess.Popen[bytes]] = {}


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port that is free on ``host`` right now (the OS picks it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind((host, 0))
        return int(probe.getsockname()[1])


def port_is_free(host: str, port: int) -> bool:
    """Whether a server could listen on ``host:port`` now.

    SO_REUSEADDR as the servers set it: connections of a stopped server linger in TIME_WAIT on its
    port, which blocks a plain bind but not the restarted server.
    """
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind((host, port))
        except OSError:
            return False
        return True


def tcp_accepts(host: str, port: int, timeout_s: float = 0.5) -> bool:
    try:
        with socket.create_connection((host, port), timeout=timeout_s):
            return True
    except OSError:
        return False


def identity(user: str | None) -> dict[str, Any]:
    """``subprocess`` arguments that run a child as ``user`` with that user's group and no others.

    Switching only the uid would keep root's group 0, and a folder of mode 0701 owned by root:root
    then denies the child entry (group bits win over the "other" bits that were meant for it).
    """
    if user is None:
        return {}
    import pwd

    entry = pwd.getpwnam(user)
    return {"user": entry.pw_uid, "group": entry.pw_gid, "extra_groups": []}


def spawn_detached(
    command: Sequence[str],
    *,
    log_path: Path,
    pid_path: Path,
    env: Mapping[str, str] | None = None,
    user: str | None = None,
    cwd: Path | None = None,
) -> int:
    """Start ``command`` in a new session, output appended to ``log_path``; write its pid file.

    A new session keeps the server alive when the starting terminal or test process ends, and keeps
    terminal signals (Ctrl-C in ``wsi stack up``'s shell) away from it.
    """
    log_path.parent.mkdir(parents=True, exist_ok=True)
    pid_path.parent.mkdir(parents=True, exist_ok=True)
    with open(log_path, "ab") as log:
        log.write(f"\n--- {time.strftime('%Y-%m-%d %H:%M:%S')} starting: {' '.join(command)}\n".encode())
        log.flush()
        process = subprocess.Popen(
            list(command),
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            env=dict(env) if env is not None else None,
            cwd=cwd,
            start_new_session=True,
            close_fds=True,
            **identity(user),
        )
    _CHILDREN[process.pid] = process
    pid_path.write_text(f"{process.pid}\n")
    return process.pid


def read_pid(pid_path: Path) -> int | None:
    try:
        return int(pid_path.read_text().strip())
    except (OSError, ValueError):
        return None


def _reap(pid: int) -> bool:
    """True if ``pid`` was a child of ours that has exited (and is now reaped)."""
    child = _CHILDREN.get(pid)
    if child is not None:
        if child.poll() is None:
            return False
        del _CHILDREN[pid]
        return True
    try:
        reaped_pid, _ = os.waitpid(pid, os.WNOHANG)
    except ChildProcessError:
        return False
    return reaped_pid == pid


def pid_alive(pid: int) -> bool:
    """Whether ``pid`` is a running process (a zombie counts as dead)."""
    if pid <= 0 or _reap(pid):
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return True  # no procfs (macOS): kill(pid, 0) is the best answer available
    state = stat.rsplit(")", 1)[-1].split()[0]
    return state not in ("Z", "X")


def command_line(pid: int) -> str:
    """The process's command line joined by spaces, or "" where it cannot be read."""
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        try:
            out = subprocess.run(["ps", "-o", "command=", "-p", str(pid)], capture_output=True, check=False)
        except OSError:
            return ""
        return out.stdout.decode(errors="replace").strip()


def running_pid(pid_path: Path, marker: str) -> int | None:
    """The pid from ``pid_path`` if that process is alive and its command line contains ``marker``."""
    pid = read_pid(pid_path)
    if pid is None or not pid_alive(pid):
        return None
    if marker not in command_line(pid):
        return None  # the pid was recycled by an unrelated process
    return pid


def wait_until_dead(pid: int, timeout_s: float) -> bool:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if not pid_alive(pid):
            return True
        time.sleep(0.05)
    return not pid_alive(pid)


def terminate(pid: int, *, timeout_s: float = 10.0, first_signal: int = signal.SIGTERM) -> None:
    """Send ``first_signal`` to the process (group), wait up to ``timeout_s``, then SIGKILL it.

    Stack servers lead their own session, so signalling the group also ends helpers they started;
    members left behind by a leader that exited are killed too.
    """
    if not pid_alive(pid):
        return
    try:
        leads_group = os.getpgid(pid) == pid
    except ProcessLookupError:
        return
    _send(pid, first_signal, group=leads_group)
    if not wait_until_dead(pid, timeout_s):
        _send(pid, signal.SIGKILL, group=leads_group)
        if not wait_until_dead(pid, 5.0):
            raise RuntimeError(f"process {pid} survived SIGKILL; check `ps -p {pid}` and end it by hand")
    if leads_group:
        _send(pid, signal.SIGKILL, group=True)  # a group id stays reserved while members remain


def _send(pid: int, sig: int, *, group: bool) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        if group:
            os.killpg(pid, sig)
        else:
            os.kill(pid, sig)


def log_tail(log_path: Path, lines: int = 30) -> str:
    try:
        text = log_path.read_text(errors="replace")
    except OSError:
        return f"(no log at {log_path})"
    return "\n".join(text.splitlines()[-lines:])


class ServerExited(RuntimeError):
    """The server process ended while we waited for it to become ready."""


def wait_ready(
    what: str,
    check: Callable[[], bool],
    *,
    pid: int,
    log_path: Path,
    timeout_s: float,
    interval_s: float = 0.25,
) -> None:
    """Poll ``check`` until it returns True; fail early if the process died, or at the timeout.

    The error carries the log's tail, because the reason a server did not come up (a port in use, a
    data directory owned by another user) is almost always written there.
    """
    deadline = time.monotonic() + timeout_s
    last_error = ""
    while True:
        if not pid_alive(pid):
            raise ServerExited(
                f"{what} (pid {pid}) exited while starting; its log {log_path} ends with:\n"
                f"{log_tail(log_path)}"
            )
        try:
            if check():
                return
        except Exception as error:  # noqa: BLE001 - the readiness probe's own failure: retried until the deadline
            last_error = f"{type(error).__name__}: {error}"
        if time.monotonic() > deadline:
            raise TimeoutError(
                f"{what} (pid {pid}) was not ready after {timeout_s:.0f} s (last probe error: "
                f"{last_error or 'none'}); its log {log_path} ends with:\n{log_tail(log_path)}"
            )
        time.sleep(interval_s)
