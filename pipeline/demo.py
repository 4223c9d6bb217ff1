"""`dinat-batch demo`: the whole product on one machine, started and stopped in one command.

A local S3 server (SeaweedFS on loopback) and a local Ray; generated sample images plus broken files are
uploaded; the pipeline classifies them from s3:// into a Parquet table in the same store; a few top-5
lists and a DuckDB query are printed from that table. Nothing is downloaded but the model, and only when
the hub is reachable.
"""

from __future__ import annotations

import io
import os
import socket
import tempfile
from collections.abc import Callable
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from dinat_batch.pipeline.config import DEFAULT_MODEL, RunConfig
from dinat_batch.pipeline.query import SUMMARY

BUCKET = "demo"
REPORT = "demo-report.html"  # written to the current folder
RANDOM_MODEL = f"s3://{BUCKET}/models/dinat-mini-RANDOM-WEIGHTS"


_QUERIES = (
    "SELECT status, count(*) AS images FROM predictions GROUP BY status ORDER BY status",
    "SELECT key, error FROM predictions WHERE status = 'error' ORDER BY key",
    SUMMARY["top labels"],
)


def demo_images(count: int = 24) -> dict[str, bytes]:
    """Generated pictures (JPEG and PNG, several sizes) plus three broken files; nothing is downloaded."""
    rng = np.random.default_rng(0)
    images: dict[str, bytes] = {}
    for n in range(count):
        image = Image.new("RGB", (320 + 8 * n, 240), tuple(int(c) for c in rng.integers(0, 256, 3)))
        draw = ImageDraw.Draw(image)
        for _ in range(12):
            x, y = (int(v) for v in rng.integers(0, 300, 2))
            draw.ellipse((x, y, x + 60, y + 40), fill=tuple(int(c) for c in rng.integers(0, 256, 3)))
        buf = io.BytesIO()
        fmt = "JPEG" if n % 2 == 0 else "PNG"
        image.save(buf, format=fmt)
        images[f"photo-{n:02d}.{fmt.lower().replace('jpeg', 'jpg')}"] = buf.getvalue()
    images["empty.jpg"] = b""
    images["text-pretending.jpg"] = b"this is not an image"
    images["truncated.jpg"] = images["photo-00.jpg"][:700]
    return images


def _model(store, echo: Callable[[str], None], offline: bool) -> str:
    """The real dinat-mini when the hub (or its cache) has it; otherwise random weights, said plainly and
    named so in the output's `model` column."""
    from dinat_batch.pipeline.model import ModelLoadError
    from dinat_batch.pipeline.model.export import random_model, save_checkpoint
    from dinat_batch.pipeline.model.files import resolve

    where = (
        "in the local cache (huggingface.co is not reachable from here)"
        if offline
        else "on the Hugging Face hub"
    )
    echo(f"looking for {DEFAULT_MODEL} {where} ...")
    try:
        resolve(DEFAULT_MODEL)  # the files, into the hub cache; the run loads (and checks) the model itself
        return DEFAULT_MODEL
    except ModelLoadError as err:
        echo(
            f"note: {DEFAULT_MODEL} is not reachable ({str(err).split('. Pass')[0]}).\n"
            "      Continuing with a RANDOMLY INITIALISED dinat-mini: its labels below are meaningless."
        )
    with tempfile.TemporaryDirectory(prefix="dinat-demo-") as tmp:
        folder = save_checkpoint(random_model("dinat-mini-in1k-224"), f"{tmp}/model")
        store.filesystem().put(f"{folder}/", f"{BUCKET}/models/dinat-mini-RANDOM-WEIGHTS/", recursive=True)
    return RANDOM_MODEL


def _hub_reachable(timeout: float = 3.0) -> bool:
    try:
        socket.create_connection(("huggingface.co", 443), timeout).close()
        return True
    except OSError:
        return False


def run_demo(echo: Callable[[str], None] = print) -> None:
    import ray

    from dinat_batch.infra.object_store import LocalObjectStore
    from dinat_batch.pipeline.query import read_output, sql
    from dinat_batch.pipeline.report import build
    from dinat_batch.pipeline.run import local_cpus, run

    offline = not _hub_reachable()
    if offline:
        # huggingface_hub would retry for ~25 s per call, in the driver and again in every actor; offline
        # it answers from its cache at once. Set before Ray starts so that its workers inherit it.
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
    with LocalObjectStore() as store:
        echo(f"local S3 (SeaweedFS) on {store.endpoint}, loopback only, generated credentials")
        ray.init(address="local", include_dashboard=False, logging_level="ERROR", num_cpus=local_cpus())
        try:
            store.make_bucket(BUCKET)
            fs = store.filesystem()
            images = demo_images()
            for name, data in images.items():
                fs.pipe(f"{BUCKET}/images/{name}", data)
            echo(f"uploaded {len(images)} images (3 of them broken on purpose) to s3://{BUCKET}/images/")
            config = RunConfig(
                input=f"s3://{BUCKET}/images/",
                output=f"s3://{BUCKET}/predictions/",
                model=_model(store, echo, offline),
                batch_size=8,
                storage_options=store.storage_options,
            )
            summary = run(config)
            echo(
                f"\nrun {summary.run_id}: {summary.images} images, {summary.ok} ok, {summary.errors} errors, "
                f"{summary.images_per_second:.1f} images/s -> {summary.output}\n"
            )
            table = read_output(config.output, store.storage_options)
            first = "SELECT key, labels, scores FROM predictions WHERE status = 'ok' ORDER BY key LIMIT 3"
            for key, labels, scores in sql(table, first).fetchall():
                echo(key)
                for label, score in zip(labels, scores, strict=True):
                    echo(f"  {score:7.4f}  {label}")
            echo(f"\nDuckDB over the output table ({table.num_rows} rows):")
            for query in _QUERIES:
                echo(f"> {query}")
                echo(str(sql(table, query)))
            # while the store still serves the images that the report's thumbnails show
            page = build(config.output, Path(REPORT), store.storage_options)
            echo(f"\nreport (one HTML page, opens offline): {page.resolve()}")
        finally:
            ray.shutdown()
