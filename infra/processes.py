"""What the local services (SeaweedFS, a Ray head) share: free loopback ports, starting again one that gave
up, stopping a process group, and use as a context manager so that nothing is left running."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
from collections.abc import Callable
from typing import TypeVar

# a service's process can give up at startup for a reason the next start need not meet: a free port taken
# by another process before the service bound it, a node the GCS did not register in time on a loaded
# machine ("The current node timed out during startup"); such a service is started again
STARTS = 3
T = TypeVar("T")


class GaveUp(RuntimeError):
    """A service's process exited while it started, for a reason another start may not meet."""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def started(start: Callable[[], T], may_retry: Callable[[], bool] = lambda: True) -> T:
    """`start()`, called again when it raises GaveUp, up to STARTS times while `may_retry()`; what it
    raises last carries the earlier starts' reasons as notes."""
    earlier: list[str] = []
    while True:
        try:
            return start()
        except BaseException as err:
            if isinstance(err, GaveUp) and len(earlier) + 1 < STARTS and may_retry():
                earlier.append(str(err))
                continue
            for reason in earlier:
                err.add_note(f"an earlier start: {reason}")
            raise


def stop_group(process: subprocess.Popen | None, first: signal.Signals, timeout: float) -> None:
    """Signal the process's group with `first`, then SIGKILL if it has not exited after `timeout` s."""
    if process is None or exited(process):
        return
    os.killpg(process.pid, first)
    try:
        process.wait(timeout)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        process.wait()


def exited(process: subprocess.Popen) -> bool:
    """Whether the group leader `process` has exited. Found exited here, before it is reaped, what it
    left in its process group is SIGKILLed first: until then its pid, and so the group's id, can be no
    other process's (found reaped earlier, by a `poll`, nothing is signalled)."""
    if process.returncode is not None:
        return True
    if os.waitid(os.P_PID, process.pid, os.WEXITED | os.WNOHANG | os.WNOWAIT) is None:
        return False
    with contextlib.suppress(ProcessLookupError):
        os.killpg(process.pid, signal.SIGKILL)
    process.poll()
    return True


def descendants(pid: int) -> list[int]:
    """`pid` and every process started under it, at any depth (by parent pid, so that children which
    moved to sessions of their own, as Ray's workers do, are found too)."""
    children: dict[int, list[int]] = {}
    table = subprocess.run(["ps", "-eo", "pid=,ppid="], capture_output=True, text=True).stdout
    for line in table.splitlines():
        child, parent = map(int, line.split())
        children.setdefault(parent, []).append(child)
    found, todo = [], [pid]
    while todo:
        pid = todo.pop()
        found.append(pid)
        todo += children.get(pid, [])
    return found


class Service:
    """A local service: launched, waited for until it serves, stopped again (also when it never became
    ready); usable as a context manager."""

    def _launch(self) -> None:
        raise NotImplementedError

    def _wait_ready(self) -> None:
        raise NotImplementedError

    def stop(self) -> None:
        raise NotImplementedError

    def start(self):
        self._launch()
        try:
            self._wait_ready()
        except BaseException:
            self.stop()
            raise
        return self

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()
