"""Nightly runs: each date's new or changed inputs become one Hive partition `run_date=YYYY-MM-DD` of one
table under the output root, which DuckDB, Polars, Spark and pyarrow read as a whole.

    OUTPUT/run_date=2026-11-27/*.parquet, _SUCCESS    committed partitions (the marker is written last)
    OUTPUT/run_date=2026-11-28/_staging/RUN/          a run in progress (pipeline.output); never read
    OUTPUT/_runs/2026-11-27/ledger-*.parquet          the ledger: (uri, size, version) of what that date read
    OUTPUT/_lease/                                    the live run's lease, one for the whole table

What a date processes: the listed objects whose (uri, version) appear in the ledger of no other committed
date. So a rerun of a date selects the same objects (less any that a later date has since taken) and
replaces only its own partition, no object has rows in two dates, and a date that crashed before its
marker is, for the other dates, as if it never ran. The ledgers and the selection are Ray datasets and
joins (`pipeline/selection.py`): the driver never holds what a date read.
"""

from __future__ import annotations

import datetime as dt
import re
import uuid
from typing import Any

import pyarrow as pa
import ray
from pydantic import BaseModel

from dinat_batch.pipeline.atomic import is_own_temp
from dinat_batch.pipeline.config import RunConfig
from dinat_batch.pipeline.errors import is_retryable
from dinat_batch.pipeline.faults import crash_point
from dinat_batch.pipeline.lease import LEASES
from dinat_batch.pipeline.output import SUCCESS, Compacted, ForeignFiles, Output
from dinat_batch.pipeline.ownership import Ownership, owner_of
from dinat_batch.pipeline.run import RunSummary, cluster, execute, finish, plan
from dinat_batch.pipeline.selection import TASK, table_files, without
from dinat_batch.pipeline.stages.read import LISTING, UNREADABLE
from dinat_batch.pipeline.stages.write import STAGE as WRITE_STAGE
from dinat_batch.pipeline.stages.write import ChunkSink

LEDGERS = "_runs"
LEDGER_PREFIX = "ledger-"
OLD_LEDGER = ".arrow"  # `_runs/DATE.arrow`: the ledger as versions before 2026-11-29 wrote it
_LEDGER_FILE = re.compile(r"^ledger-\d{6,}-\d+\.parquet$")
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

    def ledger(self, date: dt.date) -> str:
        return self.path(LEDGERS, date.isoformat())

    def seen_elsewhere(self, date: dt.date) -> ray.data.Dataset | None:
        """(uri, version) of every object read by another committed date (None: no other date has
        committed): before `date` they are old news, after it (a rerun of an earlier date) they already
        have their row there."""
        self.fs.invalidate_cache()
        files = []
        for entry in self.fs.glob(self.path(LEDGERS, "*")):
            name = entry.rsplit("/", 1)[1]
            day = _date(name.removesuffix(OLD_LEDGER))
            if day is None or day == date or not self.committed(day):
                continue
            # a date committed by a version that wrote one Arrow file per date is read as it is
            files += [entry] if name.endswith(OLD_LEDGER) else self._ledger_files(entry)[0]
        if not files:
            return None
        return table_files(self.root.ray_fs, files, ["uri", "version"])

    def _ledger_files(self, folder: str) -> tuple[list[str], list[str]]:
        """A date's ledger files, and its writes cut off before their rename (on a disk); anything else in
        its folder is someone else's."""
        found = self.fs.find(folder)
        cut_off = [path for path in found if self.root.local and is_own_temp(path.rsplit("/", 1)[1])]
        found = [path for path in found if path not in cut_off]
        owners = [
            owner_of(self.fs, path) if _LEDGER_FILE.match(path.rsplit("/", 1)[1]) else None for path in found
        ]
        foreign = [
            path
            for path, owner in zip(found, owners, strict=True)
            if owner is None or owner.output != self.root.identity
        ]
        if foreign:
            raise ForeignFiles(
                f"the nightly table's ledger folder {folder!r} holds files dinat-batch did not write: "
                f"{', '.join(foreign[:5])}. Move them away"
            )
        return found, cut_off

    def write_ledger(self, date: dt.date, read: ray.data.Dataset, ownership: Ownership) -> None:
        """Replace the date's ledger (an earlier attempt's, never committed with its partition: the
        partition's marker is gone before this) with what this run `read`."""
        folder = self.ledger(date)
        if self.fs.isdir(folder):
            ledgers, cut_off = self._ledger_files(folder)
            for path in ledgers + cut_off:
                self.fs.rm_file(path)
        if self.fs.isfile(folder + OLD_LEDGER):
            self.fs.rm_file(folder + OLD_LEDGER)
        sink = ChunkSink(folder, self.root.ray_fs, ownership, LISTING, None, prefix=LEDGER_PREFIX)
        read.write_datasink(sink, ray_remote_args=WRITE_STAGE.resources)


def _date(name: str) -> dt.date | None:
    try:
        return dt.date.fromisoformat(name)
    except ValueError:
        return None


def _failed_source(batch: pa.Table) -> pa.Table:
    """Sources of rows whose read failed (an image file, or a shard or table from its start)."""
    failed = [
        key.split(f"#{UNREADABLE} from its start>")[0]
        for key, error in zip(batch.column("key").to_pylist(), batch.column("error").to_pylist(), strict=True)
        if is_retryable(error)
    ]
    return pa.table({"source": pa.array(failed, pa.string())})


def _read_in_full(selected: ray.data.Dataset, partition: Output, compacted: Compacted) -> ray.data.Dataset:
    """The selected objects less those whose read failed: the ledger records only what was read. A shard
    that broke off part-way, or a table of URIs some of which failed, counts as read: taking it again
    would give its good rows a second date."""
    if not compacted.retryable:
        return selected
    parts = [f"{partition.path}/{entry['name']}" for entry in compacted.files]
    failed = table_files(partition.ray_fs, parts, ["key", "error"]).map_batches(
        _failed_source, batch_size=None, **TASK
    )
    return without(selected, failed, ("uri",), ("source",))


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
        new = without(planned.listing, table.seen_elsewhere(date), ("uri", "version"), ("uri", "version"))
        summary, compacted = execute(planned, partition, lease, new)
        read = _read_in_full(new, partition, compacted).materialize()
        result = NightlySummary(
            date=date,
            partition=partition.uri,
            listed=planned.listing.count(),
            new_or_changed=new.count(),
            retried_later=new.count() - read.count(),
            run=summary,
        )
        lease.check()
        table.write_ledger(date, read, planned.owner(table.root))
        crash_point("ledger-written")
        finish(partition, lease, summary, compacted, config.max_error_rate, result.model_dump(mode="json"))
    return result
