"""A local Ray head whose `ray start` gives up at startup (as a loaded machine's has: "The current node
timed out during startup") is started again, STARTS times in all, and what it left running is stopped."""

import os
import signal
import subprocess
import time

import pytest

from dinat_batch.infra import local_ray
from dinat_batch.infra.local_ray import LocalRayHead, NodeExited
from dinat_batch.infra.processes import STARTS

pytestmark = pytest.mark.standalone


def running(pid: int) -> bool:
    state = subprocess.run(["ps", "-o", "stat=", "-p", str(pid)], capture_output=True, text=True).stdout
    return state.strip() not in ("", "Z")


def test_a_head_that_gives_up_is_started_again_and_leaves_nothing(monkeypatch, tmp_path):
    launched = []

    def gives_up(args, env):
        # like `ray start`: a process group of its own, a child that outlives it, its reason on stderr
        child = tmp_path / f"child-{len(launched)}"
        launched.append(child)
        script = f"sleep 300 </dev/null >/dev/null 2>&1 & echo $! > {child}; echo node timed out during startup >&2; exit 1"
        return subprocess.Popen(["sh", "-c", script], stderr=subprocess.PIPE, start_new_session=True)

    monkeypatch.setattr(local_ray, "ray_start", gives_up)
    with pytest.raises(
        NodeExited, match=r"the head: ray start exited with 1: .*node timed out during startup"
    ):
        LocalRayHead(startup_timeout=60).start()
    assert len(launched) == STARTS
    children = [int(child.read_text()) for child in launched]
    deadline = time.monotonic() + 60
    try:
        while any(map(running, children)):  # each attempt's child is stopped with its group
            assert time.monotonic() < deadline, [pid for pid in children if running(pid)]
            time.sleep(0.1)
    finally:
        for pid in filter(running, children):
            os.kill(pid, signal.SIGKILL)
