"""The pipeline's efficiency: end-to-end images/s from the local object store to Parquet, against the bare
model loop on already-decoded tensors, same model, batch size, dtype and machine, in one run.

    .venv/bin/python benchmarks/pipeline.py [--images 1536] [--batch 16] [--dtype float32] [--record]

dinat-mini with random weights (speed does not depend on them); generated 500 x 375 JPEGs (a typical
photo size) in SeaweedFS on loopback. The bare loop runs first, alone on the machine; then the pipeline
runs on a fresh local Ray with every core. `--record` appends the table to benchmarks/RESULTS.md.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import io
import os
import sys
import tempfile
import time
import warnings
from pathlib import Path

if not __package__:
    # as a script, make the repository root importable for `benchmarks.common`
    sys.path[0] = str(Path(__file__).resolve().parents[1])

import numpy as np
import torch
from PIL import Image, ImageDraw

from benchmarks.common import machine, record
from dinat_batch.pipeline.images import decode, resized
from dinat_batch.pipeline.model import load_model
from dinat_batch.pipeline.model.export import random_model, save_checkpoint
from dinat_batch.pipeline.model.runtime import DTYPES, Runner

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
    folder: Path, data: list[bytes], batch: int, dtype: str, device: str = "cpu", **runner
) -> float:
    """images/s of the model runtime alone on pixels decoded beforehand (decoding not timed): the same
    `Runner` as the actors', fed host pixels."""
    model = load_model(str(folder), device=device)
    distinct = {d: resized(decode(d), model.preprocessing) for d in set(data)}  # the set repeats pictures
    pixels = np.stack([distinct[d] for d in data])
    run = Runner(model, DTYPES[dtype], batch_size=batch, **runner)
    run(pixels[:batch])  # warm-up
    start = time.perf_counter()
    run(pixels)
    return len(pixels) / (time.perf_counter() - start)


def pipeline_run(
    folder: Path, data: list[bytes], store: str = "s3", **config
) -> tuple[float, float, str, float]:
    """(images/s over the whole run() call, images/s after listing as the run summary reports, where JPEGs
    were decoded, seconds from the call to the first row the actors made: the run's fixed cost), reading
    from SeaweedFS (`s3`) or a local folder (`local`)."""
    import pyarrow.compute as pc
    import pyarrow.parquet as pq
    import ray

    from dinat_batch.infra.object_store import LocalObjectStore
    from dinat_batch.pipeline.output import Output
    from dinat_batch.pipeline.run import run

    with contextlib.ExitStack() as stack:
        if store == "s3":
            bucket = stack.enter_context(LocalObjectStore())
            bucket.make_bucket("bench")
            bucket.filesystem().pipe({f"bench/images/{i:06d}.jpg": d for i, d in enumerate(data)})
            where = {"input": "s3://bench/images/", "output": "s3://bench/out/"}
            where["storage_options"] = bucket.storage_options
        else:
            root = Path(stack.enter_context(tempfile.TemporaryDirectory()))
            (root / "images").mkdir()
            for i, d in enumerate(data):
                (root / "images" / f"{i:06d}.jpg").write_bytes(d)
            where = {"input": str(root / "images"), "output": str(root / "out")}
        ray.init(include_dashboard=False, logging_level="ERROR", num_cpus=os.cpu_count())
        stack.callback(ray.shutdown)
        called = dt.datetime.now(dt.UTC)
        start = time.perf_counter()
        summary = run(where | {"model": str(folder)} | config)
        wall = time.perf_counter() - start
        output = Output(where["output"], where.get("storage_options", {}))
        first = min(
            pc.min(pq.read_table(output.fs.open(path, "rb"), columns=["processed_at"]).column(0)).as_py()
            for path in output.committed_files()
        )
    assert summary.ok == len(data), summary
    return len(data) / wall, summary.images_per_second, summary.decode, (first - called).total_seconds()


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
        whole, steady, _, first_row = pipeline_run(folder, data, batch_size=args.batch, dtype=args.dtype)
    lines = [
        f"### pipeline, dinat-mini at 224, {args.images} JPEGs 500x375, batch {args.batch}, {args.dtype}, "
        f"{machine(torch.device('cpu'))}, {os.cpu_count()} cores",
        "",
        "| measured | images/s | x bare model loop |",
        "|---|---|---|",
        f"| bare model loop on decoded tensors | {bare:.1f} | 1.00 |",
        f"| pipeline, object store to Parquet, after listing (run summary) | {steady:.1f} | {steady / bare:.2f} |",
        f"| pipeline, whole run() call incl. model check, listing, actor start | {whole:.1f} | {whole / bare:.2f} |",
        "",
        f"Fixed cost: {first_row:.1f} s from the run() call to the first row the actors made (model check, "
        "listing, selection, actor start).",
    ]
    print("\n".join(lines))
    if args.record:
        record(lines)


if __name__ == "__main__":
    main()
