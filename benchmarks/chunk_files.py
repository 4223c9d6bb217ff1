"""A run's bookkeeping per chunk file, against the local S3 server (SeaweedFS on loopback):

    .venv/bin/python benchmarks/chunk_files.py --files 5000 [--record]

A run over 1B images leaves ~1M chunk files (one per write task). Writes N chunk files of a dead attempt
into an output, then times the steps whose cost grows with them: the first survey (each footer read, as a
resume does), a second survey (remembered), and the removal after the marker, side by side with the removal
one request per file (the code before `pipeline/deletion.py`), each on N files of its own. Prints one JSON
line of files per second for each step.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

if not __package__:
    sys.path[0] = str(Path(__file__).resolve().parents[1])

import pyarrow as pa

from benchmarks.common import record
from dinat_batch.infra.object_store import LocalObjectStore
from dinat_batch.pipeline.deletion import delete_files
from dinat_batch.pipeline.output import Output
from dinat_batch.pipeline.ownership import Ownership, write_table
from dinat_batch.pipeline.stages.write import chunk_name

MODEL = "0" * 64


def _chunks(output: Output, attempt: str, files: int) -> list[str]:
    """`files` chunk files of one row each, as a dead attempt of this output leaves them."""
    owner = Ownership("dead", MODEL, attempt, output.identity)
    table = pa.table({"key": ["s3://corpus/a.jpg"], "error": pa.array([None], pa.string())})
    paths = [f"{output.staging(attempt)}/{chunk_name(i, 1)}" for i in range(files)]
    with ThreadPoolExecutor(16) as pool:
        list(pool.map(lambda path: write_table(output.fs, path, table, owner), paths))
    return paths


def _timed(work) -> tuple[float, object]:
    start = time.monotonic()
    result = work()
    return time.monotonic() - start, result


def measure(files: int) -> dict:
    with LocalObjectStore() as store:
        store.make_bucket("bench")
        output = Output("s3://bench/out", store.storage_options)
        _chunks(output, "dead.0", files)
        first, survey = _timed(output.survey)
        second, _ = _timed(output.survey)
        assert len(survey.chunks["dead.0"]) == files and not survey.foreign
        one_by_one = _chunks(output, "dead.1", files)
        serial, _ = _timed(lambda: [output.fs.rm_file(path) for path in one_by_one])
        bulk, _ = _timed(lambda: delete_files(output.fs, survey.staged))
        output.fs.invalidate_cache()
        assert not [path for path in output.fs.find(output.path) if path.endswith(".parquet")]
    rate = {
        "first_survey": files / first,
        "second_survey": files / second,
        "removal_one_request_per_file": files / serial,
        "removal": files / bulk,
    }
    return {"files": files, "files_per_second": {step: round(value) for step, value in rate.items()}} | {
        "removal_ratio": round(serial / bulk, 2)
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--files", type=int, default=5000)
    parser.add_argument("--record", action="store_true", help="append the result to benchmarks/RESULTS.md")
    args = parser.parse_args()
    result = measure(args.files)
    print(json.dumps(result))
    if args.record:
        record([f"`chunk_files.py --files {args.files}`: `{json.dumps(result)}`"])


if __name__ == "__main__":
    main()
