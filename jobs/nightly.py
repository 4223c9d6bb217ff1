"""Nightly runs: each date's new or changed inputs become one Hive partition `run_date=YYYY-MM-DD` of one
table under the output root, which DuckDB, Polars, Spark and pyarrow read as a whole.

    OUTPUT/run_date=2026-11-27/*.parquet, _SUCCESS    committed partitions (the marker is written last)
    OUTPUT/_runs/2026-11-27.arrow                     the ledger: (uri, version) of what that date read
    OUTPUT/_staging/2026-11-28-<run id>/              a run in progress; never read

What a date processes: the listed objects whose (uri, version) appear in the ledger of no other committed
date. So a rerun of a date selects the same objects (less any that a later date has since taken) and
replaces only its own partition, no object has rows in two dates, and a date that crashed before its
marker is, for the other dates, as if it never ran.
"""

from __future__ import annotations

import datetime as dt
import uuid
from typing import Any

import pyarrow as pa
import pyarrow.ipc as ipc
from pydantic import BaseModel

from pipeline.config import RunConfig
from pipeline.run import RunSummary, run
from pipeline.sink import SUCCESS, Output

LEDGERS = "_runs"
STAGING = "_staging"
PARTITION = "run_date"


class NightlySummary(BaseModel):
    date: dt.date
    partition: str
    listed: int
    new_or_changed: int
    run: RunSummary


def partition_name(date: dt.date) -> str:
    return f"{PARTITION}={date.isoformat()}"


class Table:
    """The Hive-partitioned output root of the nightly runs."""

    def __init__(self, uri: str, storage_options: dict[str, Any]):
        self.root = Output(uri, storage_options)
        self.fs = self.root.fs
        self.storage_options = storage_options

    def path(self, *parts: str) -> str:
        return "/".join([self.root.path, *parts])

    def committed(self, date: dt.date) -> bool:
        return self.fs.exists(self.path(partition_name(date), SUCCESS))

    def seen_elsewhere(self, date: dt.date) -> pa.Table:
        """(uri, version) of every object read by another committed date: before `date` they are old news,
        after it (a rerun of an earlier date) they already have their row there."""
        self.fs.invalidate_cache()
        tables = []
        for ledger in sorted(self.fs.glob(self.path(LEDGERS, "*.arrow"))):
            day = dt.date.fromisoformat(ledger.rsplit("/", 1)[1].removesuffix(".arrow"))
            if day != date and self.committed(day):
                with self.fs.open(ledger, "rb") as f:
                    tables.append(ipc.open_file(f).read_all().select(["uri", "version"]))
        if not tables:
            return pa.table({"uri": pa.array([], pa.string()), "version": pa.array([], pa.string())})
        return pa.concat_tables(tables)

    def commit(self, date: dt.date, staging: str, listing: pa.Table, manifest: dict[str, Any]) -> str:
        """Replace the date's partition by the staged files; the ledger, then the marker, last."""
        partition = self.path(partition_name(date))
        if self.fs.exists(partition):
            # un-commit first: from here until the new marker, readers skip this date
            if self.fs.exists(f"{partition}/{SUCCESS}"):
                self.fs.rm(f"{partition}/{SUCCESS}")
            self.fs.rm(partition, recursive=True)
        self.fs.makedirs(partition, exist_ok=True)
        self.fs.makedirs(self.path(LEDGERS), exist_ok=True)
        for staged in self.fs.find(staging):
            if staged.endswith(".parquet"):
                self.fs.copy(staged, f"{partition}/{staged.rsplit('/', 1)[1]}")
        ledger = self.path(LEDGERS, f"{date.isoformat()}.arrow")
        with self.fs.open(ledger, "wb") as f, ipc.new_file(f, listing.schema) as writer:
            writer.write_table(listing)
        Output(f"{self.root.uri}/{partition_name(date)}", self.storage_options).commit(manifest)
        self.fs.rm(staging, recursive=True)
        return partition

    def clear_staging(self, date: dt.date) -> None:
        """Staging left by earlier attempts at this date (a crashed driver)."""
        for stale in self.fs.glob(self.path(STAGING, f"{date.isoformat()}-*")):
            self.fs.rm(stale, recursive=True)


def nightly(config: RunConfig, date: dt.date | None = None) -> NightlySummary:
    """Process what is new or changed for `date` (default: today, UTC) into its partition."""
    date = date or dt.datetime.now(dt.UTC).date()
    table = Table(config.output, config.storage_options)
    table.clear_staging(date)
    seen = table.seen_elsewhere(date)
    run_id = f"nightly-{date.isoformat()}-{uuid.uuid4().hex[:8]}"
    staging = f"{table.root.uri}/{STAGING}/{date.isoformat()}-{run_id}"
    chosen: dict[str, pa.Table] = {}

    def select(listing: pa.Table) -> pa.Table:
        chosen["listed"] = listing
        new = listing.join(seen, keys=["uri", "version"], join_type="left anti").sort_by("uri")
        chosen["new"] = new
        return new

    summary = run(config.model_copy(update={"output": staging, "overwrite": True, "run_id": run_id}), select)
    partition = f"{table.root.uri}/{partition_name(date)}"
    result = NightlySummary(
        date=date,
        partition=partition,
        listed=chosen["listed"].num_rows,
        new_or_changed=chosen["new"].num_rows,
        run=summary.model_copy(update={"output": partition}),
    )
    table.commit(date, table.fs._strip_protocol(staging), chosen["new"], result.model_dump(mode="json"))
    return result
