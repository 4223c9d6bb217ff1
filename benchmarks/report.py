"""How long `dinat-batch report` takes on a big output.

    .venv/bin/python benchmarks/report.py --rows 1000000 [--dim 512] [--record]

Writes a synthetic committed Parquet output of N rows (dinat-mini's 512-d embeddings, 1,000 labels with
a skewed distribution, 1% error rows, timestamps over an hour) in files of 100k rows, then builds the
report of it and prints one JSON line: rows, seconds to build, the page's size. The inputs the keys name
do not exist, so thumbnails are tried and skipped: the time is the reading, the aggregates, the map and
the neighbours. Target on this 2-core machine: under a minute at 1M rows.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import sys
import tempfile
import time
from pathlib import Path

if not __package__:
    sys.path[0] = str(Path(__file__).resolve().parents[1])

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from benchmarks.common import record
from dinat_batch.pipeline.report import build
from dinat_batch.pipeline.stages.write import output_schema

FILE_ROWS = 100_000


def synthetic_output(folder: Path, rows: int, dim: int) -> None:
    """A committed output of `rows` rows, written file by file, with the `_SUCCESS` a run writes."""
    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    start = dt.datetime(2026, 11, 29, tzinfo=dt.UTC)
    files = []
    for index, first in enumerate(range(0, rows, FILE_ROWS)):
        n = min(FILE_ROWS, rows - first)
        ok = rng.random(n) > 0.01
        top = np.minimum(rng.zipf(1.3, n), 1000) - 1
        labels = pa.array(
            [
                [f"label-{t}", f"label-{(t + 1) % 1000}"] if good else None
                for t, good in zip(top, ok, strict=True)
            ]
        )
        scores = pa.array(
            [[float(s), float(s) / 2] if good else None for s, good in zip(rng.random(n), ok, strict=True)],
            pa.list_(pa.float32()),
        )
        vectors = pa.FixedSizeListArray.from_arrays(pa.array(rng.standard_normal(n * dim, np.float32)), dim)
        table = pa.table(
            {
                "key": [f"/nonexistent/in/{first + i:09d}.jpg" for i in range(n)],
                "status": ["ok" if good else "error" for good in ok],
                "error": [None if good else "ImageDecodeError(undecodable): synthetic" for good in ok],
                "label_ids": pa.array(
                    [[int(t), int(t) + 1] if good else None for t, good in zip(top, ok, strict=True)],
                    pa.list_(pa.int32()),
                ),
                "labels": labels,
                "scores": scores,
                "embedding": vectors,
                "width": pa.array(np.full(n, 640), pa.int32()),
                "height": pa.array(np.full(n, 480), pa.int32()),
                "model": ["shi-labs/dinat-mini-in1k-224"] * n,
                "model_sha256": ["0" * 64] * n,
                "run_id": ["synthetic"] * n,
                "processed_at": pa.array(
                    [start + dt.timedelta(seconds=float(s)) for s in np.sort(rng.random(n) * 3600)],
                    pa.timestamp("us", tz="UTC"),
                ),
            },
            schema=output_schema(dim),
        )
        name = f"part-synthetic-{index:05d}.parquet"
        pq.write_table(table, folder / name)
        files.append({"name": name, "rows": n, "bytes": (folder / name).stat().st_size})
    manifest = {
        "run_id": "synthetic",
        "images": rows,
        "ok": rows,
        "errors": 0,
        "errors_by_kind": {},
        "model": "shi-labs/dinat-mini-in1k-224",
        "model_sha256": "0" * 64,
        "seconds": 3600,
        "config": {"input": "/nonexistent/in", "output": str(folder)},
        "files": files,
    }
    (folder / "_SUCCESS").write_text(json.dumps(manifest))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=1_000_000)
    parser.add_argument("--dim", type=int, default=512)
    parser.add_argument(
        "--record", action="store_true", help="add the result to its section of benchmarks/RESULTS.md"
    )
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        output = Path(tmp) / "out"
        synthetic_output(output, args.rows, args.dim)
        started = time.perf_counter()
        page = build(str(output), Path(tmp) / "report.html")
        seconds = time.perf_counter() - started
        result = {
            "rows": args.rows,
            "dim": args.dim,
            "seconds": round(seconds, 2),
            "page_mb": round(page.stat().st_size / 2**20, 2),
        }
    print(json.dumps(result))
    if args.record:
        record(
            [
                f"report over {args.rows:,} rows ({args.dim}-d embeddings): {seconds:.1f} s, page "
                f"{result['page_mb']} MB ({dt.date.today()}, `benchmarks/report.py`)"
            ],
            "The report over a big output",
        )


if __name__ == "__main__":
    main()
