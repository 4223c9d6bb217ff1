"""Whose a file is: every Parquet file the pipeline writes carries its writer, run, attempt and output in
the file's key-value metadata, so that it can tell its own files from anyone else's, and appears whole or
not at all (`pipeline/atomic.py`)."""

from __future__ import annotations

import hashlib
import io
import json
import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
from fsspec.implementations.local import LocalFileSystem

from dinat_batch.pipeline.atomic import put_file

WRITER = "dinat-batch"
METADATA_KEY = b"dinat_batch"


@dataclass(frozen=True)
class Ownership:
    """What the pipeline writes into each of its files' metadata: the run, its model, and the attempt
    (unique to each start of the run, also when a user names the run: its staging folder)."""

    run_id: str
    model_sha256: str
    attempt: str
    output: str  # the output's resolved location: a file copied elsewhere is not that output's own

    def metadata(self) -> dict[bytes, bytes]:
        record = {
            "writer": WRITER,
            "run_id": self.run_id,
            "model_sha256": self.model_sha256,
            "attempt": self.attempt,
            "output": self.output,
        }
        return {METADATA_KEY: json.dumps(record).encode()}


def owner_of(fs, path: str) -> Ownership | None:
    """The run that wrote a Parquet file, or None when the pipeline did not write it (or it is not
    Parquet). A read that fails (throttling, access denied, a timeout) raises: it proves nothing."""
    with fs.open(path, "rb") as f:
        try:
            metadata = pq.read_metadata(f).metadata
        except pa.ArrowInvalid:
            return None
    return owner_in(metadata)


def owner_in(metadata: dict[bytes, bytes] | None) -> Ownership | None:
    """The run named by a Parquet file's key-value metadata (a footer's, a read table's schema's), or None
    when the pipeline did not write it."""
    try:
        record = json.loads((metadata or {})[METADATA_KEY])
    except (KeyError, ValueError):
        return None
    if not isinstance(record, dict) or record.get("writer") != WRITER:
        return None
    return Ownership(
        record["run_id"], record["model_sha256"], record.get("attempt", ""), record.get("output", "")
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


class Owners:
    """`owner_of` for the files of an output's listings, one after another, each footer read once while
    the file stays the same (`file_identity`): a run surveys its output four or five times (before its
    lease, then to prepare, compact and publish), and each footer is a request to the store, which at a
    million chunk files is most of a run's bookkeeping. A file written over since is read again; the
    run's own write tasks say what they wrote (`wrote`), which is then never read."""

    def __init__(self, fs, threads: int):
        self.fs, self.threads = fs, threads
        # identities as 16-byte digests, ~90 bytes a file with the dict's own: a million chunk files
        # are a million entries
        self._known: dict[bytes, Ownership | None] = {}
        self._one: dict[Ownership, Ownership] = {}  # each owner held once, not once per file

    def of(self, files: list[tuple[str, bytes | None]]) -> list[Ownership | None]:
        """The owner of each of `files` (path, `file_identity`), unknown footers read in parallel; a failed
        read raises."""
        unread = [i for i, (_, identity) in enumerate(files) if identity not in self._known]  # None never is
        with ThreadPoolExecutor(self.threads) as pool:
            owners = pool.map(lambda i: self._once(owner_of(self.fs, files[i][0])), unread)
            read = dict(zip(unread, owners, strict=True))
        for i, owner in read.items():
            if files[i][1] is not None:
                self._known[files[i][1]] = owner
        return [read[i] if i in read else self._known[identity] for i, (_, identity) in enumerate(files)]

    def wrote(self, files: list[bytes], owner: Ownership) -> None:
        """`owner` wrote `files` (`file_identity` of each, as its writer saw it): later surveys need not
        read their footers while their listings show the same files."""
        self._known.update(dict.fromkeys(files, self._once(owner)))

    def _once(self, owner: Ownership | None) -> Ownership | None:
        return None if owner is None else self._one.setdefault(owner, owner)


def write_table(fs, path: str, table: pa.Table, ownership: Ownership) -> int:
    """Write `table` as one Parquet file owned by `ownership`; returns its size in bytes."""
    table = table.replace_schema_metadata({**(table.schema.metadata or {}), **ownership.metadata()})
    buffer = io.BytesIO()
    pq.write_table(table, buffer)
    put_file(fs, path, buffer.getvalue())
    return buffer.tell()
