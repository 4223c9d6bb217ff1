"""Sets of inputs and keys as Ray datasets, so that the driver holds no per-image state.

A run's listing, the keys earlier attempts finished and the nightly ledgers live in Ray's object store
(spilled to disk past its memory) as materialized datasets; set differences between them are Ray's hash
joins, spread over the cluster's CPUs; the driver holds block references and counts, O(blocks), never
O(images). Why joins rather than a key set shipped to every task: `benchmarks/RESULTS.md` ("A driver that
does not grow with the corpus").
"""

from __future__ import annotations

import math

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.ipc as ipc
import pyarrow.parquet as pq
import ray
from fsspec.implementations.local import LocalFileSystem

from dinat_batch.pipeline.digest import KeyDigest
from dinat_batch.pipeline.parallel import in_threads
from dinat_batch.pipeline.stages import CPU_TASK
from dinat_batch.pipeline.stages.write import chunk_groups

# keys per hash partition of a join: ~100 MB of URIs, a share one worker holds comfortably
ROWS_PER_PARTITION = 1_000_000
# up to this many rows a set operation runs in one task: a hash join's aggregator actors take seconds to
# start, an Arrow join of 200k keys in one task well under one (RESULTS.md)
SMALL = 200_000
TASK = {"batch_format": "pyarrow", **CPU_TASK}
FILE = "file"  # the column `table_files` names each row's file in
# chunk files per read call: a resume of small chunks (one inference batch each, 32 rows on a CPU) keeps
# some hundred calls in flight across the cluster, each reading its files on 16 threads (`in_threads`)
GROUP_FILES = 256


def table_files(fs, paths: list[str], columns: list[str], chunks: bool = False) -> ray.data.Dataset:
    """The rows of Parquet files (or Arrow IPC files, `.arrow`), read in Ray tasks through `fs` (None:
    each worker's local disk), each with the file it came from in a `file` column. Each call of the read
    function takes one file, or with `chunks` (files named by `chunk_name`) consecutive ones up to
    ROWS_PER_PARTITION rows and GROUP_FILES files, read by `in_threads`: the driver keeps memory
    for each block an execution is given (benchmarks/RESULTS.md), which a block per chunk of a large
    resume would add up to."""
    groups = chunk_groups(paths, ROWS_PER_PARTITION, GROUP_FILES) if chunks else [[path] for path in paths]
    return ray.data.from_items([{"paths": group} for group in groups]).map_batches(
        _read_files, batch_size=1, fn_kwargs={"fs": fs, "columns": columns}, **TASK
    )


def _read_files(batch: pa.Table, fs, columns: list[str]) -> pa.Table:
    fs = fs or LocalFileSystem()

    def read(path: str) -> pa.Table:
        with fs.open(path, "rb") as f:
            whole = (
                ipc.open_file(f).read_all() if path.endswith(".arrow") else pq.read_table(f, columns=columns)
            )
        table = whole.select(columns).replace_schema_metadata(None)
        return table.append_column(FILE, pa.repeat(pa.scalar(path, pa.string()), table.num_rows))

    # small chunk files: a request's latency each
    return pa.concat_tables(in_threads(read, batch.column("paths")[0].as_py()))


def without(
    left: ray.data.Dataset, right: ray.data.Dataset | None, on: tuple[str, ...], right_on: tuple[str, ...]
) -> ray.data.MaterializedDataset:
    """The rows of `left` whose `on` columns match no row's `right_on` columns in `right` (a left anti
    join)."""
    left = left.materialize()
    if right is None:
        return left
    right = right.materialize()
    if right.count() == 0 or left.count() == 0:
        return left
    if left.count() + right.count() <= SMALL:
        return _in_one_task(_anti_join, left, right, on=on, right_on=right_on)
    return left.join(
        right,
        join_type="left_anti",
        num_partitions=partitions(max(left.count(), right.count())),
        on=on,
        right_on=right_on,
    ).materialize()


def attach(left: ray.data.Dataset, right: ray.data.Dataset, on: str) -> ray.data.MaterializedDataset:
    """`left` with `right`'s other columns beside each row whose `on` matches (null where none does);
    `on` must be unique in `right`, as `each_group` makes it (a left outer join)."""
    left, right = left.materialize(), right.materialize()
    if left.count() + right.count() <= SMALL:
        return _in_one_task(_attach, left, right, on=on)
    return left.join(
        right, join_type="left_outer", num_partitions=partitions(right.count()), on=(on,)
    ).materialize()


def each_group(dataset: ray.data.Dataset, by: str, fn, **kwargs) -> ray.data.MaterializedDataset:
    """`fn(rows, **kwargs)` on the rows of each distinct `by` value: a table each. `dataset` has rows
    (the tables `fn` makes give the result its schema)."""
    dataset = dataset.materialize()
    if dataset.count() == 0:
        raise ValueError("each_group needs at least one row")
    if dataset.count() <= SMALL:
        return _in_one_task(_each_group, dataset, by=by, fn=fn, kwargs=kwargs)
    return (
        dataset.groupby(by, num_partitions=partitions(dataset.count()))
        .map_groups(fn, fn_kwargs=kwargs, **TASK)
        .materialize()
    )


def partitions(rows: int) -> int:
    """Hash partitions for a join or grouping of `rows` rows."""
    return max(1, math.ceil(rows / ROWS_PER_PARTITION))


def _in_one_task(work, *datasets: ray.data.MaterializedDataset, **kwargs) -> ray.data.MaterializedDataset:
    """`work(*tables, **kwargs)` in one Ray task over the datasets' blocks (never fetched by the driver)."""
    refs = [dataset.to_arrow_refs() for dataset in datasets]
    counts = [len(blocks) for blocks in refs]
    return ray.data.from_arrow_refs(
        [_run.options(**CPU_TASK).remote(work, counts, kwargs, *[ref for blocks in refs for ref in blocks])]
    )


@ray.remote
def _run(work, counts: list[int], kwargs: dict, *blocks: pa.Table) -> pa.Table:
    tables, start = [], 0
    for count in counts:
        tables.append(pa.concat_tables(blocks[start : start + count], promote_options="default"))
        start += count
    return work(*tables, **kwargs)


def _anti_join(left: pa.Table, right: pa.Table, on: tuple[str, ...], right_on: tuple[str, ...]) -> pa.Table:
    # Arrow's joins carry no list columns: every `left` here is a listing or a key table
    return left.join(right.select(list(right_on)), list(on), list(right_on), join_type="left anti")


def _attach(left: pa.Table, right: pa.Table, on: str) -> pa.Table:
    # by position rather than a join: Arrow's joins carry no list columns
    rows = pc.index_in(left.column(on), right.column(on))
    for name in right.column_names:
        if name != on:
            left = left.append_column(name, right.column(name).take(rows))
    return left


def _each_group(table: pa.Table, by: str, fn, kwargs: dict) -> pa.Table:
    table = table.sort_by(by)
    values = table.column(by).to_pylist()
    starts = [i for i in range(len(values)) if i == 0 or values[i] != values[i - 1]]
    ends = [*starts[1:], len(values)]
    results = [fn(table.slice(start, end - start), **kwargs) for start, end in zip(starts, ends, strict=True)]
    return pa.concat_tables(results) if results else table.slice(0, 0)


def digest(dataset: ray.data.Dataset, column: str) -> KeyDigest:
    """The KeyDigest of a column's values, summed from one digest per block."""
    total = KeyDigest()
    for row in dataset.map_batches(_digest, batch_size=None, fn_kwargs={"column": column}, **TASK).take_all():
        total += KeyDigest.from_json(row)
    return total


def _digest(batch: pa.Table, column: str) -> pa.Table:
    return pa.Table.from_pylist([KeyDigest().add(batch.column(column).to_pylist()).to_json()])
