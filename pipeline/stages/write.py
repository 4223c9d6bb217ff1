"""The writing stage and the output table's columns: the schema, the function that fills a batch's rows
from the model's arrays, and the Ray sink that lands each write task's rows as one chunk file in the
attempt's hidden staging folder (`_staging/ATTEMPT/chunk-*.parquet`) as soon as Ray hands them over. The
commit (`pipeline/output.py`) compacts the chunks into the table's files.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime

import numpy as np
import pyarrow as pa
import ray
from fsspec.implementations.local import LocalFileSystem
from ray.data import Datasink
from ray.data.datasource.datasink import WriteResult

from dinat_batch.pipeline.ownership import Ownership, write_table, written_identity
from dinat_batch.pipeline.stages import Stage


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


COLUMNS = tuple(output_schema(1).names)
# a chunk write is a small I/O task; at Ray's default of a whole CPU each would wait for a free core and
# then hold it from the decode tasks, starving the actor (measured: 0.64 of the bare loop, 0.87 before
# chunked writes)
STAGE = Stage("write", consumes=COLUMNS, produces=(), resources={"num_cpus": 0.1})


@dataclass(frozen=True)
class Provenance:
    """The columns every row of one actor shares: the model that made it and the run."""

    model: str
    model_sha256: str
    run_id: str


def output_rows(
    keys: Sequence[str],
    errors: Sequence[str | None],
    sizes: tuple[np.ndarray, np.ndarray],
    embeddings: np.ndarray,
    top: tuple[np.ndarray, np.ndarray, np.ndarray] | None,
    provenance: Provenance,
    schema: pa.Schema,
) -> pa.Table:
    """One output row per key from the model's arrays (zeros where a row is an error): `sizes` are the
    source images' widths and heights, `top` the top-k (scores, label ids, label names) or None for a
    backbone-only model. Rows with an error get nulls in every model column."""
    n = len(keys)
    ok = np.array([e is None for e in errors], dtype=bool)
    mask = pa.array(~ok)

    def lists(values: np.ndarray | None, type_: pa.DataType) -> pa.Array:
        if values is None:
            return pa.nulls(n, pa.list_(type_))
        offsets = pa.array(np.arange(0, values.size + 1, values.shape[1], dtype=np.int32))
        return pa.ListArray.from_arrays(offsets, pa.array(values.ravel(), type_), mask=mask)

    scores, ids, names = top if top is not None else (None, None, None)
    columns = {
        "key": pa.array(list(keys), pa.string()),
        "status": pa.array(np.where(ok, "ok", "error"), pa.string()),
        "error": pa.array(list(errors), pa.string()),
        "label_ids": lists(ids, pa.int32()),
        "labels": lists(names, pa.string()),
        "scores": lists(scores, pa.float32()),
        "embedding": pa.FixedSizeListArray.from_arrays(
            pa.array(embeddings.ravel(), pa.float32()), embeddings.shape[1], mask=mask
        ),
        "width": pa.array(sizes[0].astype(np.int32), mask=~ok),
        "height": pa.array(sizes[1].astype(np.int32), mask=~ok),
        "model": pa.array([provenance.model] * n, pa.string()),
        "model_sha256": pa.array([provenance.model_sha256] * n, pa.string()),
        "run_id": pa.array([provenance.run_id] * n, pa.string()),
        "processed_at": pa.array([datetime.now(UTC)] * n, pa.timestamp("us", tz="UTC")),
    }
    return pa.table(columns, schema=schema)


CHUNK_PREFIX = "chunk-"


def chunk_name(index: int, rows: int, prefix: str = CHUNK_PREFIX) -> str:
    """`chunk-INDEX-ROWS.parquet`: the writing task's index, so that a retried task replaces its own file,
    and its rows, so that grouping chunks into files needs no read."""
    return f"{prefix}{index:06d}-{rows}.parquet"


def chunk_rows(name: str) -> int | None:
    """Rows of a chunk file, from its name (see `chunk_name`); None for a name that tells none."""
    count = name.rsplit("/", 1)[-1].removesuffix(".parquet").rsplit("-", 1)[-1]
    return int(count) if name.endswith(".parquet") and count.isdecimal() and count.isascii() else None


def chunk_groups(paths: Iterable[str], rows: int, files: int | None = None) -> list[list[str]]:
    """Consecutive chunk files in groups of up to `rows` rows, counted from their names (a larger file,
    or one whose name tells no rows, alone), and of up to `files` files when given."""
    groups: list[list[str]] = []
    total = 0
    for path in paths:
        count = chunk_rows(path)
        if count is None:
            count = rows + 1
        if not groups or total + count > rows or len(groups[-1]) == files:
            groups.append([])
            total = 0
        groups[-1].append(path)
        total += count
    return groups


class ChunkSink(Datasink):
    """Ray Data sink: each write task's rows as one chunk file in `folder` (the attempt's staging folder,
    or a nightly ledger's), named by the task's index so that a retried task replaces its own file
    instead of adding a second."""

    def __init__(
        self,
        folder: str,
        filesystem,
        ownership: Ownership,
        schema: pa.Schema,
        min_rows: int | None,
        prefix: str = CHUNK_PREFIX,
    ):
        self.folder, self.filesystem, self.ownership = folder, filesystem, ownership
        self.schema, self._min_rows, self.prefix = schema, min_rows, prefix
        self.written: list[bytes] = []  # in the driver, once the write completes

    @property
    def min_rows_per_write(self) -> int | None:
        return self._min_rows

    def write(self, blocks, ctx) -> bytes | None:
        """Returns the chunk file's `file_identity`, for the driver's surveys (`written`)."""
        tables = [pa.table(block) if not isinstance(block, pa.Table) else block for block in blocks]
        tables = [table for table in tables if table.num_rows]
        if not tables:
            return None
        table = pa.concat_tables(tables).cast(self.schema)
        path = f"{self.folder}/{chunk_name(ctx.task_idx, table.num_rows, self.prefix)}"
        fs = self.filesystem or LocalFileSystem()
        write_table(fs, path, table, self.ownership)
        return written_identity(fs, path)

    def on_write_complete(self, write_result: WriteResult) -> None:
        self.written = [identity for identity in write_result.write_returns if identity is not None]


def apply(
    dataset: ray.data.Dataset,
    folder: str,
    filesystem,
    ownership: Ownership,
    schema: pa.Schema,
    min_rows: int | None,
) -> list[bytes]:
    """Run the plan, writing its rows as chunk files under `folder`; returns their `file_identity`s (one
    per chunk file: O(units of work) in the driver)."""
    sink = ChunkSink(folder, filesystem, ownership, schema, min_rows)
    dataset.write_datasink(sink, ray_remote_args=STAGE.resources)
    return sink.written
