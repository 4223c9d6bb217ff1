"""Reading a finished output table back, and SQL over it with DuckDB.

The PyPI duckdb wheel has no bundled httpfs, so tables are read through pyarrow and fsspec (any URI,
the run's credentials), or scanned by pyiceberg for an Iceberg table (at any snapshot), and handed to
DuckDB as Arrow data, registered as `predictions`.
"""

from __future__ import annotations

from typing import Any

import duckdb
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.dataset as ds

from dinat_batch.pipeline.iceberg import IcebergTable
from dinat_batch.pipeline.output import Output, leaf
from dinat_batch.pipeline.stages.write import output_schema

SUMMARY = {
    "runs": (
        "SELECT {by}, count(*) AS images, count(*) FILTER (status = 'ok') AS ok, "
        "count(*) FILTER (status = 'error') AS errors, min(processed_at) AS started, "
        "max(processed_at) AS finished FROM predictions GROUP BY {by} ORDER BY {by}"
    ),
    "errors by kind": (
        "SELECT split_part(error, ': ', 1) AS kind, count(*) AS images FROM predictions "
        "WHERE status = 'error' GROUP BY kind ORDER BY images DESC, kind"
    ),
    "top labels": (
        "SELECT labels[1] AS top1, count(*) AS images, round(avg(scores[1]), 4) AS mean_score "
        "FROM predictions WHERE status = 'ok' AND labels IS NOT NULL GROUP BY top1 "
        "ORDER BY images DESC, top1 LIMIT 10"
    ),
}


def summary_queries(table: pa.Table) -> dict[str, str]:
    """SUMMARY for this table: rows per run date and run for a nightly table, per run otherwise."""
    by = "run_date, run_id" if "run_date" in table.column_names else "run_id"
    return {title: text.replace("{by}", by) for title, text in SUMMARY.items()}


class OutputNotReady(RuntimeError):
    """The output has no `_SUCCESS`: the run is still going, or died before committing."""


def read_output(
    uri: str,
    storage_options: dict[str, Any] | None = None,
    iceberg: IcebergTable | None = None,
    snapshot_id: int | None = None,
    as_of_ms: int | None = None,
    columns: list[str] | None = None,
    limit: int | None = None,
    valid: str | None = None,
) -> pa.Table:
    """The committed rows under `uri`: one run's output (the files its `_SUCCESS` lists), or the committed
    `run_date=` partitions of a nightly table (with a `run_date` column). Rows no marker lists are never
    returned. With `iceberg`: that table's current snapshot, or the one `snapshot_id` names, or the one
    current at `as_of_ms` (milliseconds since the epoch). `columns`, `limit` (the first rows) and `valid` (only
    rows where that column is not null; an Iceberg table filters the first `limit` rows) read less."""
    if iceberg is not None:
        try:
            table = iceberg.read(snapshot_id, as_of_ms, columns, limit)
        except LookupError as err:
            raise OutputNotReady(str(err)) from err
        return table if valid is None else table.filter(pc.is_valid(table.column(valid)))
    if snapshot_id is not None or as_of_ms is not None:
        raise OutputNotReady("snapshots and time travel are for Iceberg tables: give the table and catalog")
    output = Output(uri, storage_options or {})
    files = output.committed_files()
    if files is not None:
        if not files:  # a run that had nothing to process
            return _empty(output_schema(0), columns)
        return _rows(ds.dataset(files, filesystem=output.fs, format="parquet"), columns, limit, valid)
    partitions = [output.child(leaf(path)) for path in output.fs.glob(f"{output.path}/run_date=*")]
    listed = [(partition, partition.committed_files()) for partition in partitions]
    committed = [(partition, files) for partition, files in listed if files is not None]
    if not committed:
        raise OutputNotReady(
            f"{uri} has no _SUCCESS marker and no committed run_date= partition: the run that writes it has "
            "not finished (or failed); rerun it"
        )
    files = [path for _, paths in committed for path in paths]
    if not files:  # only runs that found nothing new
        return _empty(output_schema(0).append(pa.field("run_date", pa.string())), columns)
    dataset = ds.dataset(
        files,
        filesystem=output.fs,
        format="parquet",
        partitioning=ds.partitioning(pa.schema([("run_date", pa.string())]), flavor="hive"),
        partition_base_dir=output.path,
    )
    return _rows(dataset, columns, limit, valid)


def _rows(dataset: ds.Dataset, columns: list[str] | None, limit: int | None, valid: str | None) -> pa.Table:
    where = None if valid is None else ds.field(valid).is_valid()
    return (
        dataset.to_table(columns, filter=where)
        if limit is None
        else dataset.head(limit, columns, filter=where)
    )


def _empty(schema: pa.Schema, columns: list[str] | None) -> pa.Table:
    table = schema.empty_table()
    return table if columns is None else table.select(columns)


def sql(table: pa.Table, query: str, params: dict[str, Any] | None = None) -> duckdb.DuckDBPyRelation:
    """Run `query` (with `$name` parameters from `params`) with the table available as `predictions`."""
    connection = duckdb.connect()
    connection.register("predictions", table)
    return connection.sql(query, params=params)


def similar(table: pa.Table, key: str, k: int = 10) -> duckdb.DuckDBPyRelation:
    """The k rows nearest to `key` by cosine similarity of their embeddings, most similar first."""
    found = sql(
        table, "SELECT count(*) FROM predictions WHERE key = $key AND embedding IS NOT NULL", {"key": key}
    )
    if found.fetchall()[0][0] == 0:
        raise KeyError(f"no row with key {key!r} and an embedding (it is absent, or an error row)")
    return sql(
        table,
        "SELECT key, round(array_cosine_similarity(embedding, "
        "(SELECT embedding FROM predictions WHERE key = $key LIMIT 1)), 6) AS similarity, labels[1] AS top1 "
        "FROM predictions WHERE key <> $key AND embedding IS NOT NULL ORDER BY similarity DESC, key LIMIT $k",
        {"key": key, "k": k},
    )
