"""The output table's schema and the writing of its files: every Parquet file the pipeline writes carries
its writer's run id in the file's key-value metadata (so it can tell its own files from anyone else's)
and appears whole or not at all (an S3 PUT; a local temp file renamed into place).

While a run goes, the inference stage's batches land as small chunk files in the output's hidden staging
folder (`_staging/RUN_ID/chunk-*.parquet`), each written as soon as Ray hands it over; the commit
(`pipeline.output`) compacts them into the table's files.
"""

from __future__ import annotations

import hashlib
import io
import json
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
from fsspec.implementations.local import LocalFileSystem
from ray.data import Datasink

from pipeline.atomic import put_file

WRITER = "dinat-batch"
METADATA_KEY = b"dinat_batch"
# error kinds that say the store failed, not the image: retried by the next resume or rerun
RETRYABLE = frozenset({"ReadError", "ShardError", "TableError"})


def output_schema(embedding_dim: int) -> pa.Schema:
    return pa.schema(
        [
            pa.field("key", pa.string(), nullable=False),
            pa.field("status", pa.string(), nullable=False),
            ("error", pa.string()),
            ("label_ids", pa.list_(pa.int32())),
            ("labels", pa.list_(pa.string())),
            ("scores", pa.list_(pa.float32())),
            ("embedding", pa.list_(pa.float32(), embedding_dim)),
            ("width", pa.int32()),
            ("height", pa.int32()),
            pa.field("model", pa.string(), nullable=False),
            pa.field("model_sha256", pa.string(), nullable=False),
            pa.field("run_id", pa.string(), nullable=False),
            pa.field("processed_at", pa.timestamp("us", tz="UTC"), nullable=False),
        ]
    )


def error_kind(error: str) -> str:
    return error.split(": ", 1)[0]


def is_retryable(error: str | None) -> bool:
    return error is not None and error_kind(error) in RETRYABLE


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


class KeyDigest:
    """A multiset fingerprint of keys: a count and two 64-bit sums of a hash of each key. Two multisets
    of keys with equal digests are equal but for a ~2**-64 chance, so comparing the rows written with the
    inputs listed proves "one row per input" without holding the keys anywhere."""

    _MASK = 2**64 - 1

    def __init__(self, count: int = 0, low: int = 0, high: int = 0):
        self.count, self.low, self.high = count, low, high

    def add(self, keys: Iterable[str]) -> KeyDigest:
        for key in keys:
            digest = hashlib.blake2b(key.encode(), digest_size=16).digest()
            self.low = (self.low + int.from_bytes(digest[:8], "little")) & self._MASK
            self.high = (self.high + int.from_bytes(digest[8:], "little")) & self._MASK
            self.count += 1
        return self

    def __iadd__(self, other: KeyDigest) -> KeyDigest:
        self.count += other.count
        self.low = (self.low + other.low) & self._MASK
        self.high = (self.high + other.high) & self._MASK
        return self

    def __eq__(self, other: object) -> bool:
        return isinstance(other, KeyDigest) and self.as_tuple() == other.as_tuple()

    def as_tuple(self) -> tuple[int, int, int]:
        return self.count, self.low, self.high

    def to_json(self) -> dict[str, int | str]:
        return {"count": self.count, "low": f"{self.low:016x}", "high": f"{self.high:016x}"}

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> KeyDigest:
        return cls(int(data["count"]), int(data["low"], 16), int(data["high"], 16))


CHUNK_PREFIX = "chunk-"


def chunk_rows(name: str) -> int:
    """Rows of a chunk file, from its name (`chunk-TASK-ROWS.parquet`): grouping chunks into files needs
    no read."""
    return int(name.rsplit("/", 1)[-1].removesuffix(".parquet").rsplit("-", 1)[1])


class ChunkSink(Datasink):
    """Ray Data sink: each write task's rows as one chunk file in the attempt's staging folder, named by
    the task's index so that a retried task replaces its own file instead of adding a second."""

    def __init__(
        self, folder: str, filesystem, ownership: Ownership, schema: pa.Schema, min_rows: int | None
    ):
        self.folder, self.filesystem, self.ownership = folder, filesystem, ownership
        self.schema, self._min_rows = schema, min_rows

    @property
    def min_rows_per_write(self) -> int | None:
        return self._min_rows

    def write(self, blocks, ctx) -> str | None:
        tables = [pa.table(block) if not isinstance(block, pa.Table) else block for block in blocks]
        tables = [table for table in tables if table.num_rows]
        if not tables:
            return None
        table = pa.concat_tables(tables).cast(self.schema)
        name = f"{CHUNK_PREFIX}{ctx.task_idx:06d}-{table.num_rows}.parquet"
        fs = self.filesystem or LocalFileSystem()
        write_table(fs, f"{self.folder}/{name}", table, self.ownership)
        return name
