"""Reading a finished output table back, and SQL over it with DuckDB.

The PyPI duckdb wheel has no bundled httpfs, so tables are read through pyarrow and fsspec (any URI,
the run's credentials) and handed to DuckDB as Arrow data, registered as `predictions`.
"""

from __future__ import annotations

from typing import Any

import duckdb
import pyarrow as pa
import pyarrow.parquet as pq

from pipeline.sink import Output


class OutputNotReady(RuntimeError):
    """The output has no `_SUCCESS`: the run is still going, or died before committing."""


def read_output(
    uri: str, storage_options: dict[str, Any] | None = None, columns: list[str] | None = None
) -> pa.Table:
    """The rows of a finished run; refuses an output without `_SUCCESS` rather than return partial rows."""
    output = Output(uri, storage_options or {})
    if output.manifest() is None:
        raise OutputNotReady(
            f"{uri} has no _SUCCESS marker: the run that writes it has not finished (or failed); rerun it"
        )
    return pq.read_table(output.path, filesystem=output.fs, columns=columns)


def sql(table: pa.Table, query: str) -> duckdb.DuckDBPyRelation:
    """Run `query` with the table available as `predictions`."""
    connection = duckdb.connect()
    connection.register("predictions", table)
    return connection.sql(query)
