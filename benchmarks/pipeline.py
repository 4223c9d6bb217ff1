"""The pipeline's efficiency: end-to-end images/s from the local object store to Parquet, against the bare
model loop on already-decoded tensors, same model, batch size, dtype and machine, in one run.

    .venv/bin/python benchmarks/pipeline.py [--images 1536] [--batch 16] [--dtype float32] [--record]

dinat-mini with random weights (speed does not depend on them); generated 500 x 375 JPEGs (a typical
photo size) in SeaweedFS on loopback. The bare loop runs first, alone on the machine; then the pipeline
runs on a fresh local Ray with every core. `--record` adds the table to its section of benchmarks/RESULTS.md.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import io
import os
import re
import statistics
import sys
import tempfile
import time
import warnings
from collections import Counter
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, NamedTuple

if not __package__:
    # as a script, make the repository root importable for `benchmarks.common`
    sys.path[0] = str(Path(__file__).resolve().parents[1])

import numpy as np
import pyarrow as pa
import torch
from PIL import Image, ImageDraw

from benchmarks.common import machine, record
from dinat_batch.pipeline.images import decode, resized
from dinat_batch.pipeline.model import load_model
from dinat_batch.pipeline.model.export import random_model, save_checkpoint
from dinat_batch.pipeline.model.runtime import DTYPES, Runner, hold_freed_memory

DISTINCT = 32  # distinct pictures; the set repeats them under other names


def photos(count: int) -> list[bytes]:
    rng = np.random.default_rng(0)
    distinct = []
    for _ in range(DISTINCT):
        image = Image.new("RGB", (500, 375), tuple(int(c) for c in rng.integers(0, 256, 3)))
        draw = ImageDraw.Draw(image)
        for _ in range(40):
            x, y = (int(v) for v in rng.integers(0, 460, 2))
            draw.ellipse((x, y, x + 80, y + 50), fill=tuple(int(c) for c in rng.integers(0, 256, 3)))
        buf = io.BytesIO()
        image.save(buf, format="JPEG", quality=90)
        distinct.append(buf.getvalue())
    return [distinct[i % DISTINCT] for i in range(count)]


def bare_loop(
    folder: Path, data: list[bytes], batch: int, dtype: str, device: str = "cpu", lanes: int = 1, **runner
) -> float:
    """images/s of the model runtime alone on pixels decoded beforehand (decoding not timed): the same
    `Runner` as the actors', fed host pixels; `lanes` > 1: that many loops side by side on threads of one
    torch thread each, over a share of the pixels each, as a CPU actor runs its lanes (`infer.Actors`), and
    holding the memory it frees, as a CPU actor does."""
    if device == "cpu":
        hold_freed_memory()
    model = load_model(str(folder), device=device)
    distinct = {d: resized(decode(d), model.preprocessing) for d in set(data)}  # the set repeats pictures
    pixels = np.stack([distinct[d] for d in data])
    run = Runner(model, DTYPES[dtype], batch_size=batch, **runner)
    shares = np.array_split(pixels, lanes)
    threads = {"initializer": torch.set_num_threads, "initargs": (1,)} if lanes > 1 else {}
    with ThreadPoolExecutor(lanes, **threads) as loops:
        list(loops.map(run, [share[:batch] for share in shares]))  # warm-up
        start = time.perf_counter()
        list(loops.map(run, shares))
        return len(pixels) / (time.perf_counter() - start)


class Measured(NamedTuple):
    """One pipeline run, from its summary and its output rows."""

    whole: float  # images/s over the whole run() call
    after_listing: float  # images/s after listing, as the run summary reports
    actors: float  # images/s while the actors made rows: from their first batch's rows to their last
    decode: str  # where JPEGs were decoded: cpu, gpu, or gpu with the share it decoded
    first_row: float  # seconds from the call to the first row the actors made: the run's fixed cost
    stages: str  # what Ray Data's executor logged of each stage during the run (see `stage_log`)


def pipeline_runs(
    folder: Path,
    data: list[bytes],
    configs: list[tuple[dict[str, Any], Callable[[], Any]]],
    store: str = "s3",
) -> Iterator[Measured]:
    """Runs each `(config, setting)` on the same inputs in SeaweedFS (`s3`) or a local folder (`local`), one
    local Ray with every core this process may use, for all of them, each into an output of its own; `setting()` is a context
    manager that the run happens inside (what a variant changes in this process). Yields each run's
    measures as it ends."""
    import pyarrow.compute as pc
    import pyarrow.parquet as pq
    import ray
    from ray.data._internal.execution import streaming_executor

    from dinat_batch.infra.object_store import LocalObjectStore
    from dinat_batch.pipeline.output import Output
    from dinat_batch.pipeline.run import run

    # the executor logs each stage's tasks, queue, budget and backpressure every 5 s: too few samples for a
    # run of seconds (a private constant, read at each step of the driver's executor loop)
    with contextlib.ExitStack() as stack:
        stack.callback(
            setattr,
            streaming_executor,
            "DEBUG_LOG_INTERVAL_SECONDS",
            streaming_executor.DEBUG_LOG_INTERVAL_SECONDS,
        )
        streaming_executor.DEBUG_LOG_INTERVAL_SECONDS = 0.5
        if store == "s3":
            bucket = stack.enter_context(LocalObjectStore())
            bucket.make_bucket("bench")
            bucket.filesystem().pipe({f"bench/images/{i:06d}.jpg": d for i, d in enumerate(data)})
            where = {"input": "s3://bench/images/", "storage_options": bucket.storage_options}
            output_root = "s3://bench/out"
        else:
            root = Path(stack.enter_context(tempfile.TemporaryDirectory()))
            (root / "images").mkdir()
            for i, d in enumerate(data):
                (root / "images" / f"{i:06d}.jpg").write_bytes(d)
            where = {"input": str(root / "images")}
            output_root = str(root / "out")
        ray.init(include_dashboard=False, logging_level="ERROR", num_cpus=len(os.sched_getaffinity(0)))
        stack.callback(ray.shutdown)
        for n, (config, setting) in enumerate(configs):
            output = f"{output_root}/{n}"
            called, start = dt.datetime.now(dt.UTC), time.perf_counter()
            with setting():  # `config` may name another model than `folder`
                summary = run(where | {"output": output, "model": str(folder)} | config)
            wall = time.perf_counter() - start
            assert summary.ok == len(data), summary
            files = Output(output, where.get("storage_options", {}))
            made = pc.value_counts(
                pa.concat_arrays(
                    [
                        pq.read_table(files.fs.open(path, "rb"), columns=["processed_at"])
                        .column(0)
                        .combine_chunks()
                        for path in files.committed_files()
                    ]
                )
            )
            times = sorted((row["values"], row["counts"]) for row in made.to_pylist())
            span = (times[-1][0] - times[0][0]).total_seconds()
            after_first = sum(count for _, count in times[1:])
            yield Measured(
                len(data) / wall,
                summary.images_per_second,
                after_first / span if span > 0 else float("nan"),
                f"{summary.decode}, {summary.device_decode_share:.0%}"
                if 0 < summary.device_decode_share < 1
                else summary.decode,
                (times[0][0] - called).total_seconds(),
                stage_log(start_time=called.timestamp()),
            )


def stage_log(start_time: float) -> str:
    """What Ray Data's executor logged of each stage of the newest execution that ran the inference actors
    and began after `start_time` (epoch seconds): per stage, the median and most tasks (actors: calls in
    flight), the median queued blocks, and the share of samples held back by each backpressure policy.
    Empty when there is no such log."""
    import ray

    logs = Path(ray._private.worker._global_node.get_logs_dir_path()) / "ray-data"
    candidates = {
        path.stat().st_mtime: text
        for path in logs.glob("ray-data-dataset_*.log")
        if path.stat().st_mtime >= start_time
        and "MapBatches(Predictor)" in (text := path.read_text(errors="replace"))
    }
    if not candidates:
        return ""
    text = candidates[max(candidates)]
    samples: dict[str, list[tuple[int, int, list[str]]]] = {}
    for line in text.splitlines():
        found = _STAGE_LINE.search(line)
        if found:
            reasons = _BACKPRESSURE.findall(found["state"] or "")
            samples.setdefault(found["stage"], []).append(
                (int(found["tasks"]), int(found["queued"]), reasons)
            )
    parts = []
    for stage, rows in samples.items():
        tasks = [row[0] for row in rows]
        queued = [row[1] for row in rows]
        held = Counter(reason for row in rows for reason in set(row[2]))
        parts.append(
            f"{stage.split('->')[-1]}: tasks median {statistics.median(tasks):.0f} max {max(tasks)}, queued "
            f"blocks median {statistics.median(queued):.0f}"
            + "".join(f", {reason} {count / len(rows):.0%}" for reason, count in held.most_common())
            + f" ({len(rows)} samples)"
        )
    return "; ".join(parts)


_STAGE_LINE = re.compile(
    r"-- \d+: (?P<stage>\S+) - Tasks: (?P<tasks>\d+)(?P<state> \[[^\]]*\])?;.*?Queued blocks: (?P<queued>\d+)"
)
_BACKPRESSURE = re.compile(r"(\w+\(\w+\))")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=1536)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--dtype", default="float32", choices=sorted(DTYPES))
    parser.add_argument("--record", action="store_true")
    args = parser.parse_args()
    warnings.filterwarnings("ignore")
    data = photos(args.images)
    with tempfile.TemporaryDirectory() as tmp:
        folder = save_checkpoint(random_model("dinat-mini-in1k-224"), Path(tmp) / "dinat-mini")
        bare = bare_loop(folder, data, args.batch, args.dtype)
        print(f"bare model loop: {bare:.1f} images/s", flush=True)
        cores = len(os.sched_getaffinity(0))
        lanes = bare_loop(folder, data, args.batch, args.dtype, lanes=cores)
        print(f"bare model loops, one a core: {lanes:.1f} images/s", flush=True)
        (measured,) = pipeline_runs(
            folder, data, [({"batch_size": args.batch, "dtype": args.dtype}, contextlib.nullcontext)]
        )
    lines = [
        f"### pipeline, dinat-mini at 224, {args.images} JPEGs 500x375, batch {args.batch}, {args.dtype}, "
        f"{machine(torch.device('cpu'))}, {os.cpu_count()} cores",
        "",
        "| measured | images/s | x bare model loop |",
        "|---|---|---|",
        f"| bare model loop on decoded tensors | {bare:.1f} | 1.00 |",
        f"| bare model loops on decoded tensors, {cores} side by side of one thread each (the actor's lanes) "
        f"| {lanes:.1f} | {lanes / bare:.2f} |",
        f"| pipeline, while the actors made rows | {measured.actors:.1f} | {measured.actors / bare:.2f} |",
        f"| pipeline, object store to Parquet, after listing (run summary) | {measured.after_listing:.1f} | "
        f"{measured.after_listing / bare:.2f} |",
        f"| pipeline, whole run() call incl. model check, listing, actor start | {measured.whole:.1f} | "
        f"{measured.whole / bare:.2f} |",
        "",
        f"Fixed cost: {measured.first_row:.1f} s from the run() call to the first row the actors made (model check, "
        "listing, selection, actor start). Against the loops side by side, the pipeline after listing runs at "
        f"{measured.after_listing / lanes:.2f}.",
    ]
    print("\n".join(lines))
    if args.record:
        record(lines, "Pipeline")


if __name__ == "__main__":
    main()
