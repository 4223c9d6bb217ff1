"""A Ray head with its job server on loopback, for trying `dinat-batch submit` on one machine and for the
tests: `ray start --head --block` on free ports with its own temp dir and token authentication, stopped
by signalling its process group (never `ray stop`, which would stop every Ray on the machine). Clients
need `env` (the token is generated per head), e.g. `env RAY_AUTH_MODE=token RAY_AUTH_TOKEN=... dinat-batch`.

    with LocalRayHead(num_cpus=4) as head:
        head.address          # http://127.0.0.1:PORT, for --address or RAY_ADDRESS
        head.env              # RAY_AUTH_MODE and RAY_AUTH_TOKEN a client needs
"""

from __future__ import annotations

import http.client
import json
import os
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path

from dinat_batch.infra.processes import GaveUp, Service, exited, free_port, started, stop_group


class NodeExited(GaveUp):
    """A node's `ray start --block` exited: at startup (`ray start` gives up on its node when the GCS has
    not registered it within 30 s, which a loaded machine has taken; the node is started again, see
    `started`), or later because one of its processes died."""


def node_ports() -> tuple[list[str], int]:
    """`ray start` flags giving a node's own services free ports (several nodes share one machine), and
    its node manager's port, by which the head's dashboard names the node."""
    flags = ("dashboard-agent-listen-port", "dashboard-agent-grpc-port", "metrics-export-port")
    flags += ("runtime-env-agent-port", "object-manager-port")
    manager = free_port()
    return [f"--{flag}={free_port()}" for flag in flags] + [f"--node-manager-port={manager}"], manager


def ray_start(args: list[str], env: dict[str, str]) -> subprocess.Popen:
    """`ray start ARGS` in its own process group (stopped by signalling the group, never `ray stop`)."""
    bin_dir = Path(sys.executable).parent
    # a job's entrypoint (`dinat-batch ...`) must be on the node's PATH
    env = os.environ | env | {"PATH": f"{bin_dir}{os.pathsep}{os.environ.get('PATH', '')}"}
    env.pop("RAY_ADDRESS", None)
    return subprocess.Popen(
        [str(bin_dir / "ray"), "start", *args],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        start_new_session=True,
    )


def gave_up(process: subprocess.Popen, name: str) -> None:
    """NodeExited, with what `ray start` printed, once `process` (a node's `ray start`) has exited;
    what it left running is stopped first (`exited`)."""
    if exited(process):
        raise NodeExited(f"{name}: ray start exited with {process.returncode}: {process.stderr.read()}")


class LocalRayHead(Service):
    def __init__(
        self, num_cpus: int = 4, startup_timeout: float = 90.0, settings: dict[str, str] | None = None
    ):
        self.num_cpus = num_cpus
        self.settings = settings or {}  # Ray's RAY_* system settings for the head's processes
        self.startup_timeout = startup_timeout
        self.token = secrets.token_hex(16)
        self.dashboard_port = 0
        self.gcs_port = 0
        self.node_manager_port = 0
        self._temp_dir = ""
        self._process: subprocess.Popen | None = None

    @property
    def address(self) -> str:
        return f"http://127.0.0.1:{self.dashboard_port}"

    @property
    def gcs_address(self) -> str:
        """Where drivers (`ray.init(address=...)`) and worker nodes (`ray start --address`) connect."""
        return f"127.0.0.1:{self.gcs_port}"

    @property
    def env(self) -> dict[str, str]:
        return {"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": self.token}

    def _launch(self) -> None:
        # short: Ray's unix socket paths under the temp dir must stay below ~107 characters
        self._temp_dir = tempfile.mkdtemp(prefix="rayh-", dir="/tmp")
        self.dashboard_port = free_port()
        self.gcs_port = free_port()
        args = ["--head", "--block", "--disable-usage-stats"]
        args += ["--node-ip-address=127.0.0.1", "--dashboard-host=127.0.0.1", "--include-dashboard=true"]
        args += [f"--num-cpus={self.num_cpus}", "--num-gpus=0", f"--temp-dir={self._temp_dir}"]
        args += [f"--dashboard-port={self.dashboard_port}", f"--port={self.gcs_port}"]
        ports, self.node_manager_port = node_ports()
        args += [f"--ray-client-server-port={free_port()}", *ports]
        self._process = ray_start(args, self.env | self.settings)

    def alive_nodes(self) -> set[int]:
        """The node-manager ports of the nodes the head counts alive (its dashboard's view)."""
        request = urllib.request.Request(
            f"{self.address}/nodes?view=summary&nocache=1", headers={"Authorization": f"Bearer {self.token}"}
        )
        with urllib.request.urlopen(request, timeout=10) as answer:
            nodes = json.loads(answer.read())["data"]["summary"]
        return {node["raylet"]["nodeManagerPort"] for node in nodes if node["raylet"]["state"] == "ALIVE"}

    def check(self) -> None:
        """NodeExited, with what `ray start` printed, once the head has exited."""
        gave_up(self._process, "the head")

    @property
    def running(self) -> bool:
        return not exited(self._process)

    def start(self) -> LocalRayHead:
        """Launched and waited for; a head whose `ray start` gave up is started again (`started`)."""
        return started(super().start)

    def _wait_ready(self) -> None:
        """Ready when the head counts its own node alive: its job server answers before `ray start` has
        the node registered, which can still fail."""
        self.wait_alive(self.node_manager_port, self._process, "the head")

    def wait_alive(self, port: int, process: subprocess.Popen, name: str) -> None:
        """Until the head counts the node with node-manager port `port` alive; NodeExited if the node's
        `ray start` (`process`) or the head's exits first. A head that does not answer, or not in full, is
        asked again (on a loaded machine its dashboard has refused connections for a while); one that
        refuses the token is not."""
        deadline = time.monotonic() + self.startup_timeout
        answer: object = "none"
        while True:
            self.check()
            gave_up(process, name)
            try:
                if port in self.alive_nodes():
                    return
                answer = "not alive yet"
            except urllib.error.HTTPError as err:
                if err.code in (401, 403):
                    raise
                answer = err
            except (OSError, http.client.HTTPException, ValueError) as err:
                answer = err
            if time.monotonic() > deadline:
                raise RuntimeError(f"{name} was not up in {self.startup_timeout} s (the head: {answer})")
            time.sleep(0.5)

    def stop(self, timeout: float = 20.0) -> None:
        """SIGINT: `ray start --block` stops its processes on it (it ignores SIGTERM); SIGKILL after."""
        stop_group(self._process, signal.SIGINT, timeout)
        self._process = None
        if self._temp_dir:
            shutil.rmtree(self._temp_dir, ignore_errors=True)
