"""Nightly runs: each date's new or changed inputs become one Hive partition `run_date=YYYY-MM-DD` of one
table under the output root, which DuckDB, Polars, Spark and pyarrow read as a whole.

    OUTPUT/run_date=2026-11-27/*.parquet, _SUCCESS    committed partitions (the marker is written last)
    OUTPUT/run_date=2026-11-28/_staging/RUN/          a run in progress (pipeline.output); never read
    OUTPUT/_runs/2026-11-27/ledger-*.parquet          the ledger: (uri, size, version) of what that date read
    OUTPUT/_lease/                                    the live run's lease, one for the whole table

With `output_format: iceberg` the partitions are those of one Iceberg table at OUTPUT (`pipeline/iceberg.py`):
its data files lie in OUTPUT/data/run_date=DATE/, a date is committed by a snapshot that replaces that
partition, and OUTPUT/run_date=DATE/ holds only the date's run in progress.

What a date processes: the listed objects whose (uri, version) appear in the ledger of no other committed
date. So a rerun of a date selects the same objects (less any that a later date has since taken) and
replaces only its own partition, no object has rows in two dates, and a date that crashed before its
marker is, for the other dates, as if it never ran. A date's ledger counts only as written by the run
that committed the date (the owner in each ledger file's footer): an Iceberg date stays committed while
its rerun writes the next ledger beside the old one. The ledgers and the selection are Ray datasets and
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
from dinat_batch.pipeline.deletion import delete_files
from dinat_batch.pipeline.errors import retryable_mask
from dinat_batch.pipeline.faults import crash_point
from dinat_batch.pipeline.iceberg import DATA, METADATA, IcebergTable
from dinat_batch.pipeline.lease import LEASES
from dinat_batch.pipeline.listing import pages
from dinat_batch.pipeline.objects import read_json
from dinat_batch.pipeline.output import SUCCESS, Compacted, ForeignFiles, Output, leaf
from dinat_batch.pipeline.ownership import Owners, Ownership, file_identity
from dinat_batch.pipeline.parallel import in_threads
from dinat_batch.pipeline.run import RunSummary, cluster, execute, finish, planned_under_guard
from dinat_batch.pipeline.selection import TASK, table_files, without
from dinat_batch.pipeline.stages.read import LISTING, UNREADABLE
from dinat_batch.pipeline.stages.write import STAGE as WRITE_STAGE
from dinat_batch.pipeline.stages.write import ChunkSink

LEDGERS = "_runs"
LEDGER_PREFIX = "ledger-"
OLD_LEDGER = ".arrow"  # `_runs/DATE.arrow`: the ledger as versions before 2026-11-29 wrote it
# ledger-RUN-000001-5.parquet (the run in the name: a rerun never writes over the committed run's files);
# ledger-000001-5.parquet as versions before 2026-11-29 named them
_LEDGER_FILE = re.compile(r"^ledger-([A-Za-z0-9._-]+-)?\d{6,}-\d+\.parquet$")
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
    """The Hive-partitioned output root of the nightly runs (or the Iceberg table partitioned by date)."""

    def __init__(self, uri: str, storage_options: dict[str, Any], iceberg: IcebergTable | None = None):
        self.root = Output(uri, storage_options)
        self.fs = self.root.fs
        self.iceberg = iceberg
        self._owners = Owners(self.fs, spread=not self.root.local)

    def path(self, *parts: str) -> str:
        return "/".join([self.root.path, *parts])

    def partition(self, date: dt.date) -> Output:
        if self.iceberg is None:
            return self.root.child(partition_name(date))
        uri = f"{self.root.uri}/{partition_name(date)}"
        return Output(uri, self.root.storage_options, self.iceberg, date.isoformat())

    def committed_runs(self) -> dict[dt.date, str | None]:
        """The run that committed each committed date (None for a date committed before ledgers carried
        their run)."""
        if self.iceberg is not None:
            return {
                day: summary.get("run_id")
                for scope, summary in self.iceberg.commits().items()
                if (day := _date(scope)) is not None
            }
        folders = {}
        for page in pages(self.fs, self.root.path, recursive=False):
            for entry in page:
                name = leaf(entry["name"])
                day = _date(name.removeprefix(f"{PARTITION}=")) if name.startswith(f"{PARTITION}=") else None
                if day is not None and entry["type"] == "directory":
                    folders[day] = entry["name"]
        # a marker each, at once: a year of dates is 365 requests; none for a date not committed (yet, or
        # its run died)
        markers = in_threads(lambda folder: read_json(self.fs, f"{folder}/{SUCCESS}"), list(folders.values()))
        return {
            day: marker.get("run_id")
            for day, marker in zip(folders, markers, strict=True)
            if marker is not None
        }

    def check_root(self) -> None:
        """The root holds partitions, ledgers and the lease only (and an Iceberg table's data and metadata):
        anything else is someone else's."""
        self.fs.invalidate_cache()
        if not self.fs.isdir(self.root.path):
            return
        ours = (LEDGERS, LEASES) + ((DATA, METADATA) if self.iceberg else ())
        foreign = [
            entry
            for entry in self.fs.ls(self.root.path, detail=False)
            if not (leaf(entry) in ours or leaf(entry).startswith(f"{PARTITION}="))
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
        committed = self.committed_runs()
        runs = {day: run for day, run in committed.items() if day != date}
        files = self._ledger_files(self.path(LEDGERS), runs)[0] if runs else []
        if not files:
            return None
        return table_files(self.root.ray_fs, files, ["uri", "version"], chunks=True)

    def _ledger_files(self, folder: str, runs: dict[dt.date, str | None]) -> tuple[list[str], list[str]]:
        """The ledger files below `folder` (the ledgers' or one date's) of the dates in `runs` written by
        the run given for each (any run's when None), and the rest: other runs' and writes cut off before
        their rename (on a disk). A date's ledger as versions before 2026-11-29 wrote it, one Arrow file
        beside the dates' folders, is read as it is. Anything else in a date's folder is someone else's.
        One listing for all the dates and their footers read at once (`Owners`): a year of dates is a year
        of ledgers."""
        top = len(self.path(LEDGERS)) + 1
        old, cut_off, foreign = [], [], []  # paths: the old ledgers', cut-off writes', someone else's
        ledgers = []  # (date, entry) of the ledger files in the dates' folders
        for page in pages(self.fs, folder, recursive=True):
            for entry in page:
                first, *below = entry["name"][top:].split("/", 1)
                day = _date(first if below else first.removesuffix(OLD_LEDGER))
                if day not in runs or entry["type"] != "file":
                    continue
                name = leaf(entry["name"])
                if not below:
                    if first.endswith(OLD_LEDGER):
                        old.append(entry["name"])
                elif self.root.local and is_own_temp(name):
                    cut_off.append(entry["name"])
                elif _LEDGER_FILE.match(name):
                    ledgers.append((day, entry))
                else:
                    foreign.append(entry["name"])
        owners = self._owners.of([(e["name"], file_identity(self.fs, e), e.get("size")) for _, e in ledgers])
        mine, others = [], []
        for (day, entry), owner in zip(ledgers, owners, strict=True):
            if owner is None or owner.output != self.root.identity:
                foreign.append(entry["name"])
            else:
                (mine if runs[day] in (None, owner.run_id) else others).append(entry["name"])
        if foreign:
            raise ForeignFiles(
                f"the nightly table's ledger folder {folder!r} holds files dinat-batch did not write: "
                f"{', '.join(foreign[:5])}. Move them away"
            )
        return old + mine, cut_off + others

    def write_ledger(self, date: dt.date, read: ray.data.Dataset, ownership: Ownership) -> None:
        """Write what this run `read` as the date's next ledger. The ledgers of runs that did not commit
        the date go first; the committed run's stays until this run's commit (`prune_ledger`): a Parquet
        partition's marker is gone by now, an Iceberg date stays committed until its new snapshot."""
        self.prune_ledger(date, self.committed_runs().get(date, ""))
        prefix = f"{LEDGER_PREFIX}{ownership.run_id}-"
        sink = ChunkSink(self.ledger(date), self.root.ray_fs, ownership, LISTING, None, prefix=prefix)
        read.write_datasink(sink, ray_remote_args=WRITE_STAGE.resources)

    def prune_ledger(self, date: dt.date, run_id: str) -> None:
        """Remove the date's ledger files that `run_id` did not write."""
        folder = self.ledger(date)
        if self.fs.isdir(folder):
            delete_files(self.fs, self._ledger_files(folder, {date: run_id})[1])
        if self.fs.isfile(folder + OLD_LEDGER):
            self.fs.rm_file(folder + OLD_LEDGER)


def _date(name: str) -> dt.date | None:
    """The date a folder is named for, written as the pipeline writes it (`fromisoformat` also takes
    `20261120`, which would stand for a date it did not write)."""
    try:
        day = dt.date.fromisoformat(name)
    except ValueError:
        return None
    return day if day.isoformat() == name else None


def _failed_source(batch: pa.Table) -> pa.Table:
    """Sources of rows whose read failed (an image file, or a shard or table from its start)."""
    keys = batch.filter(retryable_mask(batch.column("error"))).column("key").to_pylist()
    failed = [key.split(f"#{UNREADABLE} from its start>")[0] for key in keys]
    return pa.table({"source": pa.array(failed, pa.string())})


def _read_in_full(selected: ray.data.Dataset, partition: Output, compacted: Compacted) -> ray.data.Dataset:
    """The selected objects less those whose read failed: the ledger records only what was read. A shard
    that broke off part-way, or a table of URIs some of which failed, counts as read: taking it again
    would give its good rows a second date."""
    if not compacted.retryable:
        return selected
    parts = [f"{partition.data_path}/{entry['name']}" for entry in compacted.files]
    failed = table_files(partition.ray_fs, parts, ["key", "error"]).map_batches(
        _failed_source, batch_size=None, **TASK
    )
    return without(selected, failed, ("uri",), ("source",))


def nightly(config: RunConfig, date: dt.date | None = None) -> NightlySummary:
    """Process what is new or changed for `date` (default: today, UTC) into its partition.

    The whole table is leased, not the partition: two attempts at one date would otherwise both commit,
    and attempts at two dates could both take the same new objects. A date whose partition is committed
    is rerun (its marker removed first; an Iceberg date stays committed until its new snapshot); one whose
    attempt died is resumed from that attempt's chunks. Joins and leaves Ray as `run` does."""
    date = date or dt.datetime.now(dt.UTC).date()
    table = Table(config.output, config.storage_options, IcebergTable.of(config))
    run_id = f"nightly-{date.isoformat()}-{uuid.uuid4().hex[:8]}"
    table.check_root()
    with cluster(config), table.root.lease(run_id, config.lease_timeout) as lease:
        partition = table.partition(date)
        rerun = partition.marker() is not None
        # a Parquet date's marker goes before its rerun; an Iceberg date stays until its next snapshot, and
        # a rerun cut short is resumed beside it
        fresh = config.overwrite or (rerun and table.iceberg is None)
        with planned_under_guard(config.model_copy(update={"overwrite": fresh}), run_id) as planned:
            new = without(planned.listing, table.seen_elsewhere(date), ("uri", "version"), ("uri", "version"))
            summary, compacted = execute(planned, partition, lease, new, replace=rerun)
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
        table.prune_ledger(date, run_id)
    return result
