"""Nightly runs: each date's new or changed inputs become one Hive partition `run_date=YYYY-MM-DD` of one
table under the output root, which DuckDB, Polars, Spark and pyarrow read as a whole.

    OUTPUT/run_date=2026-11-27/*.parquet, _SUCCESS    committed partitions (the marker is written last)
    OUTPUT/run_date=2026-11-28/_staging/RUN/          a run in progress (pipeline.output); never read
    OUTPUT/_runs/2026-11-27.arrow                     the ledger: (uri, version) of what that date read
    OUTPUT/_lease/                                    the live run's lease, one for the whole table

What a date processes: the listed objects whose (uri, version) appear in the ledger of no other committed
date. So a rerun of a date selects the same objects (less any that a later date has since taken) and
replaces only its own partition, no object has rows in two dates, and a date that crashed before its
marker is, for the other dates, as if it never ran.
"""

from __future__ import annotations

import datetime as dt
import io
import uuid
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.ipc as ipc
from pydantic import BaseModel

from dinat_batch.pipeline.atomic import put_file
from dinat_batch.pipeline.config import RunConfig
from dinat_batch.pipeline.faults import crash_point
from dinat_batch.pipeline.lease import LEASES
from dinat_batch.pipeline.output import SUCCESS, ForeignFiles, Output
from dinat_batch.pipeline.run import RunSummary, cluster, execute, finish, plan
from dinat_batch.pipeline.stages.read import UNREADABLE

LEDGERS = "_runs"
PARTITION = "run_date"


class NightlySummary(BaseModel):
    date: dt.date
    partition: str
    listed: int
    new_or_changed: int
    retried_later: int  # inputs whose read failed: left out of the ledger, so a later run takes them again
    run: RunSummary


def partition_name(date: dt.date) -> str:
    return f"{PARTITION}={date.isoformat()}"


class Table:
    """The Hive-partitioned output root of the nightly runs."""

    def __init__(self, uri: str, storage_options: dict[str, Any]):
        self.root = Output(uri, storage_options)
        self.fs = self.root.fs

    def path(self, *parts: str) -> str:
        return "/".join([self.root.path, *parts])

    def partition(self, date: dt.date) -> Output:
        return self.root.child(partition_name(date))

    def committed(self, date: dt.date) -> bool:
        return self.fs.exists(self.path(partition_name(date), SUCCESS))

    def check_root(self) -> None:
        """The root holds partitions, ledgers and the lease only: anything else is someone else's."""
        self.fs.invalidate_cache()
        if not self.fs.isdir(self.root.path):
            return
        foreign = [
            entry
            for entry in self.fs.ls(self.root.path, detail=False)
            if not entry.rsplit("/", 1)[1].startswith((f"{PARTITION}=", LEDGERS, LEASES))
        ]
        if foreign:
            raise ForeignFiles(
                f"the nightly table {self.root.uri!r} holds files dinat-batch did not write: "
                f"{', '.join(foreign[:5])}. Choose an empty or new output, or move them away"
            )

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

    def write_ledger(self, date: dt.date, read: pa.Table) -> None:
        buffer = io.BytesIO()
        with ipc.new_file(buffer, read.schema) as writer:
            writer.write_table(read)
        put_file(self.fs, self.path(LEDGERS, f"{date.isoformat()}.arrow"), buffer.getvalue())


def _read_in_full(selected: pa.Table, retryable_keys: list[str]) -> pa.Table:
    """The selected objects less those whose read failed (an image file, or a shard or table from its
    start): the ledger records only what was read. A shard that broke off part-way, or a table of URIs
    some of which failed, counts as read: taking it again would give its good rows a second date."""
    failed = {key.split(f"#{UNREADABLE} from its start>")[0] for key in retryable_keys}
    return selected.filter(pc.invert(pc.is_in(selected.column("uri"), pa.array(sorted(failed), pa.string()))))


def nightly(config: RunConfig, date: dt.date | None = None) -> NightlySummary:
    """Process what is new or changed for `date` (default: today, UTC) into its partition.

    The whole table is leased, not the partition: two attempts at one date would otherwise both commit,
    and attempts at two dates could both take the same new objects. A date whose partition is committed
    is rerun (its marker removed first); one whose attempt died is resumed from that attempt's chunks."""
    date = date or dt.datetime.now(dt.UTC).date()
    table = Table(config.output, config.storage_options)
    run_id = f"nightly-{date.isoformat()}-{uuid.uuid4().hex[:8]}"
    table.check_root()
    with cluster(config), table.root.lease(run_id, config.lease_timeout) as lease:
        partition = table.partition(date)
        rerun = partition.marker() is not None
        planned = plan(config.model_copy(update={"overwrite": rerun or config.overwrite}), run_id)
        seen = table.seen_elsewhere(date)
        new = planned.listing.join(seen, keys=["uri", "version"], join_type="left anti").sort_by("uri")
        summary, compacted = execute(planned, partition, lease, new)
        read = _read_in_full(new, compacted.retryable_keys)
        result = NightlySummary(
            date=date,
            partition=partition.uri,
            listed=planned.listing.num_rows,
            new_or_changed=new.num_rows,
            retried_later=new.num_rows - read.num_rows,
            run=summary,
        )
        lease.check()
        table.write_ledger(date, read)
        crash_point("ledger-written")
        finish(partition, lease, summary, compacted, config.max_error_rate, result.model_dump(mode="json"))
    return result
