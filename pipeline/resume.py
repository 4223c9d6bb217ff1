"""What a run keeps of the attempts before it that died before their marker, worked out by Ray.

Their chunk files hold rows: those of failed reads are read again, those of inputs still listed are kept
(and not read again), those of inputs no longer listed (deleted since, or taken by another nightly date)
are left out of the table. The keys live in a dataset in Ray's object store, never in the driver: the
reading stage drops the finished ones by a join, and the keys of vanished inputs go to per-chunk stale
records (`pipeline/output.py`, `stale_record`) that the commit reads beside each chunk.
"""

from __future__ import annotations

from dataclasses import dataclass

import pyarrow as pa
import pyarrow.compute as pc
import ray
from fsspec.implementations.local import LocalFileSystem

from dinat_batch.pipeline.errors import retryable_mask
from dinat_batch.pipeline.output import Output, stale_record
from dinat_batch.pipeline.ownership import Ownership, write_table
from dinat_batch.pipeline.selection import FILE, TASK, each_group, table_files, without
from dinat_batch.pipeline.stages.read import container_of


@dataclass
class Resume:
    done: ray.data.MaterializedDataset | None  # `key`, `source`, `file` of each finished row; None: none
    resumed: int  # of them, rows of inputs still listed: kept in the table


def source_of(key: str, by_container: bool) -> str:
    """The listed object a row's key came from: the key itself for an image file, the shard or table
    for a container's rows."""
    return container_of(key) if by_container else key


def _finished(batch: pa.Table, by_container: bool) -> pa.Table:
    rows = batch.filter(pc.invert(retryable_mask(batch.column("error"))))
    sources = [source_of(key, by_container) for key in rows.column("key").to_pylist()]
    return pa.table(
        {"key": rows.column("key"), "source": pa.array(sources, pa.string()), FILE: rows.column(FILE)}
    )


def _record_stale(group: pa.Table, fs, staging: str, ownership: Ownership) -> pa.Table:
    chunk = group.column(FILE)[0].as_py()
    write_table(fs or LocalFileSystem(), stale_record(staging, chunk), group.select(["key"]), ownership)
    return pa.table({"rows": [group.num_rows]})


def resume(
    output: Output,
    chunks: list[str],
    listing: ray.data.Dataset,
    kind: str,
    uri_column: bool,
    ownership: Ownership,
) -> Resume:
    """The rows of earlier attempts' `chunks` (see `Output.prepare`) this attempt keeps, against the
    current `listing`. A table's URI column keys rows by the images' own URIs, which name no listed
    object: none of its rows are known stale (such a resume fails its check if a table went away)."""
    if not chunks:
        return Resume(None, 0)
    by_container = kind != "files"
    done = (
        table_files(output.ray_fs, chunks, ["key", "error"], chunks=True)
        .map_batches(_finished, batch_size=None, fn_kwargs={"by_container": by_container}, **TASK)
        .materialize()
    )
    if done.count() == 0:  # only failed reads: every input is read again
        return Resume(None, 0)
    if uri_column:
        return Resume(done, done.count())
    stale = without(done, listing.select_columns(["uri"]), ("source",), ("uri",))
    if stale.count():
        each_group(
            stale,
            FILE,
            _record_stale,
            fs=output.ray_fs,
            staging=output.staging(ownership.attempt),
            ownership=ownership,
        )
    return Resume(done, done.count() - stale.count())


def unfinished(listing: ray.data.Dataset, done: ray.data.Dataset | None) -> ray.data.MaterializedDataset:
    """The image files of `listing` that no earlier attempt finished."""
    return without(listing, done, ("uri",), ("key",))
