"""How fast a listing of image files feeds the read tasks: the run's split (`read.split`) against Ray Data's
default streaming repartition, and against a listing made in blocks of one task each (no split at all:
the executor's own ceiling), side by side in one Ray session.

    .venv/bin/python benchmarks/split.py [--images 20000] [--per-task 64] [--cpus 64] [--seconds 2] [--record]

The read tasks sleep instead of reading and decoding, so that what is measured is Ray Data's executor
handing out work, not this machine's cores: Ray is started declaring `--cpus` (more than the machine has),
and each task holds half a CPU as a read task does. Images/s: the images of the tasks started between the
fifth and the four-fifths of the run, over that time; each feed runs twice, in order and then in reverse
order, and the mean is shown. A first pass warms up Ray's workers.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

if not __package__:
    sys.path[0] = str(Path(__file__).resolve().parents[1])

import pyarrow as pa
import ray

from benchmarks.common import record
from dinat_batch.pipeline.stages import CPU_TASK, read


def _listing(images: int, rows: int) -> ray.data.Dataset:
    """`images` listed files in blocks of `rows` (all of them: one block, as one flat folder lists)."""
    uris = pa.array([f"s3://bucket/images/{i:09d}.jpg" for i in range(images)])
    listing = pa.table({"uri": uris, "size": pa.repeat(1, images), "version": pa.repeat("v", images)})
    blocks = [listing.slice(i, rows) for i in range(0, images, rows)]
    return ray.data.from_arrow(blocks).materialize()


def _task(batch: pa.Table, seconds: float) -> pa.Table:
    started = time.time()
    time.sleep(seconds)
    return pa.table({"started": [started], "images": [batch.num_rows]})


def _rate(feed: ray.data.Dataset, seconds: float) -> tuple[float, int]:
    """Images/s the read tasks started at, mid-run, and the images they took."""
    tasks = feed.map_batches(
        _task, batch_size=None, batch_format="pyarrow", fn_kwargs={"seconds": seconds}, **CPU_TASK
    )
    done = pa.concat_tables(ray.get(tasks.to_arrow_refs())).sort_by("started")
    starts, images = done.column("started").to_pylist(), done.column("images").to_pylist()
    first, last = len(starts) // 5, 4 * len(starts) // 5
    return sum(images[first:last]) / (starts[last] - starts[first]), sum(images)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--images", type=int, default=20_000)
    parser.add_argument("--per-task", type=int, default=64)
    parser.add_argument("--cpus", type=int, default=64, help="CPUs Ray is told the machine has")
    parser.add_argument("--seconds", type=float, default=2.0, help="each read task's length")
    parser.add_argument(
        "--record", action="store_true", help="add the table to its section of benchmarks/RESULTS.md"
    )
    args = parser.parse_args()
    ray.init(num_cpus=args.cpus, include_dashboard=False, log_to_driver=False)
    ray.data.DataContext.get_current().enable_progress_bars = False
    one_block = _listing(args.images, args.images)
    feeds = {
        "a block per task (no split)": lambda: _listing(args.images, args.per_task),
        "Ray Data's repartition": lambda: one_block.repartition(target_num_rows_per_block=args.per_task),
        # on a copy of its own: `one_block` keeps Ray's bound for the feed above
        "read.split": lambda: read.split(one_block, args.per_task),
    }
    _rate(feeds["a block per task (no split)"](), args.seconds)  # starts Ray's workers
    measured: dict[str, list[float]] = {name: [] for name in feeds}
    # each feed once in order and once in reverse: a machine that speeds up or slows down over the minutes
    # of a run favours none of them
    for name in [*feeds, *reversed(feeds)]:
        rate, images = _rate(feeds[name](), args.seconds)
        assert images == args.images, f"{name}: {images} images of {args.images}"
        measured[name].append(rate)
        print(f"{name}: {rate:,.0f} images/s", flush=True)
    rates = {name: statistics.mean(runs) for name, runs in measured.items()}
    ceiling, default, ours = rates.values()
    lines = [
        f"### the split's feed, {args.images} images in one listing block, {args.per_task} per task, "
        f"{args.cpus} CPUs declared, tasks of {args.seconds} s ({time.strftime('%Y-%m-%d')})",
        "",
        "| feed | images/s (mean of two) | x Ray Data's repartition |",
        "|---|---|---|",
        *(f"| {name} | {rate:,.0f} | {rate / default:.2f} |" for name, rate in rates.items()),
    ]
    print("\n".join(lines))
    print(
        f"read.split / Ray Data's repartition: {ours / default:.2f}; read.split / no split: {ours / ceiling:.2f}"
    )
    if args.record:
        record(lines, "GPU")


if __name__ == "__main__":
    main()
