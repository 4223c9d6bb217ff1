"""Several Ray nodes on one machine, for the multi-node tests and benchmarks: a head (`LocalRayHead`, with
no CPUs of its own unless asked, so that work runs on the workers) and worker nodes, each its own
`ray start --block` with its own ports and a resource naming it, added and killed while a run goes on.
Every node is stopped by signalling its process group, never by `ray stop`.

    with LocalCluster(workers=2, cpus_per_worker=2) as cluster:
        cluster.driver_env             # RAY_ADDRESS and the token, for a driver process
        node = cluster.add_worker()    # a machine joins
        cluster.kill(node)             # SIGKILL its process group: a machine lost

A worker can declare custom resources (`resources`: a worker group's, such as one `inference` slot per
node to stand for its one GPU) and have settings of its own in its environment (`env`), which the
processes Ray starts on it inherit.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
from dataclasses import dataclass

from dinat_batch.infra.local_ray import LocalRayHead, NodeExited, node_ports, ray_start
from dinat_batch.infra.processes import Service, descendants, started, stop_group

# the head declares a silent node dead after 3 missed checks 0.5 s apart, instead of Ray's ~15-25 s
# (checks every 3 s, 5 misses, 10 s timeout): a lost node shows within seconds, keeping the tests short
FAST_FAILURE_DETECTION = {
    "RAY_health_check_period_ms": "500",
    "RAY_health_check_timeout_ms": "1000",
    "RAY_health_check_failure_threshold": "3",
}


@dataclass
class WorkerNode:
    name: str  # also a custom resource of 1 on the node, to place work on it
    process: subprocess.Popen
    node_manager_port: int


class LocalCluster(Service):
    def __init__(
        self,
        workers: int = 2,
        cpus_per_worker: int = 2,
        resources_per_worker: dict[str, float] | None = None,
        env_per_worker: dict[str, str] | None = None,
        head_cpus: int = 0,
        object_store_mb: int = 256,
        startup_timeout: float = 90.0,
    ):
        self.cpus_per_worker, self.object_store_mb = cpus_per_worker, object_store_mb
        self.resources_per_worker = resources_per_worker or {}
        self.env_per_worker = env_per_worker or {}
        self.startup_timeout = startup_timeout
        self.head = LocalRayHead(
            num_cpus=head_cpus, startup_timeout=startup_timeout, settings=FAST_FAILURE_DETECTION
        )
        self.workers: list[WorkerNode] = []
        self._initial = workers

    @property
    def address(self) -> str:
        return self.head.gcs_address

    @property
    def driver_env(self) -> dict[str, str]:
        return self.head.env | {"RAY_ADDRESS": self.address}

    def _launch(self) -> None:
        self.head.start()
        for _ in range(self._initial):
            self.add_worker()

    def _wait_ready(self) -> None:
        """Each node waited for as it was added."""

    def add_worker(
        self,
        cpus: int | None = None,
        resources: dict[str, float] | None = None,
        env: dict[str, str] | None = None,
    ) -> WorkerNode:
        """A worker node joins, with the cluster's CPUs, custom resources and environment per worker unless
        given; one whose `ray start` gave up is started again while the head runs (`started`)."""
        resources = self.resources_per_worker if resources is None else resources
        env = self.env_per_worker if env is None else env
        return started(lambda: self._join(cpus, resources, env), lambda: self.head.running)

    def _join(self, cpus: int | None, resources: dict[str, float], env: dict[str, str]) -> WorkerNode:
        node = self._start_worker(cpus, resources, env)
        try:
            self.head.wait_alive(node.node_manager_port, node.process, node.name)
        except NodeExited:
            self.workers.remove(node)
            raise
        return node

    def _start_worker(self, cpus: int | None, resources: dict[str, float], env: dict[str, str]) -> WorkerNode:
        name = f"worker-{len(self.workers) + 1}"
        ports, manager_port = node_ports()
        args = ["--address", self.address, "--block", "--disable-usage-stats", "--node-ip-address=127.0.0.1"]
        args += [
            f"--num-cpus={cpus or self.cpus_per_worker}",
            "--num-gpus=0",
            f"--resources={json.dumps(resources | {name: 1})}",
        ]
        args += [f"--object-store-memory={self.object_store_mb * 2**20}", *ports]
        node = WorkerNode(name, ray_start(args, self.head.env | env), manager_port)
        self.workers.append(node)
        return node

    def processes(self, node: WorkerNode) -> list[int]:
        """Every process of the node: `ray start`, its raylet and services, and the workers the raylet
        started (which Ray puts in sessions of their own, so the process group does not hold them)."""
        return descendants(node.process.pid)

    def kill(self, node: WorkerNode) -> None:
        """The machine is lost: every process of the node dies at once, nothing shuts down cleanly."""
        if node.process.poll() is not None:  # gone already: its pid may be another process's now
            return
        for pid in self.processes(node):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        node.process.wait(10)

    def stop(self, timeout: float = 20.0) -> None:
        for node in self.workers:
            stop_group(node.process, signal.SIGINT, timeout)
        self.head.stop(timeout)
