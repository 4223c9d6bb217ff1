"""The control plane at corpus scale: does the driver grow with the number of images?

    .venv/bin/python benchmarks/scale.py --images 1000000 [--record]

Simulates N inputs without images or a model: a synthetic listing of N image URIs (as `list_objects`
gives it), an output holding a dead attempt's chunk files with half of them finished (1% of those for
inputs that are no longer listed, 1% failed reads), and a nightly table whose five earlier dates read 90%
of the listing. Runs the pipeline's own selection code on them, each step timed, and prints one JSON
line: `images`, `driver_peak_rss_mb` (peak growth of the driver's resident memory during the steps over
its size before them, sampled every 20 ms), `seconds` and `entries_per_second` per step, and the object store
bytes the datasets hold. The synthetic data is made by Ray tasks, not by the driver.
"""

from __future__ import annotations

import gc
import os
import sys
import tempfile
import threading
import time
from pathlib import Path

if not __package__:
    sys.path[0] = str(Path(__file__).resolve().parents[1])

import pyarrow as pa
import ray

from benchmarks.common import count_and_print
from dinat_batch.jobs.nightly import Table
from dinat_batch.pipeline.atomic import put_file
from dinat_batch.pipeline.config import RunConfig
from dinat_batch.pipeline.errors import error_text
from dinat_batch.pipeline.output import SUCCESS, Output
from dinat_batch.pipeline.ownership import Ownership, write_table
from dinat_batch.pipeline.resume import resume, unfinished
from dinat_batch.pipeline.selection import digest, without
from dinat_batch.pipeline.stages import read
from dinat_batch.pipeline.stages.write import ChunkSink, chunk_name

BLOCK = 100_000  # synthetic rows per generating task
CHUNK = 50_000  # rows per chunk file of the dead attempt
MODEL = "0" * 64
DATES = 5


def uri(i: int) -> str:
    return f"s3://corpus/images/{i // 10_000:06d}/{i:010d}.jpg"


def _listing_block(batch: pa.Table) -> pa.Table:
    start, count = batch.column("start")[0].as_py(), batch.column("count")[0].as_py()
    return pa.table(
        {
            "uri": [uri(i) for i in range(start, start + count)],
            "size": pa.array([120_000] * count, pa.int64()),
            "version": [f"{i:032x}" for i in range(start, start + count)],
        },
        schema=read.LISTING,
    )


def _ranges(first: int, last: int, size: int) -> ray.data.Dataset:
    starts = range(first, last, size)
    return ray.data.from_items([{"start": s, "count": min(size, last - s)} for s in starts])


def _failed(i: int) -> bool:
    return i % 100 == 7


@ray.remote(num_cpus=0.5)
def _chunk(folder: str, index: int, start: int, count: int, images: int, owner: Ownership) -> None:
    """A dead attempt's chunk of rows [start, start+count): the first images/2 rows are listed images,
    the rest images deleted since (past the listing); every 100th a failed read."""
    numbers = [j if j < images // 2 else images + j - images // 2 for j in range(start, start + count)]
    keys = [uri(i) for i in numbers]
    errors = [error_text("ReadError", "timed out") if _failed(i) else None for i in numbers]
    table = pa.table({"key": keys, "error": pa.array(errors, pa.string()), "model_sha256": [MODEL] * count})
    write_table(Output(folder, {}).fs, f"{folder}/{chunk_name(index, count)}", table, owner)


class PeakRSS:
    """The process's resident memory, sampled in a thread: the peak over a step."""

    def __init__(self):
        self.page = os.sysconf("SC_PAGE_SIZE")
        self.peak = self.now()
        self._stop = threading.Event()
        threading.Thread(target=self._sample, daemon=True).start()

    def now(self) -> int:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * self.page

    def _sample(self) -> None:
        while not self._stop.wait(0.02):
            self.peak = max(self.peak, self.now())

    def stop(self) -> None:
        self._stop.set()


def setup(images: int, root: Path) -> tuple[ray.data.MaterializedDataset, Output, Table]:
    """The synthetic listing, a dead attempt's chunks in `root/out`, five committed dates in
    `root/table`: all written by Ray tasks."""
    listing = _ranges(0, images, BLOCK).map_batches(_listing_block, batch_size=1, batch_format="pyarrow")
    listing = listing.materialize()
    out = Output(str(root / "out"), {})
    dead = Ownership("dead-run", MODEL, "dead-run.0", out.identity)
    staging = out.staging(dead.attempt)
    os.makedirs(staging)
    done = images // 2 + images // 100  # half finished, plus 1% whose inputs are gone since
    ray.get(
        [
            _chunk.remote(staging, i, start, min(CHUNK, done - start), images, dead)
            for i, start in enumerate(range(0, done, CHUNK))
        ]
    )
    table = Table(str(root / "table"), {})
    share = images * 9 // 10 // DATES
    for day in range(DATES):
        date = f"2026-11-{20 + day:02d}"
        owner = Ownership(f"nightly-{date}", MODEL, f"nightly-{date}.0", table.root.identity)
        part = _ranges(day * share, (day + 1) * share, BLOCK).map_batches(
            _listing_block, batch_size=1, batch_format="pyarrow"
        )
        folder = table.path("_runs", date)
        part.write_datasink(ChunkSink(folder, None, owner, read.LISTING, None, prefix="ledger-"))
        os.makedirs(table.path(f"run_date={date}"))
        put_file(table.fs, table.path(f"run_date={date}", SUCCESS), b"{}")
    return listing, out, table


def measure(images: int) -> dict:
    import datetime as dt

    config = RunConfig(input="s3://corpus/images", output="unused", model="unused")
    with tempfile.TemporaryDirectory() as tmp:
        ray.init(address="local", include_dashboard=False, logging_level="ERROR")
        ray.data.DataContext.get_current().enable_progress_bars = False
        listing, out, table = setup(images, Path(tmp))
        gc.collect()
        rss = PeakRSS()  # from here: what the pipeline's own steps add, not the simulation's set-up
        baseline = rss.now()
        steps: dict[str, dict[str, float]] = {}

        def step(name: str, entries: int, work):
            t0 = time.monotonic()
            result = work()
            seconds = time.monotonic() - t0
            steps[name] = {"seconds": round(seconds, 2), "entries_per_second": round(entries / seconds)}
            return result

        kind, chosen = step("choose_kind", images, lambda: read.choose_kind(config, listing))
        step("expected_digest", images, lambda: digest(chosen, "uri"))
        owner = Ownership("scale-run", MODEL, "scale-run.1", out.identity)
        earlier = step(
            "survey", len(os.listdir(out.staging("dead-run.0"))), lambda: out.prepare(False, owner, {})
        )
        done_rows = images // 2 + images // 100
        kept = step(
            "resume_keys_and_stale",
            done_rows + images,
            lambda: resume(out, earlier, chosen, kind, False, owner),
        )
        todo = step("resume_filter", images + done_rows, lambda: unfinished(chosen, kept.done))
        ledgers = images * 9 // 10 // DATES * DATES

        def nightly_selection():
            seen = table.seen_elsewhere(dt.date(2026, 11, 28))
            return without(chosen, seen, ("uri", "version"), ("uri", "version"))

        new = step("nightly_selection", images + ledgers, nightly_selection)
        rss.stop()
        result = {
            "images": images,
            "driver_peak_rss_mb": round((rss.peak - baseline) / 2**20, 1),
            "steps": steps,
            "checks": {
                "unfinished": todo.count(),
                "resumed": kept.resumed,
                "new_or_changed": new.count(),
            },
            "object_store_mb": {
                "listing": round(chosen.size_bytes() / 2**20, 1),
                "finished_keys": round(kept.done.size_bytes() / 2**20, 1),
            },
        }
        ray.shutdown()
    failed = (images // 2) // 100 + (1 if (images // 2) % 100 > 7 else 0)  # rows i < images/2 with _failed(i)
    expected = {
        "unfinished": images - (images // 2 - failed),
        "resumed": images // 2 - failed,
        "new_or_changed": images - ledgers,
    }
    if result["checks"] != expected:
        raise SystemExit(f"wrong selection: {result['checks']} != {expected}")
    return result


def main() -> None:
    count_and_print(__doc__, "scale.py", "images", 1_000_000, measure)


if __name__ == "__main__":
    main()
