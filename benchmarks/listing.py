"""One big folder listed, against the local S3 server (SeaweedFS on loopback):

    .venv/bin/python benchmarks/listing.py --files 20000 [--record]

A folder of N objects listed two ways, side by side: by fsspec (`find` and `ls`, every entry at once, as
the pipeline did before `pipeline/listing.py`) and page by page (`pages`), each way twice, A B B A.
Recursively into listing rows, as an input's listing task does, and one level into entries, as a survey
of an output's chunk files does; then the same on a local disk (a temporary folder: `disk_...`). Prints
one JSON line: objects per second, and the peak of Python memory while listing, for each of the way's two
runs (tracemalloc; Arrow's buffers, ~100 bytes a listing row, are not in it). fsspec's peak grows with the
folder; that of the pages stays about one page's (~3 MB on S3).

Then the folder as a run's input (`list_objects`, in a local Ray), A B B A, through a proxy that answers
each request `LATENCY` late (a remote store's round trip; the loopback server answers in about a
millisecond): by one listing task, and cut by its names into parts for tasks side by side (`SPAN_ENTRIES`
at a sixteenth of the folder). Seconds, the requests each way made, and its largest block's rows.
"""

from __future__ import annotations

import os
import sys
import tempfile
import time
import tracemalloc
from pathlib import Path

if not __package__:
    sys.path[0] = str(Path(__file__).resolve().parents[1])

import pyarrow as pa
import ray
from fsspec.implementations.local import LocalFileSystem
from s3fs import S3FileSystem

from benchmarks.common import count_and_print
from dinat_batch.infra.object_store import LocalObjectStore
from dinat_batch.pipeline.listing import pages
from dinat_batch.pipeline.parallel import in_threads
from dinat_batch.pipeline.run import local_cpus
from dinat_batch.pipeline.stages import read
from dinat_batch.pipeline.stages.read import Spelling, _listing
from tests.fault_proxy import FaultProxy

FOLDER = "bench/corpus"
# S3 answers a ListObjectsV2 page of 1,000 keys in ~100 ms in its region (a request of one key in ~20 ms:
# the same delay for both is the cut's worst case, whose one-key requests are most of its own)
LATENCY = 0.1


def _rows_by_fsspec(fs, folder: str) -> int:
    return _listing(list(fs.find(folder, detail=True).values()), _spelling(fs), folder).num_rows


def _rows_by_pages(fs, folder: str) -> int:
    where = _spelling(fs)
    return pa.concat_tables(
        [_listing(page, where, folder) for page in pages(fs, folder, recursive=True)]
    ).num_rows


def _level_by_fsspec(fs, folder: str) -> int:
    return len([entry["name"] for entry in fs.ls(folder, detail=True)])


def _level_by_pages(fs, folder: str) -> int:
    return len([entry["name"] for page in pages(fs, folder, recursive=False) for entry in page])


def _spelling(fs) -> Spelling:
    return Spelling("s3" if isinstance(fs, S3FileSystem) else None)


def _measured(fs, folder: str, way, files: int) -> tuple[float, int]:
    """Seconds, and the peak of Python memory in bytes, of one listing from a cold cache."""
    fs.invalidate_cache()
    tracemalloc.start()
    start = time.monotonic()
    found = way(fs, folder)
    seconds = time.monotonic() - start
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    fs.invalidate_cache()
    assert found == files, (way.__name__, found)
    return seconds, peak


def _both_ways(fs, folder: str, files: int, store: str) -> dict:
    """Rows and one level, by fsspec and by pages, A B B A."""
    result = {}
    for step, fsspec_way, paged_way in (
        ("rows", _rows_by_fsspec, _rows_by_pages),
        ("one_level", _level_by_fsspec, _level_by_pages),
    ):
        step = f"{store}_{step}" if store != "s3" else step
        taken = {"fsspec": [], "pages": []}
        for way in ("fsspec", "pages", "pages", "fsspec"):
            taken[way].append(_measured(fs, folder, fsspec_way if way == "fsspec" else paged_way, files))
        for way, runs in taken.items():
            result[f"{step}_{way}"] = {
                "files_per_second": round(files * len(runs) / sum(seconds for seconds, _ in runs)),
                "peak_mb": [round(peak / 2**20, 1) for _, peak in runs],
            }
        result[f"{step}_speed_ratio"] = round(
            result[f"{step}_pages"]["files_per_second"] / result[f"{step}_fsspec"]["files_per_second"], 2
        )
    return result


def _name(i: int) -> str:
    return f"{i:09d}-{i * 7919 % 10007:05d}.jpg"


def _as_input(options: dict, proxy: FaultProxy, files: int, span_entries: int) -> tuple[float, int, int]:
    """Seconds and requests to list the folder as a run's input, its spans cut past `span_entries`, and
    the rows of its largest block (a listing task's)."""
    read.SPAN_ENTRIES = span_entries  # the driver hands it to the listing tasks
    start, before = time.monotonic(), proxy.requests
    listed = read.list_objects(f"s3://{FOLDER}", options)
    seconds = time.monotonic() - start
    blocks = [
        entry.metadata.num_rows for bundle in listed.iter_internal_ref_bundles() for entry in bundle.blocks
    ]
    assert sum(blocks) == files, (span_entries, sum(blocks))
    return seconds, proxy.requests - before, max(blocks)


def measure(files: int) -> dict:
    with LocalObjectStore() as store:
        store.make_bucket("bench")
        fs = store.filesystem()
        in_threads(lambda i: fs.pipe_file(f"{FOLDER}/{_name(i)}", b"x"), range(files))
        result = {"files": files} | _both_ways(fs, FOLDER, files, "s3")
        with tempfile.TemporaryDirectory() as disk:
            folder = f"{disk}/corpus"
            os.mkdir(folder)
            for i in range(files):
                Path(folder, _name(i)).write_bytes(b"x")
            result |= _both_ways(LocalFileSystem(), folder, files, "disk")
        ray.init(address="local", num_cpus=local_cpus(), include_dashboard=False, logging_level="ERROR")
        try:
            with FaultProxy(store.endpoint, latency=LATENCY) as proxy:
                client = store.storage_options["client_kwargs"] | {"endpoint_url": proxy.endpoint}
                options = store.storage_options | {"client_kwargs": client}
                taken = {"one_task": [], "cut": []}
                for way in ("one_task", "cut", "cut", "one_task"):
                    span = files + 1 if way == "one_task" else files // 16
                    taken[way].append(_as_input(options, proxy, files, span))
        finally:
            ray.shutdown()
        for way, runs in taken.items():
            result[f"input_{way}"] = {
                "files_per_second": round(files * len(runs) / sum(seconds for seconds, _, _ in runs)),
                "seconds": [round(seconds, 1) for seconds, _, _ in runs],
                "requests": [requests for _, requests, _ in runs],
                "largest_block_rows": max(rows for _, _, rows in runs),
            }
        result["input_speed_ratio"] = round(
            result["input_cut"]["files_per_second"] / result["input_one_task"]["files_per_second"], 2
        )
        result["latency_s"] = LATENCY
    return result


def main() -> None:
    count_and_print(__doc__, "listing.py", "files", 20000, measure)


if __name__ == "__main__":
    main()
