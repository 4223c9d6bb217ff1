"""Whose a file is: every Parquet file the pipeline writes carries its writer, run, attempt and output in
the file's key-value metadata, so that it can tell its own files from anyone else's, and appears whole or
not at all (`pipeline/atomic.py`)."""

from __future__ import annotations

import hashlib
import io
import json
import os
from dataclasses import dataclass
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
import ray
from fsspec.implementations.local import LocalFileSystem

from dinat_batch.pipeline.atomic import put_file
from dinat_batch.pipeline.parallel import in_threads

WRITER = "dinat-batch"
METADATA_KEY = b"dinat_batch"


@dataclass(frozen=True)
class Ownership:
    """What the pipeline writes into each of its files' metadata: the run, its model (`checkpoint_sha256`:
    `model.ModelPin.sha256`, of its weights and configs), and the attempt (unique to each start of the
    run, also when a user names the run: its staging folder)."""

    run_id: str
    checkpoint_sha256: str
    attempt: str
    output: str  # the output's resolved location: a file copied elsewhere is not that output's own

    def metadata(self) -> dict[bytes, bytes]:
        record = {
            "writer": WRITER,
            "run_id": self.run_id,
            "checkpoint_sha256": self.checkpoint_sha256,
            "attempt": self.attempt,
            "output": self.output,
        }
        return {METADATA_KEY: json.dumps(record).encode()}


# The last bytes of a file read for its footer: the pipeline's footers are a few KB (its metadata and the
# schema)
FOOTER_TAIL = 64 * 1024
_MAGIC = b"PAR1"  # a Parquet file's last 4 bytes, after the footer and the footer's length (4 bytes)


def owner_of(fs, path: str, size: int | None = None) -> Ownership | None:
    """The run that wrote a Parquet file, or None when the pipeline did not write it (or it is not
    Parquet; an encrypted footer's `PARE` is not the pipeline's either). A read that fails (throttling,
    access denied, a timeout) raises: it proves nothing. Where a listing gave its `size` the footer is one
    request, a suffix range of the file's last `FOOTER_TAIL` bytes, whatever the file's size now; without,
    the store is asked for the size first (s3fs: a HEAD, then the read). The size only tells that a file
    is too small to be Parquet (an empty object has no last bytes to ask for)."""
    if size is not None:
        if size < 2 * len(_MAGIC) + 4:
            return None
        tail = fs.cat_file(path, start=-FOOTER_TAIL)
        if tail[-4:] != _MAGIC:
            return None
        if int.from_bytes(tail[-8:-4], "little") + 8 <= len(tail) or len(tail) < FOOTER_TAIL:
            return _owner_in_footer(pa.BufferReader(tail))
    with fs.open(path, "rb") as f:
        return _owner_in_footer(f)


def _owner_in_footer(source) -> Ownership | None:
    try:
        return owner_in(pq.read_metadata(source).metadata)
    except pa.ArrowInvalid:
        return None


def owner_in(metadata: dict[bytes, bytes] | None) -> Ownership | None:
    """The run named by a Parquet file's key-value metadata (a footer's, a read table's schema's), or None
    when the pipeline did not write it."""
    try:
        record = json.loads((metadata or {})[METADATA_KEY])
    except (KeyError, ValueError):
        return None
    if not isinstance(record, dict) or record.get("writer") != WRITER:
        return None
    # files of versions that recorded the weights' digest alone have none: another model to a run now
    return Ownership(
        record["run_id"],
        record.get("checkpoint_sha256", ""),
        record.get("attempt", ""),
        record.get("output", ""),
    )


# what tells one file at a path from another on a store: the content's hash where it keeps one (the same
# bytes), else every time its listing gives
_CONTENT_HASHES = ("ETag", "etag", "md5Hash")
_TIMES = ("mtime", "created", "LastModified", "last_modified")


def file_identity(fs, info: dict[str, Any]) -> bytes | None:
    """A digest of what tells this file from any other at its path (`info`: its listing entry or `info`):
    path and size, then on a disk (`fs` local or None) its device, inode, and modification and change
    times in nanoseconds from `os.stat` (`cp -p` sets the first back, nothing sets the second; fsspec
    gives the birth time instead where there is one), elsewhere the content's hash, or else every time the
    entry has. None when there is neither hash nor time, or the file is gone since it was listed (a live
    run's temp file, renamed: the survey then reads the footer, or leaves the file alone, as without)."""
    if fs is None or isinstance(fs, LocalFileSystem):
        try:
            found = os.stat(info["name"], follow_symlinks=False)
        except FileNotFoundError:
            return None
        content = f"{found.st_dev}\0{found.st_ino}\0{found.st_mtime_ns}\0{found.st_ctime_ns}"
    else:
        content = next((str(info[name]).strip('"') for name in _CONTENT_HASHES if info.get(name)), None)
        if content is None:
            times = [str(info[name]) for name in _TIMES if info.get(name) is not None]
            if not times:
                return None
            content = "\0".join(times)
    named = f"{info['name']}\0{info.get('size')}\0{content}"
    return hashlib.blake2b(named.encode(), digest_size=16).digest()


def written_identity(fs, path: str) -> bytes | None:
    """The `file_identity` of a file just written through `fs` (None: the local disk), for the driver's
    surveys; None when it cannot be told (it is only a saving: the survey then reads the footer)."""
    try:
        return file_identity(fs, (fs or LocalFileSystem()).info(path))
    except OSError:
        return None


# footers per Ray task: ~4 s of one task against a store answering ~250 a second to 16 threads; a resume
# of 1M chunks is 1,000 tasks
FOOTERS_PER_TASK = 1000
# tasks reading at once: 8 x 16 threads, with s3fs's 10 connections each, ~2.7k footers/s at 30 ms a
# request, under S3's ~5.5k GETs/s per prefix (the chunks of one attempt share one), which throttles
TASKS_IN_FLIGHT = 8
# seconds without a task finishing after which the driver reads a group itself: 8 tasks of ~4 s each end
# about every half second while the cluster runs them
STEAL_AFTER = 1.0


class Owners:
    """`owner_of` for the files of an output's listings, one after another, each footer read once while
    the file stays the same (`file_identity`): a run surveys its output four or five times (before its
    lease, then to prepare, compact and publish), and each footer is a request to the store, which at a
    million chunk files is most of a run's bookkeeping. A file written over since is read again; the
    run's own write tasks say what they wrote (`wrote`), which is then never read. `spread`: whether Ray
    tasks may read footers (not those of a local disk, each node's own)."""

    def __init__(self, fs, spread: bool):
        self.fs, self.spread = fs, spread
        # identities as 16-byte digests, ~90 bytes a file with the dict's own: a million chunk files
        # are a million entries
        self._known: dict[bytes, Ownership | None] = {}
        self._one: dict[Ownership, Ownership] = {}  # each owner held once, not once per file

    def of(self, files: list[tuple[str, bytes | None, int | None]]) -> list[Ownership | None]:
        """The owner of each of `files` (path, `file_identity`, size where listed), unknown footers read in
        parallel; a failed read raises with the store's error."""
        unread = [
            i for i, (_, identity, _) in enumerate(files) if identity not in self._known
        ]  # None never is
        owners = [self._known.get(identity) for _, identity, _ in files]  # the unread ones set below
        for i, owner in zip(unread, self._read([(files[i][0], files[i][2]) for i in unread]), strict=True):
            owners[i] = self._once(owner)
            if files[i][1] is not None:
                self._known[files[i][1]] = owners[i]
        return owners

    def _read(self, files: list[tuple[str, int | None]]) -> list[Ownership | None]:
        """Many footers (a resume's million chunks) are read by Ray tasks where the connected cluster has
        CPUs, so that they spread over its nodes rather than queue on the driver's threads. The driver
        does not wait on them for long: when no task has finished for STEAL_AFTER seconds it reads the last
        group no task has finished itself, so that a cluster whose CPUs are taken (or lost) costs no more
        than reading alone. A task lost with its worker or node is read again by the driver; a failed read
        raises the store's error."""
        if not (self.spread and len(files) > FOOTERS_PER_TASK and _cluster_has_cpus()):
            return _read_owners(self.fs, files)
        groups = [files[i : i + FOOTERS_PER_TASK] for i in range(0, len(files), FOOTERS_PER_TASK)]
        waiting = list(range(len(groups)))  # groups no task was sent yet, in order
        tasks: dict[ray.ObjectRef, int] = {}
        read: dict[int, list[Ownership | None]] = {}
        try:
            while waiting or tasks:
                while waiting and len(tasks) < TASKS_IN_FLIGHT:
                    i = waiting.pop(0)
                    tasks[_read_owners_in_a_task.remote(self.fs, groups[i])] = i
                done, _ = ray.wait(list(tasks), num_returns=1, timeout=STEAL_AFTER)
                for task in done:
                    i = tasks.pop(task)
                    try:
                        read[i] = ray.get(task)
                    except ray.exceptions.RayTaskError as err:
                        raise err.cause from err  # the store's own error, as from the driver's threads
                    except ray.exceptions.RayError:  # its worker or node lost past Ray's retries
                        read[i] = _read_owners(self.fs, groups[i])
                if done:
                    continue
                if waiting:
                    i = waiting.pop()
                else:
                    task, i = tasks.popitem()
                    ray.cancel(task)
                read[i] = _read_owners(self.fs, groups[i])
        finally:
            for task in tasks:
                ray.cancel(task)
        return [owner for i in range(len(groups)) for owner in read[i]]

    def wrote(self, files: list[bytes], owner: Ownership) -> None:
        """`owner` wrote `files` (`file_identity` of each, as its writer saw it): later surveys need not
        read their footers while their listings show the same files."""
        self._known.update(dict.fromkeys(files, self._once(owner)))

    def _once(self, owner: Ownership | None) -> Ownership | None:
        return None if owner is None else self._one.setdefault(owner, owner)


def _read_owners(fs, files: list[tuple[str, int | None]]) -> list[Ownership | None]:
    """`owner_of` each of `files` (path, size); each distinct owner is one object, so that a Ray task's answer pickles
    it once. Made one as each is read, not after the whole group: each read owner is new strings (~300
    bytes a file more at the peak of a resume's survey, measured)."""
    one: dict[Ownership, Ownership] = {}

    def read(file: tuple[str, int | None]) -> Ownership | None:
        owner = owner_of(fs, *file)
        return None if owner is None else one.setdefault(owner, owner)

    return in_threads(read, files)


_read_owners_in_a_task = ray.remote(num_cpus=0.5)(_read_owners)


def _cluster_has_cpus() -> bool:
    """Whether Ray tasks can run now: the driver is connected to a cluster with CPUs (an autoscaling one
    whose head declares none and has no workers yet has none)."""
    return ray.is_initialized() and ray.cluster_resources().get("CPU", 0) > 0


def write_table(fs, path: str, table: pa.Table, ownership: Ownership) -> int:
    """Write `table` as one Parquet file owned by `ownership`; returns its size in bytes."""
    table = table.replace_schema_metadata({**(table.schema.metadata or {}), **ownership.metadata()})
    buffer = io.BytesIO()
    pq.write_table(table, buffer)
    put_file(fs, path, buffer.getvalue())
    return buffer.tell()
