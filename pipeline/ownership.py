"""Whose a file is: every Parquet file the pipeline writes carries its writer, run, attempt and output in
the file's key-value metadata, so that it can tell its own files from anyone else's, and appears whole or
not at all (`pipeline/atomic.py`)."""

from __future__ import annotations

import io
import json
from dataclasses import dataclass

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


def write_table(fs, path: str, table: pa.Table, ownership: Ownership) -> int:
    """Write `table` as one Parquet file owned by `ownership`; returns its size in bytes."""
    table = table.replace_schema_metadata({**(table.schema.metadata or {}), **ownership.metadata()})
    buffer = io.BytesIO()
    pq.write_table(table, buffer)
    put_file(fs, path, buffer.getvalue())
    return buffer.tell()
