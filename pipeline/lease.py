"""One writer per output: a lease object created atomically, kept alive by a heartbeat, taken over when
its holder has been silent for longer than a timeout.

Leases are numbered files `OUTPUT/_lease/000001.json`, `000002.json`, ...; the highest number is the
current one, and numbers are never reused: a run that ends marks its file released rather than deleting
it. Taking an output creates the next number after the current one (at once when that one is released,
after `lease_timeout` of silence otherwise) with the store's exclusive create (S3 `If-None-Match: *`; a
hard link of a finished temp file on local and NFS-like disks), so of two runs racing for an output
exactly one wins, whichever store they share. A holder checks its lease before each step that changes
the output's committed state and after each heartbeat; one that finds a higher number than its own has
been taken over and raises LeaseLost. Its Ray tasks may still finish writing chunks into its own
staging folder; they never touch the table or the marker. Staleness is judged by the clocks of the
two hosts: keep them in sync (NTP), or raise lease_timeout well above any skew.

Stores without an exclusive create (neither local nor S3 here) get a check-then-write lease: the run
says so in a warning, and two runs started within the same second could both proceed.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import socket
import threading
import time
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from fsspec.implementations.local import LocalFileSystem

from dinat_batch.pipeline.atomic import create_local, put_file
from dinat_batch.pipeline.config import ConfigError
from dinat_batch.pipeline.objects import read_object

LEASES = "_lease"
logger = logging.getLogger(__name__)


class LeaseHeld(ConfigError):
    """Another run holds the output and its heartbeat is fresh."""


class LeaseLost(RuntimeError):
    """This run's lease was taken over (its heartbeat stalled past the timeout): it must stop writing."""


@dataclass(frozen=True)
class Holder:
    number: int
    run_id: str
    host: str
    pid: int
    started_at: str
    heartbeat_at: float  # unix seconds
    released: bool = False

    def age(self, now: float | None = None) -> float:
        return max(0.0, (now or time.time()) - self.heartbeat_at)


def exclusive_create_kind(fs) -> str:
    """How this filesystem creates a file only if it does not exist: 'local', 's3' or 'none'."""
    if isinstance(fs, LocalFileSystem):
        return "local"
    return "s3" if "s3" in fs.protocol or "s3a" in fs.protocol else "none"


def _precondition_failed(err: BaseException) -> bool:
    """An S3 conditional write refused because the object exists (412, or 409 under a race)."""
    cause = err.__cause__ or err
    code = getattr(cause, "response", {}).get("Error", {}).get("Code", "")
    return code in {"PreconditionFailed", "ConditionalRequestConflict"} or "pre-condition" in str(err)


class Lease:
    """The lease of one output folder, as a context manager; `check()` before each destructive step."""

    def __init__(self, fs, path: str, run_id: str, timeout: float, heartbeat: float | None = None):
        self.fs, self.folder, self.run_id, self.timeout = fs, f"{path}/{LEASES}", run_id, timeout
        self.interval = heartbeat or min(30.0, timeout / 4)
        self.number: int | None = None
        self._made_output = False
        self.kind = exclusive_create_kind(fs)
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._lost: LeaseLost | None = None

    def _path(self, number: int) -> str:
        return f"{self.folder}/{number:06d}.json"

    def _record(self, number: int, started_at: str, released: bool = False) -> bytes:
        return json.dumps(
            {
                "number": number,
                "run_id": self.run_id,
                "host": socket.gethostname(),
                "pid": os.getpid(),
                "started_at": started_at,
                "heartbeat_at": time.time(),
                "released": released,
            }
        ).encode()

    def holders(self) -> list[Holder]:
        """Every lease file, lowest number first. Files are written whole, so one that cannot be parsed
        was written by someone else: it counts as held, with the age of the file."""
        self.fs.invalidate_cache()
        found = []
        try:
            names = self.fs.ls(self.folder, detail=False)
        except FileNotFoundError:
            return []
        for name in names:
            stem = name.rsplit("/", 1)[1].removesuffix(".json")
            if not stem.isdigit():
                continue
            try:
                found.append(Holder(**json.loads(read_object(self.fs, name))))
            except FileNotFoundError:
                continue
            except (ValueError, TypeError):
                modified = self.fs.info(name).get("mtime") or time.time()
                found.append(Holder(int(stem), "(unreadable lease file)", "", 0, "", float(modified)))
        return sorted(found, key=lambda holder: holder.number)

    def _create(self, number: int, data: bytes) -> bool:
        """Create lease `number` only if no one has; False when someone has."""
        path = self._path(number)
        if self.kind == "local":
            self._made_output = not os.path.exists(self.folder.rsplit("/", 1)[0])
            return create_local(path, data)
        if self.kind == "s3":
            try:
                self.fs.pipe_file(path, data, mode="create")
            except OSError as err:
                if _precondition_failed(err):
                    return False
                raise
            return True
        if self.fs.exists(path):
            return False
        self.fs.pipe_file(path, data)
        return True

    def acquire(self) -> Lease:
        started_at = datetime.now(UTC).isoformat()
        holders = self.holders()
        current = holders[-1] if holders else None
        if current is not None and not current.released and current.age() < self.timeout:
            raise self._held(current)
        number = current.number + 1 if current else 1
        record = self._record(number, started_at)
        if not self._create(number, record):
            winner = next((h for h in self.holders() if h.number == number), None)
            # a retried conditional PUT whose first answer was lost finds its own lease
            if winner is None or winner.run_id != self.run_id or winner.pid != os.getpid():
                raise (
                    self._held(winner)
                    if winner
                    else LeaseHeld(
                        "another run is taking this output at this moment; try again, or choose another output"
                    )
                )
        self.number = number
        for older in holders:  # only the current number matters: keep the folder short
            with contextlib.suppress(FileNotFoundError):
                self.fs.rm_file(self._path(older.number))
        if current is not None and not current.released:
            logger.warning(
                "took over the output's lease from run %s on %s (pid %s): its heartbeat is %.0f s old, "
                "past lease_timeout %.0f s",
                current.run_id,
                current.host,
                current.pid,
                current.age(),
                self.timeout,
            )
        if self.kind == "none":
            logger.warning(
                "this store offers no atomic create: the output's lease is check-then-write, so two runs "
                "started at the same moment could both write"
            )
        self._started_at = started_at
        self._thread = threading.Thread(target=self._beat, name="dinat-lease-heartbeat", daemon=True)
        self._thread.start()
        return self

    def _held(self, holder: Holder) -> LeaseHeld:
        return LeaseHeld(
            f"another run holds this output: run {holder.run_id} on {holder.host} (pid {holder.pid}), "
            f"started {holder.started_at}, last heartbeat {holder.age():.0f} s ago. Wait for it to finish, "
            f"or, if it died, rerun after its lease expires ({self.timeout:.0f} s after its last heartbeat; "
            "lease_timeout)"
        )

    def _beat(self) -> None:
        while not self._stop.wait(self.interval):
            try:
                self.check()
                put_file(self.fs, self._path(self.number), self._record(self.number, self._started_at))
                self.check()  # a beat delayed past a takeover must not pass for ours
            except LeaseLost as err:
                self._lost = err
                return
            except OSError as err:  # a missed beat is not fatal; a long outage lets another run take over
                logger.warning("could not renew the output's lease: %s", err)

    def check(self) -> None:
        """Raise LeaseLost if another run has taken the output over since this one acquired it."""
        if self._lost is not None:
            raise self._lost
        holders = self.holders()
        mine = any(h.number == self.number and h.run_id == self.run_id for h in holders)
        newer = [holder for holder in holders if holder.number > (self.number or 0)]
        if newer or not mine:  # a run that took over and already finished has removed our file too
            taker = f"run {newer[-1].run_id} on {newer[-1].host}" if newer else "another run"
            self._lost = LeaseLost(
                f"{taker} took this output over (this run's heartbeat had stalled past lease_timeout); "
                "this run stops without writing more"
            )
            raise self._lost

    def release(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        if self.number is None or self._lost is not None:
            return
        if self._only_lease_left():  # a run refused before any work leaves nothing behind
            self.fs.rm_file(self._path(self.number))
            if self.kind == "local":
                with contextlib.suppress(OSError):
                    os.rmdir(self.folder)
                    if self._made_output:
                        os.rmdir(self.folder.rsplit("/", 1)[0])
        else:  # released, not deleted: the next run takes the next number at once, and none is reused
            put_file(
                self.fs, self._path(self.number), self._record(self.number, self._started_at, released=True)
            )
        self.number = None

    def _only_lease_left(self) -> bool:
        self.fs.invalidate_cache()
        try:
            entries = [e.rstrip("/") for e in self.fs.ls(self.folder.rsplit("/", 1)[0], detail=False)]
            leases = [e.rstrip("/") for e in self.fs.ls(self.folder, detail=False)]
        except FileNotFoundError:
            return False
        return entries == [self.folder] and leases == [self._path(self.number)]

    def __enter__(self) -> Lease:
        return self.acquire()

    def __exit__(self, *exc: Any) -> None:
        self.release()
