"""A nightly table with a long history, against the local S3 server (SeaweedFS on loopback):

    .venv/bin/python benchmarks/history.py --dates 365 [--record]

Every nightly run selects what no other committed date read, so before its first image it finds the
committed dates and reads every earlier date's ledger: its cost grows with the table's history, not with
the night's images. Builds a table of N committed dates (markers naming their run, LEDGER_FILES ledger
files of LEDGER_ROWS rows each, as a run writes them), then times, twice each: `committed_runs` (the
markers), `seen_elsewhere` (the ledgers found and their owners checked: the driver's part) and the count
of the dataset it gives (the ledgers read by Ray tasks). Prints one JSON line with the seconds, the S3
requests the driver made in each step, by kind, and the blocks of the ledgers' dataset.
"""

from __future__ import annotations

import datetime as dt
import json
import sys
import time
from collections import Counter
from pathlib import Path

if not __package__:
    sys.path[0] = str(Path(__file__).resolve().parents[1])

import pyarrow as pa
import ray
import s3fs
from fsspec.asyn import sync_wrapper

from benchmarks.common import count_and_print
from dinat_batch.infra.object_store import LocalObjectStore
from dinat_batch.jobs.nightly import LEDGERS, PARTITION, Table
from dinat_batch.pipeline.output import SUCCESS
from dinat_batch.pipeline.ownership import Ownership, write_table
from dinat_batch.pipeline.parallel import in_threads
from dinat_batch.pipeline.stages.read import LISTING
from dinat_batch.pipeline.stages.write import chunk_name

LEDGER_FILES = 4  # per date: a night's read dataset in a few blocks
LEDGER_ROWS = 100
FIRST = dt.date(2025, 1, 1)


class _Requests:
    """S3 requests made by the driver's filesystem, by kind (Ray tasks' own are not counted)."""

    def __init__(self):
        self.counts: Counter[str] = Counter()
        self._call = s3fs.S3FileSystem._call_s3

        async def counted(fs, method, *args, **kwargs):
            self.counts[method] += 1
            return await self._call(fs, method, *args, **kwargs)

        s3fs.S3FileSystem._call_s3 = counted
        s3fs.S3FileSystem.call_s3 = sync_wrapper(counted)  # made of the method before: patched apart

    def take(self) -> dict[str, int]:
        counts, self.counts = dict(self.counts), Counter()
        return counts


def _date_files(table: Table, day: int) -> None:
    date = FIRST + dt.timedelta(days=day)
    run_id = f"nightly-{date}-bench"
    owner = Ownership(run_id, "0" * 64, f"{run_id}.0", table.root.identity)
    for index in range(LEDGER_FILES):
        first = (day * LEDGER_FILES + index) * LEDGER_ROWS
        uris = [f"s3://corpus/{i:010d}.jpg" for i in range(first, first + LEDGER_ROWS)]
        rows = pa.table({"uri": uris, "size": [1] * len(uris), "version": ["v"] * len(uris)}, schema=LISTING)
        write_table(
            table.fs, table.path(LEDGERS, str(date), chunk_name(index, LEDGER_ROWS, "ledger-")), rows, owner
        )
    marker = json.dumps({"run_id": run_id}).encode()
    table.fs.pipe_file(table.path(f"{PARTITION}={date}", SUCCESS), marker)


def measure(dates: int) -> dict:
    with LocalObjectStore() as store:
        store.make_bucket("bench")
        table = Table("s3://bench/table", store.storage_options)
        in_threads(lambda day: _date_files(table, day), range(dates))
        ray.init(address="local", include_dashboard=False, logging_level="ERROR")
        ray.data.DataContext.get_current().enable_progress_bars = False
        requests = _Requests()
        tonight = FIRST + dt.timedelta(days=dates)
        result: dict = {"dates": dates, "ledger_files": dates * LEDGER_FILES}
        for run in (1, 2):
            t0 = time.monotonic()
            committed = table.committed_runs()
            t1 = time.monotonic()
            asked = requests.take()
            seen = table.seen_elsewhere(tonight)
            t2 = time.monotonic()
            found = requests.take()
            rows = seen.count()
            t3 = time.monotonic()
            assert len(committed) == dates and rows == dates * LEDGER_FILES * LEDGER_ROWS, (
                len(committed),
                rows,
            )
            result[f"run_{run}"] = {
                "committed_runs_s": round(t1 - t0, 2),
                "seen_elsewhere_s": round(t2 - t1, 2),
                "ledgers_read_s": round(t3 - t2, 2),
                "requests": {"committed_runs": asked, "seen_elsewhere": found},
                "blocks": seen.materialize().num_blocks(),
            }
        ray.shutdown()
    return result


def main() -> None:
    count_and_print(__doc__, "history.py", "dates", 365, measure)


if __name__ == "__main__":
    main()
