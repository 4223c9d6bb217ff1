"""Whose a file is: every Parquet file the pipeline writes carries its writer, run, attempt and output in
the file's key-value metadata, so that it can tell its own files from anyone else's, and appears whole or
not at all (`pipeline/atomic.py`)."""

from __future__ import annotations

import hashlib
import io
import json
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

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
            metadata = pq.read_metadata(f).metadata or {}
        except pa.ArrowInvalid:
            return None
    try:
        record = json.loads(metadata[METADATA_KEY])
    except (KeyError, ValueError):
        return None
    if not isinstance(record, dict) or record.get("writer") != WRITER:
        return None
    return Ownership(
        record["run_id"], record["model_sha256"], record.get("attempt", ""), record.get("output", "")
    )


def content_version(info: dict[str, Any]) -> str:
    """What changes when a file's content changes, from its listing entry: the ETag on object stores, else
    the modification time; "" when the filesystem gives neither."""
    for field in ("ETag", "etag", "md5Hash", "LastModified", "mtime", "last_modified", "created"):
        if info.get(field) is not None:
            return str(info[field]).strip('"')
    return ""


class Owners:
    """`owner_of` for the files of an output's listings, one after another, each footer read once while
    the file stays the same (path, size, `content_version`, inode): a run surveys its output several times
    (before its lease, then to prepare, compact and publish), and each footer is a request to the store,
    which at a million chunk files is most of a run's bookkeeping. A file replaced since is read again."""

    def __init__(self, fs, threads: int):
        self.fs, self.threads = fs, threads
        # a digest of each file's identity (~100 bytes a file with the dict's own, not ~400 for the
        # names): a million chunk files are a million entries
        self._known: dict[bytes, Ownership | None] = {}
        self._one: dict[Ownership, Ownership] = {}  # each owner held once, not once per file

    def of(self, files: list[dict[str, Any]]) -> list[Ownership | None]:
        """The owner of each of `files` (entries of `fs.ls(path, detail=True)`), unknown footers read in
        parallel; a failed read raises."""
        keys = [_identity(entry) for entry in files]
        unread = [i for i, key in enumerate(keys) if key not in self._known]  # None is never known
        with ThreadPoolExecutor(self.threads) as pool:
            owners = pool.map(lambda i: owner_of(self.fs, files[i]["name"]), unread)
            read = dict(zip(unread, owners, strict=True))
        for i, owner in read.items():
            if keys[i] is not None:
                self._known[keys[i]] = None if owner is None else self._one.setdefault(owner, owner)
        return [read[i] if i in read else self._known[key] for i, key in enumerate(keys)]


def _identity(entry: dict[str, Any]) -> bytes | None:
    """The file's path, size, `content_version` and inode (a file written again on a disk gets a new one:
    renamed over), as a digest; None when the filesystem gives no version: such a file is read each time."""
    version = content_version(entry)
    if not version:
        return None
    named = f"{entry['name']}\0{entry.get('size')}\0{version}\0{entry.get('ino')}"
    return hashlib.blake2b(named.encode(), digest_size=16).digest()


def write_table(fs, path: str, table: pa.Table, ownership: Ownership) -> int:
    """Write `table` as one Parquet file owned by `ownership`; returns its size in bytes."""
    table = table.replace_schema_metadata({**(table.schema.metadata or {}), **ownership.metadata()})
    buffer = io.BytesIO()
    pq.write_table(table, buffer)
    put_file(fs, path, buffer.getvalue())
    return buffer.tell()
